"""`streaming` (StreamingLLM, Xiao et al. 2023): the attention sinks and the most recent tokens."""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import Method, keep_plan


@dataclasses.dataclass
class Streaming(Method):
    name = "streaming"

    def plan(self, layout, stats, n_layer, n_head_kv, slots):
        n = layout.n
        sinks = np.arange(min(self.sinks, slots - 1))
        keep = np.r_[sinks, np.arange(n - (slots - len(sinks)), n)]
        return keep_plan(layout, np.broadcast_to(keep, (n_layer, n_head_kv, slots)))
