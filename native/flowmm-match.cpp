// flowmm-edge: key matching for merges, on the cache's backend.
//
// For one cache layer and every KV head: the keys of the candidate cells and of the pivots are
// gathered from the cache (get_rows, in f32), normalised (l2_norm), compared (mul_mat), offset by
// the caller's allowed/not-allowed bias (get_rows of the candidate's bias row, add), and reduced
// to the best pivot per candidate (argmax) and that pair's cosine (get_rows, mul, sum_rows). Only
// those two small arrays come back to the host, which decides what folds into what. Candidates
// go in blocks whose similarity matrix is at most FLOWMM_MATCH_BLOCK_BYTES, so the graph needs
// no more memory at 16k cells than at 2k.

#include "flowmm.h"
#include "flowmm-graph.h"
#include "flowmm-impl.h"

#include "llama-context.h"
#include "llama-graph.h"
#include "llama-hparams.h"
#include "llama-kv-cache.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

using acc = flowmm_kv_access;

// bytes of one block's similarity matrix (candidates are matched in blocks of this size)
// (the graph holds about three matrices of that size: the similarities, the gathered bias, their sum)
static constexpr int64_t FLOWMM_MATCH_BLOCK_BYTES = 8ll * 1024 * 1024;

int32_t flowmm_kv_match_keys(llama_context * ctx, llama_seq_id seq_id, int32_t il,
                             const flowmm_match_request * req, int32_t * best, float * cosine) {
    llama_kv_cache * kv = flowmm_resolve_kv_seq(ctx, seq_id);
    if (kv == nullptr) {
        return flowmm_last_status();
    }
    if (req == nullptr || best == nullptr || cosine == nullptr || req->cand == nullptr || req->piv == nullptr ||
        req->group == nullptr || req->bias == nullptr) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "a match request array is NULL");
    }
    const int64_t H = req->n_head_kv, C = req->n_cand, P = req->n_piv, G = req->n_groups;
    if (il < 0 || il >= (int32_t) acc::n_layer(*kv)) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "layer " + std::to_string(il) + " is out of range");
    }
    const auto & hp = acc::hparams(*kv);
    const uint32_t mil = acc::layer_il(*kv, il);
    if (H != (int64_t) hp.n_head_kv(mil) || C < 1 || P < 1 || G < 1) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "a match request needs the cache's KV heads and at least one "
                           "candidate, pivot and group");
    }
    const uint32_t strm = acc::stream_of(*kv, seq_id);
    const auto & cs = acc::cells(*kv, strm);
    const int64_t kv_size = cs.size();
    for (int64_t i = 0; i < H * C + H * P; ++i) {
        const int32_t c = i < H * C ? req->cand[i] : req->piv[i - H * C];
        if (c < 0 || c >= kv_size || cs.is_empty(c) || !cs.seq_has(c, seq_id)) {
            return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "cell " + std::to_string(c) + " does not hold the sequence");
        }
    }
    std::vector<bool> any_allowed(H * G, false);
    for (int64_t i = 0; i < H * G * P; ++i) {
        const float b = req->bias[i];
        if (!(b == 0.0f || (std::isinf(b) && b < 0))) {
            return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "a match bias is neither 0 nor -INFINITY");
        }
        any_allowed[i / P] = any_allowed[i / P] || b == 0.0f;
    }
    for (int64_t i = 0; i < H * C; ++i) {
        if (req->group[i] < 0 || req->group[i] >= G) {
            return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "a candidate's group is out of range");
        }
    }

    const int64_t hd = hp.n_embd_head_k(mil);
    // the similarity matrix of a block of candidates is P x block x H floats: blocks keep the
    // graph's memory bounded whatever the cache's length (one block up to a few thousand cells)
    const int64_t block = std::max<int64_t>(1, std::min<int64_t>(C, FLOWMM_MATCH_BLOCK_BYTES / (P * H * (int64_t) sizeof(float))));
    std::vector<int32_t> blk_best(H * block);
    std::vector<float>   blk_cos(H * block);
    for (int64_t c0 = 0; c0 < C; c0 += block) {
        const int64_t Cb = std::min(block, C - c0);
        const flowmm_graph g = flowmm_begin_graph(ctx);
        ggml_context * gctx = g.gctx;

        ggml_tensor * k = acc::k(*kv, il, strm);
        ggml_tensor * rows = flowmm_cache_rows(gctx, k, hd, H * kv_size); // row (cell * H + h)

        ggml_tensor * cand_rows = ggml_new_tensor_1d(gctx, GGML_TYPE_I32, H * Cb);
        ggml_tensor * piv_rows  = ggml_new_tensor_1d(gctx, GGML_TYPE_I32, H * P);
        ggml_tensor * group     = ggml_new_tensor_2d(gctx, GGML_TYPE_I32, Cb, H);
        ggml_tensor * bias      = ggml_new_tensor_3d(gctx, GGML_TYPE_F32, P, G, H);
        for (ggml_tensor * t : {cand_rows, piv_rows, group, bias}) {
            ggml_set_input(t);
        }
        const float eps = 1e-12f;
        ggml_tensor * cn = ggml_reshape_3d(gctx, ggml_l2_norm(gctx, ggml_get_rows(gctx, rows, cand_rows), eps), hd, Cb, H);
        ggml_tensor * pn = ggml_reshape_3d(gctx, ggml_l2_norm(gctx, ggml_get_rows(gctx, rows, piv_rows), eps), hd, P, H);
        ggml_tensor * sim = ggml_mul_mat(gctx, pn, cn);                                    // [P, Cb, H]
        ggml_prec_set_acc(sim, GGML_PREC_F32);
        ggml_tensor * cand_bias = ggml_get_rows(gctx, bias, group);                        // each candidate's row
        flowmm_pin_to_backend_of(g, cand_bias, k); // [P, Cb, H]: made where the keys are, from its small inputs
        sim = ggml_add(gctx, sim, cand_bias);
        ggml_tensor * arg = ggml_argmax(gctx, ggml_reshape_2d(gctx, sim, P, Cb * H));        // [Cb * H]
        ggml_tensor * picked = ggml_get_rows(gctx, pn, ggml_reshape_2d(gctx, arg, Cb, H));  // [hd, Cb, H]
        ggml_tensor * cosv = ggml_sum_rows(gctx, ggml_mul(gctx, cn, picked));               // [1, Cb, H]
        ggml_set_output(arg);
        ggml_set_output(cosv);
        ggml_build_forward_expand(g.gf, arg);
        ggml_build_forward_expand(g.gf, cosv);

        if (!ggml_backend_sched_alloc_graph(g.sched, g.gf)) {
            return flowmm_fail(FLOWMM_ERR_BACKEND, "could not allocate the key matching graph");
        }
        {
            std::vector<int32_t> r(H * Cb);
            std::vector<int32_t> grp(H * Cb);
            for (int64_t h = 0; h < H; ++h) {
                for (int64_t c = 0; c < Cb; ++c) {
                    r[h * Cb + c]   = req->cand[h * C + c0 + c] * (int32_t) H + (int32_t) h;
                    grp[h * Cb + c] = req->group[h * C + c0 + c];
                }
            }
            ggml_backend_tensor_set(cand_rows, r.data(), 0, r.size() * sizeof(int32_t));
            ggml_backend_tensor_set(group, grp.data(), 0, grp.size() * sizeof(int32_t));
            r.resize(H * P);
            for (int64_t h = 0; h < H; ++h) {
                for (int64_t p = 0; p < P; ++p) {
                    r[h * P + p] = req->piv[h * P + p] * (int32_t) H + (int32_t) h;
                }
            }
            ggml_backend_tensor_set(piv_rows, r.data(), 0, r.size() * sizeof(int32_t));
            ggml_backend_tensor_set(bias, req->bias, 0, H * G * P * sizeof(float));
        }
        if (ctx->graph_compute(g.gf, false) != GGML_STATUS_SUCCESS) {
            return flowmm_fail(FLOWMM_ERR_BACKEND, "the key matching graph failed to compute");
        }
        llama_synchronize(ctx);
        ggml_backend_tensor_get(arg, blk_best.data(), 0, H * Cb * sizeof(int32_t));
        ggml_backend_tensor_get(cosv, blk_cos.data(), 0, H * Cb * sizeof(float));
        for (int64_t h = 0; h < H; ++h) {
            for (int64_t c = 0; c < Cb; ++c) {
                best[h * C + c0 + c]   = blk_best[h * Cb + c];
                cosine[h * C + c0 + c] = blk_cos[h * Cb + c];
            }
        }
    }
    for (int64_t h = 0; h < H; ++h) {
        for (int64_t c = 0; c < C; ++c) {
            if (!any_allowed[h * G + req->group[h * C + c]]) {
                best[h * C + c] = -1;
            }
        }
    }
    return FLOWMM_OK;
}
