"""One sequence's compression, from its first turn to its last: the one home that decides when
and how a sequence of a llama.cpp context is merged (kvpress's press; llama-server's slot).

    seq = SequenceCompressor("flowmm", budget_cells=1024, policy=policy)
    with seq.observing(ctx, prompt_end=end, labels=labels, seq_id=s):   # the turn's last unit
        logits = ctx.decode(tokens, pos, s)
    ... reply from the whole cache ...
    if seq.due(cells):
        report = seq.merge(ctx, tokens_by_pos, labels, s, stop=lambda: queue_not_empty)

It owns the method (resolved by `registry`, the policy's FlowMM when there is one), the budget,
rho, and the scores gathered so far: the observation window of the latest turn (window and
whole-prompt methods, and FlowMM's rho without a policy) and the repeat pass's scores
(reconstruction.RepeatedScores, which each merge extends by the text added since the last).

`merge` is all-or-nothing: on any error, or when `stop()` says so between two chunks of the
repeat pass (MergeInterrupted), the cache is exactly as before; what the finished chunks scored
is kept, so the next attempt goes on from there. Callers decide *when* (compression schedule,
docs/ARCHITECTURE.md): reply first and merge after, or merge before the reply (`blocking`).
"""

from __future__ import annotations

import contextlib

import numpy as np

from . import reconstruction, registry
from .base import RECONSTRUCTION_SCORES, Method
from .compression import Compressor, Report
from ..errors import FlowMMError

REPLY_FIRST, BLOCKING = "reply_first", "blocking"
SCHEDULES = (REPLY_FIRST, BLOCKING)


class MergeInterrupted(FlowMMError):
    """A merge stopped at a chunk boundary because its caller asked; the cache is unchanged."""


class SequenceCompressor:
    def __init__(self, method: str | Method, budget_cells: int, policy=None):
        self._spec, self.policy, self.budget = method, policy, int(budget_cells)
        probe, rho = registry.resolve(method, policy)  # an unknown name fails here
        self.name, self.needs = probe.name, probe.needs
        self._needs_observation = Compressor(probe, self.budget, rho=rho).needs_observation
        self.repeats = reconstruction.RepeatedScores()
        self._observed: Compressor | None = None  # observed over the latest turn's end, not merged yet

    @property
    def enabled(self) -> bool:
        return self.name != "full"

    @property
    def repeats_context(self) -> bool:
        return RECONSTRUCTION_SCORES in self.needs

    def room(self, model) -> int:
        """Free cells a merge needs beyond the sequence's own (the repeat pass decodes there)."""
        return reconstruction.room_needed(reconstruction.repeat_prefix(model)) if self.repeats_context else 0

    def _fresh(self) -> Compressor:
        method, rho = registry.resolve(self._spec, self.policy)
        return Compressor(method, self.budget, rho=rho)

    @contextlib.contextmanager
    def observing(self, ctx, prompt_end: int, labels: np.ndarray, seq_id: int = 0):
        """Decode the end of a turn inside this block: the method's statistics are gathered over it
        (if it needs any) and kept for the next merge, which may come after the reply."""
        comp = self._fresh()
        with comp.observe(ctx, prompt_end=prompt_end, labels=labels, seq_id=seq_id) as stats:
            yield stats
        if comp.needs_observation:
            self._observed = comp

    def due(self, cells: int) -> bool:
        """Whether the sequence's `cells` are over the budget and a merge can plan now (a method
        that needs an observation window has one)."""
        if not self.enabled or cells <= self.budget:
            return False
        return self._observed is not None or not self._needs_observation

    def merge(self, ctx, tokens_by_pos: np.ndarray, labels: np.ndarray, seq_id: int = 0, stop=None,
              progress=None) -> Report:
        """Merge the sequence down to the budget (see the module docstring); `progress(done, total)`
        follows the repeat pass."""
        comp = self._observed or self._fresh()
        if self.repeats_context:
            try:
                comp.use_reconstruction(self.repeats.update(ctx, tokens_by_pos, seq_id, stop=stop,
                                                                progress=progress))
            except reconstruction.Interrupted as e:
                raise MergeInterrupted(str(e)) from None
        report = comp.compress(ctx, labels, seq_id)
        self._observed = None
        return report

    # -- what a conversation's snapshot, reset and cut-back need ----------------------------------

    def forget_from(self, end: int) -> None:
        self.repeats.forget_from(end)

    def reset(self) -> None:
        self.repeats = reconstruction.RepeatedScores()
        self._observed = None

    def snapshot(self) -> tuple:
        return self.repeats.snapshot(), self._observed

    def restore(self, snap: tuple) -> None:
        repeats, self._observed = snap
        self.repeats.restore(repeats)
