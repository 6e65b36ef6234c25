"""`h2o` (Zhang et al. 2023): heavy hitters by attention accumulated over every prompt row, plus
the recent window, per layer and KV head. (Our sinks default to 4 as in every method here.)"""

from __future__ import annotations

import dataclasses

from .base import PROMPT_SCORES, ScorerMethod


@dataclasses.dataclass
class H2O(ScorerMethod):
    name = "h2o"
    needs = frozenset({PROMPT_SCORES})

    def score(self, stats, n_layer, n_head_kv, n):
        return stats.require(PROMPT_SCORES, n_layer, n_head_kv, n)
