// flowmm-edge: access to llama.cpp's KV cache (layout, cells of a sequence, K/V rows).
//
// llama_kv_cache declares `friend struct flowmm_kv_access` (patches/0002); everything that
// touches its private members goes through that struct, so the patch stays one line.

#include "flowmm.h"
#include "flowmm-impl.h"

#include "llama-context.h"
#include "llama-hparams.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

static thread_local std::string g_last_error;
static thread_local int32_t     g_last_status = FLOWMM_OK;

int32_t flowmm_fail(int32_t code, std::string msg) {
    g_last_error  = std::move(msg);
    g_last_status = code;
    return code;
}

int32_t flowmm_last_status() {
    return g_last_status;
}

const char * flowmm_last_error(void) {
    return g_last_error.c_str();
}

using acc = flowmm_kv_access;

llama_kv_cache * flowmm_resolve_kv(llama_context * ctx) {
    if (ctx == nullptr) {
        flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "context is NULL");
        return nullptr;
    }
    llama_memory_t mem = llama_get_memory(ctx);
    auto * kv = dynamic_cast<llama_kv_cache *>(mem);
    if (kv == nullptr) {
        // interleaved sliding-window attention: the full-attention layers' cache is the one that
        // grows with the conversation; the sliding-window layers' cache is bounded by its window
        // (llama.cpp reuses the cells that fall out of it), so only the former is merged
        if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
            kv = iswa->get_base();
        }
    }
    if (kv == nullptr) {
        flowmm_fail(FLOWMM_ERR_UNSUPPORTED,
            "the context's memory is not a KV cache that can be merged (hybrid and recurrent models are not supported)");
        return nullptr;
    }
    if (acc::shares_cells(*kv)) {
        flowmm_fail(FLOWMM_ERR_UNSUPPORTED, "KV caches that share cells with another cache are not supported");
        return nullptr;
    }
    const auto & hp = acc::hparams(*kv);
    if (hp.rope_type == LLAMA_ROPE_TYPE_MROPE || hp.rope_type == LLAMA_ROPE_TYPE_IMROPE || kv->has_cell_ext()) {
        flowmm_fail(FLOWMM_ERR_UNSUPPORTED, "M-RoPE models (2-D positions in the cache) are not supported");
        return nullptr;
    }
    const size_t n_layer = acc::n_layer(*kv);
    for (size_t i = 0; i < n_layer; ++i) {
        const uint32_t il = acc::layer_il(*kv, i);
        if (hp.n_head_kv(il) != hp.n_head_kv(acc::layer_il(*kv, 0)) ||
            hp.n_embd_head_k(il) != hp.n_embd_head_k(acc::layer_il(*kv, 0)) ||
            hp.n_embd_head_v(il) != hp.n_embd_head_v(acc::layer_il(*kv, 0))) {
            flowmm_fail(FLOWMM_ERR_UNSUPPORTED, "models whose layers differ in KV head count or head size are not supported");
            return nullptr;
        }
        if (acc::v(*kv, i, 0) == nullptr) {
            flowmm_fail(FLOWMM_ERR_UNSUPPORTED, "caches without a V tensor (MLA) are not supported");
            return nullptr;
        }
    }
    return kv;
}

const llama_kv_cache_context * flowmm_kv_context_of(const llama_memory_context_i * mctx) {
    if (const auto * iswa = dynamic_cast<const llama_kv_cache_iswa_context *>(mctx)) {
        return iswa->get_base();
    }
    return static_cast<const llama_kv_cache_context *>(mctx);
}

llama_kv_cache * flowmm_resolve_kv_seq(llama_context * ctx, llama_seq_id seq_id) {
    llama_kv_cache * kv = flowmm_resolve_kv(ctx);
    if (kv == nullptr) {
        return nullptr;
    }
    if (seq_id < 0 || (uint32_t) seq_id >= acc::n_seq_max(*kv)) {
        flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT,
            "seq_id " + std::to_string(seq_id) + " is out of range [0, " + std::to_string(acc::n_seq_max(*kv)) + ")");
        return nullptr;
    }
    llama_synchronize(ctx); // the last decode may still be running on an asynchronous backend
    return kv;
}

flowmm_ext * flowmm_ext_of(llama_kv_cache & kv, bool create) {
    auto & slot = acc::ext_slot(kv);
    if (!slot && create) {
        slot = std::make_shared<flowmm_ext>();
    }
    return static_cast<flowmm_ext *>(slot.get());
}

int32_t flowmm_kv_get_layout(llama_context * ctx, flowmm_kv_layout * out) {
    llama_kv_cache * kv = flowmm_resolve_kv(ctx);
    if (kv == nullptr) {
        return flowmm_last_status();
    }
    if (out == nullptr) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "out is NULL");
    }
    const auto & hp = acc::hparams(*kv);
    const uint32_t il0 = acc::layer_il(*kv, 0);
    out->n_layer    = (int32_t) acc::n_layer(*kv);
    out->n_head_kv  = (int32_t) hp.n_head_kv(il0);
    out->head_dim_k = (int32_t) hp.n_embd_head_k(il0);
    out->head_dim_v = (int32_t) hp.n_embd_head_v(il0);
    out->kv_size    = (int32_t) acc::cells(*kv, 0).size();
    out->n_stream   = (int32_t) acc::n_stream(*kv);
    out->type_k     = (int32_t) acc::k(*kv, 0, 0)->type;
    out->type_v     = (int32_t) acc::v(*kv, 0, 0)->type;
    out->v_trans    = acc::v_trans(*kv) ? 1 : 0;
    out->rot_k      = acc::rot_k(*kv) ? 1 : 0;
    out->rot_v      = acc::rot_v(*kv) ? 1 : 0;
    return FLOWMM_OK;
}

int32_t flowmm_kv_seq_cells(llama_context * ctx, llama_seq_id seq_id, int32_t * cells, llama_pos * pos, int32_t cap) {
    llama_kv_cache * kv = flowmm_resolve_kv_seq(ctx, seq_id);
    if (kv == nullptr) {
        return flowmm_last_status();
    }
    if (cap < 0) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "cap is negative");
    }
    const uint32_t strm = acc::stream_of(*kv, seq_id);
    const auto & cs = acc::cells(*kv, strm);
    const std::vector<int32_t> own = flowmm_seq_cells(*kv, strm, seq_id);
    for (int32_t i = 0; i < std::min(cap, (int32_t) own.size()); ++i) {
        if (cells) cells[i] = own[i];
        if (pos)   pos[i]   = cs.pos_get(own[i]);
    }
    return (int32_t) own.size();
}

std::vector<int32_t> flowmm_seq_cells(const llama_kv_cache & kv, uint32_t strm, llama_seq_id seq_id) {
    const auto & cs = acc::cells(kv, strm);
    std::vector<int32_t> own;
    for (uint32_t i = 0; i < cs.size(); ++i) {
        if (!cs.is_empty(i) && cs.seq_has(i, seq_id)) {
            own.push_back((int32_t) i);
        }
    }
    return own;
}

int32_t flowmm_kv_used_bound(llama_context * ctx, llama_seq_id seq_id) {
    llama_kv_cache * kv = flowmm_resolve_kv_seq(ctx, seq_id);
    if (kv == nullptr) {
        return flowmm_last_status();
    }
    return (int32_t) acc::cells(*kv, acc::stream_of(*kv, seq_id)).used_max_p1();
}

int32_t flowmm_kv_free_cells(llama_context * ctx, llama_seq_id seq_id) {
    llama_kv_cache * kv = flowmm_resolve_kv_seq(ctx, seq_id);
    if (kv == nullptr) {
        return flowmm_last_status();
    }
    const auto & cells = acc::cells(*kv, acc::stream_of(*kv, seq_id));
    return (int32_t) (cells.size() - cells.get_used());
}

// dequantize `n` values of type `type` from `src` into `dst`
static bool to_f32(ggml_type type, const void * src, float * dst, int64_t n) {
    if (type == GGML_TYPE_F32) {
        memcpy(dst, src, n * sizeof(float));
        return true;
    }
    const auto * traits = ggml_get_type_traits(type);
    if (traits == nullptr || traits->to_float == nullptr) {
        return false;
    }
    traits->to_float(src, dst, n);
    return true;
}

int32_t flowmm_kv_read_rows(llama_context * ctx, llama_seq_id seq_id, int32_t il, int32_t head, int32_t is_v,
                            const int32_t * cells, int32_t n_cells, float * out) {
    llama_kv_cache * kv = flowmm_resolve_kv_seq(ctx, seq_id);
    if (kv == nullptr) {
        return flowmm_last_status();
    }
    const int32_t n_layer = (int32_t) acc::n_layer(*kv);
    if (il < 0 || il >= n_layer) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "layer " + std::to_string(il) + " is out of range [0, " + std::to_string(n_layer) + ")");
    }
    const auto & hp = acc::hparams(*kv);
    const uint32_t mil = acc::layer_il(*kv, il);
    const int32_t n_head_kv = (int32_t) hp.n_head_kv(mil);
    if (head < 0 || head >= n_head_kv) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "KV head " + std::to_string(head) + " is out of range [0, " + std::to_string(n_head_kv) + ")");
    }
    if (n_cells < 0 || (n_cells > 0 && (cells == nullptr || out == nullptr))) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "cells/out are NULL or n_cells is negative");
    }
    const uint32_t strm = acc::stream_of(*kv, seq_id);
    const auto & cs = acc::cells(*kv, strm);
    for (int32_t i = 0; i < n_cells; ++i) {
        if (cells[i] < 0 || (uint32_t) cells[i] >= cs.size()) {
            return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "cell " + std::to_string(cells[i]) + " is out of range [0, " + std::to_string(cs.size()) + ")");
        }
        if (cs.is_empty(cells[i]) || !cs.seq_has(cells[i], seq_id)) {
            return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "cell " + std::to_string(cells[i]) + " does not hold sequence " + std::to_string(seq_id));
        }
    }

    ggml_tensor * t = is_v ? acc::v(*kv, il, strm) : acc::k(*kv, il, strm);
    const int64_t head_dim = is_v ? hp.n_embd_head_v(mil) : hp.n_embd_head_k(mil);
    const bool transposed = is_v && acc::v_trans(*kv);

    if (!transposed) {
        if (head_dim % ggml_blck_size(t->type) != 0) {
            return flowmm_fail(FLOWMM_ERR_UNSUPPORTED, "head size is not a multiple of the cache type's block size");
        }
        const size_t row_bytes = ggml_row_size(t->type, head_dim);
        std::vector<uint8_t> buf(row_bytes);
        for (int32_t i = 0; i < n_cells; ++i) {
            const size_t offs = (size_t) cells[i] * t->nb[1] + (size_t) head * row_bytes;
            ggml_backend_tensor_get(t, buf.data(), offs, row_bytes);
            if (!to_f32(t->type, buf.data(), out + (size_t) i * head_dim, head_dim)) {
                return flowmm_fail(FLOWMM_ERR_UNSUPPORTED, std::string("cannot dequantize cache type ") + ggml_type_name(t->type));
            }
        }
        return FLOWMM_OK;
    }

    // transposed V: element (cell c, dim d) at (d * kv_size + c); read each dim's span of cells once
    if (n_cells == 0) {
        return FLOWMM_OK;
    }
    const auto [mn, mx] = std::minmax_element(cells, cells + n_cells);
    const int64_t span = *mx - *mn + 1;
    const size_t el = ggml_type_size(t->type);
    const int64_t kv_size = cs.size();
    std::vector<uint8_t> raw(span * el);
    std::vector<float> vals(span);
    for (int64_t d = 0; d < head_dim; ++d) {
        const int64_t dim = head * head_dim + d;
        ggml_backend_tensor_get(t, raw.data(), (dim * kv_size + *mn) * el, span * el);
        if (!to_f32(t->type, raw.data(), vals.data(), span)) {
            return flowmm_fail(FLOWMM_ERR_UNSUPPORTED, std::string("cannot dequantize cache type ") + ggml_type_name(t->type));
        }
        for (int32_t i = 0; i < n_cells; ++i) {
            out[(size_t) i * head_dim + d] = vals[cells[i] - *mn];
        }
    }
    return FLOWMM_OK;
}
