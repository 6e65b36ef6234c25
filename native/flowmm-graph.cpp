// flowmm-edge: native/'s own graphs in a llama_context (flowmm-graph.h): begin one in the
// context's reserve result, drop the graphs the context cached, count the last one's nodes.

#include "flowmm.h"
#include "flowmm-graph.h"
#include "flowmm-impl.h"

#include "llama-context.h"
#include "llama-graph.h"

#include "ggml.h"
#include "ggml-backend.h"

struct flowmm_ctx_access {
    // what llama_context::memory_update does before it changes the memory: graphs built
    // for the old cache must not be reused
    static void drop_cached_graphs(llama_context & lctx) {
        for (auto & res : lctx.gf_res_prev) {
            if (res) {
                res->reset();
            }
        }
        lctx.gf_res_prev_active = nullptr;
    }

    static int32_t last_graph_n_nodes(llama_context & lctx) {
        const llm_graph_result * res = lctx.gf_res_prev_active;
        return res ? ggml_graph_n_nodes(res->get_gf()) : -1;
    }
};

void flowmm_drop_cached_graphs(llama_context * ctx) {
    flowmm_ctx_access::drop_cached_graphs(*ctx);
}

flowmm_graph flowmm_begin_graph(llama_context * ctx) {
    flowmm_ctx_access::drop_cached_graphs(*ctx);
    ggml_backend_sched_t sched = ctx->get_sched();
    ggml_backend_sched_reset(sched);
    llm_graph_result * res = ctx->get_gf_res_reserve();
    res->reset();
    return {sched, res->get_ctx(), res->get_gf()};
}

void flowmm_pin_to_backend_of(const flowmm_graph & g, ggml_tensor * node, const ggml_tensor * held) {
    const ggml_backend_buffer_t buf = held->view_src ? held->view_src->buffer : held->buffer;
    if (buf == nullptr) {
        return;
    }
    const ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(buf);
    for (int i = 0; i < ggml_backend_sched_get_n_backends(g.sched); ++i) {
        ggml_backend_t backend = ggml_backend_sched_get_backend(g.sched, i);
        if (ggml_backend_supports_buft(backend, buft)) {
            ggml_backend_sched_set_tensor_backend(g.sched, node, backend);
            return;
        }
    }
}

ggml_tensor * flowmm_cache_rows(ggml_context * gctx, ggml_tensor * t, int64_t head_dim, int64_t n_rows) {
    return ggml_view_2d(gctx, t, head_dim, n_rows, ggml_row_size(t->type, head_dim), 0);
}

int32_t flowmm_graph_n_nodes(llama_context * ctx) {
    if (ctx == nullptr) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "context is NULL");
    }
    const int32_t n = flowmm_ctx_access::last_graph_n_nodes(*ctx);
    return n < 0 ? flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "the context has not computed a graph yet") : n;
}
