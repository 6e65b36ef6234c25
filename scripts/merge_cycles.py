#!/usr/bin/env python3
"""Repeated merge/decode cycles on the tiny model, for leak and memory-error checks.

    .venv/bin/python scripts/merge_cycles.py [--cycles 200]

Each cycle decodes 4 tokens, reads K/V rows, sets a slot bias and reads it back, hands the C
API two invalid plans (which must be refused) and merges the cache back down to 24 cells
(sinks, weighted middle, recent window) once it holds more, every other merge with V weighted
apart from K. Run it under valgrind with
scripts/leak_check.sh.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flowmm_edge.models import tiny as make_tiny_models  # noqa: E402

from flowmm_edge.bindings import kv_cache
from flowmm_edge.bindings import runtime  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--kv-type", default="f16")
    ap.add_argument("--no-flash-attn", action="store_true")
    a = ap.parse_args()
    runtime.quiet_native_logs()
    rng = np.random.default_rng(0)
    text, _ = make_tiny_models.ensure_tiny_models()
    merges = refused = 0
    with runtime.Model(text) as model, runtime.Context(model, n_ctx=128, n_batch=32, kv_type=a.kv_type,
                                                       flash_attn=not a.no_flash_attn, n_threads=2) as ctx:
        lay = kv_cache.layout(ctx)
        tokens = model.tokenize("the secret key is red and the code is 1234")
        logits = ctx.decode(tokens, 0)
        pos = len(tokens)
        for _ in range(a.cycles):
            for _ in range(4):
                logits = ctx.decode([int(logits.argmax())], pos)
                pos += 1
            cells, positions = kv_cache.seq_cells(ctx)
            kv_cache.read_rows(ctx, int(rng.integers(lay.n_layer)), 0, cells[:8], "k")
            kv_cache.set_slot_bias(ctx, rng.uniform(0, 1, (lay.n_layer, len(cells))).astype(np.float32))
            kv_cache.get_slot_bias(ctx)
            bad = kv_cache.MergePlan.keep(np.full((lay.n_layer, lay.n_head_kv, 2), 10_000, np.int32), positions[-2:])
            for plan in (bad, kv_cache.MergePlan.keep(np.zeros((1, 1, 1), np.int32), positions[-1:])):
                try:
                    kv_cache.apply_plan(ctx, plan)
                except kv_cache.NativeError:
                    refused += 1
            if len(cells) > 24:
                n, B, S = len(cells), 24, 3
                anchor = np.r_[0, 1, np.sort(rng.choice(np.arange(2, n - 8), B - 10, replace=False)), np.arange(n - 8, n)]
                src = rng.integers(0, n, size=(lay.n_layer, lay.n_head_kv, B, S))
                src[..., 0] = anchor
                weight = np.full(src.shape, 1.0 / S, np.float32)
                v_weight = rng.uniform(0, 1, src.shape).astype(np.float32) if merges % 2 else None
                kv_cache.apply_plan(ctx, kv_cache.MergePlan(src=cells[src].astype(np.int32), weight=weight,
                                                            slot_pos=positions[anchor].astype(np.int32), v_weight=v_weight))
                merges += 1
    print(f"{a.cycles} cycles, {merges} merges, {refused} plans refused, last position {pos}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
