#!/usr/bin/env python3
"""Prefill time with attention statistics off, on an observation window, and on every row.

    .venv/bin/python scripts/bench_stats.py [--model M.gguf] [--ctx 4096] [--window 32] [--repeat 1]

Three prefills of the same prompt in one run (fresh context each), flash attention on;
prints seconds and the ratios to the plain prefill.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench_common import add_common_args, open_model, prompt_tokens
from flowmm_edge.bindings import runtime
from flowmm_edge.bindings.attention_stats import AttentionStats


def prefill_s(model, tokens, n_threads, stats_kw) -> float:
    n = len(tokens)
    with runtime.Context(model, n_ctx=n + 64, n_batch=512, n_threads=n_threads) as ctx:
        labels = np.zeros(n + 64, np.int32)
        labels[n // 4: n // 2] = 1  # a span playing the image
        t0 = time.perf_counter()
        if stats_kw is None:
            ctx.decode(tokens, 0)
        else:
            with AttentionStats(ctx, prompt_end=n, labels=labels, n_labels=2, **stats_kw):
                ctx.decode(tokens, 0)
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1, help="take the best of this many runs per row")
    a = ap.parse_args()
    path, model = open_model(a)
    with model:
        tokens = prompt_tokens(model, a.ctx)
        rows = {"off": None, f"window {a.window}": {"window": a.window}, "all rows": {"window": None}}
        times = {name: min(prefill_s(model, tokens, a.threads, kw) for _ in range(a.repeat)) for name, kw in rows.items()}
    base = times["off"]
    print(f"model {path}, prompt {len(tokens)} tokens, flash attention on")
    for name, t in times.items():
        print(f"{name:>12}: {t:7.2f} s  x{t / base:.3f} of plain prefill ({len(tokens) / t:.0f} tok/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
