"""A conversation's replies: sampling, the ReplyStream of each reply, and what the conversation
records when a reply ends (see reply_stream.py). Mixed into conversation.Conversation."""

from __future__ import annotations

import time

import numpy as np

from . import chat_api
from .engine import SessionError
from .reply_stream import ReplyStream
from ..bindings import sampling


class Replying:
    def _sample(self, logits: np.ndarray) -> int:
        return (self._reply_sampler or self.sampler).sample(logits)

    def reply(self, max_tokens: int | None = None, params: sampling.SamplingParams | None = None,
              stop: list[str] | tuple[str, ...] = (), response_format: dict | None = None):
        """Generate the assistant's reply, yielding text pieces as they come: at most `max_tokens`
        (default the session's max_reply), drawn with `params` for this reply only (default the
        session's sampler), ended before the first of the `stop` strings (which it leaves out).
        `finish_reason` then says "stop" (end of generation or a stop string) or "length".

        Stopping early -- closing the generator, Ctrl-C, an exception anywhere, or starting the
        next turn while it is suspended -- keeps what was generated as the reply, and leaves cache,
        positions, labels and messages consistent: the next turn continues as if the reply had
        ended there. (After a stop string the cache keeps the tokens that spelled it.)"""
        if response_format is not None:  # OpenAI's: a grammar for this reply (chat_api.grammar_for)
            try:
                grammar = chat_api.grammar_for(response_format)
            except chat_api.FormatError as e:
                raise SessionError(str(e)) from None
            params = (params or self.engine.sampling).override(grammar=grammar)
        return self.generate(self.reply_stream(max_tokens, params, stop))

    def generate(self, stream: ReplyStream):
        """A ReplyStream's text pieces as a generator, each token decoded alone; the conversation
        owns it (the next turn closes it, as `reply`'s)."""
        gen = self._generate(stream)
        self._active_reply = gen
        return gen

    def reply_stream(self, max_tokens: int | None = None, params: sampling.SamplingParams | None = None,
                     stop: list[str] | tuple[str, ...] = (), logprobs: int | None = None,
                     hide_from: str | None = None) -> ReplyStream:
        """The reply as a ReplyStream (see `reply` for the arguments): its owner decodes each
        token, alone or in a batch with other sequences' (serve's worker). `logprobs`: record each
        token's log probability and that many most probable alternatives; `hide_from`: text
        from this string on is not shown (a tool call's opening; ReplyStream)."""
        self._finish_reply()
        if self.last_logits is None:
            raise SessionError("no user turn to reply to")
        if params is not None:
            try:
                params.check()
            except sampling.SamplingError as e:
                raise SessionError(str(e)) from None
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise SessionError(f"max_tokens {max_tokens!r} must be an integer >= 1")
        if any(not isinstance(s, str) or not s for s in stop):
            raise SessionError("each stop string must be a non-empty string")
        try:
            self._reply_sampler = None if params is None else sampling.Sampler(
                self.model.n_vocab, params, banned=self.model.end_of_generation_tokens() if params.ignore_eos else None,
                vocab=self.model.vocab)
        except sampling.SamplingError as e:
            raise SessionError(str(e)) from None
        if self._reply_sampler is None and self.engine.sampling.grammar is not None:
            self.sampler.reset()  # the session's grammar starts at its root for every reply
        stream = ReplyStream(self, max_tokens or self.max_reply, tuple(stop), logprobs, hide_from)
        self.last_logits, self.finish_reason = None, "length"
        self._active_stream = stream
        return stream

    def _finish_reply(self) -> None:
        """Make the context this call's: close a reply generator that was left suspended (its
        `finally` records the reply) and stop a background merge at its next chunk boundary."""
        gen, self._active_reply = self._active_reply, None
        stream, self._active_stream = self._active_stream, None
        if gen is not None:
            gen.close()
        if stream is not None:
            stream.close()
        self.stop_background_merge()

    def _generate(self, stream: ReplyStream):
        """Conversation.reply's generator: the stream's tokens decoded one at a time."""
        try:
            while True:
                tok = stream.next_token()
                if tok is None:
                    break
                piece = stream.accept(tok, self.ctx.decode([tok], self.pos, self.seq_id))
                if piece:
                    yield piece
                if stream.done:
                    break
            rest = stream.tail()
            if rest:
                yield rest
        finally:
            stream.close()

    def _release_reply(self, stream: ReplyStream) -> None:
        if self._active_stream is stream:
            self._active_stream = self._active_reply = None
        if self._reply_sampler is not None:
            self._reply_sampler.close()
            self._reply_sampler = None

    def _reply_abandoned(self, stream: ReplyStream) -> None:
        """A reply closed before its first token: the turn can still be replied to."""
        self._release_reply(stream)
        self.last_logits, self.finish_reason = stream.logits, None

    def _took_token(self) -> None:
        """The reply's token was decoded at self.pos."""
        self.pos += 1

    def _reply_ended(self, stream: ReplyStream, text: str, generated: list[int], seconds: float) -> None:
        """The reply `stream` ended with `text` (its tokens `generated`): it becomes the conversation's."""
        # A stop that lands between a token's decode and its bookkeeping leaves that token in the
        # cache at self.pos: drop it, so the cache ends exactly where positions and text do.
        self.ctx.truncate(self.pos, self.seq_id)
        self._release_reply(stream)
        self.finish_reason = stream.finish_reason
        self.stats.decode_seconds += seconds
        self.stats.generated_tokens += len(generated)
        self.labels_by_pos = np.concatenate([self.labels_by_pos, np.full(len(generated), self.labels("text"), np.int32)])
        self.tokens_by_pos = np.concatenate([self.tokens_by_pos, np.asarray(generated, np.int32)])
        keys = self._keys
        if self.continues:  # the reply continues the last assistant message: they are one message
            self.continues = False
            text_so_far = self.messages[-1][1] + text
            self.messages, keys = self.messages[:-1], keys[:-1] if keys else keys
        else:
            text_so_far = text
        self.messages = self.messages + [("assistant", text_so_far)]
        self.cached_text += text
        self.last_reply_tokens = len(generated)
        if keys is not None:  # as chat_api keys the reply when a client sends it back
            content, calls = self.tool_family.parse(text_so_far) if self.tool_family else (text_so_far, [])
            self._keys = keys + [chat_api.assistant_key(content, calls) if calls else ("assistant", text_so_far, ())]
        self.idle_since = time.monotonic()
        self._after_reply()

    def _after_reply(self) -> None:
        """The hook for the owner of the context once a reply has ended: a Session merges in the
        background here; the server's worker merges idle slots in its own idle steps."""

    def chat(self, text: str, images: list | tuple = ()) -> str:
        self.add_user_turn(text, images)
        return "".join(self.reply())
