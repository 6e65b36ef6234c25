"""An independent reader of llama.cpp's sequence state (llama_state_seq_get_data).

It parses the bytes llama_kv_cache::state_write produces, for each of a context's caches,
and dequantizes K/V with gguf-py's numpy code, so tests can check the FlowMM C API
against llama.cpp's own serialisation rather than against itself.
"""

from __future__ import annotations

import ctypes
import dataclasses

import numpy as np

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
from flowmm_edge.bindings.native import llama_cpp


@dataclasses.dataclass
class SeqState:
    pos: np.ndarray  # [n_cells] positions in cell order
    k: list[np.ndarray]  # per layer [n_cells, n_embd_k_gqa] float32
    v: list[np.ndarray]  # per layer [n_cells, n_embd_v_gqa] float32
    v_trans: bool
    raw: bytes
    k_types: list[int] = dataclasses.field(default_factory=list)
    v_types: list[int] = dataclasses.field(default_factory=list)
    magic: int = 0
    span: tuple[int, int] = (0, 0)  # this cache's bytes in `raw`


def _dequant(raw: np.ndarray, ggml_type: int, n_cols: int) -> np.ndarray:
    t = GGMLQuantizationType(ggml_type)
    if t == GGMLQuantizationType.F16:
        return raw.view(np.float16).astype(np.float32).reshape(-1, n_cols)
    if t == GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(-1, n_cols).copy()
    block, type_size = GGML_QUANT_SIZES[t]
    return quants.dequantize(raw.reshape(-1, n_cols // block * type_size), t).reshape(-1, n_cols).astype(np.float32)


def seq_state_bytes(ctx_ptr, seq_id: int) -> bytes:
    n = llama_cpp.llama_state_seq_get_size(ctx_ptr, seq_id)
    buf = (ctypes.c_uint8 * n)()
    got = llama_cpp.llama_state_seq_get_data(ctx_ptr, buf, n, seq_id)
    assert got == n
    return bytes(buf)


def parse_seq_state(data: bytes, n_embd_k_gqa: int, n_embd_v_gqa: int) -> SeqState:
    """The sequence's cells in a single-cache context's state."""
    (state,) = parse_seq_states(data, n_embd_k_gqa, n_embd_v_gqa)
    return state


def parse_seq_states(data: bytes, n_embd_k_gqa: int, n_embd_v_gqa: int) -> list[SeqState]:
    """The sequence's cells in each of the context's caches, in the order llama.cpp writes them
    (llama_kv_cache_iswa::state_write: the full-attention cache, then the sliding-window one)."""
    off = 0

    def take(fmt: str, count: int = 1):
        nonlocal off
        arr = np.frombuffer(data, dtype=fmt, count=count, offset=off)
        off += arr.nbytes
        return arr

    (magic,) = take("<u4")
    take("<i4")  # seq_id
    states = []
    while off < len(data):  # each cache: its streams, each stream's cells, then K and V
        start = off
        (n_stream,) = take("<u4")
        found = None
        for _ in range(n_stream):
            (cell_count,) = take("<u4")
            if cell_count == 0:
                continue
            assert found is None, "sequence spread over several streams"
            pos = np.empty(cell_count, dtype=np.int32)
            for i in range(cell_count):
                pos[i] = take("<i4")[0]
                (n_seq,) = take("<u4")
                take("<i4", n_seq)
            v_trans, n_layer = (int(x) for x in take("<u4", 2))
            ks, vs, kts, vts = [], [], [], []
            for _ in range(n_layer):
                (k_type,) = take("<i4")
                kts.append(int(k_type))
                (row,) = take("<u8")
                ks.append(_dequant(take("<u1", int(row) * cell_count), int(k_type), n_embd_k_gqa))
            for _ in range(n_layer):
                (v_type,) = take("<i4")
                vts.append(int(v_type))
                if not v_trans:
                    (row,) = take("<u8")
                    vs.append(_dequant(take("<u1", int(row) * cell_count), int(v_type), n_embd_v_gqa))
                else:
                    (el,) = take("<u4")
                    (n_embd,) = take("<u4")
                    cols = take("<u1", int(el) * cell_count * int(n_embd))
                    vs.append(_dequant(cols, int(v_type), cell_count).reshape(int(n_embd), cell_count).T.copy())
            found = SeqState(pos=pos, k=ks, v=vs, v_trans=bool(v_trans), raw=data, k_types=kts, v_types=vts,
                             magic=int(magic))
        assert found is not None, "sequence has no cells"
        found.span = (start, off)
        states.append(found)
    assert off == len(data), f"parsed {off} of {len(data)} bytes"
    return states


def _quant(x: np.ndarray, ggml_type: int) -> bytes:
    t = GGMLQuantizationType(ggml_type)
    if t == GGMLQuantizationType.F16:
        return x.astype(np.float16).tobytes()
    if t == GGMLQuantizationType.F32:
        return x.astype(np.float32).tobytes()
    return quants.quantize(x.astype(np.float32), t).tobytes()


def write_seq_state(like: SeqState, pos: np.ndarray, k: list[np.ndarray], v: list[np.ndarray], seq_id: int = 0) -> bytes:
    """Serialise cells (positions, per-layer float K and V) in llama_state_seq_set_data's format,
    quantized to the cache types of `like` with gguf-py."""
    n = len(pos)
    out = [np.array([like.magic], "<u4").tobytes(), np.array([seq_id], "<i4").tobytes(),
           np.array([1, n], "<u4").tobytes()]
    for p in pos:
        out.append(np.array([p], "<i4").tobytes() + np.array([1], "<u4").tobytes() + np.array([seq_id], "<i4").tobytes())
    out.append(np.array([int(like.v_trans), len(k)], "<u4").tobytes())
    for t, rows in zip(like.k_types, k):
        data = _quant(rows, t)
        out += [np.array([t], "<i4").tobytes(), np.array([len(data) // n], "<u8").tobytes(), data]
    for t, rows in zip(like.v_types, v):
        if not like.v_trans:
            data = _quant(rows, t)
            out += [np.array([t], "<i4").tobytes(), np.array([len(data) // n], "<u8").tobytes(), data]
        else:
            data = _quant(np.ascontiguousarray(rows.T), t)
            out += [np.array([t], "<i4").tobytes(), np.array([len(data) // (n * rows.shape[1])], "<u4").tobytes(),
                    np.array([rows.shape[1]], "<u4").tobytes(), data]
    return b"".join(out)


def load_seq_state(ctx_ptr, data: bytes, seq_id: int = 0) -> None:
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    got = llama_cpp.llama_state_seq_set_data(ctx_ptr, buf, len(data), seq_id)
    assert got == len(data), f"llama.cpp read {got} of {len(data)} state bytes"
