"""`random`: a control; the sinks, the recent window and a seeded random choice of the rest."""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import ScorerMethod


@dataclasses.dataclass
class RandomKeep(ScorerMethod):
    seed: int = 0

    name = "random"

    def score(self, stats, n_layer, n_head_kv, n):
        return np.random.default_rng(self.seed).random((n_layer, n_head_kv, n))
