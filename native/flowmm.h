// flowmm-edge: FlowMM KV-cache merging extension of llama.cpp.
//
// Public C API, compiled into libllama by the hook in patches/. Every exported
// function follows llama.cpp's conventions: snake_case, a `flowmm_` prefix and
// explicit integer error codes (0 = success, negative = error).
#pragma once

#include "llama.h"

#include <stdint.h>

#define FLOWMM_API LLAMA_API

// Version of the native extension. Bumped whenever the C API changes so that the
// Python bindings can refuse a stale libllama with a clear message.
#define FLOWMM_VERSION_MAJOR 0
#define FLOWMM_VERSION_MINOR 13
#define FLOWMM_VERSION_PATCH 0

#ifdef __cplusplus
extern "C" {
#endif

    // status codes returned by every function below (>= 0 means success)
    enum flowmm_status {
        FLOWMM_OK                   =  0,
        FLOWMM_ERR_INVALID_ARGUMENT = -1, // a bad index, size, pointer or plan; nothing changed
        FLOWMM_ERR_UNSUPPORTED      = -2, // a memory or model kind the extension cannot handle
        FLOWMM_ERR_BUFFER_TOO_SMALL = -3, // the caller's buffer is too small; nothing written
        FLOWMM_ERR_BACKEND          = -4, // a ggml backend operation failed
    };

    // message of the last error on this thread ("" if none); valid until the next call
    FLOWMM_API const char * flowmm_last_error(void);

    // "MAJOR.MINOR.PATCH"; static storage, never NULL
    FLOWMM_API const char * flowmm_version(void);

    // MAJOR * 10000 + MINOR * 100 + PATCH
    FLOWMM_API int32_t flowmm_version_number(void);

    // A ggml_abort_callback: true once the int32 at `flag` is non-zero. Installed with
    // llama_set_abort_callback(ctx, flowmm_abort_when_set, flag), it lets another thread stop the
    // context's decode before its next graph node on the CPU backend (llama_decode returns 2 and
    // drops the positions of the ubatch it stopped in); other backends do not ask. (0.9)
    FLOWMM_API bool flowmm_abort_when_set(void * flag);

    //
    // reading the KV cache
    //

    struct flowmm_kv_layout {
        int32_t n_layer;    // layers in the cache (== model layers for the supported models)
        int32_t n_head_kv;
        int32_t head_dim_k;
        int32_t head_dim_v;
        int32_t kv_size;    // cells per stream
        int32_t n_stream;
        int32_t type_k;     // enum ggml_type
        int32_t type_v;
        int32_t v_trans;    // 1: V stored transposed (flash attention off)
        int32_t rot_k;      // 1: K stored Hadamard-rotated (llama.cpp does so for quantized K, head_dim % 64 == 0)
        int32_t rot_v;
    };

    // Layout of the context's KV cache. With interleaved sliding-window attention (iSWA) it is the
    // full-attention layers' cache, the one every function here reads and merges; the
    // sliding-window layers keep llama.cpp's own bounded cache. FLOWMM_ERR_UNSUPPORTED for other
    // memory (hybrid, recurrent) and for M-RoPE.
    FLOWMM_API int32_t flowmm_kv_get_layout(struct llama_context * ctx, struct flowmm_kv_layout * out);

    // Cells holding seq_id, in cell order, with their positions. Returns the count; writes at
    // most `cap` entries (either array may be NULL to only count).
    FLOWMM_API int32_t flowmm_kv_seq_cells(struct llama_context * ctx, llama_seq_id seq_id,
                                           int32_t * cells, llama_pos * pos, int32_t cap);

    // One past the highest used cell of seq_id's stream: the bound llama.cpp's attended width
    // n_kv follows (padded up). After a merge it is the compacted size.
    FLOWMM_API int32_t flowmm_kv_used_bound(struct llama_context * ctx, llama_seq_id seq_id);

    // Cells of seq_id's stream that hold no sequence at all: the room a decode after the
    // sequence's end can use, whatever other sequences share the stream.
    FLOWMM_API int32_t flowmm_kv_free_cells(struct llama_context * ctx, llama_seq_id seq_id);

    // K (is_v = 0) or V (is_v = 1) of KV head `head` in cache layer `il` for `n_cells` cells of
    // seq_id, dequantized to float32: out[i * head_dim + d]. Reads only those rows.
    FLOWMM_API int32_t flowmm_kv_read_rows(struct llama_context * ctx, llama_seq_id seq_id,
                                           int32_t il, int32_t head, int32_t is_v,
                                           const int32_t * cells, int32_t n_cells, float * out);

    //
    // merge plans
    //

    // For every (cache layer l, KV head h) and each of n_slots surviving slots j, the cells of
    // the sequence summed into it: slot(l, h, j) = sum_i weight[l][h][j][i] * row(src[l][h][j][i]).
    // Unused entries have src = -1 (and any weight). Arrays are dense, row-major in that order.
    struct flowmm_merge_plan {
        int32_t           n_layer;    // must equal the cache's
        int32_t           n_head_kv;  // must equal the cache's
        int32_t           n_slots;    // B, the same for every layer and head
        int32_t           n_src;      // entries per slot
        const int32_t   * src;        // [n_layer][n_head_kv][n_slots][n_src], cells of seq_id or -1
        const float     * weight;     // same shape; finite and >= 0
        const llama_pos * slot_pos;   // [n_slots], strictly increasing, last == the sequence's max position
        const float     * v_weight;   // same shape as weight: V's own weights (K keeps `weight`);
                                      // NULL: V is merged with `weight` too
    };

    // Apply `plan` to seq_id: K and V of every slot are written (in the cache's own type) to the
    // lowest cells not used by other sequences, the sequence's other cells are freed, and slot j
    // takes position slot_pos[j]. Runs as a ggml graph on the cache's backend. The plan is fully
    // checked first: on any error nothing changes. The next llama_decode needs no other call.
    FLOWMM_API int32_t flowmm_kv_apply_plan(struct llama_context * ctx, llama_seq_id seq_id,
                                            const struct flowmm_merge_plan * plan);

    // Key matching, for merges that fold candidates into their most similar kept slot. For cache
    // layer il and every KV head h, candidate c (cell cand[h][c]) is compared by key cosine with the
    // pivots (cells piv[h][p]); the similarity plus bias[h][group[h][c]][p] (0: allowed, -INFINITY:
    // not) picks best[h][c], an index into piv[h], and cosine[h][c] is that pivot's plain cosine.
    // A candidate whose bias row allows no pivot gets best = -1. Runs as a ggml graph on the
    // cache's backend; only best and cosine come back.
    struct flowmm_match_request {
        int32_t         n_head_kv; // must equal the cache's
        int32_t         n_cand;    // C, per head
        int32_t         n_piv;     // P, per head
        int32_t         n_groups;  // rows of bias per head
        const int32_t * cand;      // [n_head_kv][C] cells of seq_id
        const int32_t * piv;       // [n_head_kv][P] cells of seq_id
        const int32_t * group;     // [n_head_kv][C] in [0, n_groups)
        const float   * bias;      // [n_head_kv][n_groups][P], 0 or -INFINITY
    };

    FLOWMM_API int32_t flowmm_kv_match_keys(struct llama_context * ctx, llama_seq_id seq_id, int32_t il,
                                            const struct flowmm_match_request * req, int32_t * best, float * cosine);

    // Learned importance. For cache layer il and every KV head h, each cell of seq_id (in the
    // cell order of flowmm_kv_seq_cells) is scored by
    //     scores[h][c] = weights[h] . [k, len(pairs of k)] + bias[h]
    // where k is the cell's key as the model computed it (dequantized, Hadamard rotation undone)
    // and len(pair i) = sqrt(k[a]^2 + k[b]^2) for the dimensions RoPE rotates together:
    // (i, i + head_dim/2) with FLOWMM_PAIRS_HALVES (NEOX-style RoPE), (2i, 2i + 1) with
    // FLOWMM_PAIRS_ADJACENT. n_feat = head_dim_k * 3 / 2. A `relative` predictor sees positions
    // only relative to the sequence's end: k is first turned back by the plain RoPE of its cell's
    // position (the first rope_n_rot dimensions, paired as `pairing` says, angle
    // pos * rope_freq_scale * rope_freq_base^(-2i/rope_n_rot)), and log(1 + p_max - pos), p_max the
    // sequence's last position, is one more feature: n_feat = head_dim_k * 3 / 2 + 1. Runs as a
    // ggml graph on the cache's backend; returns the number of cells scored.
    enum flowmm_rope_pairing {
        FLOWMM_PAIRS_HALVES   = 0,
        FLOWMM_PAIRS_ADJACENT = 1,
    };

    struct flowmm_predictor {
        int32_t       n_head_kv; // must equal the cache's
        int32_t       n_feat;    // head_dim_k * 3 / 2
        int32_t       pairing;   // enum flowmm_rope_pairing
        const float * weights;   // [n_head_kv][n_feat]
        const float * bias;      // [n_head_kv]
        int32_t       relative;        // 1: keys turned back by RoPE, and the distance to the end; 0: as cached
        int32_t       rope_n_rot;      // with relative: the RoPE undone (dimensions, base, scale)
        float         rope_freq_base;
        float         rope_freq_scale;
    };

    // scores: [n_head_kv][n_cells], n_cells = flowmm_kv_seq_cells(ctx, seq_id, NULL, NULL, 0)
    FLOWMM_API int32_t flowmm_kv_predict_scores(struct llama_context * ctx, llama_seq_id seq_id, int32_t il,
                                                const struct flowmm_predictor * pred, float * scores);

    // Near-copies: for cache layer il and every KV head h, how many of seq_id's keys look like each
    // cell's own,
    //     out[h][c] = log( mean over the sequence's cells j of exp(beta * cos(k'_c, k'_j)) )
    // k' the key as the model computed it, turned back by the plain RoPE of its cell's position (as
    // a relative flowmm_predictor's). With more than max_reference cells, the mean over the others
    // is estimated from every stride-th cell (stride = ceil(n / max_reference), cell order of
    // flowmm_kv_seq_cells) and the cell's own term, exp(beta), counted exactly. n_cells must be the
    // sequence's count; out is [n_head_kv][n_cells]. Runs as ggml graphs on the cache's backend;
    // returns the number of cells. Since 0.13.
    struct flowmm_near_copies_request {
        int32_t pairing;         // enum flowmm_rope_pairing
        int32_t rope_n_rot;      // the RoPE undone (dimensions, base, scale)
        float   rope_freq_base;
        float   rope_freq_scale;
        float   beta;            // in (0, 80]
        int32_t max_reference;   // >= 1
    };

    FLOWMM_API int32_t flowmm_kv_near_copies(struct llama_context * ctx, llama_seq_id seq_id, int32_t il,
                                             const struct flowmm_near_copies_request * req, float * out,
                                             int32_t n_cells);

    // The norm of every cell's value: out[h][c] = |v| of KV head h at the c-th cell of seq_id (cell
    // order of flowmm_kv_seq_cells; n_cells their count), as the model computed it. Runs as a ggml
    // graph on the cache's backend; returns the number of cells. Since 0.11.
    FLOWMM_API int32_t flowmm_kv_value_norms(struct llama_context * ctx, llama_seq_id seq_id, int32_t il, float * out,
                                             int32_t n_cells);

    //
    // per-slot attention bias
    //

    // Additive bias on the attention logits of seq_id's cells (in the cell order of
    // flowmm_kv_seq_cells), per cache layer and, if per_head, per KV head:
    // bias[l][h][i] with h in [0, per_head ? n_head_kv : 1). -INFINITY makes a slot dead in that
    // layer (and head); log(n) makes a slot count for n merged tokens. Replaces the sequence's
    // previous bias; a merge drops it (flowmm_kv_get_slot_bias reads it first, to set it again),
    // and a cell freed and written again carries none. Works with flash attention on and off.
    FLOWMM_API int32_t flowmm_kv_set_slot_bias(struct llama_context * ctx, llama_seq_id seq_id,
                                               const float * bias, int32_t n_cells, int32_t per_head);

    // Remove seq_id's slot bias.
    FLOWMM_API int32_t flowmm_kv_clear_slot_bias(struct llama_context * ctx, llama_seq_id seq_id);

    // The bias seq_id's cells carry now, out[l][h][i] for h in [0, n_head_kv) and i in the cell
    // order of flowmm_kv_seq_cells (n_cells must be their count); 0 where none is set.
    FLOWMM_API int32_t flowmm_kv_get_slot_bias(struct llama_context * ctx, llama_seq_id seq_id,
                                               float * out, int32_t n_cells);

    //
    // attention statistics
    //
    // Requests are per sequence (since 0.10): several sequences may be observed at once, and a
    // ubatch of a unified cache (kv_unified) may hold an observed sequence's rows beside other
    // sequences' rows, as a server's batch does. A requested sequence's counted rows must be
    // consecutive in the batch and belong to it alone, and one requested sequence's rows are
    // counted per ubatch (each adds nodes to every layer; llama.cpp's node budget is sized for
    // its own graph). With one stream per sequence, a ubatch that holds several sequences
    // cannot be counted. Where rows cannot be counted, that request's getters fail, naming why.

    // Ask the following llama_decode calls to also compute, for every layer, the attention
    // probabilities of seq_id's query rows at positions >= pos_min (an observation window: the
    // last W positions of a prompt; everything: 0), under the mask the layer uses, with flash
    // attention on or off, accumulated over ubatches. With n_labels > 0, labels[p] in
    // [0, n_labels) is the modality of position p (n_label_pos must cover every position seen).
    // Replaces seq_id's previous request and zeroes its accumulators.
    FLOWMM_API int32_t flowmm_stats_begin(struct llama_context * ctx, llama_seq_id seq_id, llama_pos pos_min,
                                          const int32_t * labels, int32_t n_label_pos, int32_t n_labels);

    // Count the rows of the request in groups of `rows` consecutive positions from pos_min: the
    // column scores are then, per cell and KV head, the largest mass any one group sent it (the
    // group's rows and the KV head's query heads summed), reported at the KV head's first query
    // head (the others are 0), not the sum over all rows. Call right after flowmm_stats_begin. Groups must not
    // straddle ubatches: decode from pos_min in ubatches of a multiple of `rows` (the last group
    // may be shorter). 0 turns grouping off.
    FLOWMM_API int32_t flowmm_stats_set_row_groups(struct llama_context * ctx, llama_seq_id seq_id, int32_t rows);

    // Stop computing seq_id's statistics (every sequence's: seq_id < 0); with no request left,
    // the graph is again exactly llama.cpp's.
    FLOWMM_API int32_t flowmm_stats_end(struct llama_context * ctx, llama_seq_id seq_id);

    // Column scores of cache layer il: out[h][i] = attention mass the i-th cell of the sequence (cell
    // order of flowmm_kv_seq_cells) received from the counted rows, per query head h (with row
    // groups: the largest mass from one group). Returns the number of rows counted.
    FLOWMM_API int32_t flowmm_stats_column_scores(struct llama_context * ctx, llama_seq_id seq_id, int32_t il, float * out,
                                                  int32_t n_head, int32_t n_cells);

    // Modality flow of cache layer il: out[h][a][b] = attention mass that counted rows labelled a
    // sent to cells labelled b, per query head h. Returns the number of rows counted.
    FLOWMM_API int32_t flowmm_stats_flow(struct llama_context * ctx, llama_seq_id seq_id, int32_t il, double * out,
                                         int32_t n_head, int32_t n_labels);

    // Query sums of cache layer il: out[h][d] = sum over the counted rows of query head h's query
    // (as the layer attends with it: after RoPE, before kq_scale), head_dim = n_embd_head_k.
    // Returns the number of rows counted (the mean is out / that). Since 0.7.
    FLOWMM_API int32_t flowmm_stats_query_sums(struct llama_context * ctx, llama_seq_id seq_id, int32_t il, double * out,
                                               int32_t n_head, int32_t head_dim);

    // Nodes of the graph the context computed last (to check that hooks add nothing when off).
    FLOWMM_API int32_t flowmm_graph_n_nodes(struct llama_context * ctx);

#ifdef __cplusplus
}
#endif
