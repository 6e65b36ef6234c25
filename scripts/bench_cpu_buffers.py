#!/usr/bin/env python3
"""Decode speed with and without ggml's CPU repack buffers, side by side in one run.

    python scripts/bench_cpu_buffers.py [--model M.gguf] [--ctx 512] [--decode 64] [--rounds 3]

The repack buffers ("CPU_REPACK": weights re-laid for the loaded CPU variant's SIMD kernels) are
what llama.cpp uses by default; the AMX one is left out of the build (scripts/build_native.py), so
the fix must not cost them. Each round prefills the same prompt and greedily decodes --decode
tokens with repack on and off, alternating, so both see the same machine state; the best round of
each is reported, with the ratio.
"""

from __future__ import annotations

import argparse
import time

from bench_common import add_common_args, open_model, prompt_tokens
from flowmm_edge.bindings import native, runtime


def decode_rate(model: runtime.Model, prompt: list[int], n_decode: int, n_threads) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one prefill + greedy decode in a fresh context."""
    with runtime.Context(model, n_ctx=len(prompt) + n_decode + 8, n_threads=n_threads) as ctx:
        t0 = time.perf_counter()
        logits = ctx.decode(prompt, 0)
        t1 = time.perf_counter()
        pos = len(prompt)
        for _ in range(n_decode):  # fixed length: no early stop at an end-of-generation token
            logits = ctx.decode([int(logits.argmax())], pos)
            pos += 1
        t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_decode / (t2 - t1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--decode", type=int, default=64, help="tokens decoded per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.set_defaults(ctx=512)
    args = ap.parse_args()
    path, probe = open_model(args)
    prompt = prompt_tokens(probe, args.ctx)
    probe.close()
    models = {"repack on": runtime.Model(path), "repack off": runtime.Model(path, repack=False)}
    best = {name: (0.0, 0.0) for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            pre, dec = decode_rate(model, prompt, args.decode, args.threads)
            best[name] = (max(best[name][0], pre), max(best[name][1], dec))
    print(f"model {path.name}; CPU variant {native.cpu_variant()}; {len(prompt)}-token prompt, {args.decode} decoded, "
          f"best of {args.rounds}")
    print("| weights | buffers | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|")
    for name, model in models.items():
        bufs = ", ".join(f"{b} {mib:.0f} MiB" for b, mib in model.buffers.items())
        print(f"| {name} | {bufs} | {best[name][0]:.1f} | {best[name][1]:.1f} |")
    on, off = best["repack on"], best["repack off"]
    print(f"repack on / off: prefill {on[0] / off[0]:.2f}x, decode {on[1] / off[1]:.2f}x")
    for model in models.values():
        model.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
