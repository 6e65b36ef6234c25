"""`snapkv` (Li et al. 2024): attention from the observation window (the last `window` prompt
rows), smoothed by 1-D average pooling (kernel 7, the paper's default) so that neighbours of
important tokens survive, top-k per layer and KV head, plus the window itself."""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import WINDOW_SCORES, ScorerMethod


def avg_pool(scores: np.ndarray, kernel: int) -> np.ndarray:
    """Mean over a centred window of `kernel` cells (stride 1, shrinking at the edges)."""
    pad = kernel // 2
    n = scores.shape[-1]
    c = np.zeros(scores.shape[:-1] + (n + 1,), np.result_type(scores, np.float64))
    np.cumsum(scores, axis=-1, out=c[..., 1:])  # in place: this runs on [layers, heads, cells] at 16k and more
    lo = np.clip(np.arange(n) - pad, 0, n)
    hi = np.clip(np.arange(n) + pad + 1, 0, n)
    out = c[..., hi]
    out -= c[..., lo]
    out /= hi - lo
    return out


@dataclasses.dataclass
class SnapKV(ScorerMethod):
    kernel: int = 7  # average pooling of the scores (SnapKV's clustering)

    name = "snapkv"
    needs = frozenset({WINDOW_SCORES})

    def score(self, stats, n_layer, n_head_kv, n):
        return avg_pool(stats.require(WINDOW_SCORES, n_layer, n_head_kv, n), self.kernel)
