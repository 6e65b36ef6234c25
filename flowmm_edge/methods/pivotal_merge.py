"""The merge weights of a fold (LOOK-M's pivotal merge, and a plain mean) and the Plan they make,
shared by `lookm` and `flowmm`; what folds into what is token_folding.py's. Pure numpy.

Pivotal merge (LOOK-M, arXiv 2406.18139, and its code's scatter_reduce(mean, include_self)):
pivot j absorbing candidates i_1..i_n becomes  (k_j + ½ Σ_i (k_i + k_j)) / (n + 1),
i.e. weight (1 + n/2)/(n + 1) on the pivot and ½/(n + 1) on each candidate: the weights sum
to 1 and the pivot never weighs less than ½. The same weights merge V.
"""

from __future__ import annotations

import numpy as np

from .base import MethodError, Plan, TokenLayout, merge_sources
from .mass_merge import mass_plan
from .token_folding import candidates

MERGE_RULES = ("pivotal", "mean", "mass")  # mass: mass_merge.py (kept keys, mass-weighted values, log-mass bias)


def merge_weights(n_absorbed: int, rule: str) -> tuple[float, float]:
    """(pivot weight, weight of each absorbed candidate) for a pivot absorbing n_absorbed tokens."""
    if rule == "pivotal":
        return (1 + n_absorbed / 2) / (n_absorbed + 1), 0.5 / (n_absorbed + 1)
    if rule == "mean":
        return 1 / (n_absorbed + 1), 1 / (n_absorbed + 1)
    raise MethodError(f"merge rule {rule!r} is not one of {', '.join(MERGE_RULES)}")


def build_plan(layout: TokenLayout, src: np.ndarray, rule: str) -> Plan:
    """A Plan from each slot's sources [n_layer, n_head_kv, B, S] (base.merge_sources: the pivot
    first, -1 unused), K and V weighted alike by `rule`."""
    n_absorbed = (src[..., 1:] >= 0).sum(axis=-1, keepdims=True)
    wp, wc = merge_weights(n_absorbed, rule)  # every slot at once
    weight = np.where(src >= 0, wc, 0.0).astype(np.float32)
    weight[..., :1] = wp
    return Plan(src=src, weight=weight, slot_pos=layout.positions[src[0, 0, :, 0]])


def merge_plan(layout: TokenLayout, pivots: np.ndarray, rule: str, fold_layer, mass: np.ndarray | None = None) -> Plan:
    """A Plan from pivots [n_layer, n_head_kv, B]: fold_layer(layer, pivots [H, B], candidates [H, C])
    returns each candidate's slot [H, C] (-1: evicted). The "mass" rule needs the cells' attention
    mass [n_layer, n_head_kv, n]."""
    cand = candidates(pivots, layout.n)
    target = np.stack([fold_layer(l, pivots[l], cand[l]) for l in range(len(pivots))])
    src = merge_sources(pivots, cand, target)
    return mass_plan(layout, src, mass) if rule == "mass" else build_plan(layout, src, rule)
