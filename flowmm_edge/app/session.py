"""A chat session: an engine with one conversation, the whole KV buffer its own.

    with Session(budget=0.25, n_ctx=2048) as s:        # the embedded default model
        s.add_user_turn("What is in this picture?", images=["cat.png"])
        for piece in s.reply():
            print(piece, end="")

`Session(...)` takes the engine's settings (engine.Engine) and is the conversation
(conversation.Conversation): turns, replies, `create_chat_completion`, save and load. Closing it
closes the engine.
"""

from __future__ import annotations

from .conversation import MEDIA, Conversation, SessionStats
from .engine import DEFAULT_SYSTEM, MIN_CTX, Engine, SessionError, available_memory, check_settings

__all__ = ["DEFAULT_SYSTEM", "MEDIA", "MIN_CTX", "Session", "SessionError", "SessionStats", "available_memory",
           "check_settings"]


class Session(Conversation):
    def __init__(self, *args, **kwargs):
        if kwargs.get("n_slots", 1) != 1:
            raise SessionError("a Session is one conversation: use Engine(n_slots=...) and Conversations")
        engine = Engine(*args, **kwargs)
        try:
            super().__init__(engine, 0)
        except BaseException:
            engine.close()
            raise
        self.background = True  # the terminal chat's idle time merges: reply first, merge while the user reads

    def _after_reply(self) -> None:
        """The merge schedule's idle merge, on a thread of its own while the user reads and types."""
        if self.background:
            delay = self.engine.merge_schedule.idle_delay(self)
            if delay is not None:
                self.merge_in_background(delay)

    def close(self) -> None:
        super().close()
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
