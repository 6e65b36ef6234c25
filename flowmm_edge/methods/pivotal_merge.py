"""Folding evicted tokens into kept ones: cosine matching and the merge weights (LOOK-M's pivotal
merge), shared by `lookm` and `flowmm`. Pure numpy; one (layer, KV head) at a time.

Pivotal merge (LOOK-M, arXiv 2406.18139, and its code's scatter_reduce(mean, include_self)):
pivot j absorbing candidates i_1..i_n becomes  (k_j + ½ Σ_i (k_i + k_j)) / (n + 1),
i.e. weight (1 + n/2)/(n + 1) on the pivot and ½/(n + 1) on each candidate: the weights sum
to 1 and the pivot never weighs less than ½. The same weights merge V.
"""

from __future__ import annotations

import numpy as np

from .base import MethodError, Plan, TokenLayout
from .mass_merge import mass_plan

MERGE_RULES = ("pivotal", "mean", "mass")  # mass: mass_merge.py (kept keys, mass-weighted values, log-mass bias)


def merge_weights(n_absorbed: int, rule: str) -> tuple[float, float]:
    """(pivot weight, weight of each absorbed candidate) for a pivot absorbing n_absorbed tokens."""
    if rule == "pivotal":
        return (1 + n_absorbed / 2) / (n_absorbed + 1), 0.5 / (n_absorbed + 1)
    if rule == "mean":
        return 1 / (n_absorbed + 1), 1 / (n_absorbed + 1)
    raise MethodError(f"merge rule {rule!r} is not one of {', '.join(MERGE_RULES)}")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] cosine similarity; a zero vector is similar to nothing (0)."""
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-30)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-30)
    return a @ b.T


def assign(sim: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """For each candidate row: the index of its most similar eligible pivot column, or -1 if none.

    eligible: bool, broadcastable to sim. Ties go to the earlier pivot (argmax takes the first)."""
    masked = np.where(eligible, sim, -np.inf)
    best = masked.argmax(axis=1) if masked.shape[1] else np.zeros(len(masked), np.int64)
    ok = np.isfinite(masked[np.arange(len(masked)), best]) if masked.shape[1] else np.zeros(len(masked), bool)
    return np.where(ok, best, -1)


def key_matcher(keys: np.ndarray):
    """The numpy reference of the backend's key matching (kv_cache.match_keys), over keys
    [n_layer, n_head_kv, n, head_dim]: match(layer, cand [H, C], piv [H, P], group [H, C],
    allowed [H, G, P]) -> (best [H, C], index into piv or -1; cosine [H, C] to that pivot)."""
    def match(layer, cand, piv, group, allowed):
        best = np.empty(cand.shape, np.int32)
        cos = np.zeros(cand.shape, np.float32)
        for h in range(cand.shape[0]):
            sim = cosine(keys[layer, h][cand[h]].astype(np.float64), keys[layer, h][piv[h]].astype(np.float64))
            best[h] = assign(sim, allowed[h][group[h]])
            cos[h] = sim[np.arange(len(sim)), np.maximum(best[h], 0)]
        return best, cos
    return match


def cap_absorbed(target: np.ndarray, sim_to_target: np.ndarray, n_pivots: int, max_absorb: int) -> np.ndarray:
    """Each pivot keeps at most `max_absorb` candidates, the most similar (ties: earlier candidate);
    the others are evicted (-1). This bounds a merge plan to B x (max_absorb + 1) sources."""
    target = target.copy()
    order = np.lexsort((np.arange(len(target)), -np.asarray(sim_to_target, np.float64), target))  # by pivot, best first
    grouped = target[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]]) if len(order) else np.zeros(0, np.int64)
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))  # place within its pivot
    target[order[(rank >= max_absorb) & (grouped >= 0)]] = -1
    return target


def build_plan(layout: TokenLayout, pivots: np.ndarray, absorbed: list[list[list[np.ndarray]]], rule: str) -> Plan:
    """A Plan from sorted pivots [n_layer, n_head_kv, B] and, per (layer, head, slot), the
    candidate indices merged into that slot. Source 0 of every slot is its pivot."""
    n_layer, n_head_kv, b = pivots.shape
    width = 1 + max((len(a) for per_l in absorbed for per_h in per_l for a in per_h), default=0)
    src = np.full((n_layer, n_head_kv, b, width), -1, np.int32)
    weight = np.zeros(src.shape, np.float32)
    src[..., 0] = pivots
    for l in range(n_layer):
        for h in range(n_head_kv):
            for s, cand in enumerate(absorbed[l][h]):
                wp, wc = merge_weights(len(cand), rule)
                weight[l, h, s, 0] = wp
                src[l, h, s, 1:1 + len(cand)] = cand
                weight[l, h, s, 1:1 + len(cand)] = wc
    return Plan(src=src, weight=weight, slot_pos=layout.positions[pivots[0, 0]])


def merge_plan(layout: TokenLayout, pivots: np.ndarray, rule: str, fold_one, mass: np.ndarray | None = None) -> Plan:
    """A Plan from pivots [n_layer, n_head_kv, B]: fold_one(layer, head, pivots, candidates)
    returns per pivot the candidates merged into it; the rest are evicted. The "mass" rule needs
    the cells' attention mass [n_layer, n_head_kv, n]."""
    n_layer, n_head_kv, _ = pivots.shape
    every = np.arange(layout.n)
    absorbed = [[fold_one(l, h, pivots[l, h], np.setdiff1d(every, pivots[l, h])) for h in range(n_head_kv)]
                for l in range(n_layer)]
    if rule == "mass":
        return mass_plan(layout, pivots, absorbed, mass)
    return build_plan(layout, pivots, absorbed, rule)


def absorbed_lists(target: np.ndarray, candidates: np.ndarray, n_pivots: int) -> list[np.ndarray]:
    """Per pivot slot, the candidate indices assigned to it (in position order)."""
    return [candidates[target == j] for j in range(n_pivots)]


def fold(cand: np.ndarray, piv: np.ndarray, keys: np.ndarray, eligible: np.ndarray, max_absorb: int,
         fallback: np.ndarray | None = None, floor: float | None = None) -> list[np.ndarray]:
    """Match candidates to their most similar eligible pivot (then, for those left without one,
    to the most similar pivot allowed by `fallback`), cap each pivot at max_absorb, and return
    per pivot the candidates it absorbs. eligible/fallback: bool, broadcastable to [cand, piv].
    With a floor, a candidate whose best allowed cosine is below it is evicted."""
    sim = cosine(keys[cand], keys[piv])
    above = np.ones(sim.shape, bool) if floor is None else sim >= floor
    target = assign(sim, eligible & above)
    if fallback is not None:
        retry = target < 0
        target[retry] = assign(sim[retry], (np.broadcast_to(fallback, sim.shape) & above)[retry])
    best = sim[np.arange(len(cand)), np.maximum(target, 0)]
    return absorbed_lists(cap_absorbed(target, best, len(piv), max_absorb), cand, len(piv))
