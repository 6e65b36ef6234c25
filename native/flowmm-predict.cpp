// flowmm-edge: learned cell importance, on the cache's backend.
//
// For one cache layer and every KV head, each of the sequence's cells is scored by a linear map of
// its own cached key: score = w . [k, |pairs of k|] + b. The keys are gathered from the cache
// (get_rows, in f32), rotated back where llama.cpp stores them Hadamard-rotated (quantized K), and
// the length of each RoPE-rotated pair of dimensions is appended (sqr, add of the two halves or
// of adjacent dimensions, sqrt: a length does not change with the position). A relative predictor
// first turns the keys back by RoPE at each cell's own position (ggml_rope_ext at -pos, as
// llama.cpp's K-shift turns cached keys by a position delta), so that k itself means the same at
// every position, and adds log(1 + distance to the sequence's last position), computed here from
// the cells' positions. One mul_mat per KV head against the caller's weights gives the scores;
// only those come back to the host.

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

// cells per importance graph (its features: about 1.5 * head_dim * n_head_kv * 4 bytes each)
static constexpr int64_t FLOWMM_PREDICT_BLOCK = 4096;

// the orthonormal Sylvester-Walsh-Hadamard matrix llama.cpp rotates quantized K with
// (llama-kv-cache.cpp, ggml_gen_hadamard); symmetric, its own inverse
static std::vector<float> flowmm_hadamard(int64_t n) {
    std::vector<float> h(n * n, 0.0f);
    h[0] = 1.0f / sqrtf((float) n);
    for (int64_t s = 1; s < n; s *= 2) {
        for (int64_t i = 0; i < s; ++i) {
            for (int64_t j = 0; j < s; ++j) {
                const float v = h[i * n + j];
                h[(i + s) * n + j]       =  v;
                h[i * n + (j + s)]       =  v;
                h[(i + s) * n + (j + s)] = -v;
            }
        }
    }
    return h;
}

// the block size llama.cpp rotates K in: the largest power of two (>= 64) dividing head_dim
// (llama_kv_cache::build_input_k_rot)
static int64_t flowmm_k_rot_size(int64_t head_dim) {
    int64_t n = 64;
    do {
        n *= 2;
    } while (head_dim % n == 0);
    return n / 2;
}

// the rows of a flowmm_cache_rows view (row cell * H + h) of cells own[c0 .. c0 + nb), head-major
static std::vector<int32_t> head_major_rows(const std::vector<int32_t> & own, int64_t c0, int64_t nb, int64_t H) {
    std::vector<int32_t> r(H * nb);
    for (int64_t h = 0; h < H; ++h) {
        for (int64_t c = 0; c < nb; ++c) {
            r[h * nb + c] = own[c0 + c] * (int32_t) H + (int32_t) h;
        }
    }
    return r;
}

// compute a block's graph and copy its [H, nb] result `node` into dst[h * n + c0 ...], per KV head
static bool compute_block(llama_context * ctx, const flowmm_graph & g, ggml_tensor * node, std::vector<float> & blk,
                          int64_t H, int64_t nb, int64_t n, int64_t c0, float * dst) {
    if (ctx->graph_compute(g.gf, false) != GGML_STATUS_SUCCESS) {
        return false;
    }
    llama_synchronize(ctx);
    ggml_backend_tensor_get(node, blk.data(), 0, H * nb * sizeof(float));
    for (int64_t h = 0; h < H; ++h) {
        std::copy(blk.begin() + h * nb, blk.begin() + (h + 1) * nb, dst + h * n + c0);
    }
    return true;
}

int32_t flowmm_kv_predict_scores(llama_context * ctx, llama_seq_id seq_id, int32_t il,
                                 const flowmm_predictor * pred, float * scores) {
    llama_kv_cache * kv = flowmm_resolve_kv_seq(ctx, seq_id);
    if (kv == nullptr) {
        return flowmm_last_status();
    }
    if (pred == nullptr || pred->weights == nullptr || pred->bias == nullptr) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "a predictor array is NULL");
    }
    if (il < 0 || il >= (int32_t) acc::n_layer(*kv)) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "layer " + std::to_string(il) + " is out of range");
    }
    const auto & hp = acc::hparams(*kv);
    const uint32_t mil = acc::layer_il(*kv, il);
    const int64_t H  = hp.n_head_kv(mil);
    const int64_t hd = hp.n_embd_head_k(mil);
    if (pred->relative != 0 && pred->relative != 1) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "relative must be 0 or 1");
    }
    const int64_t nf = hd + hd / 2 + pred->relative;
    if (pred->n_head_kv != H || pred->n_feat != nf || hd % 2 != 0) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "the predictor has " + std::to_string(pred->n_head_kv) +
                           " KV heads of " + std::to_string(pred->n_feat) + " features, the cache " +
                           std::to_string(H) + " of " + std::to_string(nf));
    }
    if (pred->pairing != FLOWMM_PAIRS_HALVES && pred->pairing != FLOWMM_PAIRS_ADJACENT) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "unknown RoPE pairing " + std::to_string(pred->pairing));
    }
    if (pred->relative && (pred->rope_n_rot <= 0 || pred->rope_n_rot > hd || pred->rope_n_rot % 2 != 0 ||
                           !(std::isfinite(pred->rope_freq_base) && pred->rope_freq_base > 0.0f &&
                             std::isfinite(pred->rope_freq_scale) && pred->rope_freq_scale > 0.0f))) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "the predictor's RoPE (" + std::to_string(pred->rope_n_rot) +
                           " dimensions, base " + std::to_string(pred->rope_freq_base) + ", scale " +
                           std::to_string(pred->rope_freq_scale) + ") does not fit a head of " + std::to_string(hd));
    }
    for (int64_t i = 0; i < H * nf + H; ++i) {
        if (!std::isfinite(i < H * nf ? pred->weights[i] : pred->bias[i - H * nf])) {
            return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "a predictor weight is not finite");
        }
    }
    if (scores == nullptr) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "scores is NULL");
    }
    const uint32_t strm = acc::stream_of(*kv, seq_id);
    const std::vector<int32_t> own = flowmm_seq_cells(*kv, strm, seq_id);
    const int64_t n = own.size();
    if (n == 0) {
        return FLOWMM_OK;
    }
    const int64_t kv_size = acc::cells(*kv, strm).size();

    // cells go in blocks, so the graph's features stay a few MiB whatever the cache's length
    const int64_t nrot = acc::rot_k(*kv) ? flowmm_k_rot_size(hd) : 0; // quantized K is stored rotated
    const std::vector<float> hv = nrot > 0 ? flowmm_hadamard(nrot) : std::vector<float>();
    std::vector<float> blk(H * FLOWMM_PREDICT_BLOCK);
    for (int64_t c0 = 0; c0 < n; c0 += FLOWMM_PREDICT_BLOCK) {
        const int64_t nb = std::min<int64_t>(FLOWMM_PREDICT_BLOCK, n - c0);
        const flowmm_graph g = flowmm_begin_graph(ctx);
        ggml_context * gctx = g.gctx;

        ggml_tensor * rows = flowmm_cache_rows(gctx, acc::k(*kv, il, strm), hd, H * kv_size); // row (cell * H + h)
        ggml_tensor * idx  = ggml_new_tensor_1d(gctx, GGML_TYPE_I32, H * nb);                // head-major
        ggml_tensor * w    = ggml_new_tensor_3d(gctx, GGML_TYPE_F32, nf, 1, H);
        ggml_tensor * b    = ggml_new_tensor_3d(gctx, GGML_TYPE_F32, 1, 1, H);
        ggml_tensor * hmat = nullptr;
        ggml_tensor * back = nullptr; // relative: -pos of each row's cell, for the RoPE undone
        ggml_tensor * dist = nullptr; // relative: log(1 + distance to the last position) of each row's cell
        for (ggml_tensor * t : {idx, w, b}) {
            ggml_set_input(t);
        }
        ggml_tensor * k = ggml_get_rows(gctx, rows, idx); // [hd, H * nb] f32
        if (nrot > 0) {
            hmat = ggml_new_tensor_2d(gctx, GGML_TYPE_F32, nrot, nrot);
            ggml_set_input(hmat);
            k = ggml_reshape_2d(gctx, ggml_mul_mat(gctx, hmat, ggml_reshape_2d(gctx, k, nrot, hd / nrot * H * nb)), hd, H * nb);
        }
        if (pred->relative) {
            back = ggml_new_tensor_1d(gctx, GGML_TYPE_I32, H * nb);
            dist = ggml_new_tensor_2d(gctx, GGML_TYPE_F32, 1, H * nb);
            ggml_set_input(back);
            ggml_set_input(dist);
            const int mode = pred->pairing == FLOWMM_PAIRS_HALVES ? GGML_ROPE_TYPE_NEOX : 0;
            k = ggml_rope_ext(gctx, ggml_reshape_3d(gctx, k, hd, 1, H * nb), back, nullptr, pred->rope_n_rot, mode, 0,
                              pred->rope_freq_base, pred->rope_freq_scale, 0.0f, 1.0f, 0.0f, 0.0f);
            k = ggml_reshape_2d(gctx, k, hd, H * nb);
        }
        ggml_tensor * sq = ggml_sqr(gctx, k);
        ggml_tensor * pairs;
        if (pred->pairing == FLOWMM_PAIRS_HALVES) {
            ggml_tensor * lo = ggml_view_2d(gctx, sq, hd / 2, H * nb, sq->nb[1], 0);
            ggml_tensor * hi = ggml_view_2d(gctx, sq, hd / 2, H * nb, sq->nb[1], (hd / 2) * ggml_element_size(sq));
            pairs = ggml_add(gctx, ggml_cont(gctx, lo), ggml_cont(gctx, hi));
        } else {
            pairs = ggml_reshape_2d(gctx, ggml_sum_rows(gctx, ggml_reshape_2d(gctx, sq, 2, hd / 2 * H * nb)), hd / 2, H * nb);
        }
        ggml_tensor * feat = ggml_concat(gctx, k, ggml_sqrt(gctx, pairs), 0);            // [nf, H * nb]
        if (dist != nullptr) {
            feat = ggml_concat(gctx, feat, dist, 0);
        }
        ggml_tensor * out  = ggml_mul_mat(gctx, w, ggml_reshape_3d(gctx, feat, nf, nb, H)); // [1, nb, H]
        ggml_prec_set_acc(out, GGML_PREC_F32);
        out = ggml_add(gctx, out, b);
        ggml_set_output(out);
        ggml_build_forward_expand(g.gf, out);

        if (!ggml_backend_sched_alloc_graph(g.sched, g.gf)) {
            return flowmm_fail(FLOWMM_ERR_BACKEND, "could not allocate the importance graph");
        }
        {
            std::vector<int32_t> r = head_major_rows(own, c0, nb, H);
            ggml_backend_tensor_set(idx, r.data(), 0, r.size() * sizeof(int32_t));
            ggml_backend_tensor_set(w, pred->weights, 0, H * nf * sizeof(float));
            ggml_backend_tensor_set(b, pred->bias, 0, H * sizeof(float));
            if (hmat != nullptr) {
                ggml_backend_tensor_set(hmat, hv.data(), 0, hv.size() * sizeof(float));
            }
            if (back != nullptr) {
                const llama_kv_cells & cells = acc::cells(*kv, strm);
                const llama_pos last = cells.seq_pos_max(seq_id);
                std::vector<float> d(H * nb);
                for (int64_t h = 0; h < H; ++h) {
                    for (int64_t c = 0; c < nb; ++c) {
                        const llama_pos p = cells.pos_get(own[c0 + c]);
                        r[h * nb + c] = -(int32_t) p;
                        d[h * nb + c] = log1pf((float) (last - p));
                    }
                }
                ggml_backend_tensor_set(back, r.data(), 0, r.size() * sizeof(int32_t));
                ggml_backend_tensor_set(dist, d.data(), 0, d.size() * sizeof(float));
            }
        }
        if (!compute_block(ctx, g, out, blk, H, nb, n, c0, scores)) {
            return flowmm_fail(FLOWMM_ERR_BACKEND, "the importance graph failed to compute");
        }
    }
    return (int32_t) n;
}

// The norm of every cell's value, per KV head (KVzip+'s correction of an attention score: a cell
// that draws attention but adds a short value changes little). An orthonormal rotation keeps a
// norm, so rotated V needs no undoing. V is gathered by rows (get_rows) or, stored transposed
// (flash attention off), turned back first: a copy of the layer's V, a few MiB, per block of
// FLOWMM_PREDICT_BLOCK cells (each block is its own graph).
int32_t flowmm_kv_value_norms(llama_context * ctx, llama_seq_id seq_id, int32_t il, float * out, int32_t n_cells) {
    llama_kv_cache * kv = flowmm_resolve_kv_seq(ctx, seq_id);
    if (kv == nullptr) {
        return flowmm_last_status();
    }
    if (il < 0 || il >= (int32_t) acc::n_layer(*kv)) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "layer " + std::to_string(il) + " is out of range");
    }
    const uint32_t strm = acc::stream_of(*kv, seq_id);
    const std::vector<int32_t> own = flowmm_seq_cells(*kv, strm, seq_id);
    const int64_t n = own.size();
    if (n_cells != n || (n > 0 && out == nullptr)) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "out holds " + std::to_string(n_cells) + " cells per head, the sequence has " +
            std::to_string(n));
    }
    if (n == 0) {
        return 0;
    }
    const auto & hp = acc::hparams(*kv);
    const uint32_t mil = acc::layer_il(*kv, il);
    const int64_t H  = hp.n_head_kv(mil);
    const int64_t hd = hp.n_embd_head_v(mil);
    const int64_t kv_size = acc::cells(*kv, strm).size();
    ggml_tensor * v = acc::v(*kv, il, strm);

    std::vector<float> blk(H * FLOWMM_PREDICT_BLOCK);
    for (int64_t c0 = 0; c0 < n; c0 += FLOWMM_PREDICT_BLOCK) {
        const int64_t nb = std::min<int64_t>(FLOWMM_PREDICT_BLOCK, n - c0);
        const flowmm_graph g = flowmm_begin_graph(ctx);
        ggml_context * gctx = g.gctx;
        ggml_tensor * rows;
        if (acc::v_trans(*kv)) { // [kv_size, H * hd] -> [H * hd, kv_size] -> row (cell * H + h)
            ggml_tensor * vt = ggml_view_2d(gctx, v, kv_size, H * hd, ggml_row_size(v->type, kv_size), 0);
            rows = ggml_reshape_2d(gctx, ggml_cont(gctx, ggml_transpose(gctx, vt)), hd, H * kv_size);
        } else {
            rows = flowmm_cache_rows(gctx, v, hd, H * kv_size);
        }
        ggml_tensor * idx = ggml_new_tensor_1d(gctx, GGML_TYPE_I32, H * nb); // head-major
        ggml_set_input(idx);
        ggml_tensor * sel = ggml_get_rows(gctx, rows, idx);                 // [hd, H * nb] f32
        ggml_tensor * norm = ggml_sqrt(gctx, ggml_sum_rows(gctx, ggml_sqr(gctx, sel)));
        ggml_set_output(norm);
        ggml_build_forward_expand(g.gf, norm);
        if (!ggml_backend_sched_alloc_graph(g.sched, g.gf)) {
            return flowmm_fail(FLOWMM_ERR_BACKEND, "could not allocate the value-norm graph");
        }
        const std::vector<int32_t> r = head_major_rows(own, c0, nb, H);
        ggml_backend_tensor_set(idx, r.data(), 0, r.size() * sizeof(int32_t));
        if (!compute_block(ctx, g, norm, blk, H, nb, n, c0, out)) {
            return flowmm_fail(FLOWMM_ERR_BACKEND, "the value-norm graph failed to compute");
        }
    }
    return (int32_t) n;
}
