"""Python binding of the FlowMM KV-cache C API (native/flowmm.h): layout, cells, K/V rows."""

from __future__ import annotations

import ctypes
import dataclasses

import numpy as np

from ..errors import FlowMMError
from .native import lib, llama_cpp

_i32p = ctypes.POINTER(ctypes.c_int32)
_f32p = ctypes.POINTER(ctypes.c_float)


class NativeError(FlowMMError):
    """A FlowMM C API call failed; carries the native status code and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Layout(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in (
        "n_layer", "n_head_kv", "head_dim_k", "head_dim_v", "kv_size", "n_stream",
        "type_k", "type_v", "v_trans", "rot_k", "rot_v")]


lib.flowmm_last_error.restype = ctypes.c_char_p
lib.flowmm_last_error.argtypes = []
lib.flowmm_kv_get_layout.restype = ctypes.c_int32
lib.flowmm_kv_get_layout.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.POINTER(_Layout)]
lib.flowmm_kv_seq_cells.restype = ctypes.c_int32
lib.flowmm_kv_seq_cells.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.c_int32, _i32p, _i32p, ctypes.c_int32]
lib.flowmm_kv_used_bound.restype = ctypes.c_int32
lib.flowmm_kv_used_bound.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.c_int32]
lib.flowmm_kv_free_cells.restype = ctypes.c_int32
lib.flowmm_kv_free_cells.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.c_int32]
lib.flowmm_kv_read_rows.restype = ctypes.c_int32
lib.flowmm_kv_read_rows.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
                                    ctypes.c_int32, _i32p, ctypes.c_int32, _f32p]


def _check(status: int) -> int:
    if status < 0:
        raise NativeError(status, lib.flowmm_last_error().decode("utf-8", "replace"))
    return status


@dataclasses.dataclass(frozen=True)
class KVLayout:
    n_layer: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    kv_size: int
    n_stream: int
    type_k: int
    type_v: int
    v_trans: bool
    rot_k: bool
    rot_v: bool


def layout(ctx) -> KVLayout:
    """Layout of the KV cache of `ctx` (a runtime.Context or a raw llama_context pointer)."""
    out = _Layout()
    _check(lib.flowmm_kv_get_layout(_ptr(ctx), ctypes.byref(out)))
    return KVLayout(**{f: bool(getattr(out, f)) if f in ("v_trans", "rot_k", "rot_v") else getattr(out, f)
                       for f, _ in _Layout._fields_})


def seq_cells(ctx, seq_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(cell indices, positions) of the cells holding `seq_id`, in cell order."""
    n = _check(lib.flowmm_kv_seq_cells(_ptr(ctx), seq_id, None, None, 0))
    cells = np.empty(n, dtype=np.int32)
    pos = np.empty(n, dtype=np.int32)
    _check(lib.flowmm_kv_seq_cells(_ptr(ctx), seq_id, cells.ctypes.data_as(_i32p), pos.ctypes.data_as(_i32p), n))
    return cells, pos


def used_bound(ctx, seq_id: int = 0) -> int:
    """One past the highest used cell of the sequence's stream (what llama.cpp's n_kv follows)."""
    return _check(lib.flowmm_kv_used_bound(_ptr(ctx), seq_id))


def free_cells(ctx, seq_id: int = 0) -> int:
    """Cells of the sequence's stream that no sequence holds (what a decode after its end can use)."""
    return _check(lib.flowmm_kv_free_cells(_ptr(ctx), seq_id))


def read_rows(ctx, layer: int, head: int, cells, which: str = "k", seq_id: int = 0) -> np.ndarray:
    """K or V rows of KV head `head` in `layer` for `cells`, dequantized: [len(cells), head_dim] float32."""
    if which not in ("k", "v"):
        raise ValueError("which must be 'k' or 'v'")
    lay = layout(ctx)
    cells = np.ascontiguousarray(cells, dtype=np.int32)
    out = np.empty((len(cells), lay.head_dim_v if which == "v" else lay.head_dim_k), dtype=np.float32)
    _check(lib.flowmm_kv_read_rows(_ptr(ctx), seq_id, layer, head, int(which == "v"),
                                   cells.ctypes.data_as(_i32p), len(cells), out.ctypes.data_as(_f32p)))
    return out


def _ptr(ctx):
    return getattr(ctx, "ptr", ctx)


class _MergePlan(ctypes.Structure):
    _fields_ = [("n_layer", ctypes.c_int32), ("n_head_kv", ctypes.c_int32), ("n_slots", ctypes.c_int32),
                ("n_src", ctypes.c_int32), ("src", _i32p), ("weight", _f32p), ("slot_pos", _i32p),
                ("v_weight", _f32p)]


lib.flowmm_kv_apply_plan.restype = ctypes.c_int32
lib.flowmm_kv_apply_plan.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.c_int32, ctypes.POINTER(_MergePlan)]


@dataclasses.dataclass
class MergePlan:
    """For each (layer, KV head, slot): the cells summed into it, and their weights.

    src: int32 [n_layer, n_head_kv, n_slots, n_src], cells of the sequence or -1 (unused);
    weight: float32, same shape; slot_pos: int32 [n_slots], strictly increasing, the last
    equal to the sequence's last position; v_weight: V's own weights (same shape), or None
    for V merged with `weight` like K (weight one-hot on a slot's first source keeps its key).
    """

    src: np.ndarray
    weight: np.ndarray
    slot_pos: np.ndarray
    v_weight: np.ndarray | None = None

    @classmethod
    def keep(cls, cells_per_head: np.ndarray, positions: np.ndarray) -> "MergePlan":
        """Keep-only plan: cells_per_head [n_layer, n_head_kv, n_slots], weight 1 each."""
        src = np.asarray(cells_per_head, dtype=np.int32)[..., None]
        return cls(src=src, weight=np.ones(src.shape, np.float32), slot_pos=np.asarray(positions, np.int32))


def apply_plan(ctx, plan: MergePlan, seq_id: int = 0) -> None:
    """Merge and compact `seq_id`'s cache by `plan` (see native/flowmm.h); raises NativeError,
    with the cache unchanged, if the plan is refused."""
    src = np.ascontiguousarray(plan.src, dtype=np.int32)
    weight = np.ascontiguousarray(plan.weight, dtype=np.float32)
    slot_pos = np.ascontiguousarray(plan.slot_pos, dtype=np.int32)
    v_weight = None if plan.v_weight is None else np.ascontiguousarray(plan.v_weight, dtype=np.float32)
    if src.ndim != 4 or weight.shape != src.shape or slot_pos.shape != (src.shape[2],) or (
            v_weight is not None and v_weight.shape != src.shape):
        raise NativeError(-1, f"plan shapes do not fit: src {src.shape}, weight {weight.shape}, slot_pos {slot_pos.shape}"
                              + ("" if v_weight is None else f", v_weight {v_weight.shape}"))
    c = _MergePlan(src.shape[0], src.shape[1], src.shape[2], src.shape[3], src.ctypes.data_as(_i32p),
                   weight.ctypes.data_as(_f32p), slot_pos.ctypes.data_as(_i32p),
                   None if v_weight is None else v_weight.ctypes.data_as(_f32p))
    _check(lib.flowmm_kv_apply_plan(_ptr(ctx), seq_id, ctypes.byref(c)))


class _MatchRequest(ctypes.Structure):
    _fields_ = [("n_head_kv", ctypes.c_int32), ("n_cand", ctypes.c_int32), ("n_piv", ctypes.c_int32),
                ("n_groups", ctypes.c_int32), ("cand", _i32p), ("piv", _i32p), ("group", _i32p), ("bias", _f32p)]


lib.flowmm_kv_match_keys.restype = ctypes.c_int32
lib.flowmm_kv_match_keys.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.c_int32, ctypes.c_int32,
                                     ctypes.POINTER(_MatchRequest), _i32p, _f32p]


def match_keys(ctx, layer: int, cand: np.ndarray, piv: np.ndarray, group: np.ndarray, allowed: np.ndarray,
               seq_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """For every KV head h of cache layer `layer`: each candidate cell cand[h, c]'s most similar (key
    cosine) pivot cell among piv[h, :] allowed by allowed[h, group[h, c], :], as an index into
    piv[h] (-1 if none is allowed), and that cosine. Computed on the cache's backend (see
    native/flowmm.h); returns (best [H, C] int32, cosine [H, C] float32)."""
    cand = np.ascontiguousarray(cand, dtype=np.int32)
    piv = np.ascontiguousarray(piv, dtype=np.int32)
    group = np.ascontiguousarray(group, dtype=np.int32)
    bias = np.ascontiguousarray(np.where(allowed, 0.0, -np.inf), dtype=np.float32)
    if cand.ndim != 2 or piv.ndim != 2 or group.shape != cand.shape or bias.shape != (cand.shape[0], bias.shape[1], piv.shape[1]):
        raise NativeError(-1, f"match shapes do not fit: cand {cand.shape}, piv {piv.shape}, group {group.shape}, "
                              f"allowed {bias.shape}")
    best = np.empty(cand.shape, np.int32)
    cos = np.empty(cand.shape, np.float32)
    req = _MatchRequest(cand.shape[0], cand.shape[1], piv.shape[1], bias.shape[1], cand.ctypes.data_as(_i32p),
                        piv.ctypes.data_as(_i32p), group.ctypes.data_as(_i32p), bias.ctypes.data_as(_f32p))
    _check(lib.flowmm_kv_match_keys(_ptr(ctx), seq_id, layer, ctypes.byref(req), best.ctypes.data_as(_i32p),
                                    cos.ctypes.data_as(_f32p)))
    return best, cos


class _Predictor(ctypes.Structure):
    _fields_ = [("n_head_kv", ctypes.c_int32), ("n_feat", ctypes.c_int32), ("pairing", ctypes.c_int32),
                ("weights", _f32p), ("bias", _f32p), ("relative", ctypes.c_int32), ("rope_n_rot", ctypes.c_int32),
                ("rope_freq_base", ctypes.c_float), ("rope_freq_scale", ctypes.c_float)]


lib.flowmm_kv_predict_scores.restype = ctypes.c_int32
lib.flowmm_kv_predict_scores.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.c_int32, ctypes.c_int32,
                                         ctypes.POINTER(_Predictor), _f32p]
ROPE_PAIRINGS = {"halves": 0, "adjacent": 1}  # native/flowmm.h, enum flowmm_rope_pairing


def predict_scores(ctx, layer: int, weights: np.ndarray, bias: np.ndarray, pairing: str, seq_id: int = 0,
                   relative=None) -> np.ndarray:
    """For every KV head h of cache layer `layer`: weights[h] . [k, pair lengths of k] + bias[h]
    for each of the sequence's cells (cell order of seq_cells), computed on the cache's backend
    (native/flowmm.h, flowmm_kv_predict_scores). With `relative` (methods.base.RopeGeometry), k is
    first turned back by that RoPE at its cell's position and log(1 + the cell's distance to the
    sequence's last position) is one more feature. Returns [n_head_kv, n_cells] float32."""
    w = np.ascontiguousarray(weights, dtype=np.float32)
    b = np.ascontiguousarray(bias, dtype=np.float32)
    if w.ndim != 2 or b.shape != (w.shape[0],) or pairing not in ROPE_PAIRINGS:
        raise NativeError(-1, f"predictor shapes do not fit: weights {w.shape}, bias {b.shape}, pairing {pairing!r}")
    n = _check(lib.flowmm_kv_seq_cells(_ptr(ctx), seq_id, None, None, 0))
    out = np.empty((w.shape[0], n), np.float32)
    rope = (0, 0, 0.0, 0.0) if relative is None else \
        (1, int(relative.n_rot), float(relative.freq_base), float(relative.freq_scale))
    req = _Predictor(w.shape[0], w.shape[1], ROPE_PAIRINGS[pairing], w.ctypes.data_as(_f32p), b.ctypes.data_as(_f32p),
                     *rope)
    _check(lib.flowmm_kv_predict_scores(_ptr(ctx), seq_id, layer, ctypes.byref(req), out.ctypes.data_as(_f32p)))
    return out


class _NearCopies(ctypes.Structure):
    _fields_ = [("pairing", ctypes.c_int32), ("rope_n_rot", ctypes.c_int32), ("rope_freq_base", ctypes.c_float),
                ("rope_freq_scale", ctypes.c_float), ("beta", ctypes.c_float), ("max_reference", ctypes.c_int32)]


lib.flowmm_kv_near_copies.restype = ctypes.c_int32
lib.flowmm_kv_near_copies.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.c_int32, ctypes.c_int32,
                                      ctypes.POINTER(_NearCopies), _f32p, ctypes.c_int32]


def near_copies(ctx, layer: int, rope, beta: float, max_reference: int, seq_id: int = 0) -> np.ndarray:
    """How many of the sequence's keys look like each cell's, per KV head of cache layer `layer`:
    log mean_j exp(beta * cos(k'_c, k'_j)), k' the keys turned back by `rope`
    (methods.base.RopeGeometry) at their positions; beyond `max_reference` cells the mean over the
    others is estimated from every stride-th cell (native/flowmm.h, flowmm_kv_near_copies).
    Computed on the cache's backend; returns [n_head_kv, n_cells] float32 in seq_cells order."""
    n = _check(lib.flowmm_kv_seq_cells(_ptr(ctx), seq_id, None, None, 0))
    out = np.empty((layout(ctx).n_head_kv, n), np.float32)
    req = _NearCopies(ROPE_PAIRINGS[rope.pairing], int(rope.n_rot), float(rope.freq_base), float(rope.freq_scale),
                      float(beta), int(max_reference))
    _check(lib.flowmm_kv_near_copies(_ptr(ctx), seq_id, layer, ctypes.byref(req), out.ctypes.data_as(_f32p), n))
    return out


lib.flowmm_kv_value_norms.restype = ctypes.c_int32
lib.flowmm_kv_value_norms.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.c_int32, ctypes.c_int32, _f32p, ctypes.c_int32]


def value_norms(ctx, layer: int, seq_id: int = 0) -> np.ndarray:
    """|v| of every cell of the sequence (cell order of seq_cells) per KV head of cache layer
    `layer`, computed on the cache's backend (native/flowmm.h, flowmm_kv_value_norms):
    [n_head_kv, n_cells] float32."""
    n = _check(lib.flowmm_kv_seq_cells(_ptr(ctx), seq_id, None, None, 0))
    out = np.empty((layout(ctx).n_head_kv, n), np.float32)
    _check(lib.flowmm_kv_value_norms(_ptr(ctx), seq_id, layer, out.ctypes.data_as(_f32p), n))
    return out


lib.flowmm_kv_set_slot_bias.restype = ctypes.c_int32
lib.flowmm_kv_set_slot_bias.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.c_int32, _f32p, ctypes.c_int32, ctypes.c_int32]
lib.flowmm_kv_clear_slot_bias.restype = ctypes.c_int32
lib.flowmm_kv_clear_slot_bias.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.c_int32]
lib.flowmm_kv_get_slot_bias.restype = ctypes.c_int32
lib.flowmm_kv_get_slot_bias.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.c_int32, _f32p, ctypes.c_int32]


def set_slot_bias(ctx, bias: np.ndarray, seq_id: int = 0) -> None:
    """Additive attention-logit bias for `seq_id`'s cells (cell order of seq_cells).

    bias: [n_layer, n_cells] (per layer) or [n_layer, n_head_kv, n_cells] (per KV head);
    -inf makes a slot dead in that layer/head, log(n) weights a slot merged from n tokens.
    """
    b = np.ascontiguousarray(bias, dtype=np.float32)
    if b.ndim not in (2, 3):
        raise NativeError(-1, f"bias must be [n_layer, n_cells] or [n_layer, n_head_kv, n_cells], got shape {b.shape}")
    _check(lib.flowmm_kv_set_slot_bias(_ptr(ctx), seq_id, b.ctypes.data_as(_f32p), b.shape[-1], int(b.ndim == 3)))


def clear_slot_bias(ctx, seq_id: int = 0) -> None:
    _check(lib.flowmm_kv_clear_slot_bias(_ptr(ctx), seq_id))


def get_slot_bias(ctx, seq_id: int = 0) -> np.ndarray:
    """The bias `seq_id`'s cells carry now: [n_layer, n_head_kv, n_cells] in seq_cells order, 0 where none."""
    lay = layout(ctx)
    n = len(seq_cells(ctx, seq_id)[0])
    out = np.zeros((lay.n_layer, lay.n_head_kv, n), np.float32)
    _check(lib.flowmm_kv_get_slot_bias(_ptr(ctx), seq_id, out.ctypes.data_as(_f32p), n))
    return out
