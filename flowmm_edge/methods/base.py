"""The one interface every KV-compression method implements (in the spirit of NVIDIA kvpress).

A method sees the token layout (position and modality label of every cell of a sequence),
the statistics it declared it needs, and returns a merge plan for a budget. It never touches
llama.cpp: `Plan.to_cells` maps its cell *indices* (0..n-1, the order of
`kv_cache.seq_cells`) to the cache's cell ids for `kv_cache.apply_plan`.
"""

from __future__ import annotations

import abc
import dataclasses

import numpy as np

from ..errors import MethodError
from ..bindings.kv_cache import MergePlan
from .budget import Budget
from .token_folding import key_matcher

WINDOW_SCORES = "window_scores"  # [n_layer, n_head_kv, n] mass from the observation window, per KV-head group
PROMPT_SCORES = "prompt_scores"  # [n_layer, n_head_kv, n] mass from every prompt row (H2O's accumulator)
RECONSTRUCTION_SCORES = "reconstruction_scores"  # [n_layer, n_head_kv, n] mass from a repeat-the-context pass
PREDICTED_SCORES = "predicted_scores"  # [n_layer, n_head_kv, n] the reconstruction mass an ImportancePredictor
                                       # (importance_predictor.py) expects from each cell's cached key
RHO = "rho"                      # [n_layer] cross-modal share of attention (docs/METHOD.md, 'Cross-modal flow (rho)')
KEYS = "keys"                    # [n_layer, n_head_kv, n, head_dim] keys as stored in the cache
MATCHER = "matcher"              # key matching on the cache's backend (kv_cache.match_keys), in cell indices;
                                 # token_folding.key_matcher is its numpy reference over KEYS
QUERY_MEANS = "query_means"      # [n_layer, n_head, head_dim] the observation window's mean query (RoPE applied)
KEY_SCORER = "key_scorer"        # callable(layer, weights [n_head_kv, n_feat], bias [n_head_kv]) -> [n_head_kv, n]:
                                 # weights . [k, pair lengths of k] + bias per cell, on the cache's backend
                                 # (kv_cache.predict_scores), in cell indices
ROPE = "rope"                    # the model's RoPE: RopeGeometry
VALUE_NORMS = "value_norms"      # [n_layer, n_head_kv, n] |v| of each cell (kv_cache.value_norms, on the cache's backend)
STATISTICS = (WINDOW_SCORES, PROMPT_SCORES, RECONSTRUCTION_SCORES, PREDICTED_SCORES, RHO, KEYS, MATCHER,
              QUERY_MEANS, KEY_SCORER, ROPE, VALUE_NORMS)


@dataclasses.dataclass(frozen=True)
class RopeGeometry:
    """Which key dimensions RoPE rotates together ("halves": i and i + n_rot/2, NEOX; "adjacent":
    2i and 2i + 1) and by how much per position: pair i turns by freq_scale * freq_base^(-2i/n_rot)."""

    freq_base: float
    n_rot: int
    pairing: str
    freq_scale: float = 1.0

    def angles(self) -> np.ndarray:
        """[n_rot / 2] radians per position of each rotated pair."""
        return self.freq_scale * self.freq_base ** (-np.arange(0, self.n_rot, 2, dtype=np.float64) / self.n_rot)

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(first, second) dimension of each rotated pair."""
        i = np.arange(self.n_rot // 2)
        return (i, i + self.n_rot // 2) if self.pairing == "halves" else (2 * i, 2 * i + 1)

    def turn(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """[..., head_dim] float64: `x` with each rotated pair (a, b) turned as llama.cpp's RoPE
        turns it, (a cos - b sin, a sin + b cos); cos and sin [..., n_rot / 2] broadcast against
        x's pairs. Dimensions past n_rot are kept."""
        first, second = self.pairs()
        out = np.array(x, dtype=np.float64, copy=True)
        a, b = out[..., first].copy(), out[..., second].copy()
        out[..., first] = a * cos - b * sin
        out[..., second] = a * sin + b * cos
        return out


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Position and modality label (0 = text, 1.. = images or other spans) of each cell, in cell order."""

    positions: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if len(self.positions) != len(self.labels) or len(self.positions) == 0:
            raise MethodError(f"layout has {len(self.positions)} positions and {len(self.labels)} labels")
        if np.any(np.diff(self.positions) <= 0):
            raise MethodError("layout positions must be strictly increasing")

    @property
    def n(self) -> int:
        return len(self.positions)


@dataclasses.dataclass
class Stats:
    window_scores: np.ndarray | None = None
    prompt_scores: np.ndarray | None = None
    reconstruction_scores: np.ndarray | None = None
    predicted_scores: np.ndarray | None = None
    rho: np.ndarray | None = None
    keys: np.ndarray | None = None
    matcher: object = None  # callable, see MATCHER; without one, the numpy reference over `keys`
    query_means: np.ndarray | None = None
    key_scorer: object = None  # callable, see KEY_SCORER
    rope: RopeGeometry | None = None
    value_norms: np.ndarray | None = None
    # [n] bool: cells the importance source did not score (the repeat pass hid them: the recent
    # window, compression/reconstruction.hidden_tail); kept as they are, never a merge's target
    unscored: np.ndarray | None = None

    def require(self, name: str, n_layer: int, n_head_kv: int, n: int) -> np.ndarray:
        if name == MATCHER:  # the backend's, or the numpy reference over the keys
            if self.matcher is not None:
                return self.matcher
            return key_matcher(self.require(KEYS, n_layer, n_head_kv, n))
        value = getattr(self, name)
        if value is None:
            raise MethodError(f"the method needs {name}, which was not computed")
        if name in (KEY_SCORER, ROPE):
            return value
        if name == QUERY_MEANS and (value.ndim != 3 or value.shape[0] != n_layer or value.shape[1] % n_head_kv):
            raise MethodError(f"query means have shape {value.shape}, expected ({n_layer}, n_head, head_dim)")
        scores = (n_layer, n_head_kv, n)
        want = {WINDOW_SCORES: scores, PROMPT_SCORES: scores, RECONSTRUCTION_SCORES: scores, PREDICTED_SCORES: scores,
                VALUE_NORMS: scores, RHO: (n_layer,)}.get(name)
        if want is not None and value.shape != want:
            raise MethodError(f"{name} has shape {value.shape}, expected {want}")
        if name == KEYS and value.shape[:3] != (n_layer, n_head_kv, n):
            raise MethodError(f"keys have shape {value.shape}, expected ({n_layer}, {n_head_kv}, {n}, head_dim)")
        if not np.all(np.isfinite(value)):
            raise MethodError(f"{name} contains NaN or infinite values")
        return value


@dataclasses.dataclass
class Plan:
    """A merge plan in cell *indices*: src [n_layer, n_head_kv, B, S] (-1 unused), weight, slot_pos [B];
    v_weight: V's own weights (K keeps `weight`), or None for both merged alike; bias_gain
    [n_layer, n_head_kv, B]: added to the attention bias each slot's first source carried."""

    src: np.ndarray
    weight: np.ndarray
    slot_pos: np.ndarray
    v_weight: np.ndarray | None = None
    bias_gain: np.ndarray | None = None

    @property
    def n_slots(self) -> int:
        return self.src.shape[2]

    def to_cells(self, cells: np.ndarray) -> MergePlan:
        cells = np.asarray(cells, dtype=np.int32)
        src = np.where(self.src >= 0, cells[np.maximum(self.src, 0)], -1).astype(np.int32)
        return MergePlan(src=src, weight=self.weight.astype(np.float32, copy=False),
                         slot_pos=self.slot_pos.astype(np.int32),
                         v_weight=None if self.v_weight is None else self.v_weight.astype(np.float32, copy=False))


@dataclasses.dataclass
class Method(abc.ABC):
    """A KV-compression method (kvpress's shape: a small dataclass of its settings): declare
    `needs`, implement `plan`. `name` and `needs` are class attributes, not settings; a subclass
    checks its settings in __post_init__ (calling this one)."""

    sinks: int = 4    # the first cells, always kept (attention sinks)
    window: int = 32  # the last cells, always kept; also the observation window's rows

    name = "?"
    needs = frozenset()

    def __post_init__(self):
        if self.sinks < 0 or self.window < 1:
            raise MethodError(f"sinks must be >= 0 and window >= 1 (got {self.sinks}, {self.window})")

    def protected(self, n: int) -> np.ndarray:
        """Cell indices always kept: the attention sinks, the recent window (which holds the last token)."""
        return np.unique(np.r_[np.arange(min(self.sinks, n)), np.arange(max(0, n - self.window), n)])

    def __call__(self, layout: TokenLayout, stats: Stats, n_layer: int, n_head_kv: int,
                 budget: Budget | float | int) -> Plan:
        slots = Budget.of(budget).slots(layout.n, len(self.protected(layout.n)))
        return self.plan(layout, stats, n_layer, n_head_kv, slots)

    @abc.abstractmethod
    def plan(self, layout: TokenLayout, stats: Stats, n_layer: int, n_head_kv: int, slots: int) -> Plan:
        ...


@dataclasses.dataclass
class ScorerMethod(Method):
    """A method that keeps, per layer and KV head, the protected cells and the highest-scoring
    others (kvpress's ScorerPress): a subclass writes only `score`."""

    @abc.abstractmethod
    def score(self, stats: Stats, n_layer: int, n_head_kv: int, n: int) -> np.ndarray:
        """Each cell's score, [n_layer, n_head_kv, n]: higher is kept first."""

    def plan(self, layout: TokenLayout, stats: Stats, n_layer: int, n_head_kv: int, slots: int) -> Plan:
        scores = self.score(stats, n_layer, n_head_kv, layout.n)
        return keep_plan(layout, top_by_score(scores, self.protected(layout.n), slots))


def top_by_score(scores: np.ndarray, protected: np.ndarray, slots: int) -> np.ndarray:
    """Per row of scores [..., n]: the protected indices plus the highest-scoring others, sorted.

    Ties go to the earlier position (lexsort is stable). Every row at once."""
    n = scores.shape[-1]
    mask = np.zeros(n, bool)
    mask[protected] = True
    flat = scores.reshape(-1, n)
    # protected first, then by descending score, then by position
    order = np.lexsort((-flat, np.broadcast_to(~mask, flat.shape)), axis=-1)
    return np.sort(order[:, :slots], axis=-1).astype(np.int64).reshape(scores.shape[:-1] + (slots,))


def merge_sources(pivots: np.ndarray, cand: np.ndarray, target: np.ndarray) -> np.ndarray:
    """A merge plan's src [n_layer, n_head_kv, B, 1 + the largest group] from sorted pivots
    [n_layer, n_head_kv, B], candidates [n_layer, n_head_kv, C] and each candidate's slot (index
    into its pivots, -1: evicted) [n_layer, n_head_kv, C]: source 0 of every slot is its pivot,
    then the candidates sent to it in the order they are given (-1 pads). One sort, no loop."""
    n_layer, n_head_kv, b = pivots.shape
    head = np.arange(n_layer * n_head_kv, dtype=np.int32).reshape(n_layer, n_head_kv, 1)
    slot = np.where(target >= 0, head * b + target, -1).astype(np.int32).ravel()  # flat slot id of each candidate
    # by slot, then by candidate index: a (layer, head)'s candidates are consecutive and in order in
    # the flat array, so a stable sort by slot alone keeps them so
    order = np.argsort(slot, kind="stable")
    order = order[slot[order] >= 0]
    grouped = slot[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]]) if len(order) else np.zeros(0, np.int64)
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))  # place within its slot
    src = np.full((n_layer * n_head_kv * b, 2 + int(rank.max(initial=-1))), -1, np.int32)
    src[:, 0] = pivots.ravel()
    src[grouped, 1 + rank] = cand.ravel()[order]
    return src.reshape(n_layer, n_head_kv, b, -1)


def keep_plan(layout: TokenLayout, selection: np.ndarray) -> Plan:
    """A keep-only plan from per-(layer, head) sorted selections [n_layer, n_head_kv, B].

    Slot j takes the position of layer 0, head 0's j-th kept cell: sinks and the recent window
    sit in the same slots everywhere, and the last slot keeps the last position."""
    src = selection[..., None].astype(np.int32)
    return Plan(src=src, weight=np.ones(src.shape, np.float32), slot_pos=layout.positions[selection[0, 0]])
