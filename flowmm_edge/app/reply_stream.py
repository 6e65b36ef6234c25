"""One reply being generated, a token at a time, so that its owner decides how each token is
decoded: alone (`Conversation.reply`, a generator over one stream) or in one batch with the other
slots' tokens (`serve`'s worker: one llama_decode per step for every replying slot, as
llama-server's update_slots does).

    stream = conv.reply_stream(max_tokens, params, stop)
    while (tok := stream.next_token()) is not None:
        piece = stream.show(tok)                                # text to show now ('' while held)
        stream.decoded(ctx.decode([tok], conv.pos, conv.seq_id))  # or one row of a batch
        if stream.done: break
    rest = stream.tail()                                        # what is left to show
    stream.close()                                              # the reply becomes the conversation's

`finish_reason` ends "stop" (end of generation, or a stop string, which is left out) or "length"
(max_tokens, or no room in the buffer). Text that may still become a stop string is held back.
"""

from __future__ import annotations

import codecs
import time

import numpy as np

from ..bindings import sampling


class ReplyStream:
    def __init__(self, conv, max_tokens: int, stop: tuple[str, ...], logprobs: int | None = None,
                 hide_from: str | None = None):
        self.conv, self.max_tokens, self.stop = conv, max_tokens, stop
        self.hide_from = hide_from  # text from here on is not shown: a tool call, parsed once the reply ends
        self.logprobs = logprobs  # None: off; k: each token's log probability and the k most probable
        self.token_logprobs, self.logprobs_taken = [], 0  # (token, logprob, [(token, logprob)]) per token
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.full, self.shown, self.cut, self.generated = "", 0, False, []
        self.hold = max((len(s) for s in stop), default=1) - 1  # text that may still become a stop string
        self.logits = conv.last_logits
        self.finish_reason = "length"
        self.done = self.closed = self.started = False
        self.t0 = time.perf_counter()

    def next_token(self) -> int | None:
        """The next token to decode at the conversation's position, or None: the reply ended."""
        if self.done:
            return None
        self.started = True
        conv = self.conv
        engine = conv.engine
        if len(self.generated) >= self.max_tokens or (
                engine.room(conv, reserved=False) < 1 and not engine.make_room(1, conv, reserved=False)):
            return self._end()  # max_tokens, or the buffer is full: "length"
        tok = conv._sample(self.logits)
        if conv.model.is_end_of_generation(tok):
            self.finish_reason = "stop"
            return self._end()
        if self.logprobs is not None:
            self.token_logprobs.append((tok, *sampling.logprobs(self.logits, tok, self.logprobs)))
        return tok

    def take_logprobs(self) -> list:
        """The entries of the tokens accepted since the last call (what a piece just shown holds)."""
        got = self.token_logprobs[self.logprobs_taken:len(self.generated)]
        self.logprobs_taken += len(got)
        return got

    def accept(self, tok: int, logits: np.ndarray) -> str:
        """`tok` was decoded at the conversation's position, giving `logits`: the text to show now."""
        self.decoded(logits)
        return self.show(tok)

    def decoded(self, logits: np.ndarray) -> None:
        """The token `show` took was decoded at the conversation's position, giving `logits`."""
        self.conv._took_token()
        self.logits = logits

    def show(self, tok: int) -> str:
        """Take the sampled `tok` into the reply: the text to show now ('' while held). The caller
        then decodes it and calls `decoded` (the server shows a token once it is sampled, as
        llama-server does, and decodes it in the next step's batch)."""
        self.generated.append(tok)
        self.full += self.decoder.decode(self.conv.model.token_to_piece(tok)).replace("\x00", "")  # NUL ends C strings
        hits = [i for i in (self.full.find(s, max(0, self.shown - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.full, self.finish_reason, self.cut = self.full[:min(hits)], "stop", True
            self._end()
            return ""
        end = min(len(self.full) - self.hold, self._visible_end())
        if end > self.shown:
            piece = self.full[self.shown:end]
            self.shown = end
            return piece
        return ""

    def _visible_end(self) -> int:
        """Where the text that may be shown ends: before `hide_from`, or before what may still become it."""
        if self.hide_from is None:
            return len(self.full)
        at = self.full.find(self.hide_from)
        return at if at >= 0 else len(self.full) - (len(self.hide_from) - 1)

    def _end(self) -> None:
        if not self.done:
            self.done = True
            if not self.cut:
                self.full += self.decoder.decode(b"", final=True)  # the bytes of a character left incomplete
        return None

    def tail(self) -> str:
        """Once done: the text not shown yet."""
        if not self.done:
            return ""
        at = self.full.find(self.hide_from) if self.hide_from else -1
        rest = self.full[self.shown:at if at >= 0 else len(self.full)]
        self.shown += len(rest)
        return rest

    def close(self) -> None:
        """End the reply where it is (if it has not ended) and hand it to the conversation: the
        cache, positions, labels and messages continue as if the reply had ended there."""
        if self.closed:
            return
        self.closed = True
        if not self.started:  # never asked for a token: as if the reply had not been asked for
            self.conv._reply_abandoned(self)
            return
        self._end()
        self.conv._reply_ended(self, self.full, self.generated, time.perf_counter() - self.t0)
