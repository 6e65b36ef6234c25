"""A learned importance: per (layer, KV head), a linear map from what the cache holds at a cell to
the log of the reconstruction score that the repeat pass (reconstruction.py) would give it.

    score = w . [k, |rotated pairs of k|] + b          (as cached)
    score = w . [k', |rotated pairs of k|, log(1 + distance to the end)] + b   (relative: k' = k turned back)

The features are the cell's own cached key, so nothing runs while decoding: the score is one
small matrix product per layer over the cache, computed on the cache's backend when a merge
plans (kv_cache.predict_scores, the native graph) and reproduced here in numpy (`features`,
`predict`) as the reference the tests hold the graph to.

K is cached after RoPE, which rotates each pair of dimensions (i, i + d/2 for NEOX-style models
such as Qwen2, 2i and 2i + 1 for the original style) by an angle that grows with the position.
A linear map of raw K therefore means something different at every position. The length of
each rotated pair does not change with the position. The features are both: k and the d/2 pair
lengths. A `relative` predictor (RELATIVE_FEATURES, every fit since 2026-12-06) sees positions only
relative to the sequence's end: it first turns each key back by the plain RoPE of its own position
(`unrope`; the native graph does the same with ggml_rope_ext at -pos), so k means the same at every
position, and takes log(1 + the cell's distance to the sequence's last position) as one more
feature, the recency that raw K carried within a document. Fitted on documents at positions 0-2k,
it ranks a chat's later turns as it ranks a document at 0. One fitted on cached K as it is
(FEATURES, the shipped one) ranks the same document 0.59-0.73 alike, by Spearman, once it sits
2-6k positions later (docs/RESULTS.md, "Importance at every position"). Measured against the
alternatives (pair lengths alone, raw K alone, with V) in docs/METHOD.md, 'Learned importance'
(scripts/predictor_features.py).

After KVzap (NVIDIA kvpress, kvzap/, arXiv 2601.07891), which maps a layer's hidden state to the
log KVzip score per KV head with one linear layer. Distillation: calibration/distillation.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import FlowMMError

FEATURES = "k+pair_lengths"  # [k, |rotated pairs of k|], k as cached (after RoPE)
RELATIVE_FEATURES = "unroped_k+pair_lengths+log_distance_to_end"  # k turned back by RoPE, and recency
PAIRINGS = ("halves", "adjacent")  # RoPE's pairs: (i, i + d/2) NEOX-style, (2i, 2i + 1) the original
LOG_FLOOR = 1e-4  # added to the teacher's attention mass before the log (a cell nobody looked at)


class PredictorError(FlowMMError):
    pass


def rope_pairing(rope_type: int) -> str:
    """The pairing of llama.cpp's rope type (llama_model_rope_type): NORM (0) rotates adjacent
    dimensions, NEOX (2) and the multi-section kinds built on it rotate the two halves."""
    return "adjacent" if rope_type == 0 else "halves"


def k_pair_lengths(k: np.ndarray, pairing: str) -> np.ndarray:
    """[n, d] rotated keys -> [n, d/2] the length of each rotated pair (unchanged by RoPE)."""
    half = k.shape[-1] // 2
    a, b = (k[..., :half], k[..., half:]) if pairing == "halves" else (k[..., 0::2], k[..., 1::2])
    return np.sqrt(a * a + b * b)


def features(k: np.ndarray, pairing: str, distance: np.ndarray | None = None) -> np.ndarray:
    """The predictor's input rows for cells with keys k [n, d]: [k, k_pair_lengths(k)], [n, 3d/2];
    with `distance` [n] (each cell's distance to the sequence's last position), log(1 + distance)
    appended, [n, 3d/2 + 1]."""
    k = np.asarray(k, np.float64)
    cols = [k, k_pair_lengths(k, pairing)]
    if distance is not None:
        cols.append(np.log1p(np.asarray(distance, np.float64))[:, None])
    return np.concatenate(cols, axis=-1)


def distance_to_end(positions: np.ndarray, end: int) -> np.ndarray:
    """Each position's distance to the last position of a sequence whose next position is `end`."""
    return (end - 1 - np.asarray(positions, np.int64)).astype(np.float64)


def unrope(k: np.ndarray, positions: np.ndarray, rope) -> np.ndarray:
    """Keys k [..., n, d] cached at `positions` [n], turned back by the plain RoPE of `rope`
    (methods.base.RopeGeometry): pair i of the first n_rot dimensions rotated by -pos * angle_i."""
    theta = -np.asarray(positions, np.float64)[:, None] * rope.angles()[None, :]  # [n, n_rot / 2]
    return rope.turn(k, np.cos(theta), np.sin(theta))


def n_features(head_dim_k: int, relative: bool = False) -> int:
    return head_dim_k + head_dim_k // 2 + int(relative)


def fit_ridge(x: np.ndarray, y: np.ndarray, ridge: float, weight: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Closed-form ridge regression of y [n] on x [n, f], each sample weighted by `weight` [n]
    (None: all 1), with the features standardised for the penalty and the standardisation folded
    back into the weights: returns (w [f], b)."""
    wt = np.ones(len(y)) if weight is None else np.asarray(weight, np.float64)
    wt = wt / wt.mean()
    mu = wt @ x / len(x)
    sd = np.sqrt(wt @ (x - mu) ** 2 / len(x)) + 1e-6
    z = (x - mu) / sd
    ym = wt @ y / len(y)
    zw = z * wt[:, None]
    w = np.linalg.solve(zw.T @ z + ridge * len(z) * np.eye(z.shape[1]), zw.T @ (y - ym))
    w = w / sd
    return w, float(ym - mu @ w)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / np.sqrt((ra @ ra) * (rb @ rb) + 1e-12))


def top_recall(pred: np.ndarray, teacher: np.ndarray, share: float = 0.1) -> float:
    """The share of the teacher's top `share` of cells that are also in the prediction's top
    `share`: what a merge keeping that share would keep of what the teacher keeps."""
    n = max(1, int(len(teacher) * share))
    return len(set(np.argsort(-pred)[:n].tolist()) & set(np.argsort(-teacher)[:n].tolist())) / n


@dataclasses.dataclass(frozen=True)
class ImportancePredictor:
    """weights [n_layer, n_head_kv, n_feat], bias [n_layer, n_head_kv]."""

    rope_pairing: str
    weights: np.ndarray
    bias: np.ndarray
    info: dict = dataclasses.field(default_factory=dict)  # what it was fitted on, how well it ranks
    relative: bool = False  # RELATIVE_FEATURES: keys turned back by RoPE, and the distance to the end

    def __post_init__(self):
        if self.rope_pairing not in PAIRINGS:
            raise PredictorError(f"predictor RoPE pairing {self.rope_pairing!r} is not one of {', '.join(PAIRINGS)}")
        w, b = np.asarray(self.weights), np.asarray(self.bias)
        if w.ndim != 3 or b.shape != w.shape[:2]:
            raise PredictorError(f"predictor weights {w.shape} and bias {b.shape} do not fit together "
                                 "([n_layer, n_head_kv, n_feat] and [n_layer, n_head_kv])")
        if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
            raise PredictorError("predictor weights are not all finite")

    @property
    def n_layer(self) -> int:
        return self.weights.shape[0]

    def check_layout(self, lay) -> None:
        want = n_features(lay.head_dim_k, self.relative)
        if self.weights.shape != (lay.n_layer, lay.n_head_kv, want):
            raise PredictorError(f"the predictor's weights {tuple(self.weights.shape)} do not fit this cache "
                                 f"({lay.n_layer} layers, {lay.n_head_kv} KV heads, {want} features)")

    def predict(self, layer: int, head: int, k: np.ndarray, distance: np.ndarray | None = None) -> np.ndarray:
        """numpy reference: the predicted log score of cells with keys k [n, d] (as the model
        computed them: no storage rotation); a `relative` predictor takes them turned back by
        `unrope`, with each cell's `distance` to the sequence's last position."""
        if self.relative and distance is None:
            raise PredictorError("a relative predictor needs each cell's distance to the sequence's end")
        return features(k, self.rope_pairing, distance if self.relative else None) @ self.weights[layer, head] + \
            self.bias[layer, head]

    def to_json(self) -> dict:
        return {"features": RELATIVE_FEATURES if self.relative else FEATURES, "rope_pairing": self.rope_pairing,
                "weights": np.asarray(self.weights, np.float32).round(6).tolist(),
                "bias": np.asarray(self.bias, np.float32).round(6).tolist(), "info": self.info}

    @classmethod
    def from_json(cls, data, where: str) -> "ImportancePredictor":
        if not isinstance(data, dict):
            raise PredictorError(f"{where}: 'predictor' must be an object")
        try:
            if data["features"] not in (FEATURES, RELATIVE_FEATURES):
                raise PredictorError(f"predictor features {data['features']!r} are not {FEATURES!r} or "
                                     f"{RELATIVE_FEATURES!r}")
            return cls(rope_pairing=data["rope_pairing"],
                       weights=np.asarray(data["weights"], np.float32), bias=np.asarray(data["bias"], np.float32),
                       info=dict(data.get("info") or {}), relative=data["features"] == RELATIVE_FEATURES)
        except (KeyError, TypeError, ValueError) as e:
            raise PredictorError(f"{where}: bad predictor ({e})") from None
        except PredictorError as e:
            raise PredictorError(f"{where}: {e}") from None
