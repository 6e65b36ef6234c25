"""Which evicted token folds into which kept one, by key similarity: the candidates left beside
the pivots, cosine matching (gated by which pivots each candidate may join), a floor on the
cosine, and a cap on what each pivot absorbs. Shared by `lookm` and `flowmm` whatever their merge
rule (pivotal_merge.py, mass_merge.py). Pure numpy, imports nothing of this package.

`key_matcher` is the numpy reference of the backend's key matching (base.MATCHER,
kv_cache.match_keys); `fold` and `match_above` take either.
"""

from __future__ import annotations

import numpy as np


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


def candidates(pivots: np.ndarray, n: int) -> np.ndarray:
    """[..., n - B]: per row of sorted pivots [..., B], the other cells of 0..n-1 in order."""
    keep = np.ones(pivots.shape[:-1] + (n,), bool)
    np.put_along_axis(keep, pivots, False, axis=-1)
    out = np.empty(pivots.shape[:-1] + (n - pivots.shape[-1],), np.int32)
    rows = out.reshape(int(np.prod(out.shape[:-1])), out.shape[-1])
    for r, row in enumerate(keep.reshape(-1, n)):  # a row at a time: nonzero over all of them held 3 int64 copies
        rows[r] = np.flatnonzero(row)
    return out


def match_above(match, layer: int, cand: np.ndarray, piv: np.ndarray, group: np.ndarray, allowed: np.ndarray,
                floor: float | None) -> tuple[np.ndarray, np.ndarray]:
    """`match`'s (best pivot [H, C], its cosine [H, C]) (see key_matcher), with a best pivot whose
    cosine is below `floor` dropped (-1): that candidate is evicted, not folded."""
    best, cos = match(layer, cand, piv, group, allowed)
    return (best if floor is None else np.where(cos >= floor, best, -1)), cos


def fold(match, layer: int, piv: np.ndarray, cand: np.ndarray, max_absorb: int,
         floor: float | None = None) -> np.ndarray:
    """Each candidate's slot [H, C] (-1: evicted): each candidate [H, C] goes to its most similar
    pivot [H, P] by key cosine (`match`, see key_matcher: the cache's backend or numpy), unless
    that cosine is below `floor`; each pivot keeps at most max_absorb, the most similar."""
    n_head_kv, n_piv = piv.shape
    best, cos = match_above(match, layer, cand, piv, np.zeros(cand.shape, np.int32),
                            np.ones((n_head_kv, 1, n_piv), bool), floor)
    return np.stack([cap_absorbed(best[h], cos[h], n_piv, max_absorb) for h in range(n_head_kv)])
