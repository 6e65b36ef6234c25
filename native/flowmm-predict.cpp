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

// the rows of a flowmm_cache_rows view (row cell * H + h) of nb cells from own[c0], every stride-th,
// head-major
static std::vector<int32_t> head_major_rows(const std::vector<int32_t> & own, int64_t c0, int64_t nb, int64_t H,
                                            int64_t stride = 1) {
    std::vector<int32_t> r(H * nb);
    for (int64_t h = 0; h < H; ++h) {
        for (int64_t c = 0; c < nb; ++c) {
            r[h * nb + c] = own[c0 + c * stride] * (int32_t) H + (int32_t) h;
        }
    }
    return r;
}

// RoPE undone at each cell's own position (a relative predictor's keys, and near-copies')
struct flowmm_rope_undo {
    bool  on;
    int   pairing; // enum flowmm_rope_pairing
    int   n_rot;
    float freq_base;
    float freq_scale;
};

// the keys of n_rows head-major rows of cells (head_major_rows) as the model computed them:
// gathered in f32, the Hadamard rotation of quantized K undone, RoPE undone where rope.on
struct key_rows {
    ggml_tensor * k;    // [hd, n_rows] f32
    ggml_tensor * idx;  // input: the rows
    ggml_tensor * hmat; // input: the Hadamard matrix (quantized K), else NULL
    ggml_tensor * back; // input: -pos of each row's cell (rope.on), else NULL
};

static key_rows gather_keys(ggml_context * gctx, ggml_tensor * k_cache, int64_t hd, int64_t H, int64_t kv_size,
                            int64_t n_rows, int64_t nrot, const flowmm_rope_undo & rope) {
    key_rows out = {nullptr, nullptr, nullptr, nullptr};
    ggml_tensor * rows = flowmm_cache_rows(gctx, k_cache, hd, H * kv_size); // row (cell * H + h)
    out.idx = ggml_new_tensor_1d(gctx, GGML_TYPE_I32, n_rows);
    ggml_set_input(out.idx);
    ggml_tensor * k = ggml_get_rows(gctx, rows, out.idx); // [hd, n_rows] f32
    if (nrot > 0) {
        out.hmat = ggml_new_tensor_2d(gctx, GGML_TYPE_F32, nrot, nrot);
        ggml_set_input(out.hmat);
        k = ggml_reshape_2d(gctx, ggml_mul_mat(gctx, out.hmat, ggml_reshape_2d(gctx, k, nrot, hd / nrot * n_rows)), hd, n_rows);
    }
    if (rope.on) {
        out.back = ggml_new_tensor_1d(gctx, GGML_TYPE_I32, n_rows);
        ggml_set_input(out.back);
        const int mode = rope.pairing == FLOWMM_PAIRS_HALVES ? GGML_ROPE_TYPE_NEOX : 0;
        k = ggml_rope_ext(gctx, ggml_reshape_3d(gctx, k, hd, 1, n_rows), out.back, nullptr, rope.n_rot, mode, 0,
                          rope.freq_base, rope.freq_scale, 0.0f, 1.0f, 0.0f, 0.0f);
        k = ggml_reshape_2d(gctx, k, hd, n_rows);
    }
    out.k = k;
    return out;
}

// the inputs of gather_keys for cells own[c0 .. c0 + nb), every stride-th, of stream strm (the graph allocated)
static void set_keys(const key_rows & keys, const llama_kv_cache & kv, uint32_t strm, const std::vector<int32_t> & own,
                     int64_t c0, int64_t nb, int64_t H, const std::vector<float> & hv, int64_t stride = 1) {
    std::vector<int32_t> r = head_major_rows(own, c0, nb, H, stride);
    ggml_backend_tensor_set(keys.idx, r.data(), 0, r.size() * sizeof(int32_t));
    if (keys.hmat != nullptr) {
        ggml_backend_tensor_set(keys.hmat, hv.data(), 0, hv.size() * sizeof(float));
    }
    if (keys.back != nullptr) {
        const llama_kv_cells & cells = acc::cells(kv, strm);
        for (int64_t h = 0; h < H; ++h) {
            for (int64_t c = 0; c < nb; ++c) {
                r[h * nb + c] = -(int32_t) cells.pos_get(own[c0 + c * stride]);
            }
        }
        ggml_backend_tensor_set(keys.back, r.data(), 0, r.size() * sizeof(int32_t));
    }
}

// the cache of seq_id, and layer il's KV heads and key size; NULL (the error set) where either is bad
static llama_kv_cache * resolve_layer(llama_context * ctx, llama_seq_id seq_id, int32_t il, int64_t & H, int64_t & hd) {
    llama_kv_cache * kv = flowmm_resolve_kv_seq(ctx, seq_id);
    if (kv == nullptr) {
        return nullptr;
    }
    if (il < 0 || il >= (int32_t) acc::n_layer(*kv)) {
        flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "layer " + std::to_string(il) + " is out of range");
        return nullptr;
    }
    const uint32_t mil = acc::layer_il(*kv, il);
    H  = acc::hparams(*kv).n_head_kv(mil);
    hd = acc::hparams(*kv).n_embd_head_k(mil);
    return kv;
}

// whether a RoPE to undo (n_rot dimensions, base, scale) fits a head of hd dimensions
static bool rope_fits(int32_t n_rot, float base, float scale, int64_t hd) {
    return n_rot > 0 && n_rot <= hd && n_rot % 2 == 0 && std::isfinite(base) && base > 0.0f &&
           std::isfinite(scale) && scale > 0.0f;
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
    int64_t H = 0, hd = 0;
    llama_kv_cache * kv = resolve_layer(ctx, seq_id, il, H, hd);
    if (kv == nullptr) {
        return flowmm_last_status();
    }
    if (pred == nullptr || pred->weights == nullptr || pred->bias == nullptr) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "a predictor array is NULL");
    }
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
    if (pred->relative && !rope_fits(pred->rope_n_rot, pred->rope_freq_base, pred->rope_freq_scale, hd)) {
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

        const flowmm_rope_undo rope = {pred->relative != 0, pred->pairing, pred->rope_n_rot, pred->rope_freq_base,
                                       pred->rope_freq_scale};
        key_rows keys = gather_keys(gctx, acc::k(*kv, il, strm), hd, H, kv_size, H * nb, nrot, rope);
        ggml_tensor * k    = keys.k; // [hd, H * nb] f32, head-major
        ggml_tensor * w    = ggml_new_tensor_3d(gctx, GGML_TYPE_F32, nf, 1, H);
        ggml_tensor * b    = ggml_new_tensor_3d(gctx, GGML_TYPE_F32, 1, 1, H);
        ggml_tensor * dist = nullptr; // relative: log(1 + distance to the last position) of each row's cell
        ggml_set_input(w);
        ggml_set_input(b);
        if (pred->relative) {
            dist = ggml_new_tensor_2d(gctx, GGML_TYPE_F32, 1, H * nb);
            ggml_set_input(dist);
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
        set_keys(keys, *kv, strm, own, c0, nb, H, hv);
        ggml_backend_tensor_set(w, pred->weights, 0, H * nf * sizeof(float));
        ggml_backend_tensor_set(b, pred->bias, 0, H * sizeof(float));
        if (dist != nullptr) {
            const llama_kv_cells & cells = acc::cells(*kv, strm);
            const llama_pos last = cells.seq_pos_max(seq_id);
            std::vector<float> d(H * nb);
            for (int64_t h = 0; h < H; ++h) {
                for (int64_t c = 0; c < nb; ++c) {
                    d[h * nb + c] = log1pf((float) (last - cells.pos_get(own[c0 + c])));
                }
            }
            ggml_backend_tensor_set(dist, d.data(), 0, d.size() * sizeof(float));
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

// Near-copies: how many keys of the sequence look like each cell's, log mean_j exp(beta cos(k_c, k_j)),
// the keys turned back by RoPE (a relative predictor's). Per block of cells, one graph: the block's
// keys and the reference keys gathered (gather_keys), each scaled to unit length (l2_norm), one
// mul_mat per KV head gives [reference x block] cosines, exp(beta (cos - 1)) (at most 1, so it cannot
// overflow) summed over the reference, and only [KV heads x block] sums come back. The host adds
// beta and the log of the mean, and, where the reference is a sample, counts the cell's own term
// exactly and estimates the others' from the sample.

// floats of one block's [reference x block x KV heads] cosines (16 MiB)
static constexpr int64_t FLOWMM_NEAR_COPIES_FLOATS = 4 << 20;

int32_t flowmm_kv_near_copies(llama_context * ctx, llama_seq_id seq_id, int32_t il,
                              const flowmm_near_copies_request * req, float * out, int32_t n_cells) {
    int64_t H = 0, hd = 0;
    llama_kv_cache * kv = resolve_layer(ctx, seq_id, il, H, hd);
    if (kv == nullptr) {
        return flowmm_last_status();
    }
    if (req == nullptr) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "the near-copies request is NULL");
    }
    if (req->pairing != FLOWMM_PAIRS_HALVES && req->pairing != FLOWMM_PAIRS_ADJACENT) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "unknown RoPE pairing " + std::to_string(req->pairing));
    }
    if (!rope_fits(req->rope_n_rot, req->rope_freq_base, req->rope_freq_scale, hd)) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "the near-copies' RoPE (" + std::to_string(req->rope_n_rot) +
                           " dimensions, base " + std::to_string(req->rope_freq_base) + ", scale " +
                           std::to_string(req->rope_freq_scale) + ") does not fit a head of " + std::to_string(hd));
    }
    if (!(std::isfinite(req->beta) && req->beta > 0.0f && req->beta <= 80.0f)) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "near-copies beta " + std::to_string(req->beta) +
                           " is not in (0, 80]");
    }
    if (req->max_reference < 1) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "max_reference " + std::to_string(req->max_reference) +
                           " is not positive");
    }
    const uint32_t strm = acc::stream_of(*kv, seq_id);
    const std::vector<int32_t> own = flowmm_seq_cells(*kv, strm, seq_id);
    const int64_t n = own.size();
    if (n_cells != n || (n > 0 && out == nullptr)) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "out holds " + std::to_string(n_cells) +
                           " cells per head, the sequence has " + std::to_string(n));
    }
    if (n == 0) {
        return 0;
    }
    const int64_t kv_size = acc::cells(*kv, strm).size();
    const int64_t stride = (n + req->max_reference - 1) / req->max_reference; // reference: every stride-th cell
    const int64_t m = (n + stride - 1) / stride;
    const int64_t nrot = acc::rot_k(*kv) ? flowmm_k_rot_size(hd) : 0;
    const std::vector<float> hv = nrot > 0 ? flowmm_hadamard(nrot) : std::vector<float>();
    const flowmm_rope_undo rope = {true, req->pairing, req->rope_n_rot, req->rope_freq_base, req->rope_freq_scale};
    const int64_t block = std::max<int64_t>(1, std::min<int64_t>(FLOWMM_PREDICT_BLOCK, FLOWMM_NEAR_COPIES_FLOATS / (m * H)));

    std::vector<float> blk(H * block);
    for (int64_t c0 = 0; c0 < n; c0 += block) {
        const int64_t nb = std::min<int64_t>(block, n - c0);
        const flowmm_graph g = flowmm_begin_graph(ctx);
        ggml_context * gctx = g.gctx;
        key_rows ref = gather_keys(gctx, acc::k(*kv, il, strm), hd, H, kv_size, H * m, nrot, rope);
        key_rows cur = gather_keys(gctx, acc::k(*kv, il, strm), hd, H, kv_size, H * nb, nrot, rope);
        ggml_tensor * ur = ggml_reshape_3d(gctx, ggml_l2_norm(gctx, ref.k, 1e-12f), hd, m, H);
        ggml_tensor * uc = ggml_reshape_3d(gctx, ggml_l2_norm(gctx, cur.k, 1e-12f), hd, nb, H);
        ggml_tensor * cosine = ggml_mul_mat(gctx, ur, uc); // [m, nb, H]
        ggml_prec_set_acc(cosine, GGML_PREC_F32);
        ggml_tensor * sum = ggml_sum_rows(gctx, ggml_exp(gctx, ggml_scale_bias(gctx, cosine, req->beta, -req->beta)));
        ggml_set_output(sum); // [1, nb, H]
        ggml_build_forward_expand(g.gf, sum);
        if (!ggml_backend_sched_alloc_graph(g.sched, g.gf)) {
            return flowmm_fail(FLOWMM_ERR_BACKEND, "could not allocate the near-copies graph");
        }
        set_keys(ref, *kv, strm, own, 0, m, H, hv, stride);
        set_keys(cur, *kv, strm, own, c0, nb, H, hv);
        if (!compute_block(ctx, g, sum, blk, H, nb, n, c0, out)) {
            return flowmm_fail(FLOWMM_ERR_BACKEND, "the near-copies graph failed to compute");
        }
    }
    // sum over the reference of exp(beta (cos - 1)) -> log mean over the sequence of exp(beta cos);
    // a sampled reference: the cell's own term (1) exactly, the other n - 1 from the sample's others
    for (int64_t h = 0; h < H; ++h) {
        for (int64_t c = 0; c < n; ++c) {
            float total = out[h * n + c];
            if (stride > 1) {
                const bool in_ref = c % stride == 0;
                const float others = std::max(0.0f, total - (in_ref ? 1.0f : 0.0f));
                total = 1.0f + others * (float) (n - 1) / (float) std::max<int64_t>(1, m - (in_ref ? 1 : 0));
            }
            out[h * n + c] = req->beta + logf(std::max(total, 1e-30f)) - logf((float) n);
        }
    }
    return (int32_t) n;
}
