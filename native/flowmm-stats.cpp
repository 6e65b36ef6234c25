// flowmm-edge: attention statistics of chosen query rows, with flash attention on or off.
//
// Flash attention never materialises the attention probabilities, so when statistics are
// requested the graph hook (patches/0004) recomputes the softmax rows it needs from the layer's
// queries and the cached keys under the mask the layer attends with (existing ops: mul_mat,
// soft_max_ext, permute/cont, sum_rows), for the requested rows of each ubatch only. Two
// graph outputs per layer: column sums (mass each cell receives) and, with labels, the mass
// each row sends to each label. The after-compute hook (patches/0005) accumulates them on the
// host across ubatches. A third output sums the counted rows' queries (as the layer attends with
// them, RoPE applied): their mean is what Expected Attention scores the keys against. With no
// request, neither hook adds or does anything.
//
// Requests are per sequence: in a unified cache a ubatch may hold several sequences' rows (a
// server's batch); the requested sequence whose rows it holds gets nodes over its own rows,
// one such sequence per ubatch (a second one's request fails, naming the first).

#include "flowmm.h"
#include "flowmm-graph.h"
#include "flowmm-hooks.h"
#include "flowmm-impl.h"

#include "llama-batch.h"
#include "llama-context.h"
#include "llama-graph.h"
#include "llama-kv-cache.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

using acc = flowmm_kv_access;

namespace {

struct stats_state {
    llama_seq_id seq_id  = 0;
    llama_pos    pos_min = 0;
    int32_t      n_labels = 0;
    std::vector<int32_t> labels; // label of each position
    int32_t n_layer = 0;
    int32_t n_head  = 0;
    int32_t n_head_kv = 0;
    int32_t kv_size = 0;
    uint32_t strm   = 0;
    std::vector<float>  colsum; // [n_layer][n_head][kv_size]
    int32_t group = 0;          // rows per group (0: plain sums); colsum then holds, at each KV head's first
                                // query head, the max over groups of the group's mass summed over the KV head's query heads
    std::vector<double> flow;   // [n_layer][n_head][n_labels][n_labels]
    int32_t head_dim = 0;
    std::vector<double> qsum;   // [n_layer][n_head][head_dim] sum of the counted rows' queries
    int64_t n_rows = 0;         // query rows counted
    std::string error;          // set when a ubatch could not be counted; getters then fail

    int32_t label_of(llama_pos p) {
        if (p < 0 || (size_t) p >= labels.size()) {
            if (error.empty()) {
                error = "position " + std::to_string(p) + " has no label (labels cover " + std::to_string(labels.size()) + " positions)";
            }
            return -1;
        }
        return labels[p];
    }
};

// the open requests of a cache, one per sequence (kept in flowmm_ext::stats)
using stats_requests = std::map<llama_seq_id, std::shared_ptr<stats_state>>;

stats_requests * requests_of(llama_kv_cache & kv, bool create) {
    flowmm_ext * ext = flowmm_ext_of(kv, create);
    if (ext == nullptr) {
        return nullptr;
    }
    if (!ext->stats && create) {
        ext->stats = std::make_shared<stats_requests>();
    }
    return static_cast<stats_requests *>(ext->stats.get());
}

std::shared_ptr<stats_state> state_of(llama_kv_cache & kv, llama_seq_id seq_id) {
    stats_requests * reqs = requests_of(kv, false);
    if (reqs == nullptr) {
        return nullptr;
    }
    auto it = reqs->find(seq_id);
    return it == reqs->end() ? nullptr : it->second;
}

class stats_input : public llm_graph_input_i {
public:
    stats_input(std::shared_ptr<stats_state> keep, const llama_kv_cache_context * mctx, int32_t layer, int32_t r0, int32_t n_sel)
        : keep(std::move(keep)), mctx(mctx), layer(layer), r0(r0), n_sel(n_sel) {}

    // one-hot labels of the cells the layer attends: [n_kv, n_labels]
    void set_input(const llama_ubatch * ubatch) override {
        GGML_UNUSED(ubatch);
        if (onehot == nullptr) {
            return;
        }
        stats_state & st = this->st();
        const auto & cells = acc::cells(*acc::kv_of(*mctx), st.strm);
        const int64_t n_kv = onehot->ne[0];
        std::vector<float> data(n_kv * st.n_labels, 0.0f);
        for (int64_t c = 0; c < n_kv; ++c) {
            if (cells.is_empty(c) || !cells.seq_has(c, st.seq_id)) {
                continue; // masked for this sequence: no mass to attribute
            }
            const int32_t lab = st.label_of(cells.pos_get(c));
            if (lab >= 0) {
                data[lab * n_kv + c] = 1.0f;
            }
        }
        ggml_backend_tensor_set(onehot, data.data(), 0, data.size() * sizeof(float));
    }

    bool can_reuse(const llm_graph_params & params) override {
        GGML_UNUSED(params);
        return false; // the selected rows depend on the ubatch's positions
    }

    // accumulate this graph's outputs into the host buffers
    void collect(const llama_ubatch & ubatch) {
        if (colsum == nullptr) {
            return; // a marker without rows
        }
        stats_state & st = this->st();
        const int64_t n_kv = colsum->ne[0];
        const int64_t ng   = colsum->ne[1]; // 1 without row groups
        const int64_t nh   = colsum->ne[2];
        std::vector<float> cs(n_kv * ng * nh);
        ggml_backend_tensor_get(colsum, cs.data(), 0, cs.size() * sizeof(float));
        if (st.group == 0) {
            for (int64_t h = 0; h < nh; ++h) {
                float * dst = st.colsum.data() + ((size_t) layer * st.n_head + h) * st.kv_size;
                for (int64_t c = 0; c < n_kv; ++c) {
                    dst[c] += cs[h * n_kv + c];
                }
            }
        } else {
            // per KV head: the group's mass summed over the head's query heads (consecutive, GQA), then the max
            const int64_t gqa = nh / st.n_head_kv;
            std::vector<float> sum(n_kv);
            for (int64_t kh = 0; kh < st.n_head_kv; ++kh) {
                float * dst = st.colsum.data() + ((size_t) layer * st.n_head + kh * gqa) * st.kv_size;
                for (int64_t g = 0; g < ng; ++g) {
                    std::fill(sum.begin(), sum.end(), 0.0f);
                    for (int64_t j = 0; j < gqa; ++j) {
                        const float * src = cs.data() + ((kh * gqa + j) * ng + g) * n_kv;
                        for (int64_t c = 0; c < n_kv; ++c) {
                            sum[c] += src[c];
                        }
                    }
                    for (int64_t c = 0; c < n_kv; ++c) {
                        dst[c] = std::max(dst[c], sum[c]);
                    }
                }
            }
        }
        if (flow != nullptr) {
            const int64_t L = st.n_labels;
            std::vector<float> fl(L * n_sel * nh);
            ggml_backend_tensor_get(flow, fl.data(), 0, fl.size() * sizeof(float));
            for (int64_t i = 0; i < n_sel; ++i) {
                const int32_t qlab = st.label_of(ubatch.pos[r0 + i]);
                if (qlab < 0) {
                    continue;
                }
                for (int64_t h = 0; h < nh; ++h) {
                    double * m = st.flow.data() + (((size_t) layer * st.n_head + h) * L + qlab) * L;
                    for (int64_t b = 0; b < L; ++b) {
                        m[b] += fl[(h * n_sel + i) * L + b];
                    }
                }
            }
        }
        if (qsum != nullptr) {
            const int64_t hd = qsum->ne[1];
            std::vector<float> qs(hd * nh);
            ggml_backend_tensor_get(qsum, qs.data(), 0, qs.size() * sizeof(float));
            double * dst = st.qsum.data() + (size_t) layer * st.n_head * st.head_dim;
            for (int64_t i = 0; i < hd * nh; ++i) {
                dst[i] += qs[i];
            }
        }
        if (layer == 0) {
            st.n_rows += n_sel;
        }
    }

    ggml_tensor * colsum = nullptr; // [1, n_kv, n_head]; with row groups [n_kv, n_groups, n_head] sums
    ggml_tensor * flow   = nullptr; // [n_labels, n_sel * n_head]
    ggml_tensor * qsum   = nullptr; // [1, head_dim, n_head]
    ggml_tensor * onehot = nullptr; // [n_kv, n_labels]

private:
    stats_state & st() { return *keep; }

    std::shared_ptr<stats_state> keep;
    const llama_kv_cache_context * mctx;
    const int32_t layer;
    const int32_t r0;
    const int32_t n_sel;
};

} // namespace

// the rows of `ubatch` that `st` counts: its sequence's at or after pos_min, which must be
// consecutive in the ubatch (a batch lays each sequence's chunk out in one run). Sets n_sel = 0
// if there are none; false (with st->error set) if they cannot be counted.
static bool counted_rows(stats_state & st, const llama_ubatch & ubatch, int32_t & r0, int32_t & n_sel) {
    r0 = -1;
    n_sel = 0;
    for (int32_t i = 0; i < (int32_t) ubatch.n_tokens; ++i) {
        bool own = false;
        for (int32_t s = 0; s < ubatch.n_seq_id[i]; ++s) {
            own = own || ubatch.seq_id[i][s] == st.seq_id;
        }
        if (!own || ubatch.pos[i] < st.pos_min) {
            continue;
        }
        if (ubatch.n_seq_id[i] != 1) {
            st.error = "a row shared by several sequences cannot be counted for one of them";
            return false;
        }
        if (r0 >= 0 && i != r0 + n_sel) {
            st.error = "the requested sequence's rows are not consecutive in the batch";
            return false;
        }
        r0 = r0 < 0 ? i : r0;
        ++n_sel;
    }
    r0 = std::max(r0, 0);
    return true;
}

// the statistics nodes of one request over its rows of this ubatch. One request counts rows per
// ubatch (`taken`): each adds about 17 nodes a layer, and llama.cpp sizes the graph's node
// budget for its own graph (graph_max_nodes), which one request's nodes fit and several may not.
static void add_stats_nodes(ggml_context * ctx, ggml_cgraph * gf, llm_graph_result * res,
                            const llama_kv_cache_context * mctx, llama_kv_cache * kv, const llama_ubatch & ubatch,
                            ggml_tensor * q, ggml_tensor * k, ggml_tensor * kq_mask, float kq_scale, int il,
                            const std::shared_ptr<stats_state> & sp, llama_seq_id & taken) {
    stats_state * st = sp.get();
    if (!st->error.empty()) {
        return;
    }
    bool has_seq = false;
    for (uint32_t s = 0; s < ubatch.n_seqs_unq; ++s) {
        has_seq = has_seq || ubatch.seq_id_unq[s] == st->seq_id;
    }
    if (!has_seq) {
        return; // other sequences' rows
    }
    if (ubatch.n_seqs_unq != 1 && k->ne[3] != 1) {
        // one stream per sequence: k and the mask are laid out per stream
        st->error = "statistics of a ubatch of several sequences need a unified cache (kv_unified)";
        return;
    }
    int32_t r0 = 0;
    int32_t n_sel = 0;
    if (!counted_rows(*st, ubatch, r0, n_sel)) {
        return;
    }
    const int32_t layer = acc::cache_layer(*kv, il);
    if (n_sel <= 0) {
        if (layer == 0) {
            // nothing to count here, but this graph must not be reused for a ubatch that has rows
            res->add_input(std::make_unique<stats_input>(sp, mctx, layer, r0, 0));
        }
        return;
    }
    if (taken >= 0 && taken != st->seq_id) {
        st->error = "sequence " + std::to_string(taken) + "'s statistics were counted in the same ubatch: "
                    "decode one observed sequence's rows per ubatch";
        return;
    }
    taken = st->seq_id;

    if (st->group > 0 && (ubatch.pos[r0] - st->pos_min) % st->group != 0) {
        if (st->error.empty()) {
            st->error = "row groups of " + std::to_string(st->group) + " would straddle ubatches: decode from pos_min "
                        "in ubatches of a multiple of " + std::to_string(st->group) + " rows";
        }
        return;
    }

    const int64_t hd = q->ne[0];
    const int64_t nh = q->ne[1];
    const int64_t n_kv = k->ne[2];

    // [hd, n_sel, n_head] queries and [hd, n_kv, n_head_kv] keys; mul_mat broadcasts GQA groups.
    // Contiguous copies (a few MB) let the CPU use its fast matmul: about half the cost of views.
    ggml_tensor * qs = ggml_view_3d(ctx, q, hd, nh, n_sel, q->nb[1], q->nb[2], (size_t) r0 * q->nb[2]);
    qs = ggml_cont(ctx, ggml_permute(ctx, qs, 0, 2, 1, 3));
    ggml_tensor * ks = ggml_view_3d(ctx, k, hd, k->ne[1], n_kv, k->nb[1], k->nb[2], 0);
    ks = ggml_cont(ctx, ggml_permute(ctx, ks, 0, 2, 1, 3));
    ggml_tensor * kq = ggml_mul_mat(ctx, ks, qs);                                  // [n_kv, n_sel, n_head]
    ggml_prec_set_acc(kq, GGML_PREC_F32);

    // the rows of the mask this layer attends with (it may carry a per-head slot bias)
    ggml_tensor * m = ggml_view_3d(ctx, kq_mask, n_kv, n_sel, kq_mask->ne[2], kq_mask->nb[1], kq_mask->nb[2],
                                   (size_t) r0 * kq_mask->nb[1]);
    if (!ggml_is_contiguous(m)) {
        m = ggml_cont(ctx, m); // a per-head mask: some of each head's rows (soft_max needs them contiguous)
    }
    ggml_tensor * p = ggml_soft_max_ext(ctx, kq, m, kq_scale, 0.0f);               // [n_kv, n_sel, n_head]

    // column sums over rows: repeat_back reduces dim 1 in place of a transposed copy of p (1.34x
    // instead of 1.9x prefill time for all rows at 4k); where the cache's device lacks it (Metal),
    // the portable transpose + sum_rows. FLOWMM_STATS_PORTABLE=1 forces the portable path (tests
    // run it on the CPU). `rows` is p's [n_kv, G, n_groups, n_head] view; the result [n_kv, n_groups, n_head].
    ggml_tensor * kbase = k->view_src ? k->view_src : k;
    ggml_backend_dev_t dev = kbase->buffer ? ggml_backend_buft_get_device(ggml_backend_buffer_get_type(kbase->buffer)) : nullptr;
    const char * portable = getenv("FLOWMM_STATS_PORTABLE");
    auto group_sums = [&](ggml_tensor * rows) {
        ggml_tensor * s = ggml_repeat_back(ctx, rows, ggml_new_tensor_4d(ctx, GGML_TYPE_F32, n_kv, 1, rows->ne[2], nh));
        if ((portable && atoi(portable)) || (dev != nullptr && !ggml_backend_dev_supports_op(dev, s))) {
            s = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, rows, 1, 0, 2, 3)));
        }
        return ggml_reshape_3d(ctx, s, n_kv, rows->ne[2], nh);
    };

    auto inp = std::make_unique<stats_input>(sp, mctx, layer, r0, n_sel);
    if (st->group == 0) {
        inp->colsum = group_sums(ggml_view_4d(ctx, p, n_kv, n_sel, 1, nh, p->nb[1], p->nb[2], p->nb[2], 0));
    } else {
        // row groups: sums over each G consecutive rows (the last may be shorter), [n_kv, n_groups, n_head]
        const int64_t G = st->group, n_full = n_sel / G, rest = n_sel % G;
        if (n_full > 0) {
            inp->colsum = group_sums(ggml_view_4d(ctx, p, n_kv, G, n_full, nh, p->nb[1], p->nb[1] * G, p->nb[2], 0));
        }
        if (rest > 0) {
            ggml_tensor * last = group_sums(ggml_view_4d(ctx, p, n_kv, rest, 1, nh, p->nb[1], p->nb[1] * rest, p->nb[2],
                                                         (size_t) n_full * G * p->nb[1]));
            inp->colsum = inp->colsum ? ggml_concat(ctx, inp->colsum, last, 1) : last;
        }
    }
    ggml_set_output(inp->colsum);
    ggml_build_forward_expand(gf, inp->colsum);
    if (hd == st->head_dim && nh == st->n_head) {
        // [n_sel, hd, n_head] rows summed: [1, hd, n_head]
        inp->qsum = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, qs, 1, 0, 2, 3)));
        ggml_set_output(inp->qsum);
        ggml_build_forward_expand(gf, inp->qsum);
    }
    if (st->n_labels > 0) {
        inp->onehot = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_kv, st->n_labels);
        ggml_set_input(inp->onehot);
        inp->flow = ggml_mul_mat(ctx, inp->onehot, ggml_reshape_2d(ctx, p, n_kv, n_sel * nh));  // [n_labels, n_sel*n_head]
        ggml_set_output(inp->flow);
        ggml_build_forward_expand(gf, inp->flow);
    }
    res->add_input(std::move(inp));
}

void flowmm_hook_attn_stats(ggml_context * ctx, ggml_cgraph * gf, llm_graph_result * res,
                            const llama_kv_cache_context * mctx, const llama_ubatch & ubatch,
                            ggml_tensor * q, ggml_tensor * k, ggml_tensor * kq_mask, float kq_scale, int il) {
    if (mctx == nullptr || q == nullptr || k == nullptr || kq_mask == nullptr) {
        return;
    }
    llama_kv_cache * kv = acc::kv_of(*mctx);
    stats_requests * reqs = kv ? requests_of(*kv, false) : nullptr;
    if (reqs == nullptr) {
        return;
    }
    llama_seq_id taken = -1;
    for (const auto & [seq_id, sp] : *reqs) {
        add_stats_nodes(ctx, gf, res, mctx, kv, ubatch, q, k, kq_mask, kq_scale, il, sp, taken);
    }
}

void flowmm_hook_graph_computed(llama_context * lctx, llm_graph_result * res, const llama_ubatch & ubatch) {
    bool synced = false;
    for (auto & input : res->inputs) {
        auto * si = dynamic_cast<stats_input *>(input.get());
        if (si == nullptr) {
            continue;
        }
        if (!synced) {
            llama_synchronize(lctx);
            synced = true;
        }
        si->collect(ubatch);
    }
}

int32_t flowmm_stats_begin(llama_context * ctx, llama_seq_id seq_id, llama_pos pos_min,
                           const int32_t * labels, int32_t n_label_pos, int32_t n_labels) {
    llama_kv_cache * kv = flowmm_resolve_kv_seq(ctx, seq_id);
    if (kv == nullptr) {
        return flowmm_last_status();
    }
    if (pos_min < 0) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "pos_min is negative");
    }
    if (n_labels < 0 || (n_labels > 0 && (labels == nullptr || n_label_pos <= 0))) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "labels are missing or n_labels is negative");
    }
    for (int32_t i = 0; i < (n_labels > 0 ? n_label_pos : 0); ++i) {
        if (labels[i] < 0 || labels[i] >= n_labels) {
            return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "label " + std::to_string(labels[i]) + " at position " +
                std::to_string(i) + " is out of range [0, " + std::to_string(n_labels) + ")");
        }
    }
    const uint32_t strm = acc::stream_of(*kv, seq_id);
    const llama_pos pos_max = acc::cells(*kv, strm).seq_pos_max(seq_id);
    if (n_labels > 0 && pos_max >= n_label_pos) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "labels cover " + std::to_string(n_label_pos) +
            " positions but the sequence already holds position " + std::to_string(pos_max));
    }
    const auto & hp = acc::hparams(*kv);
    if (hp.attn_soft_cap) { // the hook recomputes plain softmax(q·k·scale + mask) rows
        return flowmm_fail(FLOWMM_ERR_UNSUPPORTED, "attention statistics do not model attention logit soft-capping (Gemma 2)");
    }
    auto st = std::make_shared<stats_state>();
    st->seq_id   = seq_id;
    st->pos_min  = pos_min;
    st->n_labels = n_labels;
    if (n_labels > 0) {
        st->labels.assign(labels, labels + n_label_pos);
    }
    st->n_layer = (int32_t) acc::n_layer(*kv);
    st->n_head  = (int32_t) hp.n_head(acc::layer_il(*kv, 0));
    st->n_head_kv = (int32_t) hp.n_head_kv(acc::layer_il(*kv, 0));
    st->kv_size = (int32_t) acc::cells(*kv, strm).size();
    st->strm    = strm;
    st->colsum.assign((size_t) st->n_layer * st->n_head * st->kv_size, 0.0f);
    st->flow.assign((size_t) st->n_layer * st->n_head * n_labels * n_labels, 0.0);
    st->head_dim = (int32_t) hp.n_embd_head_k(acc::layer_il(*kv, 0));
    st->qsum.assign((size_t) st->n_layer * st->n_head * st->head_dim, 0.0);
    (*requests_of(*kv, true))[seq_id] = st; // replaces this sequence's request, not the others'
    flowmm_drop_cached_graphs(ctx); // graphs built without the statistics nodes
    return FLOWMM_OK;
}

int32_t flowmm_stats_set_row_groups(llama_context * ctx, llama_seq_id seq_id, int32_t rows) {
    llama_kv_cache * kv = flowmm_resolve_kv(ctx);
    if (kv == nullptr) {
        return flowmm_last_status();
    }
    std::shared_ptr<stats_state> st = state_of(*kv, seq_id);
    if (st == nullptr) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "no statistics were requested (flowmm_stats_begin)");
    }
    if (rows < 0) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "row groups of " + std::to_string(rows) + " rows");
    }
    if (st->n_rows > 0) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "row groups must be set before any row is counted");
    }
    st->group = rows;
    flowmm_drop_cached_graphs(ctx); // graphs built with the other reduction
    return FLOWMM_OK;
}

int32_t flowmm_stats_end(llama_context * ctx, llama_seq_id seq_id) {
    llama_kv_cache * kv = flowmm_resolve_kv(ctx);
    if (kv == nullptr) {
        return flowmm_last_status();
    }
    stats_requests * reqs = requests_of(*kv, false);
    if (reqs != nullptr && (seq_id < 0 ? !reqs->empty() : reqs->erase(seq_id) > 0)) {
        if (seq_id < 0) {
            reqs->clear();
        }
        flowmm_drop_cached_graphs(ctx);
    }
    return FLOWMM_OK;
}

static std::shared_ptr<stats_state> checked_state(llama_context * ctx, llama_seq_id seq_id, int32_t il, int32_t n_head,
                                                  llama_kv_cache ** kv_out) {
    llama_kv_cache * kv = flowmm_resolve_kv(ctx);
    if (kv == nullptr) {
        return nullptr;
    }
    llama_synchronize(ctx);
    std::shared_ptr<stats_state> st = state_of(*kv, seq_id);
    if (st == nullptr) {
        flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "no statistics were requested for sequence " + std::to_string(seq_id) +
            " (flowmm_stats_begin)");
        return nullptr;
    }
    if (!st->error.empty()) {
        flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, st->error);
        return nullptr;
    }
    if (il < 0 || il >= st->n_layer) {
        flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "layer " + std::to_string(il) + " is out of range [0, " + std::to_string(st->n_layer) + ")");
        return nullptr;
    }
    if (n_head != st->n_head) {
        flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "n_head " + std::to_string(n_head) + " differs from the model's " + std::to_string(st->n_head));
        return nullptr;
    }
    *kv_out = kv;
    return st;
}

int32_t flowmm_stats_column_scores(llama_context * ctx, llama_seq_id seq_id, int32_t il, float * out, int32_t n_head,
                                   int32_t n_cells) {
    llama_kv_cache * kv = nullptr;
    std::shared_ptr<stats_state> st = checked_state(ctx, seq_id, il, n_head, &kv);
    if (st == nullptr) {
        return flowmm_last_status();
    }
    const std::vector<int32_t> own = flowmm_seq_cells(*kv, st->strm, st->seq_id);
    if (n_cells != (int32_t) own.size() || out == nullptr) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "out holds " + std::to_string(n_cells) + " cells per head, the sequence has " +
            std::to_string(own.size()));
    }
    for (int32_t h = 0; h < n_head; ++h) {
        const float * src = st->colsum.data() + ((size_t) il * st->n_head + h) * st->kv_size;
        for (int32_t i = 0; i < n_cells; ++i) {
            out[(size_t) h * n_cells + i] = src[own[i]];
        }
    }
    return (int32_t) st->n_rows;
}

int32_t flowmm_stats_flow(llama_context * ctx, llama_seq_id seq_id, int32_t il, double * out, int32_t n_head,
                          int32_t n_labels) {
    llama_kv_cache * kv = nullptr;
    std::shared_ptr<stats_state> st = checked_state(ctx, seq_id, il, n_head, &kv);
    if (st == nullptr) {
        return flowmm_last_status();
    }
    if (n_labels != st->n_labels || n_labels == 0 || out == nullptr) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "n_labels " + std::to_string(n_labels) + " differs from the request's " +
            std::to_string(st->n_labels));
    }
    const size_t n = (size_t) n_head * n_labels * n_labels;
    std::copy(st->flow.begin() + (size_t) il * n, st->flow.begin() + (size_t) (il + 1) * n, out);
    return (int32_t) st->n_rows;
}

int32_t flowmm_stats_query_sums(llama_context * ctx, llama_seq_id seq_id, int32_t il, double * out, int32_t n_head,
                                int32_t head_dim) {
    llama_kv_cache * kv = nullptr;
    std::shared_ptr<stats_state> st = checked_state(ctx, seq_id, il, n_head, &kv);
    if (st == nullptr) {
        return flowmm_last_status();
    }
    if (head_dim != st->head_dim || out == nullptr) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "head_dim " + std::to_string(head_dim) + " differs from the model's " +
            std::to_string(st->head_dim));
    }
    const size_t n = (size_t) n_head * head_dim;
    std::copy(st->qsum.begin() + (size_t) il * n, st->qsum.begin() + (size_t) (il + 1) * n, out);
    return (int32_t) st->n_rows;
}
