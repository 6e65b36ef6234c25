// flowmm-edge: the functions llama.cpp's sources call through the hooks in patches/
#pragma once

struct ggml_cgraph;
struct ggml_context;
struct ggml_tensor;
struct llama_context;
struct llama_ubatch;
class llm_graph_result;
class llama_kv_cache_context;

// Attention mask of model layer `il`, with the slot bias of its cache added when one is set
// (flowmm_kv_set_slot_bias); otherwise `kq_mask` itself, adding no graph nodes.
ggml_tensor * flowmm_hook_kq_mask(ggml_context * ctx, llm_graph_result * res, const llama_kv_cache_context * mctx,
                                  ggml_tensor * kq_mask, int il, int n_head);

// When statistics are requested (flowmm_stats_begin), add to the graph the softmax rows of the
// requested query rows of this ubatch, from q [head_dim, n_head, n_tokens] and the cache's k,
// under the mask the layer attends with; their column sums and per-label masses become graph
// outputs. Otherwise nothing is added.
void flowmm_hook_attn_stats(ggml_context * ctx, ggml_cgraph * gf, llm_graph_result * res,
                            const llama_kv_cache_context * mctx, const llama_ubatch & ubatch,
                            ggml_tensor * q, ggml_tensor * k, ggml_tensor * kq_mask, float kq_scale, int il);

// After a ubatch's graph ran: accumulate the statistics outputs it holds into host buffers.
void flowmm_hook_graph_computed(llama_context * lctx, llm_graph_result * res, const llama_ubatch & ubatch);
