"""Attention statistics from llama.cpp's decode (native/flowmm-stats.cpp), flash attention on or off.

    with AttentionStats(ctx, prompt_end=n, window=32, labels=labels) as stats:
        ctx.decode(prompt, 0)
    scores = stats.column_scores(layer)      # [n_head, n_cells], cells in seq_cells order
    q = stats.query_mean(layer)              # [n_head, head_dim] the counted rows' mean query
    flow = stats.flow(layer)                 # [n_head, n_labels, n_labels] mass from label a to b
    rho = stats.cross_modal_share(layer)     # per head, rho^l before averaging (docs/METHOD.md,
                                             # 'Cross-modal flow (rho)')

The context manager stops the computation on exit (the graph is llama.cpp's own again) but
keeps the results readable until the next request or `close()`.
"""

from __future__ import annotations

import ctypes

import numpy as np

from .kv_cache import NativeError, _check, _ptr, layout, seq_cells
from .native import lib, llama_cpp

_i32p = ctypes.POINTER(ctypes.c_int32)
_f32p = ctypes.POINTER(ctypes.c_float)
_f64p = ctypes.POINTER(ctypes.c_double)

lib.flowmm_stats_begin.restype = ctypes.c_int32
lib.flowmm_stats_begin.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.c_int32, ctypes.c_int32, _i32p,
                                   ctypes.c_int32, ctypes.c_int32]
lib.flowmm_stats_set_row_groups.restype = ctypes.c_int32
lib.flowmm_stats_set_row_groups.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.c_int32, ctypes.c_int32]
lib.flowmm_stats_end.restype = ctypes.c_int32
lib.flowmm_stats_end.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.c_int32]
lib.flowmm_stats_column_scores.restype = ctypes.c_int32
lib.flowmm_stats_column_scores.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.c_int32, ctypes.c_int32, _f32p,
                                           ctypes.c_int32, ctypes.c_int32]
lib.flowmm_stats_flow.restype = ctypes.c_int32
lib.flowmm_stats_flow.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.c_int32, ctypes.c_int32, _f64p, ctypes.c_int32,
                                  ctypes.c_int32]
lib.flowmm_stats_query_sums.restype = ctypes.c_int32
lib.flowmm_stats_query_sums.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.c_int32, ctypes.c_int32, _f64p,
                                        ctypes.c_int32, ctypes.c_int32]
lib.flowmm_graph_n_nodes.restype = ctypes.c_int32
lib.flowmm_graph_n_nodes.argtypes = [llama_cpp.llama_context_p_ctypes]


def graph_n_nodes(ctx) -> int:
    """Nodes of the graph the context computed last."""
    return _check(lib.flowmm_graph_n_nodes(_ptr(ctx)))


class AttentionStats:
    """Statistics of `seq_id`'s query rows at positions >= prompt_end - window (all rows: window=None).
    With `row_groups` G, column scores are each cell's largest mass from one group of G
    consecutive rows (decode from the window's start in batches of a multiple of G)."""

    def __init__(self, ctx, prompt_end: int | None = None, window: int | None = None, labels=None,
                 n_labels: int | None = None, seq_id: int = 0, row_groups: int | None = None):
        if window is not None:
            if prompt_end is None:
                raise NativeError(-1, "an observation window needs prompt_end (the position after the prompt's last token)")
            if window <= 0 or window > prompt_end:
                raise NativeError(-1, f"window {window} is not in [1, {prompt_end}] (the prompt has {prompt_end} positions)")
            pos_min = prompt_end - window
        else:
            pos_min = 0
        self.ctx, self.seq_id = ctx, seq_id
        model = llama_cpp.llama_get_model(_ptr(ctx))
        self.n_head = llama_cpp.llama_model_n_head(model)
        self.n_head_kv = llama_cpp.llama_model_n_head_kv(model)
        lay = layout(ctx)  # the cache's layers: with iSWA, only the full-attention ones
        self.n_layer, self.head_dim = lay.n_layer, lay.head_dim_k
        if labels is not None:
            self._labels = np.ascontiguousarray(labels, dtype=np.int32)
            self.n_labels = int(n_labels if n_labels is not None else self._labels.max(initial=0) + 1)
            lab_ptr, n_pos = self._labels.ctypes.data_as(_i32p), len(self._labels)
        else:
            self._labels, self.n_labels, lab_ptr, n_pos = None, 0, None, 0
        _check(lib.flowmm_stats_begin(_ptr(ctx), seq_id, pos_min, lab_ptr, n_pos, self.n_labels))
        self.row_groups = row_groups or 0
        if row_groups:
            try:
                _check(lib.flowmm_stats_set_row_groups(_ptr(ctx), seq_id, int(row_groups)))
            except NativeError:
                _check(lib.flowmm_stats_end(_ptr(ctx), seq_id))
                raise
        self._running = True

    def stop(self) -> None:
        """Stop computing statistics (results stay readable)."""
        if self._running:
            self._running = False
            self._results = {}
            try:
                self.cells, self.positions = seq_cells(self.ctx, self.seq_id)  # what the columns below are
                n_cells = len(self.cells)
                for layer in range(self.n_layer):  # read everything before the native state goes
                    self._results[layer] = (self._column_scores(layer, n_cells),
                                            self._flow(layer) if self.n_labels else None,
                                            self._query_sums(layer))
                self.n_rows = self._n_rows
            finally:  # the graph is llama.cpp's own again even when the results could not be read
                _check(lib.flowmm_stats_end(_ptr(self.ctx), self.seq_id))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def _column_scores(self, layer: int, n_cells: int | None = None) -> np.ndarray:
        if n_cells is None:
            n_cells = len(seq_cells(self.ctx, self.seq_id)[0])
        out = np.zeros((self.n_head, n_cells), dtype=np.float32)
        self._n_rows = _check(lib.flowmm_stats_column_scores(_ptr(self.ctx), self.seq_id, layer, out.ctypes.data_as(_f32p),
                                                             self.n_head, n_cells))
        return out

    def _flow(self, layer: int) -> np.ndarray:
        out = np.zeros((self.n_head, self.n_labels, self.n_labels), dtype=np.float64)
        _check(lib.flowmm_stats_flow(_ptr(self.ctx), self.seq_id, layer, out.ctypes.data_as(_f64p), self.n_head, self.n_labels))
        return out

    def _query_sums(self, layer: int) -> np.ndarray:
        """[n_head, head_dim] sums over the counted rows, divided by their count: the mean query."""
        out = np.zeros((self.n_head, self.head_dim), dtype=np.float64)
        rows = _check(lib.flowmm_stats_query_sums(_ptr(self.ctx), self.seq_id, layer, out.ctypes.data_as(_f64p), self.n_head,
                                                  self.head_dim))
        return out / max(rows, 1)

    def query_mean(self, layer: int) -> np.ndarray:
        """[n_head, head_dim]: the mean query of the counted rows, per query head, as the layer
        attends with it (RoPE applied at each row's position, before the 1/sqrt(d) scale)."""
        return self._results[layer][2] if not self._running else self._query_sums(layer)

    def column_scores(self, layer: int, per_kv_head: bool = False) -> np.ndarray:
        """[n_head, n_cells]: attention mass each cell of the sequence received, per query head;
        with per_kv_head, summed over each KV head's group of query heads: [n_head_kv, n_cells].
        With row groups, per KV head only: the largest of the groups' masses."""
        if self.row_groups and not per_kv_head:
            raise NativeError(-1, "with row groups the scores are per KV head (per_kv_head=True)")
        scores = self._results[layer][0] if not self._running else self._column_scores(layer)
        if per_kv_head:
            scores = scores.reshape(self.n_head_kv, self.n_head // self.n_head_kv, -1).sum(axis=1)
        return scores

    def flow(self, layer: int) -> np.ndarray:
        """[n_head, n_labels, n_labels]: mass rows labelled a sent to cells labelled b, per query head."""
        if not self.n_labels:
            raise NativeError(-1, "no labels were given, so there is no modality flow")
        return self._results[layer][1] if not self._running else self._flow(layer)

    def cross_modal_share(self, layer: int, text_label: int = 0) -> np.ndarray:
        """Per query head: (mass text->non-text + non-text->text) / all mass: rho^l before 1/H
        (docs/METHOD.md, 'Cross-modal flow (rho)')."""
        f = self.flow(layer)
        text = np.zeros(self.n_labels, bool)
        text[text_label] = True
        cross = f[:, text][:, :, ~text].sum(axis=(1, 2)) + f[:, ~text][:, :, text].sum(axis=(1, 2))
        return cross / f.sum(axis=(1, 2))
