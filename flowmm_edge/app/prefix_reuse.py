"""llama-cpp-python's and OpenAI's view of a conversation: `create_chat_completion` over the
whole message list, decoding only what the cache does not hold yet (llama-server's
cache_prompt), and which slot holds a request's prefix. Mixed into conversation.Conversation."""

from __future__ import annotations

import os

from pathlib import Path

from . import chat_api
from .chat_template import message_text
from .engine import TemplateRerenders


class PrefixReuse:
    def create_chat_completion(self, messages: list[dict], max_tokens: int | None = None,
                               temperature: float | None = None, top_p: float | None = None,
                               top_k: int | None = None, min_p: float | None = None,
                               repeat_penalty: float | None = None, seed: int | None = None,
                               stop: str | list[str] | None = None, stream: bool = False,
                               response_format: dict | None = None, tools: list | None = None, tool_choice=None,
                               logprobs: bool | None = None, top_logprobs: int | None = None):
        """llama-cpp-python's `Llama.create_chat_completion` on this session: `messages` is the
        whole conversation (OpenAI's shape, chat_api), and the reply a `chat.completion` dict, or
        with stream=True an iterator of `chat.completion.chunk` dicts. A conversation that extends
        the one in the cache decodes only its new messages (llama-server's cache_prompt); any
        other starts afresh; `usage.prompt_tokens_details.cached_tokens` says how many prompt
        positions the cache held already (OpenAI's field). Sampling settings left None are the
        session's; `response_format`, `tools`/`tool_choice` and `logprobs`/`top_logprobs` as
        `serve` takes them (docs/USAGE.md). The caller names local image files freely (it is this
        process)."""
        return chat_api.create_chat_completion(
            self, messages, chat_api.MediaPolicy(Path("/"), self.engine.max_image_bytes), max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repeat_penalty=repeat_penalty,
            seed=seed, stop=stop, stream=stream, response_format=response_format, tools=tools,
            tool_choice=tool_choice, logprobs=logprobs, top_logprobs=top_logprobs)

    def feed_raw(self, prompt: str, reuse: bool = True) -> tuple[int, int]:
        """Bring the cache to a completions prompt (no chat template): keep what it holds when the
        prompt extends its text (an earlier prompt and its reply), else start afresh, keeping the
        cells of its same first tokens; decode the rest. `reuse` False: keep nothing (serve's
        cache_prompt). Returns (positions the cache held already, positions decoded now)."""
        self._finish_reply()
        self.reused = 0
        if self.tools is not None:
            self.use_tools(None)
        if not reuse or not self.holds_raw_prefix(prompt):
            self.reset(reuse=reuse)
            self.raw = True
        held = self.pos
        try:
            decoded = self.add_raw_text(prompt[len(self.cached_text):])
        finally:
            self._drop_reusable()
        return held + self.reused, decoded - self.reused

    def holds_raw_prefix(self, prompt: str) -> bool:
        """Whether the cache holds a completions prompt's beginning (and it goes on from there)."""
        return self.raw and 0 < len(self.cached_text) < len(prompt) and prompt.startswith(self.cached_text)

    def held_prefix(self, keys: list) -> int:
        """How many of a request's turn keys (chat_api.Turn.key) the cache holds as its beginning,
        when the request extends them (0: it would start afresh)."""
        own = self._keys
        return len(own) if own and len(own) < len(keys) and keys[:len(own)] == own else 0

    def shared_start(self, keys: list | None, raw: str | None = None) -> int:
        """For a request that would start afresh here: how much of its beginning it shares with
        what the cache holds, in first turns (turn keys) or, for a completions prompt, in
        characters, where those cells can be kept (a sequence never merged, up to its first
        image; Conversation.reset(reuse=True)). serve picks the free slot that shares the most
        (llama-server's slot prompt similarity). 0: nothing to keep."""
        if raw is not None:
            n = len(os.path.commonprefix([self.cached_text, raw])) if self.raw else 0
        else:
            n = 0
            for own, theirs in zip(self._keys or (), keys or ()):
                if own != theirs:
                    break
                n += 1
        return n if n and self._reusable_tokens() is not None else 0

    def feed(self, turns: list, tools: list | None = None, reuse: bool = True) -> tuple[int, int]:
        """Bring the cache to the conversation `turns` less its last turn's reply: keep the cached
        turns if they are its beginning, else start afresh, keeping the cells of as many of its
        first tokens as are the same (Conversation.reset(reuse=True)); decode the rest. `tools` are rendered
        for the whole conversation (other tools than the cache's: afresh; tool_calls.plan checks
        that turns with calls or results come with tools). Tool results that
        follow one another are one turn (the template renders them together). `reuse` False:
        keep nothing, decode it all (serve's cache_prompt). Returns
        (positions the cache held already, positions decoded now)."""
        keys = [t.key for t in turns]
        self._finish_reply()
        self.reused = 0
        if tools != self.tools:
            self.use_tools(tools)
        cached = self._keys
        if not reuse or cached is None or keys[:len(cached)] != cached or len(cached) >= len(keys):
            self.reset(reuse=reuse)  # (the cells of the same first tokens are kept: llama-server's cache_prompt)
            self.messages, self._keys = [], []
        held = self.pos
        try:
            decoded = self._feed_turns(turns, turns[len(self._keys):])
            return held + self.reused, decoded - self.reused
        except TemplateRerenders:
            pass
        finally:
            self._drop_reusable()
        # the template renders the new turns into the earlier ones (a system message mid-history,
        # say): decode the conversation afresh, rendered whole, rather than refuse it
        self.reset()
        self.messages, self._keys = [], []
        return 0, self._feed_whole(turns)

    def _feed_whole(self, turns: list) -> int:
        """Render every turn at once and decode it as one (a final assistant message is then
        continued as feed continues it)."""
        last = turns[-1] if turns[-1].role == "assistant" else None
        body = turns[:-1] if last else turns
        messages, segments = [], []
        for t in body:
            if t.role == "user":
                segments += list(t.segments)
            messages.append((t.role, message_text(t.segments) if t.role == "user" else self._message_text(t)))
        decoded = self._add_turn(messages, segments)
        if last is not None:
            decoded += self.add_assistant_turn(last.text, continued=True)
        self._keys = [t.key for t in turns]
        return decoded

    def _message_text(self, turn) -> str:
        """A turn's text as the conversation holds it: an assistant's calls in the model's own syntax."""
        return self.tool_family.render(turn.text, turn.calls) if turn.calls else turn.text

    def _feed_turns(self, turns: list, rest: list) -> int:
        decoded = 0
        try:
            while rest:
                turn, keys = rest[0], self._keys
                done = [turn]
                if turn.role == "tool":
                    while len(done) < len(rest) and rest[len(done)].role == "tool":
                        done.append(rest[len(done)])
                self.more_turns = len(done) < len(rest)  # (a cache kept from another conversation: reuse goes on)
                if turn.role == "system":
                    self.messages = self.messages + [("system", turn.text)]  # rendered with the next turn
                elif turn.role == "assistant":
                    decoded += self.add_assistant_turn(self._message_text(turn), continued=turn is turns[-1])
                elif turn.role == "tool":
                    decoded += self.add_tool_results([t.text for t in done])
                else:
                    decoded += self.add_user_turn(segments=list(turn.segments))
                self._keys = keys + [t.key for t in done]
                rest = rest[len(done):]
        finally:
            self.more_turns = False
        return decoded
