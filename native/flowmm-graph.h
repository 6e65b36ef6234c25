// flowmm-edge: building and running native/'s own ggml graphs in a llama_context (not part of the
// C API): a fresh graph in the context's reserve result, dropping the context's cached graphs,
// and views of the cache tensors that those graphs gather from and write to.
#pragma once

#include "llama.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <cstdint>

// llama_context's cached graphs must not be reused after the cache or its hooks change
void flowmm_drop_cached_graphs(llama_context * ctx);

// a fresh graph of native/'s own in the context's reserve result, like llama.cpp's K-shift
// graph: cached graphs dropped, the scheduler reset
struct flowmm_graph {
    ggml_backend_sched_t sched;
    ggml_context       * gctx;
    ggml_cgraph        * gf;
};
flowmm_graph flowmm_begin_graph(llama_context * ctx);

// a cache tensor of one layer and stream (K, or V when not transposed) as a 2-D view
// [head_dim, n_rows], n_rows = n_head_kv * kv_size: row (cell * n_head_kv + h) is KV head h of
// that cell
ggml_tensor * flowmm_cache_rows(ggml_context * gctx, ggml_tensor * t, int64_t head_dim, int64_t n_rows);

// run `node` on the backend that holds `held` (a cache tensor or a view of one). An op whose
// operands are all graph inputs is otherwise scheduled on the CPU, the inputs' backend, and its
// result copied to the cache's device: for a [pivots x candidates] broadcast that is megabytes
// per layer over PCIe or a socket where the inputs themselves are kilobytes.
void flowmm_pin_to_backend_of(const flowmm_graph & g, ggml_tensor * node, const ggml_tensor * held);
