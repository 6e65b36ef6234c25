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

One input is not the key's own: `near_copies` (NEAR_COPIES_FEATURES, every fit since
2026-12-08), how many keys of the sequence look like this one, log mean_j exp(beta cos(k'_i, k'_j)).
The teacher's rows split their attention among a repeated phrase's copies, which a key alone
cannot show; the native graph computes it per merge (kv_cache.near_copies) and the predictor adds
its last weight times it. Measured in docs/RESULTS.md, "Near-copies built".

After KVzap (NVIDIA kvpress, kvzap/, arXiv 2601.07891), which maps a layer's hidden state to the
log KVzip score per KV head with one linear layer. Distillation: calibration/distillation.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import FlowMMError

FEATURES = "k+pair_lengths"  # [k, |rotated pairs of k|], k as cached (after RoPE)
RELATIVE_FEATURES = "unroped_k+pair_lengths+log_distance_to_end"  # k turned back by RoPE, and recency
NEAR_COPIES_FEATURES = RELATIVE_FEATURES + "+near_copies"  # and how many keys of the sequence look alike
NEAR_COPIES_BETA = 20.0  # sharpness of `near_copies` (chosen among 5 / 10 / 20: docs/RESULTS.md)
NEAR_COPIES_REFERENCE = 512  # keys each cell is compared with at most (beyond: a strided sample; the cost: RESULTS.md)
NEAR_COPIES = {"beta": NEAR_COPIES_BETA, "max_reference": NEAR_COPIES_REFERENCE}  # what every new fit uses
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


def features(k: np.ndarray, pairing: str, distance: np.ndarray | None = None,
             near_copies: np.ndarray | None = None) -> np.ndarray:
    """The predictor's input rows for cells with keys k [n, d]: [k, k_pair_lengths(k)], [n, 3d/2];
    with `distance` [n] (each cell's distance to the sequence's last position), log(1 + distance)
    appended, [n, 3d/2 + 1]; with `near_copies` [n] (`near_copies`), that too, [n, 3d/2 + 2]."""
    k = np.asarray(k, np.float64)
    cols = [k, k_pair_lengths(k, pairing)]
    if distance is not None:
        cols.append(np.log1p(np.asarray(distance, np.float64))[:, None])
    if near_copies is not None:
        cols.append(np.asarray(near_copies, np.float64)[:, None])
    return np.concatenate(cols, axis=-1)


def near_copies(k: np.ndarray, beta: float = NEAR_COPIES_BETA, max_reference: int = NEAR_COPIES_REFERENCE) -> np.ndarray:
    """How many keys of a sequence look like each one: for keys k [n, d] (turned back by RoPE,
    `unrope`), log mean_j exp(beta * cos(k_i, k_j)) over all n, [n]. A key with many near-copies
    (a repeated word, one of many near-identical records) scores high; the student learns what
    that is worth (a negative weight in most layers: what is repeated can go). With more than
    `max_reference` keys, the mean over the others is estimated from every stride-th key
    (stride = ceil(n / max_reference)) and the key's own term, exp(beta), is counted exactly.
    The numpy reference of the native graph (kv_cache.near_copies), in the same order."""
    k = np.asarray(k, np.float64)
    n = len(k)
    u = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
    stride = -(-n // max_reference)
    ref = u[::stride]
    total = np.exp(beta * (u @ ref.T - 1.0)).sum(1)  # exp(beta (cos - 1)) <= 1: no overflow
    if stride > 1:
        own = (np.arange(n) % stride == 0).astype(np.float64)
        total = 1.0 + np.maximum(total - own, 0.0) * (n - 1) / np.maximum(len(ref) - own, 1.0)
    return beta + np.log(total) - np.log(n)


def distance_to_end(positions: np.ndarray, end: int) -> np.ndarray:
    """Each position's distance to the last position of a sequence whose next position is `end`."""
    return (end - 1 - np.asarray(positions, np.int64)).astype(np.float64)


def unrope(k: np.ndarray, positions: np.ndarray, rope) -> np.ndarray:
    """Keys k [..., n, d] cached at `positions` [n], turned back by the plain RoPE of `rope`
    (methods.base.RopeGeometry): pair i of the first n_rot dimensions rotated by -pos * angle_i."""
    theta = -np.asarray(positions, np.float64)[:, None] * rope.angles()[None, :]  # [n, n_rot / 2]
    return rope.turn(k, np.cos(theta), np.sin(theta))


def n_features(head_dim_k: int, relative: bool = False, near_copies: bool = False) -> int:
    return head_dim_k + head_dim_k // 2 + int(relative) + int(near_copies)


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
    """weights [n_layer, n_head_kv, n_feat], bias [n_layer, n_head_kv]; with `near_copies`, the
    last feature's weight is near-copies' (n_feat one more)."""

    rope_pairing: str
    weights: np.ndarray
    bias: np.ndarray
    info: dict = dataclasses.field(default_factory=dict)  # what it was fitted on, how well it ranks
    relative: bool = False  # RELATIVE_FEATURES: keys turned back by RoPE, and the distance to the end
    near_copies: dict | None = None  # NEAR_COPIES_FEATURES: {"beta": .., "max_reference": ..}; needs relative

    def __post_init__(self):
        if self.rope_pairing not in PAIRINGS:
            raise PredictorError(f"predictor RoPE pairing {self.rope_pairing!r} is not one of {', '.join(PAIRINGS)}")
        w, b = np.asarray(self.weights), np.asarray(self.bias)
        if w.ndim != 3 or b.shape != w.shape[:2]:
            raise PredictorError(f"predictor weights {w.shape} and bias {b.shape} do not fit together "
                                 "([n_layer, n_head_kv, n_feat] and [n_layer, n_head_kv])")
        if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
            raise PredictorError("predictor weights are not all finite")
        if self.near_copies is not None:
            nc = self.near_copies
            if not self.relative:
                raise PredictorError("a near-copies predictor must be relative (its keys turned back by RoPE)")
            if not (isinstance(nc, dict) and set(nc) == {"beta", "max_reference"}
                    and isinstance(nc["beta"], (int, float)) and 0 < nc["beta"] <= 80
                    and isinstance(nc["max_reference"], int) and nc["max_reference"] >= 1):
                raise PredictorError(f"predictor near_copies {nc!r} is not {{'beta': (0, 80], 'max_reference': >= 1}}")

    @property
    def n_layer(self) -> int:
        return self.weights.shape[0]

    def check_layout(self, lay) -> None:
        want = n_features(lay.head_dim_k, self.relative, self.near_copies is not None)
        if self.weights.shape != (lay.n_layer, lay.n_head_kv, want):
            raise PredictorError(f"the predictor's weights {tuple(self.weights.shape)} do not fit this cache "
                                 f"({lay.n_layer} layers, {lay.n_head_kv} KV heads, {want} features)")

    def predict(self, layer: int, head: int, k: np.ndarray, distance: np.ndarray | None = None,
                near_copies: np.ndarray | None = None) -> np.ndarray:
        """numpy reference: the predicted log score of cells with keys k [n, d] (as the model
        computed them: no storage rotation); a `relative` predictor takes them turned back by
        `unrope`, with each cell's `distance` to the sequence's last position, and a near-copies
        one each cell's `near_copies` in its whole sequence."""
        if self.relative and distance is None:
            raise PredictorError("a relative predictor needs each cell's distance to the sequence's end")
        if (self.near_copies is not None) != (near_copies is not None):
            raise PredictorError("a near-copies predictor takes each cell's near-copies, and only it")
        return features(k, self.rope_pairing, distance if self.relative else None, near_copies) @ \
            self.weights[layer, head] + self.bias[layer, head]

    def key_weights(self, layer: int) -> np.ndarray:
        """[n_head_kv, n_feat] of the features the native predictor computes from each key
        (kv_cache.predict_scores): all but near-copies'."""
        return self.weights[layer, :, :-1] if self.near_copies is not None else self.weights[layer]

    @property
    def features_name(self) -> str:
        return NEAR_COPIES_FEATURES if self.near_copies is not None else RELATIVE_FEATURES if self.relative else FEATURES

    def to_json(self) -> dict:
        out = {"features": self.features_name, "rope_pairing": self.rope_pairing,
               "weights": np.asarray(self.weights, np.float32).round(6).tolist(),
               "bias": np.asarray(self.bias, np.float32).round(6).tolist(), "info": self.info}
        if self.near_copies is not None:
            out["near_copies"] = dict(self.near_copies)
        return out

    @classmethod
    def from_json(cls, data, where: str) -> "ImportancePredictor":
        if not isinstance(data, dict):
            raise PredictorError(f"{where}: 'predictor' must be an object")
        try:
            names = (FEATURES, RELATIVE_FEATURES, NEAR_COPIES_FEATURES)
            if data["features"] not in names:
                raise PredictorError(f"predictor features {data['features']!r} are not one of "
                                     f"{', '.join(map(repr, names))}")
            nc = data["features"] == NEAR_COPIES_FEATURES
            return cls(rope_pairing=data["rope_pairing"],
                       weights=np.asarray(data["weights"], np.float32), bias=np.asarray(data["bias"], np.float32),
                       info=dict(data.get("info") or {}), relative=data["features"] != FEATURES,
                       near_copies=data["near_copies"] if nc else None)
        except (KeyError, TypeError, ValueError) as e:
            raise PredictorError(f"{where}: bad predictor ({e})") from None
        except PredictorError as e:
            raise PredictorError(f"{where}: {e}") from None
