#!/usr/bin/env python3
"""Decode speed and attended width before and after a merge, measured side by side.

    .venv/bin/python scripts/bench_merge.py [--model M.gguf] [--ctx 4096] [--keep 0.2] [--decode 32]

Prefills the same prompt into two contexts, compacts one to `keep` of its cells with a
keep-plan (4 sinks, the recent quarter of the budget, the rest evenly spaced), then decodes
the same tokens greedily in both and prints ms/token, the ratio, the merge time and the
cells each one attends. Default model: the embedded Qwen2.5 Coder 0.5B.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench_common import add_common_args, open_model, prompt_tokens
from flowmm_edge.bindings import kv_cache, runtime


def keep_plan(n: int, budget: int, n_layer: int, n_head_kv: int) -> kv_cache.MergePlan:
    sinks = np.arange(min(4, budget))
    recent = np.arange(n - budget // 4, n)
    middle = np.linspace(len(sinks), n - budget // 4 - 1, budget - len(sinks) - len(recent)).round().astype(int)
    keep = np.unique(np.r_[sinks, middle, recent])
    return kv_cache.MergePlan.keep(np.broadcast_to(keep, (n_layer, n_head_kv, len(keep))), keep)


def decode_ms(ctx: runtime.Context, first_logits: np.ndarray, pos: int, n: int) -> float:
    tok = int(first_logits.argmax())
    t0 = time.perf_counter()
    for i in range(n):
        tok = int(ctx.decode([tok], pos + i).argmax())
    return (time.perf_counter() - t0) * 1000 / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--keep", type=float, default=0.2, help="fraction of cells kept")
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--kv-type", default="f16", choices=sorted(runtime.KV_TYPES))
    a = ap.parse_args()
    path, model = open_model(a)
    with model:
        tokens = prompt_tokens(model, a.ctx)
        n = len(tokens)
        contexts = [runtime.Context(model, n_ctx=n + a.decode + 64, n_batch=512, kv_type=a.kv_type,
                                    n_threads=a.threads) for _ in range(2)]
        try:
            t0 = time.perf_counter()
            logits = [c.decode(tokens, 0) for c in contexts]
            prefill_s = (time.perf_counter() - t0) / 2
            lay = kv_cache.layout(contexts[1])
            budget = max(8, int(n * a.keep))
            plan = keep_plan(n, budget, lay.n_layer, lay.n_head_kv)
            t0 = time.perf_counter()
            kv_cache.apply_plan(contexts[1], plan)
            merge_ms = (time.perf_counter() - t0) * 1000
            cells = [len(kv_cache.seq_cells(c)[0]) for c in contexts]
            full_ms = decode_ms(contexts[0], logits[0], n, a.decode)
            merged_ms = decode_ms(contexts[1], logits[1], n, a.decode)
            # the same merged cache with a slot bias in every layer, then per KV head
            biased_ms = {}
            pos = n + a.decode
            for kind in ("per layer", "per KV head"):
                m = len(kv_cache.seq_cells(contexts[1])[0])
                shape = (lay.n_layer, m) if kind == "per layer" else (lay.n_layer, lay.n_head_kv, m)
                kv_cache.set_slot_bias(contexts[1], np.log(np.random.default_rng(0).integers(1, 4, size=shape)).astype(np.float32))
                biased_ms[kind] = decode_ms(contexts[1], contexts[1].logits(), pos, a.decode)
                pos += a.decode
        finally:
            for c in contexts:
                c.close()
    print(f"model {path}, prompt {n} tokens, prefill {n / prefill_s:.0f} tok/s, KV {a.kv_type}")
    print(f"{'':10} {'cells':>7} {'ms/token':>9}   (cells held when decoding starts)")
    print(f"{'full':10} {cells[0]:>7} {full_ms:>9.2f}")
    print(f"{'merged':10} {cells[1]:>7} {merged_ms:>9.2f}")
    for kind, ms in biased_ms.items():
        print(f"{'  + bias ' + kind:22} {ms:>9.2f}  (x{ms / merged_ms:.2f} of merged)")
    print(f"decode speed-up x{full_ms / merged_ms:.2f}, cells kept {cells[1] / cells[0]:.1%}")
    print(f"merge took {merge_ms:.1f} ms = {merge_ms / 1000 / prefill_s:.2%} of the prefill ({prefill_s:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
