"""`flowmm` (Li et al. 2025, "FlowMM", arXiv 2511.05534; no official code): cross-modal information
flow picks a merging mode per layer, a sensitivity-adaptive matcher picks what folds into what.

Per layer l and KV head (docs/METHOD.md; [S] the paper states it, [I] our choice):
  1. [S] mode: cross-modal if rho^l >= theta, else intra-modal. rho^l (the share of attention
     mass crossing text<->other modality) comes from a calibrated policy or, without one, from
     the current prompt's statistics.
  2. [S] pivots: the top-B tokens by importance I(i), attention received from the observation
     window (the last `window` prompt rows, summed over the KV head's query heads [I]); the
     sinks and the recent window are always pivots [I]. Everything else is a merge candidate.
     [I] importance="reconstruction" takes the attention of a repeat-the-context pass instead
     (reconstruction.py, after KVzip), which keeps a context answerable for questions not yet
     asked; "both" ranks the cells by each (after pooling) and scores a cell by its better
     rank, so the pivots alternate between the two lists: the window's picks serve the question
     being asked, the repeat's the ones to come. (Adding the two masses instead lets the
     window's few peaked tokens outrank the repeat's: measured, it answered nothing after
     compression, like SnapKV.) The merge's mass is then the two masses added, each
     normalised to unit mass per layer and KV head.
     [I] importance="predicted" takes the repeat pass's mass as a calibrated predictor expects
     it from each cell's cached key (importance_predictor.py, distilled by `calibrate
     --distill`): one small matrix product per layer in place of a second prefill.
     [I] I is smoothed by SnapKV's average pooling (`pool`=7; 1 turns it off) before both the
     selection and the tau gate: a fact spread over several tokens (a number is one token per
     digit in Qwen's vocabulary) otherwise keeps its two or three strongest tokens only, and on
     the default model a planted 5-digit passkey came back as its first 3 digits.
     [I] value_norm (on with a predictor): I is first multiplied by each cell's |v| (KVzip+'s
     correction): the first token and punctuation draw attention and add near-zero values.
  3. [S] matching: candidate i goes to argmax_j cos(k_i, k_j) over pivots with I_j <= tau;
     pivots above tau are too sensitive to absorb anything. [I] tau is the `tau_quantile`
     quantile of the pivots' importance (0.9: the top tenth absorb nothing). [I] In intra-modal
     layers only pivots with i's own label are eligible.
  4. [I] the paper leaves the merge function open: LOOK-M's pivotal merge (merge="pivotal"),
     a plain mean ("mean"), or "mass" (mass_merge.py: the pivot's key kept, values weighted by
     the window's attention mass, log(mass) on the slot's logit, and only candidates with key
     cosine >= `floor` folded, 0.8 by default; the rest evicted).
  5. [I] a candidate with no eligible pivot is evicted (orphans="evict"); orphans="ungated"
     retries it without the tau gate (the modality rule still holds).
  6. [I] a pivot absorbs at most `max_absorb` candidates (its most similar); the rest are
     evicted. Under the pivotal rule the 16th candidate weighs 1/34 of the slot, and the cap
     bounds the merge graph to B x (max_absorb + 1) rows per layer and head.

Defaults [I], by measurement (docs/RESULTS.md, RULER-style 2k documents, default model):
importance="reconstruction" and merge="mass". With the question asked after compression (the
chat's follow-up case) the window-based selection answered nothing at <= 35%, this answers 44%,
66%, 81% of what the full cache answers at 5, 10, 20%; with the question inside, it beats SnapKV
at 5-20% and loses at 35%. The mass merge beats eviction of the same candidates at every budget in
both modes. `importance="window", merge="pivotal"` is the method as the paper's text reads.

Ablations (the paper's): flow_guidance=False merges every layer cross-modally (no per-layer
decision); sensitivity=False drops the tau gate (every pivot may absorb); both off is plain
similarity merging of the top-B-by-window selection.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import (MATCHER, PREDICTED_SCORES, RECONSTRUCTION_SCORES, RHO, VALUE_NORMS, WINDOW_SCORES, Method, MethodError,
                   merge_sources, top_by_score)
from .snapkv import avg_pool
from .mass_merge import floor_for
from .mass_merge import mass_plan
from .pivotal_merge import MERGE_RULES, build_plan
from .token_folding import candidates, cap_absorbed, match_above

ORPHAN_RULES = ("evict", "ungated")
# [I] FlowMM's settings with a predictor: the last 8 cells protected (not 32: with no observation
# window to read, the tail of a document is worth no more than its middle) and pooling over 3 (the
# predictor's scores come from each cell's own key, and 7 blurred the record a value belongs to).
# Measured on fresh contexts, question after compression: 5% +0.12 [0.05-0.19], 10% +0.00, 20%
# +0.08 [0.02-0.15] (docs/RESULTS.md, "Settings for the predictor"). And KVzip+'s value-norm
# correction: on the same 60 contexts, paired, 5% +0.09 [0.03-0.15], 10% +0.02 [-0.05-0.10], 20%
# +0.06 [-0.02-0.15], KL to the full cache halved at each; images at 10% 0.96 against 0.75
# (docs/RESULTS.md, "KVzip+'s value-norm correction").
PREDICTED = dict(importance="predicted", window=8, pool=3, value_norm=True)
# FlowMM where no predictor is at hand (a model a user brings, until it has learned one): the
# repeat pass, with KVzip+'s value-norm correction. Measured without a policy, question after
# compression, on 15 + 10 contexts of the default model (0.27 / 0.52 / 0.65 -> 0.60 / 0.72 / 0.77
# at 5 / 10 / 20% on the 15; KL to the full cache 0.886 -> 0.205 at 5%) and 40 of Gemma 3 270M
# (0.06 / 0.49 / 0.54 -> 0.25 / 0.46 / 0.57, KL lower at each) (docs/RESULTS.md, "The repeat pass
# takes the value-norm correction"). The dataclass's own default stays off: the plain method.
REPEATED = dict(value_norm=True)
IMPORTANCE = {"window": (WINDOW_SCORES,), "reconstruction": (RECONSTRUCTION_SCORES,), "predicted": (PREDICTED_SCORES,),
              "both": (WINDOW_SCORES, RECONSTRUCTION_SCORES)}


@dataclasses.dataclass
class FlowMM(Method):
    theta: float = 0.25
    tau_quantile: float = 0.9
    merge: str = "mass"
    orphans: str = "evict"
    max_absorb: int = 15
    flow_guidance: bool = True
    sensitivity: bool = True
    pool: int = 7
    floor: float | None = None  # None: mass_merge.floor_for's default for the merge rule
    importance: str = "reconstruction"
    # [I] KVzip+'s correction (kvpress): a cell's importance times the norm of its value, before
    # pooling; a cell that draws attention but adds a short value (a sink, punctuation) changes
    # the output little. On in the product's settings, with a predictor (PREDICTED) or without
    # (REPEATED)
    value_norm: bool = False
    # importance="predicted": the ImportancePredictor that scores the cells (a policy's, see policy.py)
    predictor: object = dataclasses.field(default=None, repr=False, compare=False)

    name = "flowmm"

    def __post_init__(self):
        super().__post_init__()
        theta, tau_quantile, merge, importance = self.theta, self.tau_quantile, self.merge, self.importance
        orphans, pool, max_absorb = self.orphans, self.pool, self.max_absorb
        if not 0.0 <= theta <= 1.0:
            raise MethodError(f"theta {theta} is outside [0, 1]")
        if not 0.0 <= tau_quantile <= 1.0:
            raise MethodError(f"tau_quantile {tau_quantile} is outside [0, 1]")
        if merge not in MERGE_RULES:
            raise MethodError(f"merge rule {merge!r} is not one of {', '.join(MERGE_RULES)}")
        if importance not in IMPORTANCE:
            raise MethodError(f"importance {importance!r} is not one of {', '.join(IMPORTANCE)}")
        if importance == "predicted" and self.predictor is None:
            raise MethodError("importance 'predicted' needs a policy with an importance predictor "
                              "(calibrate --distill)")
        if orphans not in ORPHAN_RULES:
            raise MethodError(f"orphan rule {orphans!r} is not one of {', '.join(ORPHAN_RULES)}")
        if pool < 1 or pool % 2 == 0:
            raise MethodError(f"pool must be an odd kernel size >= 1 (got {pool})")
        if max_absorb < 0:
            raise MethodError(f"max_absorb must be >= 0 (got {max_absorb})")

    @property
    def needs(self):
        return frozenset({MATCHER, *IMPORTANCE[self.importance]} | ({RHO} if self.flow_guidance else set()) |
                         ({VALUE_NORMS} if self.value_norm else set()))

    def scores(self, stats, n_layer: int, n_head_kv: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(mass, importance) per cell [n_layer, n_head_kv, n] from the chosen source(s): the
        attention mass the merge weighs values by, and the pooled score pivots are chosen by."""
        parts = [np.asarray(stats.require(name, n_layer, n_head_kv, n), np.float64) for name in IMPORTANCE[self.importance]]
        if self.value_norm:
            norms = np.asarray(stats.require(VALUE_NORMS, n_layer, n_head_kv, n), np.float64)
            parts = [p * norms for p in parts]
        pooled = [avg_pool(p, self.pool) if self.pool > 1 else p for p in parts]
        if len(parts) == 1:
            return parts[0], pooled[0]
        mass = sum(p / np.maximum(p.sum(axis=-1, keepdims=True), 1e-30) for p in parts)
        rank = np.min([np.argsort(np.argsort(-p, axis=-1, kind="stable"), axis=-1) for p in pooled], axis=0)
        return mass, (n - rank).astype(np.float64)

    def modes(self, rho: np.ndarray | None, n_layer: int) -> np.ndarray:
        """Per layer: True = cross-modal, False = intra-modal."""
        if not self.flow_guidance:
            return np.ones(n_layer, bool)
        return np.asarray(rho) >= self.theta

    def plan(self, layout, stats, n_layer, n_head_kv, slots):
        n = layout.n
        mass, importance = self.scores(stats, n_layer, n_head_kv, n)
        match = stats.require(MATCHER, n_layer, n_head_kv, n)
        cross = self.modes(stats.require(RHO, n_layer, n_head_kv, n) if self.flow_guidance else None, n_layer)
        pivots = top_by_score(importance, self.protected(n), slots)
        cand = candidates(pivots, n)
        unscored = stats.unscored if stats.unscored is not None else np.zeros(n, bool)
        target = np.stack([self._fold_layer(match, l, pivots[l], cand[l], importance[l], layout.labels, cross[l],
                                            unscored) for l in range(n_layer)])
        src = merge_sources(pivots, cand, target)
        return mass_plan(layout, src, mass) if self.merge == "mass" else build_plan(layout, src, self.merge)

    def _fold_layer(self, match, l, piv, cand, importance, labels, cross, unscored) -> np.ndarray:
        """Each candidate's slot [H, C] (-1: evicted): its most similar key among
        the pivots open to it (the tau gate; same modality in an intra-modal layer), if its
        cosine reaches the floor; with orphans="ungated", one without such a pivot tries again
        without the gate. At most max_absorb per pivot, the most similar. A pivot the importance
        source did not score (`unscored`) is closed, and the gate's quantile is over the others."""
        n_head_kv, n_piv = piv.shape
        scored = ~unscored[piv]
        if self.sensitivity:
            imp = np.where(scored, np.take_along_axis(importance, piv, axis=1), np.nan)
            gate = np.full((n_head_kv, 1), -np.inf)
            rows = scored.any(axis=1)
            if rows.any():
                gate[rows] = np.nanquantile(imp[rows], self.tau_quantile, axis=1, keepdims=True)
            open_ = scored & (imp <= gate)
        else:
            open_ = scored
        if cross:
            group, same = np.zeros(cand.shape, np.int32), np.ones((n_head_kv, 1, n_piv), bool)
        else:
            n_labels = int(labels.max(initial=0)) + 1
            group = labels[cand]
            same = labels[piv][:, None, :] == np.arange(n_labels)[None, :, None]  # [H, label, P]
        floor = floor_for(self.merge, self.floor)
        best, cos = match_above(match, l, cand, piv, group, same & open_[:, None, :], floor)
        if self.orphans == "ungated":
            retry_best, retry_cos = match_above(match, l, cand, piv, group, same & scored[:, None, :], floor)
            retry = best < 0
            best, cos = np.where(retry, retry_best, best), np.where(retry, retry_cos, cos)
        return np.stack([cap_absorbed(best[h], cos[h], n_piv, self.max_absorb) for h in range(n_head_kv)])
