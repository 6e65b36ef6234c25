"""`random`: a control; the sinks, the recent window and a seeded random choice of the rest."""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import Method, keep_plan, top_by_score


@dataclasses.dataclass
class RandomKeep(Method):
    seed: int = 0

    name = "random"

    def plan(self, layout, stats, n_layer, n_head_kv, slots):
        scores = np.random.default_rng(self.seed).random((n_layer, n_head_kv, layout.n))
        return keep_plan(layout, top_by_score(scores, self.protected(layout.n), slots))
