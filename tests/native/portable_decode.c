// One small decode through the built libraries, for tests/test_cpu_portability.py: run natively and
// under qemu-user emulating an older CPU, it must load a CPU variant that CPU can run and give the
// same logits. Prints "variant <path>" (from ggml's log) and the last prompt token's logits.
//
//   portable_decode LIB_DIR MODEL.gguf
#include "llama.h"
#include "ggml-backend.h"

#include <stdio.h>
#include <string.h>

static void on_log(enum ggml_log_level level, const char * text, void * user_data) {
    (void) user_data;
    const char * at = strstr(text, "loaded CPU backend from ");
    if (at) {
        printf("variant %s", at + strlen("loaded CPU backend from "));
    } else if (level >= GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

int main(int argc, char ** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s LIB_DIR MODEL.gguf\n", argv[0]);
        return 2;
    }
    llama_log_set(on_log, NULL);
    ggml_backend_load_all_from_path(argv[1]);
    llama_backend_init();

    struct llama_model * model = llama_model_load_from_file(argv[2], llama_model_default_params());
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[2]);
        return 1;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 64;
    cp.n_batch = 64;
    cp.n_threads = cp.n_threads_batch = 1;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot create a context\n");
        return 1;
    }
    llama_token tokens[16];
    for (int i = 0; i < 16; i++) {
        tokens[i] = (llama_token) (1 + 7 * i);
    }
    if (llama_decode(ctx, llama_batch_get_one(tokens, 16)) != 0) {
        fprintf(stderr, "llama_decode failed\n");
        return 1;
    }
    const float * logits = llama_get_logits_ith(ctx, -1);
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    printf("logits");
    for (int i = 0; i < n_vocab; i++) {
        printf(" %.6g", logits[i]);
    }
    printf("\n");
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
