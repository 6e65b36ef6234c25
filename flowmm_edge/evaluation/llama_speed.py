"""Prefill and decode speed of one libllama, in a process of its own, through llama-cpp-python's
low-level API alone.

    python llama_speed.py --lib DIR --model GGUF --tokens FILE.json [--n-decode 32] [--fa on|off]
                          [--kv-type f16] [--threads N] [--room R]

`bench` runs this file by path (not as part of the package: importing flowmm_edge loads the
patched libllama and checks its FlowMM symbols) once against the stock, unpatched llama.cpp of
the pinned version and once against the patched build with FlowMM off, so both libraries are
timed by the same code, each in a fresh process. It prints one JSON line: prefill and decode
tokens per second, the flash attention setting, the library file that was loaded, the ggml
backend modules it loaded (the same CPU variant for both builds), and the tokens it decoded
greedily.

Standard library, numpy and llama_cpp only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import sys
import time


def measure(lib_dir: str, model_path: str, tokens: list[int], n_decode: int, flash_attn: str, kv_type: str,
             n_threads: int, room: int) -> dict:
    import numpy as np
    from llama_cpp import llama_cpp as ll

    log: list[str] = []

    @ll.llama_log_callback
    def _keep(level, text, user_data):  # llama.cpp's reports are not this tool's output; kept to read
        log.append(text.decode("utf-8", "replace"))

    ll.llama_log_set(_keep, ctypes.c_void_p())
    # both builds make each CPU variant a module (GGML_BACKEND_DL): load the best one for this CPU
    # from the library's own folder, as flowmm_edge.bindings.native does
    ll._lib.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    ll._lib.ggml_backend_load_all_from_path.restype = None
    ll._lib.ggml_backend_load_all_from_path(lib_dir.encode())
    modules = re.findall(r"loaded (\S+) backend from (.+?)\s*$", "".join(log), re.MULTILINE)
    ll.llama_backend_init()
    mp = ll.llama_model_default_params()
    model = ll.llama_model_load_from_file(model_path.encode(), mp)
    if not model:
        raise SystemExit(f"llama_speed: error: {model_path}: llama.cpp could not load this model")
    cp = ll.llama_context_default_params()
    cp.n_ctx = len(tokens) + room
    cp.n_batch = cp.n_ubatch = 512
    cp.n_threads = cp.n_threads_batch = n_threads
    cp.type_k = cp.type_v = {"f16": ll.GGML_TYPE_F16, "q8_0": ll.GGML_TYPE_Q8_0, "q4_0": ll.GGML_TYPE_Q4_0}[kv_type]
    cp.flash_attn_type = {"on": ll.LLAMA_FLASH_ATTN_TYPE_ENABLED, "off": ll.LLAMA_FLASH_ATTN_TYPE_DISABLED,
                          "auto": ll.LLAMA_FLASH_ATTN_TYPE_AUTO}[flash_attn]
    cp.no_perf = True
    ctx = ll.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit("llama_speed: error: llama.cpp could not create the context")
    n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
    batch = ll.llama_batch_init(512, 0, 1)

    def decode(chunk: list[int], pos0: int) -> None:
        batch.n_tokens = len(chunk)
        for i, tok in enumerate(chunk):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos0 + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(chunk) - 1
        if ll.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_speed: error: llama_decode failed")

    def argmax_last() -> int:
        return int(np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).argmax())

    try:
        t = time.perf_counter()
        for start in range(0, len(tokens), 512):
            decode(tokens[start:start + 512], start)
        prefill_s = time.perf_counter() - t
        pos, generated = len(tokens), []
        t = time.perf_counter()
        for _ in range(n_decode):  # greedy, as bench's own decode rows
            generated.append(argmax_last())
            decode([generated[-1]], pos)
            pos += 1
        decode_s = time.perf_counter() - t
    finally:
        ll.llama_batch_free(batch)
        ll.llama_free(ctx)
        ll.llama_model_free(model)
    return {"prefill_tok_s": len(tokens) / prefill_s, "decode_tok_s": n_decode / decode_s,
            "flash_attn": flash_attn, "kv_type": kv_type, "lib": getattr(ll._lib, "_name", "?"),
            "backends": {name: os.path.basename(path) for name, path in modules}, "tokens": generated}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", required=True, help="folder holding the libllama to time")
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", required=True, help="JSON file: the prompt's token ids")
    ap.add_argument("--n-decode", type=int, default=32)
    ap.add_argument("--fa", choices=("on", "off", "auto"), default="auto")
    ap.add_argument("--kv-type", choices=("f16", "q8_0", "q4_0"), default="f16")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--room", type=int, default=64, help="cells past the prompt")
    a = ap.parse_args(argv)
    # before llama_cpp is imported: it loads libllama from this folder
    os.environ["LLAMA_CPP_LIB_PATH"] = a.lib
    with open(a.tokens) as f:
        tokens = [int(t) for t in json.load(f)]
    print(json.dumps(measure(a.lib, a.model, tokens, a.n_decode, a.fa, a.kv_type, a.threads, max(a.room, a.n_decode + 8))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
