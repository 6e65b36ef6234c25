// flowmm-edge: per-slot additive bias on the attention logits, per layer and optionally per KV head.
//
// A merged slot that stands for n tokens gets +log(n) (proportional attention); a slot that is
// dead in one layer only gets -inf there. The bias is stored per cell with the cell's position
// and sequence, so a cell that is later freed and reused never inherits a stale bias. The graph
// hook (patches/0004) adds it to the KQ mask with existing ops (cast, repeat, add), for flash
// attention on and off; with no bias set it adds nothing to the graph.

#include "flowmm.h"
#include "flowmm-graph.h"
#include "flowmm-hooks.h"
#include "flowmm-impl.h"

#include "llama-graph.h"
#include "llama-kv-cache.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <unordered_map>
#include <vector>

using acc = flowmm_kv_access;

namespace {

struct stream_bias {
    std::vector<llama_pos>    pos;   // [kv_size] position the bias was set for, -1 = none
    std::vector<llama_seq_id> seq;   // [kv_size]
    std::vector<float>        value; // [n_layer][n_head_kv][kv_size]
};

struct bias_state {
    int32_t n_layer   = 0;
    int32_t n_head_kv = 0;
    int32_t kv_size   = 0;
    std::vector<stream_bias> streams;
    std::vector<uint8_t> layer_active;   // [n_layer] some cell has a non-zero bias
    std::vector<uint8_t> layer_per_head; // [n_layer] the heads of the layer differ
    uint64_t generation = 0;             // bumped when the graph structure changes

    float get(uint32_t strm, int32_t l, int32_t h, uint32_t cell) const {
        return streams[strm].value[((size_t) l * n_head_kv + h) * kv_size + cell];
    }

    void refresh_layer_flags() {
        std::vector<uint8_t> active(n_layer, 0), per_head(n_layer, 0);
        for (const auto & sb : streams) {
            for (int32_t l = 0; l < n_layer; ++l) {
                for (int32_t c = 0; c < kv_size; ++c) {
                    if (sb.pos[c] < 0) {
                        continue;
                    }
                    const float v0 = sb.value[((size_t) l * n_head_kv) * kv_size + c];
                    for (int32_t h = 0; h < n_head_kv; ++h) {
                        const float v = sb.value[((size_t) l * n_head_kv + h) * kv_size + c];
                        active[l]   |= v != 0.0f;
                        per_head[l] |= v != v0;
                    }
                }
            }
        }
        if (active != layer_active || per_head != layer_per_head) {
            layer_active   = std::move(active);
            layer_per_head = std::move(per_head);
            ++generation;
        }
    }
};

bias_state * state_of(llama_kv_cache & kv, bool create) {
    flowmm_ext * ext = flowmm_ext_of(kv, create);
    if (ext == nullptr) {
        return nullptr;
    }
    if (!ext->bias && create) {
        auto st = std::make_shared<bias_state>();
        const auto & hp = acc::hparams(kv);
        st->n_layer   = (int32_t) acc::n_layer(kv);
        st->n_head_kv = (int32_t) hp.n_head_kv(acc::layer_il(kv, 0));
        st->kv_size   = (int32_t) acc::cells(kv, 0).size();
        st->streams.resize(acc::n_stream(kv));
        for (auto & sb : st->streams) {
            sb.pos.assign(st->kv_size, -1);
            sb.seq.assign(st->kv_size, -1);
            sb.value.assign((size_t) st->n_layer * st->n_head_kv * st->kv_size, 0.0f);
        }
        st->layer_active.assign(st->n_layer, 0);
        st->layer_per_head.assign(st->n_layer, 0);
        ext->bias = st;
    }
    return static_cast<bias_state *>(ext->bias.get());
}

void forget(bias_state & st, uint32_t strm, llama_seq_id seq_id) {
    auto & sb = st.streams[strm];
    for (int32_t c = 0; c < st.kv_size; ++c) {
        if (sb.pos[c] >= 0 && sb.seq[c] == seq_id) {
            sb.pos[c] = -1;
            sb.seq[c] = -1;
            for (int32_t lh = 0; lh < st.n_layer * st.n_head_kv; ++lh) {
                sb.value[(size_t) lh * st.kv_size + c] = 0.0f;
            }
        }
    }
}

// The cells a ubatch writes hold new tokens: a bias set for an earlier token of the same sequence
// at the same position (one dropped with llama_memory_seq_rm and decoded again) is not theirs.
void drop_rewritten(bias_state & st, llama_kv_cache & kv, const llama_ubatch & ub) {
    std::vector<std::unordered_map<int64_t, int32_t>> at(st.streams.size()); // (seq, pos) -> cell
    for (size_t strm = 0; strm < st.streams.size(); ++strm) {
        const auto & sb = st.streams[strm];
        for (int32_t c = 0; c < st.kv_size; ++c) {
            if (sb.pos[c] >= 0) {
                at[strm][((int64_t) sb.seq[c] << 32) | (uint32_t) sb.pos[c]] = c;
            }
        }
    }
    bool dropped = false;
    for (uint32_t t = 0; t < ub.n_tokens; ++t) {
        for (int32_t k = 0; k < ub.n_seq_id[t]; ++k) {
            const llama_seq_id seq = ub.seq_id[t][k];
            const uint32_t strm = acc::n_stream(kv) == 1 ? 0 : acc::stream_of(kv, seq);
            const auto it = at[strm].find(((int64_t) seq << 32) | (uint32_t) ub.pos[t]);
            if (it == at[strm].end()) {
                continue;
            }
            auto & sb = st.streams[strm];
            sb.pos[it->second] = -1;
            sb.seq[it->second] = -1;
            for (int32_t lh = 0; lh < st.n_layer * st.n_head_kv; ++lh) {
                sb.value[(size_t) lh * st.kv_size + it->second] = 0.0f;
            }
            dropped = true;
        }
    }
    if (dropped) {
        st.refresh_layer_flags(); // graphs built from now on see the new flags
    }
}

// graph input: fills the bias tensor [n_kv, 1, n_head or 1, n_stream] before each compute
class bias_input : public llm_graph_input_i {
public:
    bias_input(std::shared_ptr<void> keep, const llama_kv_cache_context * mctx, int32_t layer, int32_t n_head, bool kv_unified)
        : keep(std::move(keep)), mctx(mctx), layer(layer), n_head(n_head), kv_unified(kv_unified) {
        generation = st().generation;
        // the first biased layer's input runs first: it drops what the ubatch rewrites, for every layer
        const auto & active = st().layer_active;
        first = std::find(active.begin(), active.end(), 1) - active.begin() == layer;
    }

    void set_input(const llama_ubatch * ubatch) override {
        llama_kv_cache & kv = *acc::kv_of(*mctx);
        if (first) {
            drop_rewritten(*static_cast<bias_state *>(keep.get()), kv, *ubatch);
        }
        const bias_state & s = st();
        const int64_t n_kv = tensor->ne[0];
        const int64_t nh   = tensor->ne[2];
        const int64_t ns   = tensor->ne[3];
        const int32_t gqa  = n_head / s.n_head_kv;
        std::vector<float> data(n_kv * nh * ns, 0.0f);
        for (int64_t si = 0; si < ns; ++si) {
            const uint32_t strm = acc::n_stream(kv) == 1 ? 0 : acc::stream_of(kv, ubatch->seq_id_unq[si]);
            const auto & cells = acc::cells(kv, strm);
            const auto & sb = s.streams[strm];
            for (int64_t c = 0; c < n_kv; ++c) {
                // the bias belongs to the token it was set for: skip cells freed or reused since
                if (sb.pos[c] < 0 || cells.is_empty(c) || cells.pos_get(c) != sb.pos[c] || !cells.seq_has(c, sb.seq[c])) {
                    continue;
                }
                for (int64_t h = 0; h < nh; ++h) {
                    const int32_t kvh = nh == 1 ? 0 : (int32_t) (h / gqa);
                    data[(si * nh + h) * n_kv + c] = s.get(strm, layer, kvh, (uint32_t) c);
                }
            }
        }
        ggml_backend_tensor_set(tensor, data.data(), 0, data.size() * sizeof(float));
    }

    bool can_reuse(const llm_graph_params & params) override {
        mctx = flowmm_kv_context_of(params.mctx);
        const int64_t n_stream = kv_unified ? 1 : params.ubatch.n_seqs_unq;
        return st().generation == generation && tensor->ne[0] == mctx->get_n_kv() && tensor->ne[3] == n_stream;
    }

    ggml_tensor * tensor = nullptr;

private:
    const bias_state & st() const { return *static_cast<const bias_state *>(keep.get()); }

    std::shared_ptr<void> keep; // the state outlives every graph that reads it
    const llama_kv_cache_context * mctx;
    const int32_t layer;
    const int32_t n_head;
    const bool kv_unified;
    uint64_t generation;
    bool first;
};

// The cells of seq_id a bias buffer of n_cells values per (layer, KV head) maps onto, in
// flowmm_kv_seq_cells order, and the cache's shape.
struct bias_target {
    llama_kv_cache * kv = nullptr;
    uint32_t strm = 0;
    std::vector<int32_t> own;
    int32_t n_layer = 0;
    int32_t n_head_kv = 0;
};

// FLOWMM_OK, or the failure (recorded) when the sequence cannot be resolved or `buf` (named
// `name` in messages) does not cover exactly the sequence's cells.
int32_t resolve_bias_target(llama_context * ctx, llama_seq_id seq_id, const float * buf, int32_t n_cells,
                            const std::string & name, bias_target & t) {
    t.kv = flowmm_resolve_kv_seq(ctx, seq_id);
    if (t.kv == nullptr) {
        return flowmm_last_status();
    }
    t.strm = acc::stream_of(*t.kv, seq_id);
    t.own = flowmm_seq_cells(*t.kv, t.strm, seq_id);
    if (n_cells != (int32_t) t.own.size()) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, name + " covers " + std::to_string(n_cells) + " cells, sequence " +
            std::to_string(seq_id) + " has " + std::to_string(t.own.size()));
    }
    if (n_cells > 0 && buf == nullptr) {
        return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, name + " is NULL");
    }
    t.n_layer = (int32_t) acc::n_layer(*t.kv);
    t.n_head_kv = (int32_t) acc::hparams(*t.kv).n_head_kv(acc::layer_il(*t.kv, 0));
    return FLOWMM_OK;
}

} // namespace

void flowmm_bias_forget_seq(llama_kv_cache & kv, llama_seq_id seq_id) {
    if (bias_state * st = state_of(kv, false)) {
        forget(*st, acc::stream_of(kv, seq_id), seq_id);
        st->refresh_layer_flags();
    }
}

ggml_tensor * flowmm_hook_kq_mask(ggml_context * ctx, llm_graph_result * res, const llama_kv_cache_context * mctx,
                                  ggml_tensor * kq_mask, int il, int n_head) {
    if (mctx == nullptr || kq_mask == nullptr) {
        return kq_mask;
    }
    llama_kv_cache * kv = acc::kv_of(*mctx);
    bias_state * st = kv ? state_of(*kv, false) : nullptr;
    if (st == nullptr) {
        return kq_mask;
    }
    const int32_t layer = acc::cache_layer(*kv, il);
    if (!st->layer_active[layer]) {
        return kq_mask;
    }
    const int64_t n_kv = kq_mask->ne[0];
    const int64_t n_tps = kq_mask->ne[1];
    const int64_t ns = kq_mask->ne[3];
    const int64_t nh = st->layer_per_head[layer] ? n_head : 1;

    // one stream (unified cache) => the mask has one stream block; else one per sequence in the ubatch
    auto inp = std::make_unique<bias_input>(flowmm_ext_of(*kv, false)->bias, mctx, layer, n_head, acc::n_stream(*kv) == 1);
    inp->tensor = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, n_kv, 1, nh, ns);
    ggml_set_input(inp->tensor);
    ggml_set_name(inp->tensor, "flowmm_slot_bias");

    ggml_tensor * m = kq_mask->type == GGML_TYPE_F32 ? kq_mask : ggml_cast(ctx, kq_mask, GGML_TYPE_F32);
    if (nh > 1) {
        m = ggml_repeat_4d(ctx, m, n_kv, n_tps, nh, ns);
    }
    m = ggml_add(ctx, m, inp->tensor);
    if (kq_mask->type != GGML_TYPE_F32) {
        m = ggml_cast(ctx, m, kq_mask->type);
    }
    res->add_input(std::move(inp));
    return m;
}

int32_t flowmm_kv_set_slot_bias(llama_context * ctx, llama_seq_id seq_id, const float * bias, int32_t n_cells, int32_t per_head) {
    bias_target t;
    if (int32_t rc = resolve_bias_target(ctx, seq_id, bias, n_cells, "bias", t); rc != FLOWMM_OK) {
        return rc;
    }
    llama_kv_cache * kv = t.kv;
    const uint32_t strm = t.strm;
    const auto & cells = acc::cells(*kv, strm);
    const std::vector<int32_t> & own = t.own;
    const int32_t n_layer = t.n_layer;
    const int32_t n_head_kv = t.n_head_kv;
    const int32_t nh = per_head ? n_head_kv : 1;
    const size_t n = (size_t) n_layer * nh * n_cells;
    for (size_t i = 0; i < n; ++i) {
        if (std::isnan(bias[i]) || bias[i] == INFINITY) {
            return flowmm_fail(FLOWMM_ERR_INVALID_ARGUMENT, "bias entry " + std::to_string(i) + " is NaN or +inf");
        }
    }

    bias_state * st = state_of(*kv, true);
    forget(*st, strm, seq_id);
    auto & sb = st->streams[strm];
    for (int32_t i = 0; i < n_cells; ++i) {
        const int32_t c = own[i];
        sb.pos[c] = cells.pos_get(c);
        sb.seq[c] = seq_id;
        for (int32_t l = 0; l < n_layer; ++l) {
            for (int32_t h = 0; h < n_head_kv; ++h) {
                sb.value[((size_t) l * n_head_kv + h) * st->kv_size + c] = bias[((size_t) l * nh + (per_head ? h : 0)) * n_cells + i];
            }
        }
    }
    const uint64_t gen = st->generation;
    st->refresh_layer_flags();
    if (st->generation != gen) {
        flowmm_drop_cached_graphs(ctx); // graphs built without (or with other) bias nodes
    }
    return FLOWMM_OK;
}

int32_t flowmm_kv_clear_slot_bias(llama_context * ctx, llama_seq_id seq_id) {
    llama_kv_cache * kv = flowmm_resolve_kv_seq(ctx, seq_id);
    if (kv == nullptr) {
        return flowmm_last_status();
    }
    if (bias_state * st = state_of(*kv, false)) {
        const uint64_t gen = st->generation;
        forget(*st, acc::stream_of(*kv, seq_id), seq_id);
        st->refresh_layer_flags();
        if (st->generation != gen) {
            flowmm_drop_cached_graphs(ctx);
        }
    }
    return FLOWMM_OK;
}

int32_t flowmm_kv_get_slot_bias(llama_context * ctx, llama_seq_id seq_id, float * out, int32_t n_cells) {
    bias_target t;
    if (int32_t rc = resolve_bias_target(ctx, seq_id, out, n_cells, "bias buffer", t); rc != FLOWMM_OK) {
        return rc;
    }
    std::fill(out, out + (size_t) t.n_layer * t.n_head_kv * n_cells, 0.0f);
    const bias_state * st = state_of(*t.kv, false);
    if (st == nullptr) {
        return FLOWMM_OK;
    }
    const auto & cells = acc::cells(*t.kv, t.strm);
    const auto & sb = st->streams[t.strm];
    for (int32_t i = 0; i < n_cells; ++i) {
        const int32_t c = t.own[i];
        if (sb.pos[c] < 0 || sb.seq[c] != seq_id || cells.pos_get(c) != sb.pos[c]) {
            continue; // none set, or set for a token this cell no longer holds (as the graph reads it)
        }
        for (int32_t l = 0; l < t.n_layer; ++l) {
            for (int32_t h = 0; h < t.n_head_kv; ++h) {
                out[((size_t) l * t.n_head_kv + h) * n_cells + i] = st->get(t.strm, l, h, (uint32_t) c);
            }
        }
    }
    return FLOWMM_OK;
}
