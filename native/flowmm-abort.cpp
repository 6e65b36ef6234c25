// flowmm-edge: a decode its caller can stop between two graph nodes.
//
// llama_set_abort_callback(ctx, flowmm_abort_when_set, flag) makes the CPU backend ask, before
// each node of every graph it computes, whether the int32 at `flag` is set. Another thread sets
// it (a user's next turn arriving while the repeat pass runs in the background); llama_decode then
// returns 2 and removes the positions of the ubatch it stopped in (llama_context::decode). The
// flag is a plain int32 written by the caller, so no Python runs on the compute thread.

#include "flowmm.h"

bool flowmm_abort_when_set(void * flag) {
    return flag != nullptr && *static_cast<const volatile int32_t *>(flag) != 0;
}
