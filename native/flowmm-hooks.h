// flowmm-edge: the functions llama.cpp's sources call through the hooks in patches/
#pragma once

struct ggml_context;
struct ggml_tensor;
class llm_graph_result;
class llama_kv_cache_context;

// Attention mask of model layer `il`, with the slot bias of its cache added when one is set
// (flowmm_kv_set_slot_bias); otherwise `kq_mask` itself, adding no graph nodes.
ggml_tensor * flowmm_hook_kq_mask(ggml_context * ctx, llm_graph_result * res, const llama_kv_cache_context * mctx,
                                  ggml_tensor * kq_mask, int il, int n_head);
