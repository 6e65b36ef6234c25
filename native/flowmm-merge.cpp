// flowmm-edge: apply a merge plan to one sequence of llama.cpp's KV cache and compact it.
//
// Modelled on llama_kv_cache::build_graph_shift: a small ggml graph over views of the cache
// tensors, computed by the context's scheduler on the cache's own backend. Only existing ops
// (get_rows, mul, permute/cont, sum_rows, set_rows, cpy), so CPU, CUDA and Metal run it.

#include "flowmm.h"
#include "flowmm-graph.h"
#include "flowmm-impl.h"

#include "llama-context.h"
#include "llama-graph.h"
#include "llama-hparams.h"
#include "llama-kv-cache.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <cmath>
#include <string>
#include <vector>

using acc = flowmm_kv_access;

namespace {

struct plan_check {
    uint32_t strm = 0;
    std::vector<int32_t> seq_cells;  // cells of seq_id, all exclusively its own
    std::vector<int32_t> dst;        // [n_slots] destination cells, ascending
};

int32_t validate(const llama_kv_cache & kv, llama_seq_id seq_id, const flowmm_merge_plan & p, plan_check & out) {
    const auto & hp = acc::hparams(kv);
    const int32_t n_layer   = (int32_t) acc::n_layer(kv);
    const int32_t n_head_kv = (int32_t) hp.n_head_kv(acc::layer_il(kv, 0));
    if (p.n_layer != n_layer || p.n_head_kv != n_head_kv) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "plan is for " + std::to_string(p.n_layer) + " layers x " +
            std::to_string(p.n_head_kv) + " KV heads, the cache has " + std::to_string(n_layer) + " x " + std::to_string(n_head_kv));
    }
    if (p.n_slots <= 0 || p.n_src <= 0) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "plan needs n_slots > 0 and n_src > 0");
    }
    if (p.src == nullptr || p.weight == nullptr || p.slot_pos == nullptr) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "plan arrays are NULL");
    }

    out.strm = acc::stream_of(kv, seq_id);
    const auto & cs = acc::cells(kv, out.strm);
    out.seq_cells = flowmm_seq_cells(kv, out.strm, seq_id);
    std::vector<uint8_t> own(cs.size(), 0);
    for (int32_t i : out.seq_cells) {
        if (cs.seq_count(i) != 1) {
            return flowmm_fail(FLOWMM_ERR_UNSUPPORTED, "cell " + std::to_string(i) + " of sequence " + std::to_string(seq_id) +
                " is shared with another sequence; merging shared cells is not supported");
        }
        own[i] = 1;
    }
    if (out.seq_cells.empty()) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "sequence " + std::to_string(seq_id) + " has no cells");
    }
    if ((size_t) p.n_slots > out.seq_cells.size()) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "plan keeps " + std::to_string(p.n_slots) +
            " slots but the sequence has only " + std::to_string(out.seq_cells.size()) + " cells");
    }

    const llama_pos pos_max = cs.seq_pos_max(seq_id);
    for (int32_t j = 0; j < p.n_slots; ++j) {
        if (p.slot_pos[j] < 0 || (j > 0 && p.slot_pos[j] <= p.slot_pos[j - 1])) {
            return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "slot positions must be non-negative and strictly increasing (slot " + std::to_string(j) + ")");
        }
    }
    if (p.slot_pos[p.n_slots - 1] != pos_max) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "the last slot must keep the sequence's last position " + std::to_string(pos_max) +
            " (got " + std::to_string(p.slot_pos[p.n_slots - 1]) + ")");
    }

    const size_t n_entries = (size_t) n_layer * n_head_kv * p.n_slots * p.n_src;
    for (size_t e = 0; e < n_entries; ++e) {
        const int32_t c = p.src[e];
        const float   w = p.weight[e];
        if (c == -1) {
            continue;
        }
        if (c < 0 || (uint32_t) c >= cs.size()) {
            return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "plan entry " + std::to_string(e) + ": cell " + std::to_string(c) + " is out of range");
        }
        if (!own[c]) {
            return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "plan entry " + std::to_string(e) + ": cell " + std::to_string(c) +
                " does not hold sequence " + std::to_string(seq_id));
        }
        if (!std::isfinite(w) || w < 0.0f) {
            return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "plan entry " + std::to_string(e) + ": weight " + std::to_string(w) + " is negative or not finite");
        }
        if (p.v_weight != nullptr && (!std::isfinite(p.v_weight[e]) || p.v_weight[e] < 0.0f)) {
            return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "plan entry " + std::to_string(e) + ": V weight " + std::to_string(p.v_weight[e]) + " is negative or not finite");
        }
    }
    for (size_t slot = 0; slot < n_entries / p.n_src; ++slot) {
        bool any = false;
        for (int32_t i = 0; i < p.n_src; ++i) {
            any = any || p.src[slot * p.n_src + i] != -1;
        }
        if (!any) {
            return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "plan slot " + std::to_string(slot) + " (layer, head, slot flattened) has no source cell");
        }
    }

    // destinations: the lowest cells that are free or the sequence's own
    for (uint32_t i = 0; i < cs.size() && (int32_t) out.dst.size() < p.n_slots; ++i) {
        if (cs.is_empty(i) || own[i]) {
            out.dst.push_back((int32_t) i);
        }
    }
    if (acc::v_trans(kv) && out.dst.back() - out.dst.front() + 1 != p.n_slots) {
        return flowmm_fail(FLOWMM_ERR_UNSUPPORTED,
            "with flash attention off, merging needs the sequence's slots contiguous; other sequences occupy cells between them");
    }
    return FLOWMM_OK;
}

} // namespace

int32_t flowmm_kv_apply_plan(llama_context * ctx, llama_seq_id seq_id, const flowmm_merge_plan * plan) {
    llama_kv_cache * kv = flowmm_resolve_kv_seq(ctx, seq_id);
    if (kv == nullptr) {
        return flowmm_last_status();
    }
    if (plan == nullptr) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "plan is NULL");
    }

    plan_check chk;
    if (int32_t rc = validate(*kv, seq_id, *plan, chk); rc != FLOWMM_OK) {
        return rc;
    }

    const auto & hp = acc::hparams(*kv);
    const int64_t H   = plan->n_head_kv;
    const int64_t B   = plan->n_slots;
    const int64_t S   = plan->n_src;
    const int64_t HB  = H * B;
    const int64_t HBS = HB * S;
    const auto & cs   = acc::cells(*kv, chk.strm);
    const int64_t kv_size = cs.size();

    const flowmm_graph g = flowmm_begin_graph(ctx);
    ggml_backend_sched_t sched = g.sched;
    ggml_context * gctx = g.gctx;
    ggml_cgraph  * gf   = g.gf;

    // inputs: per layer source rows (cell * H + h) and weights; one destination row list
    ggml_tensor * dst_rows = ggml_new_tensor_1d(gctx, GGML_TYPE_I64, HB);
    ggml_set_input(dst_rows);
    std::vector<ggml_tensor *> src_rows(plan->n_layer), weights(plan->n_layer), weights_v(plan->n_layer);

    auto merge = [&](ggml_tensor * rows2d, int64_t il, int64_t head_dim, ggml_tensor * w) {
        // rows2d: [head_dim, H * kv_size], row (cell * H + h); returns [head_dim, B * H], row (j * H + h).
        // Every op runs where the layer's cache lives: with layers split over devices, the
        // scheduler would otherwise put some on another device and copy [hd, HBS] between them.
        ggml_tensor * x = ggml_get_rows(gctx, rows2d, src_rows[il]);                 // [hd, HBS] f32
        flowmm_pin_to_backend_of(g, x, rows2d);
        x = ggml_mul(gctx, x, w);                                                      // * w, broadcast over hd
        flowmm_pin_to_backend_of(g, x, rows2d);
        x = ggml_reshape_3d(gctx, x, head_dim, S, HB);
        x = ggml_cont(gctx, ggml_permute(gctx, x, 1, 0, 2, 3));                        // [S, hd, HB]
        flowmm_pin_to_backend_of(g, x, rows2d);
        x = ggml_sum_rows(gctx, x);                                                    // [1, hd, HB]
        flowmm_pin_to_backend_of(g, x, rows2d);
        return ggml_reshape_2d(gctx, x, head_dim, HB);
    };

    for (int64_t l = 0; l < plan->n_layer; ++l) {
        src_rows[l] = ggml_new_tensor_1d(gctx, GGML_TYPE_I32, HBS);
        weights[l]  = ggml_new_tensor_2d(gctx, GGML_TYPE_F32, 1, HBS);
        ggml_set_input(src_rows[l]);
        ggml_set_input(weights[l]);
        weights_v[l] = weights[l];
        if (plan->v_weight != nullptr) {
            weights_v[l] = ggml_new_tensor_2d(gctx, GGML_TYPE_F32, 1, HBS);
            ggml_set_input(weights_v[l]);
        }

        const uint32_t mil = acc::layer_il(*kv, l);
        const int64_t hd_k = hp.n_embd_head_k(mil);
        const int64_t hd_v = hp.n_embd_head_v(mil);

        ggml_tensor * k = acc::k(*kv, l, chk.strm);
        ggml_tensor * k2 = flowmm_cache_rows(gctx, k, hd_k, H * kv_size);
        ggml_build_forward_expand(gf, ggml_set_rows(gctx, k2, merge(k2, l, hd_k, weights[l]), dst_rows));

        ggml_tensor * v = acc::v(*kv, l, chk.strm);
        if (!acc::v_trans(*kv)) {
            ggml_tensor * v2 = flowmm_cache_rows(gctx, v, hd_v, H * kv_size);
            ggml_build_forward_expand(gf, ggml_set_rows(gctx, v2, merge(v2, l, hd_v, weights_v[l]), dst_rows));
        } else {
            // V^T: element (cell c, dim d) at d * kv_size + c. Gather from a row-major copy, write
            // the B destination columns (contiguous, checked) back through a strided view.
            const size_t el = ggml_type_size(v->type);
            ggml_tensor * vt = ggml_view_2d(gctx, v, kv_size, H * hd_v, kv_size * el, 0);       // [kv, n_embd_v]
            ggml_tensor * vr = ggml_cont(gctx, ggml_transpose(gctx, vt));                      // [n_embd_v, kv]
            vr = ggml_reshape_2d(gctx, vr, hd_v, H * kv_size);
            ggml_tensor * m  = ggml_reshape_2d(gctx, merge(vr, l, hd_v, weights_v[l]), H * hd_v, B); // [n_embd_v, B]
            ggml_tensor * out = ggml_view_2d(gctx, v, B, H * hd_v, kv_size * el, chk.dst[0] * el); // [B, n_embd_v]
            ggml_build_forward_expand(gf, ggml_cpy(gctx, ggml_transpose(gctx, m), out));
        }
    }

    if (!ggml_backend_sched_alloc_graph(sched, gf)) {
        return flowmm_fail(FLOWMM_ERR_BACKEND, "could not allocate the merge graph");
    }

    {
        std::vector<int64_t> d(HB);
        for (int64_t j = 0; j < B; ++j) {
            for (int64_t h = 0; h < H; ++h) {
                d[j * H + h] = (int64_t) chk.dst[j] * H + h;
            }
        }
        ggml_backend_tensor_set(dst_rows, d.data(), 0, d.size() * sizeof(int64_t));

        std::vector<int32_t> r(HBS);
        std::vector<float>   w(HBS), wv(plan->v_weight != nullptr ? HBS : 0);
        for (int64_t l = 0; l < plan->n_layer; ++l) {
            for (int64_t h = 0; h < H; ++h) {
                for (int64_t j = 0; j < B; ++j) {
                    for (int64_t i = 0; i < S; ++i) {
                        const size_t  e = (((size_t) l * H + h) * B + j) * S + i;  // plan order
                        const int64_t o = (j * H + h) * S + i;                       // graph order
                        const int32_t c = plan->src[e];
                        r[o] = c < 0 ? (int32_t) (chk.seq_cells[0] * H + h) : (int32_t) (c * H + h);
                        w[o] = c < 0 ? 0.0f : plan->weight[e];
                        if (plan->v_weight != nullptr) {
                            wv[o] = c < 0 ? 0.0f : plan->v_weight[e];
                        }
                    }
                }
            }
            ggml_backend_tensor_set(src_rows[l], r.data(), 0, r.size() * sizeof(int32_t));
            ggml_backend_tensor_set(weights[l],  w.data(), 0, w.size() * sizeof(float));
            if (plan->v_weight != nullptr) {
                ggml_backend_tensor_set(weights_v[l], wv.data(), 0, wv.size() * sizeof(float));
            }
        }
    }

    if (ctx->graph_compute(gf, false) != GGML_STATUS_SUCCESS) {
        return flowmm_fail(FLOWMM_ERR_BACKEND, "the merge graph failed to compute; the sequence's cache is undefined");
    }
    llama_synchronize(ctx);

    // cell metadata: free the sequence's cells, then occupy the destinations in slot order
    auto & cells = acc::cells_mut(*kv, chk.strm);
    for (int32_t c : chk.seq_cells) {
        cells.rm(c);
    }
    for (int64_t j = 0; j < B; ++j) {
        cells.pos_set(chk.dst[j], plan->slot_pos[j]);
        cells.seq_add(chk.dst[j], seq_id);
    }
    // llama.cpp's find_slot searches from head: start at the bottom, so the next tokens fill the
    // cells the compaction freed instead of landing past them (which would widen n_kv)
    acc::head(*kv, chk.strm) = 0;
    flowmm_bias_forget_seq(*kv, seq_id); // its slots hold new content: biases must be set again
    return FLOWMM_OK;
}
