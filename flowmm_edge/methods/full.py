"""`full`: no compression; every cell kept (the reference every other method is measured against)."""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import Method, Plan, Stats, TokenLayout, keep_plan


@dataclasses.dataclass
class Full(Method):
    name = "full"

    def __call__(self, layout: TokenLayout, stats: Stats, n_layer: int, n_head_kv: int, budget=1.0) -> Plan:
        return self.plan(layout, stats, n_layer, n_head_kv, layout.n)

    def plan(self, layout, stats, n_layer, n_head_kv, slots):
        return keep_plan(layout, np.broadcast_to(np.arange(layout.n), (n_layer, n_head_kv, layout.n)))
