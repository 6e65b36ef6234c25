// flowmm-edge: internal helpers shared by the native/ sources (not part of the C API)
#pragma once

#include "llama.h"
#include "llama-kv-cache.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

// llama_kv_cache declares this struct its friend (patches/0002): the one door to its internals
struct flowmm_kv_access {
    static const llama_hparams & hparams(const llama_kv_cache & kv) { return kv.hparams; }
    static bool v_trans(const llama_kv_cache & kv) { return kv.v_trans; }
    static bool rot_k(const llama_kv_cache & kv) { return kv.attn_rot_k; }
    static bool rot_v(const llama_kv_cache & kv) { return kv.attn_rot_v; }
    static bool shares_cells(const llama_kv_cache & kv) { return kv.other != nullptr; }
    static uint32_t n_stream(const llama_kv_cache & kv) { return kv.n_stream; }
    static uint32_t n_seq_max(const llama_kv_cache & kv) { return kv.n_seq_max; }
    static uint32_t stream_of(const llama_kv_cache & kv, llama_seq_id s) { return kv.seq_to_stream[s]; }
    static const llama_kv_cells & cells(const llama_kv_cache & kv, uint32_t strm) { return kv.v_cells[strm]; }
    static llama_kv_cells & cells_mut(llama_kv_cache & kv, uint32_t strm) { return kv.v_cells[strm]; }
    static uint32_t & head(llama_kv_cache & kv, uint32_t strm) { return kv.v_heads[strm]; }
    static size_t n_layer(const llama_kv_cache & kv) { return kv.layers.size(); }
    static uint32_t layer_il(const llama_kv_cache & kv, size_t i) { return kv.layers[i].il; }
    static ggml_tensor * k(const llama_kv_cache & kv, size_t i, uint32_t strm) { return kv.layers[i].k_stream[strm]; }
    static ggml_tensor * v(const llama_kv_cache & kv, size_t i, uint32_t strm) { return kv.layers[i].v_stream[strm]; }
    static int32_t cache_layer(const llama_kv_cache & kv, int32_t il) { return kv.map_layer_ids.at(il); }
    static std::shared_ptr<void> & ext_slot(llama_kv_cache & kv) { return kv.flowmm_ext; }
    static llama_kv_cache * kv_of(const llama_kv_cache_context & mctx) { return mctx.kv; }
};


// record `msg` as this thread's last error and return `code`
int32_t flowmm_fail(int32_t code, std::string msg);

// the code of the last flowmm_fail() on this thread
int32_t flowmm_last_status();

// the context's plain-RoPE KV cache that merges act on (with iSWA, the full-attention layers'
// cache), or NULL with the error recorded
llama_kv_cache * flowmm_resolve_kv(llama_context * ctx);

// the batch context of that cache within a graph's memory context (with iSWA, its base part)
const llama_kv_cache_context * flowmm_kv_context_of(const llama_memory_context_i * mctx);

// the cells of stream `strm` holding seq_id, in cell order
std::vector<int32_t> flowmm_seq_cells(const llama_kv_cache & kv, uint32_t strm, llama_seq_id seq_id);

// flowmm_resolve_kv, then checks that seq_id is a sequence of the cache and waits for the
// context's pending work; NULL with the error recorded otherwise
llama_kv_cache * flowmm_resolve_kv_seq(llama_context * ctx, llama_seq_id seq_id);

// the slot-bias state forgets the cells of seq_id (after they were rewritten by a merge)
void flowmm_bias_forget_seq(llama_kv_cache & kv, llama_seq_id seq_id);

// what native/ keeps on a cache (in its flowmm_ext slot, patches/0002): one entry per feature
struct flowmm_ext {
    std::shared_ptr<void> bias;  // flowmm-bias.cpp
    std::shared_ptr<void> stats; // flowmm-stats.cpp
};

// the cache's extension state; NULL if none and !create
flowmm_ext * flowmm_ext_of(llama_kv_cache & kv, bool create);
