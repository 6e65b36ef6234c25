"""Presses: FlowMM (or a baseline) on the KV cache of a `llama_cpp.Llama` of your own.

    from llama_cpp import Llama
    from flowmm_edge.press import FlowMMPress   # importing flowmm_edge loads its patched libllama
    llm = Llama("model.gguf", n_ctx=2048)
    with FlowMMPress(compression_ratio=0.75).attach(llm):
        llm.create_chat_completion(messages=[...])   # as before, in a cache of n_ctx cells

A press is a method's dataclass plus `compression_ratio` (kvpress's meaning: the share of the
cells a compression removes), so `SnapKVPress(compression_ratio=0.8, window=64)` is SnapKV with
those settings, and `PRESSES[name]` is the registry. Attaching it to a Llama:

- **When it compresses.** Before a batch of tokens that would not fit in the cells left (less
  the room the method's own pass needs), the sequence is merged down to
  (1 - compression_ratio) of its cells, then decoding goes on. So a conversation can run past
  the Llama's `n_ctx` cells, up to `max_positions` tokens (default: the model's trained
  context), while the KV buffer stays the `n_ctx` cells llama.cpp allocated.
- **What a method sees.** Reconstruction scores (FlowMM's default) repeat the tokens added since
  the last compression (kept by the sequence's `SequenceCompressor`, the one home of a
  sequence's compression that chat and serve use too); window and whole-prompt scores come
  from re-decoding the last `window` tokens with statistics on (so H2O's accumulator holds
  those rows only); every cell is labelled text.
- **llama-cpp-python's prefix reuse stays right.** A Llama keeps the tokens it evaluated and,
  for a new prompt, keeps the cached prefix it shares with them. If that prefix ends before the
  last compression (a merged slot may hold tokens past it), the press drops the cache and
  prefills the prompt again rather than answer from another history.
- Out of scope, refused with an error: `logits_all=True` Llamas (per-position logits of a
  compressed cache do not exist), and sequences other than 0. Images that a llama-cpp-python
  chat handler evaluates go in as they are and are merged later as if they were text.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .bindings import kv_cache, runtime
from .errors import FlowMMError
from .methods import ExpectedAttention, FlowMM, H2O, LookM, Method, RandomKeep, SnapKV, Streaming
from .methods.flowmm import REPEATED
from .compression.sequence_compressor import SequenceCompressor


class PressError(FlowMMError):
    pass


@dataclasses.dataclass
class Press:
    """Mixed into a method's dataclass: `compression_ratio` and attaching to a Llama."""

    compression_ratio: float = 0.75

    def __post_init__(self):
        if not 0.0 < self.compression_ratio < 1.0:
            raise PressError(f"compression_ratio {self.compression_ratio} is outside (0, 1)")
        super().__post_init__()

    def attach(self, llm, max_positions: int | None = None) -> "AttachedPress":
        """A context manager that compresses `llm`'s cache while inside it. (Not `press(llm)` as
        in kvpress: calling a method object plans a merge, methods.base.Method.__call__.)"""
        return AttachedPress(self, llm, max_positions)


@dataclasses.dataclass
class FlowMMPress(Press, FlowMM):
    """FlowMM (methods/flowmm.py): importance-chosen pivots, mass merge, flow-guided matching.

    `policy` ("auto": the one shipped or learned for the Llama's model, if any; a path or
    calibration.policy.Policy; None) gives the method `chat` and `serve` run with it: the
    policy's own settings and theta, its per-layer rho and, where it has one, its importance
    predictor instead of the repeat pass. Without a policy, chat's settings for the repeat pass
    (methods/flowmm.py: REPEATED). A field set to other than FlowMM's default is kept over both."""

    policy: object = dataclasses.field(default="auto", repr=False, compare=False)

    def for_model(self, model_path):
        """(the method to run on this model, its policy or None)."""
        from .calibration import policy as policy_mod

        pol = policy_mod.choose(self.policy, model_path)
        fields = [f.name for f in dataclasses.fields(FlowMM) if f.init and f.name != "predictor"]
        plain = FlowMM()
        mine = {k: getattr(self, k) for k in fields if getattr(self, k) != getattr(plain, k)}
        if pol is None:
            return dataclasses.replace(self, **{**REPEATED, **mine}), None
        method = pol.flowmm(**mine)  # as methods.registry.resolve builds chat's and serve's
        return dataclasses.replace(self, predictor=method.predictor, **{k: getattr(method, k) for k in fields}), pol


@dataclasses.dataclass
class LookMPress(Press, LookM):
    """LOOK-M (methods/lookm.py): heavy hitters and recent tokens, the rest merged into them."""


@dataclasses.dataclass
class SnapKVPress(Press, SnapKV):
    """SnapKV (methods/snapkv.py): the cells the observation window attends to, pooled."""


@dataclasses.dataclass
class ExpectedAttentionPress(Press, ExpectedAttention):
    """Expected Attention (methods/expected_attention.py): the cells the window's mean query,
    RoPE-averaged over the coming positions, is expected to attend to. Training-free."""


@dataclasses.dataclass
class H2OPress(Press, H2O):
    """H2O (methods/h2o.py): heavy hitters by accumulated attention, and the recent window."""


@dataclasses.dataclass
class StreamingLLMPress(Press, Streaming):
    """StreamingLLM (methods/streaming.py): the attention sinks and the most recent cells."""


@dataclasses.dataclass
class RandomPress(Press, RandomKeep):
    """A control: sinks, recent window and a seeded random choice of the rest."""


PRESSES: dict[str, type[Press]] = {p.name: p for p in (FlowMMPress, LookMPress, SnapKVPress, ExpectedAttentionPress, H2OPress,
                                                         StreamingLLMPress, RandomPress)}


class AttachedPress:
    """The press at work on one Llama; `with` attaches and detaches it (detaching keeps the
    compressed cache if the Llama can hold its positions, and empties it otherwise)."""

    def __init__(self, press: Press, llm, max_positions: int | None = None):
        if getattr(llm, "_logits_all", False):
            raise PressError("a Llama with logits_all=True keeps logits per position, which a compressed cache "
                             "does not have: create it without logits_all")
        self.press, self.llm = press, llm
        self.model = runtime.Model.borrow(llm._model.model, llm.model_path)
        self.ctx = runtime.Context.borrow(llm._ctx.ctx, self.model)
        self.n_ctx = self.ctx.n_ctx
        self.max_positions = max(self.n_ctx, max_positions or self.model.facts.n_ctx_train or self.n_ctx)
        method, policy = press.for_model(llm.model_path) if isinstance(press, FlowMMPress) else (press, None)
        self.seq = SequenceCompressor(method, 1.0, policy)  # each merge sets its own budget (compress)
        self.room = self.seq.room(self.model)  # kept free for the method's own pass
        kept = len(press.protected(10 ** 6))
        if self.n_ctx - self.room <= 2 * kept:
            raise PressError(f"a Llama of {self.n_ctx} cells leaves no room to compress with {press.name} "
                             f"({self.room} cells for its pass, {kept} always kept): raise n_ctx")
        self.merged_upto = 0  # positions below this were merged: a cut before it means prefilling again
        self.compressions = 0
        self._saved = None

    # -- attaching -------------------------------------------------------------------------------

    def __enter__(self) -> "AttachedPress":
        llm = self.llm
        self._saved = {"eval": llm.__dict__.get("eval"), "n_ctx": llm.__dict__.get("n_ctx"), "_n_ctx": llm._n_ctx,
                       "input_ids": llm.input_ids}
        ids = np.zeros(self.max_positions, dtype=llm.input_ids.dtype)
        ids[:len(llm.input_ids)] = llm.input_ids
        llm.input_ids, llm._n_ctx = ids, self.max_positions
        llm.n_ctx = lambda: self.max_positions  # llama-cpp-python's checks count positions against it
        self._orig_eval = type(llm).eval.__get__(llm)
        llm.eval = self.eval
        return self

    def __exit__(self, *exc) -> None:
        llm, saved = self.llm, self._saved
        for name in ("eval", "n_ctx"):
            if saved[name] is None:
                llm.__dict__.pop(name, None)
            else:
                setattr(llm, name, saved[name])
        llm._n_ctx = saved["_n_ctx"]
        if llm.n_tokens > len(saved["input_ids"]):  # more positions than the Llama can index: start afresh
            llm.reset()
            self.ctx.clear()
        else:
            saved["input_ids"][:] = llm.input_ids[:len(saved["input_ids"])]
        llm.input_ids = saved["input_ids"]
        self.ctx.close()
        self.model.close()

    # -- decoding ----------------------------------------------------------------------------------

    def cells(self) -> int:
        return len(kv_cache.seq_cells(self.ctx)[0])

    def eval(self, tokens) -> None:
        """Llama.eval, compressing before any batch that would not fit."""
        llm = self.llm
        tokens = list(tokens)
        if llm.n_tokens < self.merged_upto:  # the kept prefix ends inside merged cells: prefill again
            tokens = llm.input_ids[:llm.n_tokens].tolist() + tokens
            llm.n_tokens, self.merged_upto = 0, 0
            self.seq.reset()
            self.ctx.clear()
        if llm.n_tokens + len(tokens) > self.max_positions:
            raise PressError(f"{llm.n_tokens + len(tokens)} positions exceed max_positions={self.max_positions}")
        self.ctx.truncate(llm.n_tokens)
        self.seq.forget_from(llm.n_tokens)
        done = 0
        while done < len(tokens):
            free = kv_cache.free_cells(self.ctx) - self.room
            if free < 1:
                self.compress()
                continue
            batch = tokens[done:done + min(free, llm.n_batch)]
            self._orig_eval(batch)
            done += len(batch)

    def compress(self) -> None:
        """Merge sequence 0 down to (1 - compression_ratio) of its cells."""
        llm, press = self.llm, self.press
        n = llm.n_tokens
        cells = self.cells()
        target = max(len(press.protected(cells)) + 1, math.ceil((1 - press.compression_ratio) * cells))
        if target >= cells:
            raise PressError(f"cannot compress {cells} cells below the {target} that {press.name} always keeps")
        labels, tokens = np.zeros(n, np.int32), llm.input_ids[:n]
        self.seq.replay(self.ctx, tokens[max(0, n - press.window):].tolist(), n, labels)  # the window again
        self.seq.merge(self.ctx, tokens, labels, budget=target)
        self.merged_upto = n
        self.compressions += 1

    def report(self) -> dict:
        cells = self.cells()
        return {"cells": cells, "buffer_cells": self.n_ctx, "positions": self.llm.n_tokens,
                "compressions": self.compressions, "method": self.press.name}



__all__ = ["PRESSES", "AttachedPress", "ExpectedAttentionPress", "FlowMMPress", "H2OPress", "LookMPress", "Method", "Press", "PressError",
           "RandomPress", "SnapKVPress", "StreamingLLMPress"]
