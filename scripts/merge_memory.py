#!/usr/bin/env python3
"""Peak memory of a merge against the prefill it follows, in one process per method.

    cd scripts && python merge_memory.py --ctx 16384 --budget 0.1 --methods flowmm,snapkv [--threads 2]

For each method, a fresh process prefills the same `--ctx`-token prompt into a context of that
size (the full cache: what a user who does not compress holds), reads the process's peak RSS
(ru_maxrss), merges down to `--budget` with the method (FlowMM with the policy the package ships
for the model, so with its importance predictor if it has one), and reads the peak again. The
target: the merge's peak at most the full cache's + 5%.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from bench_common import add_common_args, open_model, prompt_tokens


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(args) -> dict:
    from flowmm_edge.calibration import policy as policy_mod
    from flowmm_edge.compression.sequence_compressor import SequenceCompressor
    from flowmm_edge.bindings import runtime

    path, model = open_model(args)
    pol = policy_mod.shipped_for(path) if args.method.startswith("flowmm") else None
    seq = SequenceCompressor(args.method, args.budget, pol)
    tokens = prompt_tokens(model, args.ctx)
    labels = np.zeros(len(tokens) + 8, np.int32)
    with runtime.Context(model, n_ctx=args.ctx + 640, n_batch=512, n_threads=args.threads) as ctx:
        t = time.perf_counter()
        with seq.observing(ctx, prompt_end=len(tokens), labels=labels):
            ctx.decode(tokens, 0)
        prefill_s = time.perf_counter() - t
        full = peak_mib()
        t = time.perf_counter()
        report = seq.merge(ctx, np.asarray(tokens, np.int32), labels)
        merge_s = time.perf_counter() - t
    return {"method": args.method, "ctx": args.ctx, "budget": args.budget, "cells_after": report.cells_after,
            "prefill_s": prefill_s, "merge_s": merge_s, "peak_after_prefill_mib": full, "peak_after_merge_mib": peak_mib(),
            "importance": getattr(seq.method, "importance", None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--methods", default="flowmm,snapkv")
    ap.add_argument("--method", help=argparse.SUPPRESS)  # one method, in the child process
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.method:
        print(json.dumps(one(args)))
        return
    rows = []
    for m in args.methods.split(","):
        cmd = [sys.executable, __file__, "--ctx", str(args.ctx), "--budget", str(args.budget), "--method", m]
        cmd += ["--model", args.model] if args.model else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    print("| method | importance | context | budget | cells after | prefill s | merge s | peak RSS after prefill (full cache) MiB "
          "| peak RSS after merge MiB | merge peak vs full |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['importance'] or '—'} | {r['ctx']} | {r['budget']:.0%} | {r['cells_after']} | "
              f"{r['prefill_s']:.1f} | {r['merge_s']:.2f} | {r['peak_after_prefill_mib']:.0f} | "
              f"{r['peak_after_merge_mib']:.0f} | {r['peak_after_merge_mib'] / r['peak_after_prefill_mib'] - 1:+.1%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
