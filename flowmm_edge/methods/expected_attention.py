"""`expected_attention` (NVIDIA kvpress's ExpectedAttentionPress; training-free): a cell's score
is the attention the queries of the coming positions are expected to give its key. Those queries
are modelled by the mean query of the observation window (its last `window` rows, as SnapKV
observes them), turned by RoPE's average rotation over the next `n_future_positions` positions;
each query head's softmax over the cells, averaged over the heads that share a KV head. The top
cells per (layer, KV head) are kept, with the sinks and the recent window; the rest are evicted.

For a model with no distilled importance predictor it costs what SnapKV's observation costs, and
unlike SnapKV's window scores it does not look only at what the window itself attends to.

Where it differs from kvpress, and why:
- the query mean is the observation window's (kvpress: every row of the context but the first
  n_sink), because that is the one set of rows whose statistics a prefill gathers here for free;
- the covariance term and the rescaling by value norms are left out (kvpress's
  use_covariance=False, use_vnorm=False): the score is then one linear function of each cached
  key, computed on the cache's backend by the importance predictor's graph
  (kv_cache.predict_scores), and only [KV heads, cells] floats come back per query head.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import KEY_SCORER, QUERY_MEANS, ROPE, RopeGeometry, ScorerMethod


def future_query(mean: np.ndarray, rope: RopeGeometry, offset: float, n_future: int) -> np.ndarray:
    """[..., head_dim]: `mean` (queries at their own positions, RoPE applied) turned by RoPE's
    average rotation over the positions offset, offset + 1, ..., offset + n_future - 1 ahead.
    Pair (a, b) turns as llama.cpp's RoPE does: (a cos - b sin, a sin + b cos), averaged."""
    theta = rope.angles()
    steps = offset + np.arange(n_future, dtype=np.float64)
    cos, sin = np.cos(np.outer(steps, theta)).mean(axis=0), np.sin(np.outer(steps, theta)).mean(axis=0)
    return rope.turn(mean, cos, sin)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@dataclasses.dataclass
class ExpectedAttention(ScorerMethod):
    n_future_positions: int = 512  # kvpress's default

    name = "expected_attention"
    needs = frozenset({QUERY_MEANS, KEY_SCORER, ROPE})

    def score(self, stats, n_layer: int, n_head_kv: int, n: int) -> np.ndarray:
        """[n_layer, n_head_kv, n]: each cell's expected attention, averaged over its KV head's query heads."""
        means = stats.require(QUERY_MEANS, n_layer, n_head_kv, n)
        rope = stats.require(ROPE, n_layer, n_head_kv, n)
        score_keys = stats.require(KEY_SCORER, n_layer, n_head_kv, n)
        n_head, head_dim = means.shape[1:]
        group = n_head // n_head_kv
        # the window's rows sit (window + 1) / 2 positions behind the end on average
        mu = future_query(means, rope, (self.window + 1) / 2, self.n_future_positions) / np.sqrt(head_dim)
        out = np.zeros((n_layer, n_head_kv, n))
        no_pairs, no_bias = np.zeros((n_head_kv, head_dim // 2)), np.zeros(n_head_kv)
        for layer in range(n_layer):
            by_kv = mu[layer].reshape(n_head_kv, group, head_dim)  # query head h reads KV head h // group
            for j in range(group):
                logits = score_keys(layer, np.concatenate([by_kv[:, j], no_pairs], axis=1), no_bias)
                out[layer] += softmax(np.asarray(logits, np.float64))
        return out / group

