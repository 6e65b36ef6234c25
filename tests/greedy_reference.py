"""The reference for a greedy reply decoded in a shared batch: the same conversation decoded alone
on a fresh context, token by token.

llama.cpp's CPU kernels are not bit-exact across batch compositions: a sequence decoded in one
batch with other sequences' chunks, or into cells interleaved with theirs, gets logits a few
thousandths apart from the same sequence decoded alone (0.004 and 0.02 on the tiny model; the
summation order differs). Where the reference's two best tokens are that close, greedy decoding
may take either. So a reply agrees with the reference when each of its tokens is one whose logit
is within NEAR_TIE of the reference's best at that step, the reference then going on from the
reply's token. A wrong context (another sequence's cells, a lost chunk) picks tokens far below
the best, and fails.
"""

from __future__ import annotations

import numpy as np

NEAR_TIE = 0.1  # logits closer than this may swap places between batch compositions (5x the largest gap seen)


class GreedyReference:
    """A conversation (`conv`) of its own on a fresh context; `check` a reply to it as it stands."""

    def __init__(self, model_path, max_tokens: int, ignore_eos: bool = False, tol: float = NEAR_TIE):
        from flowmm_edge.app.conversation import Conversation
        from flowmm_edge.app.engine import Engine

        self.engine = Engine(model_path, method="full", n_ctx=1024, n_slots=1, max_reply=max_tokens, n_threads=2)
        self.conv = Conversation(self.engine)
        self.max_tokens, self.ignore_eos, self.tol = max_tokens, ignore_eos, tol

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.engine.close()

    def feed(self, messages: list[dict]) -> int:
        """Bring the conversation to OpenAI `messages`, as serve's slot does (Conversation.feed:
        what it holds is kept); returns the positions it held."""
        from flowmm_edge.app import chat_api

        return self.conv.feed(chat_api.parse_messages(messages))[0]

    def check(self, tokens: list[int] | None = None, pieces: list[bytes] | None = None) -> int:
        """Assert that a reply (its `tokens`, or their `pieces` as bytes) is a greedy reply to the
        conversation up to near ties (see the module); one shorter than max_tokens must end where
        an end-of-generation token is that near the best. The conversation then holds the reply's
        tokens, as the server's slot does. Returns how many near ties the reply took the other
        side of."""
        model, conv = self.engine.model, self.conv
        if pieces is None:
            pieces = [model.token_to_piece(t) for t in tokens]
        stream = conv.reply_stream(self.max_tokens)
        stream.started = True  # (driven here token by token, not by next_token)
        swapped = 0
        for i, piece in enumerate(pieces + [None] * (len(pieces) < self.max_tokens)):
            logits = stream.logits.copy()
            if self.ignore_eos:
                logits[model.end_of_generation_tokens()] = -np.inf
            near = [int(t) for t in np.argsort(-logits) if logits[t] >= logits.max() - self.tol]
            if piece is None:  # the reply ended here
                assert any(model.is_end_of_generation(t) for t in near), \
                    f"the reply ended after {i} tokens where the reference goes on with {model.token_to_piece(near[0])!r}"
                break
            took = next((t for t in near if model.token_to_piece(t) == piece), None)
            assert took is not None, (f"token {i}: the reply took {piece!r}, the reference {model.token_to_piece(near[0])!r}"
                                      f" (no token within {self.tol} of the best is the reply's)")
            swapped += took != near[0]
            stream.show(took)
            stream.decoded(self.engine.ctx.decode([took], conv.pos, conv.seq_id))
        stream.close()
        return swapped
