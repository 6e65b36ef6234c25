// flowmm-edge: internal helpers shared by the native/ sources (not part of the C API)
#pragma once

#include "llama.h"

#include <cstdint>
#include <string>

class llama_kv_cache;

// record `msg` as this thread's last error and return `code`
int32_t flowmm_fail(int32_t code, std::string msg);

// the code of the last flowmm_fail() on this thread
int32_t flowmm_last_status();

// the context's single plain-RoPE KV cache, or NULL with the error recorded
llama_kv_cache * flowmm_resolve_kv(llama_context * ctx);

// FLOWMM_OK if seq_id is a valid sequence of the cache, else the error recorded
int32_t flowmm_check_seq(const llama_kv_cache & kv, llama_seq_id seq_id);
