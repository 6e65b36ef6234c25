"""One sequence's compression, from its first turn to its last: the one home that decides when
and how a sequence of a llama.cpp context is merged (kvpress's press; llama-server's slot).

    seq = SequenceCompressor("flowmm", budget=1024, policy=policy)
    with seq.observing(ctx, prompt_end=end, labels=labels, seq_id=s):   # the turn's last unit
        logits = ctx.decode(tokens, pos, s)
    ... reply from the whole cache ...
    if seq.due(cells):
        report = seq.merge(ctx, tokens_by_pos, labels, s, stop=lambda: queue_not_empty)

Its callers: a chat or server conversation (app/conversation.py), the press on a user's own
Llama (press.py: `replay` re-gathers the window on a cache nobody observed, and each merge takes
its own budget), and eval and bench, which compare many methods and budgets on one restored
prefill and so let them `share_scores` of one repeat pass.

It owns the method (resolved by `registry`, the policy's FlowMM when there is one), the budget,
rho, and the scores gathered so far: the observation window of the latest turn (window and
whole-prompt methods, and FlowMM's rho without a policy) and the repeat pass's scores
(reconstruction.RepeatedScores, which each merge extends by the text added since the last).

Decision [I]: without a policy, FlowMM's rho is measured on the conversation's first turn that
holds two modalities and kept for the rest of it, as a policy's rho is kept for every prompt;
later turns decode without statistics where rho was all they were for (a learning model's short
turns waited 1.18-1.23x the full cache's first token, now 0.89-0.98x; docs/RESULTS.md, "A
learning model's turns").

`merge` is all-or-nothing: on any error, or when `stop()` says so between two chunks of the
repeat pass (MergeInterrupted), the cache is exactly as before; what the finished chunks scored
is kept, so the next attempt goes on from there. *When* a conversation merges is decided by
app/merge_schedule.py; eval, bench and the press call `merge` where they need it.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from . import reconstruction

from ..methods import registry
from ..methods.base import RECONSTRUCTION_SCORES, Method
from ..methods.budget import Budget
from .compressor import Compressor, Report, one_modality
from ..errors import FlowMMError


class MergeInterrupted(FlowMMError):
    """A merge stopped at a chunk boundary because its caller asked; the cache is unchanged."""


class SequenceCompressor:
    def __init__(self, method: str | Method, budget: int | float, policy=None, learner=None):
        """`budget`: the cells a merge keeps, or a ratio of the cells it finds (methods.budget.Budget).
        `learner` (self_distillation.ImportanceLearner): fed the repeat pass's scores and keys of
        every merge that runs it, before the merge changes the cache."""
        self._spec, self.budget = method, budget if isinstance(budget, float) else int(budget)
        self.learner = learner
        self._rho_measured: np.ndarray | None = None  # without a policy's: this conversation's, once measured
        self.use_policy(policy)  # an unknown name fails here
        self.repeats = reconstruction.RepeatedScores()
        self._observed: Compressor | None = None  # observed over the latest turn's end, not merged yet

    def use_policy(self, policy) -> None:
        """Merge by `policy` from now on (a predictor learned meanwhile, say); the repeat pass's
        scores so far are kept."""
        probe, rho = registry.resolve(self._spec, policy)  # once per policy: a method holds settings, no state
        self.policy, self.method, self.name, self.needs, self._rho = policy, probe, probe.name, probe.needs, rho
        self._needs_observation = self._fresh().needs_observation

    @property
    def enabled(self) -> bool:
        return self.name != "full"

    @property
    def needs_observation(self) -> bool:
        """Whether a merge plans from statistics observed while the sequence's end was decoded."""
        return self._needs_observation

    @property
    def repeats_context(self) -> bool:
        return RECONSTRUCTION_SCORES in self.needs

    @property
    def kept_tail(self) -> int:
        """The last cells every merge keeps (the method's recent window): the repeat pass hides them
        (reconstruction.hidden_tail)."""
        return self.method.window

    def runs_repeat_pass(self, teacher: bool = False) -> bool:
        """Whether a merge runs the repeat pass: the method scores by it, or `teacher` asks for it
        where the method predicts."""
        return self.repeats_context or (teacher and self.teaches())

    def room(self, model, teacher: bool = False) -> int:
        """Free cells a merge needs beyond the sequence's own (the repeat pass decodes there)."""
        return reconstruction.room_needed(reconstruction.repeat_prefix(model)) if self.runs_repeat_pass(teacher) else 0

    def _fresh(self) -> Compressor:
        if self._rho is None and self._rho_measured is not None:
            return Compressor(self.method, self.budget, rho=self._rho_measured, rho_source="conversation")
        return Compressor(self.method, self.budget, rho=self._rho)

    def observed_from(self, prompt_end: int) -> int:
        """The first position whose rows `observing` reads for a turn ending at `prompt_end`: the
        rows before it may be decoded before the block (in a batch other sequences share)."""
        return self._fresh().observed_from(prompt_end)

    @contextlib.contextmanager
    def observing(self, ctx, prompt_end: int, labels: np.ndarray, seq_id: int = 0):
        """Decode the end of a turn inside this block: the method's statistics are gathered over it
        (if it needs any) and kept for the next merge, which may come after the reply."""
        comp = self._fresh()
        with comp.observe(ctx, prompt_end=prompt_end, labels=labels, seq_id=seq_id) as stats:
            yield stats
        self._observed = comp if comp.needs_observation else None  # the latest turn's, or none
        if comp.needs_observation:
            self._keep_rho(comp, labels[:prompt_end])

    def _keep_rho(self, comp: Compressor, labels: np.ndarray) -> None:
        """Keep the rho a turn of two modalities measured, for the rest of the conversation (and
        give it to the learner: one per conversation, as a policy holds one)."""
        if self._rho is None and self._rho_measured is None and not one_modality(labels):
            rho = comp.measured_rho()
            if rho is not None:
                self._rho_measured = rho
                self._needs_observation = self._fresh().needs_observation
                if self.learner is not None:
                    self.learner.add_rho(rho)

    def replay(self, ctx, tail_tokens: list[int], prompt_end: int, labels: np.ndarray, seq_id: int = 0,
               whole_prompt=None):
        """Gather the observation on a cache that already holds the sequence and that nobody
        observed (a press's Llama, a restored prefill): Compressor.replay re-decodes the window
        from `tail_tokens`, the tokens that end it, or takes `whole_prompt`'s rows. Returns the
        logits of that re-decode, or None if nothing was decoded."""
        comp = self._fresh()
        logits = comp.replay(ctx, tail_tokens, prompt_end, labels, whole_prompt=whole_prompt, seq_id=seq_id)
        self._observed = comp if comp.needs_observation else None
        if comp.needs_observation:
            self._keep_rho(comp, labels[:prompt_end])
        return logits

    def share_scores(self, repeats: reconstruction.RepeatedScores) -> None:
        """Use repeat-pass scores gathered over the same cells by someone else (eval and bench
        compare several methods and budgets on one restored prefill, and pay for one pass); a
        merge repeats only what they have not."""
        self.repeats = repeats

    def due(self, cells: int) -> bool:
        """Whether the sequence's `cells` are over the budget and a merge can plan now (a method
        that needs an observation window has one)."""
        keep = Budget.of(self.budget).keep(cells)
        if not self.enabled or cells <= keep:
            return False
        return self._observed is not None or not self._needs_observation

    def teaches(self) -> bool:
        """Whether a merge with time to spare would score by the repeat pass (the teacher) where
        this one predicts: FlowMM with a predictor."""
        return getattr(self.method, "importance", None) == "predicted"

    def merge(self, ctx, tokens_by_pos: np.ndarray, labels: np.ndarray, seq_id: int = 0, stop=None,
              progress=None, budget: int | float | None = None, teacher: bool = False,
              images: dict | None = None) -> Report:
        """Merge the sequence down to the budget, or to this call's `budget` (see the module
        docstring); `progress(done, total)` follows the repeat pass. `teacher`: a merge nobody
        waits for (idle time) scores by the repeat pass even where the method has a predictor.
        `images`: the sequence's images the caller still holds, by first position, for the repeat
        pass to re-feed (reconstruction.images_by_position)."""
        comp = self._observed or self._fresh()
        if budget is not None:
            comp.budget = budget
        if teacher and self.teaches():
            comp = comp.with_method(dataclasses.replace(comp.method, importance="reconstruction", predictor=None))
        if RECONSTRUCTION_SCORES in comp.method.needs:
            before = self.repeats.repeated
            try:
                scored = self.repeats.update(ctx, tokens_by_pos, seq_id, stop=stop, progress=progress, images=images,
                                             kept_tail=comp.method.window)
            except reconstruction.Interrupted as e:
                raise MergeInterrupted(str(e)) from None
            comp.use_reconstruction(scored)
            if self.learner is not None:
                self.learner.observe(ctx, seq_id, scored, np.setdiff1d(self.repeats.repeated, before))
        report = comp.compress(ctx, labels, seq_id)
        self._observed = None
        return report

    # -- what a conversation's snapshot, reset and cut-back need ----------------------------------

    def forget_from(self, end: int) -> None:
        self.repeats.forget_from(end)

    def reset(self) -> None:
        self.repeats = reconstruction.RepeatedScores()
        self._observed = None
        self._forget_rho(None)

    def snapshot(self) -> tuple:
        return self.repeats.snapshot(), self._observed, self._rho_measured

    def restore(self, snap: tuple) -> None:
        repeats, self._observed, rho = snap
        self.repeats.restore(repeats)
        self._forget_rho(rho)

    def _forget_rho(self, rho: np.ndarray | None) -> None:
        self._rho_measured = rho
        self._needs_observation = self._fresh().needs_observation
