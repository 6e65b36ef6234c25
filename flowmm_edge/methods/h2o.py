"""`h2o` (Zhang et al. 2023): heavy hitters by attention accumulated over every prompt row, plus
the recent window, per layer and KV head. (Our sinks default to 4 as in every method here.)"""

from __future__ import annotations

import dataclasses

from .base import PROMPT_SCORES, Method, keep_plan, top_by_score


@dataclasses.dataclass
class H2O(Method):
    name = "h2o"
    needs = frozenset({PROMPT_SCORES})

    def plan(self, layout, stats, n_layer, n_head_kv, slots):
        scores = stats.require(PROMPT_SCORES, n_layer, n_head_kv, layout.n)
        return keep_plan(layout, top_by_score(scores, self.protected(layout.n), slots))
