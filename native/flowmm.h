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
#define FLOWMM_VERSION_MINOR 1
#define FLOWMM_VERSION_PATCH 0

#ifdef __cplusplus
extern "C" {
#endif

    // "MAJOR.MINOR.PATCH"; static storage, never NULL
    FLOWMM_API const char * flowmm_version(void);

    // MAJOR * 10000 + MINOR * 100 + PATCH
    FLOWMM_API int32_t flowmm_version_number(void);

#ifdef __cplusplus
}
#endif
