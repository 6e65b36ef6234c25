#!/usr/bin/env python3
"""What the near-copies input costs against the prefill it follows, per size of its reference.

    cd scripts && python near_copies_cost.py [--ctx 4096] [--references 512,1024,2048] [--threads 2]

One context prefills the same prompt (timed), then computes the input
(kv_cache.near_copies, flowmm_kv_near_copies) for every cache layer once per reference size,
timed: the share of the prefill each size adds to a merge's importance. The whole merge's cost is
`bench`'s; this isolates the one input whose cost grows with the cache times the reference.
"""

from __future__ import annotations

import argparse
import time

from bench_common import add_common_args, open_model, prompt_tokens

from flowmm_edge.bindings import kv_cache, runtime
from flowmm_edge.compression.compressor import rope_geometry
from flowmm_edge.methods.importance_predictor import NEAR_COPIES_BETA


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--references", default="512,1024,2048")
    args = ap.parse_args()
    _, model = open_model(args)
    rope = rope_geometry(model)
    print("| context | reference keys | near-copies s (all layers) | prefill s | share of the prefill |")
    print("|---|---|---|---|---|")
    for n in (args.ctx,):
        tokens = prompt_tokens(model, n)
        with runtime.Context(model, n_ctx=n + 64, n_batch=512, n_threads=args.threads) as ctx:
            t = time.perf_counter()
            ctx.decode(tokens, 0)
            prefill = time.perf_counter() - t
            for ref in (int(x) for x in args.references.split(",")):
                t = time.perf_counter()
                for layer in range(kv_cache.layout(ctx).n_layer):
                    kv_cache.near_copies(ctx, layer, rope, NEAR_COPIES_BETA, ref)
                s = time.perf_counter() - t
                print(f"| {n} | {ref} | {s:.2f} | {prefill:.1f} | {100 * s / prefill:.1f}% |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
