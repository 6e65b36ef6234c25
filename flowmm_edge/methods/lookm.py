"""`lookm` (Wan et al. 2024, "LOOK-M", arXiv 2406.18139): text-prior H2O selection plus a pivotal
merge of every evicted key into its most cosine-similar kept key, per layer and KV head.

As the paper states it: importance = attention each token received over the whole prefill
(column sums, all query rows); text tokens are ranked first (the "text prior": their score is
raised by the largest score); the recent window and the top-scored tokens are kept in equal
shares (its default: 10% recent + 10% heavy); each evicted key/value is merged into its most
similar kept key with the pivotal rule of pivotal_merge.py. Keys are compared on the cache's
backend (MATCHER): only each candidate's best pivot and its cosine come back to the host.

Where its code differs, and what we do: the released code compresses once at prefill and in
fact leaves every text token uncompressed (only image tokens count against the budget). Here
the budget covers all tokens, as in every method, so that methods are compared at equal memory;
the text prior still keeps text first whenever the budget allows. Sinks (default 4) are kept as
in every method here; LOOK-M has none, and they cost 4 slots.

merge="mass" (offered, not LOOK-M's: its default stays the pivotal rule) folds by mass_merge.py,
the masses being the whole-prompt scores, with a key-cosine floor (0.8 by default).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import MATCHER, PROMPT_SCORES, Method, MethodError, top_by_score
from .mass_merge import floor_for
from .pivotal_merge import MERGE_RULES, merge_plan
from .token_folding import fold


@dataclasses.dataclass
class LookM(Method):
    recent_share: float = 0.5
    text_label: int = 0
    merge: str = "pivotal"
    max_absorb: int = 15
    floor: float | None = None  # None: mass_merge.floor_for's default for the merge rule

    name = "lookm"
    needs = frozenset({PROMPT_SCORES, MATCHER})

    def __post_init__(self):
        super().__post_init__()
        if self.merge not in MERGE_RULES:
            raise MethodError(f"merge rule {self.merge!r} is not one of {', '.join(MERGE_RULES)}")

    def plan(self, layout, stats, n_layer, n_head_kv, slots):
        n = layout.n
        scores = stats.require(PROMPT_SCORES, n_layer, n_head_kv, n).astype(np.float64)
        match = stats.require(MATCHER, n_layer, n_head_kv, n)
        # the recent window: `recent_share` of the budget (LOOK-M: as many recent as heavy), at least `window`
        recent = min(max(self.window, int(self.recent_share * slots)), slots - min(self.sinks, n))
        protected = np.unique(np.r_[np.arange(min(self.sinks, n)), np.arange(max(0, n - recent), n)])
        text = layout.labels == self.text_label
        prior = scores + text * scores.max(axis=-1, keepdims=True)  # every text token outranks every other
        pivots = top_by_score(prior, protected, slots)
        floor = floor_for(self.merge, self.floor)
        return merge_plan(layout, pivots, self.merge,
                          lambda l, piv, cand: fold(match, l, piv, cand, self.max_absorb, floor), mass=scores)
