#!/usr/bin/env python3
"""What an observed turn end costs `serve`'s other slots: a prompt's last 32 rows, whose attention
statistics a window method (SnapKV, FlowMM without a policy) gathers, decoded in the step that
carries three replying slots' rows (one llama_decode, as the worker now does), against the same
rows decoded alone after that step (two llama_decodes, as before statistics were per sequence).
Side by side, alternating, on one context whose four sequences each hold `--length` tokens.

    cd scripts && python observed_window_cost.py [--model M.gguf] [--length 1024] [--window 32] [--rounds 12]
"""

from __future__ import annotations

import argparse
import statistics
import time

from flowmm_edge.bindings import runtime
from flowmm_edge.bindings.attention_stats import AttentionStats
from flowmm_edge.models import default_model

TEXT = "The quick brown fox jumps over the lazy dog while the committee reviews the budget. "


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF (default: the embedded model)")
    ap.add_argument("--length", type=int, default=1024, help="tokens each sequence holds before the step")
    ap.add_argument("--window", type=int, default=32, help="observed rows (SnapKV's window)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with runtime.Model(args.model or str(default_model.ensure())) as model:
        tokens = (model.tokenize(TEXT * (args.length // 10 + 2), add_special=False))[:args.length + args.window]
        n = args.length
        with runtime.Context(model, n_ctx=4 * (n + args.window + 8), n_batch=512, n_threads=args.threads,
                             n_seq_max=4, kv_unified=True) as ctx:
            for s in range(4):
                ctx.decode(tokens[:n], 0, s)
            window = tokens[n:n + args.window]
            rows = [(tokens[n], n, s) for s in range(3)]
            times = {"shared": [], "alone": []}
            for r in range(2 * args.rounds):
                mode = ("shared", "alone")[r % 2]
                t0 = time.perf_counter()
                with AttentionStats(ctx, prompt_end=n + len(window), window=len(window), seq_id=3):
                    if mode == "shared":
                        ctx.decode_rows(rows, [(window, n, 3)])
                    else:
                        ctx.decode_rows(rows)
                        ctx.decode(window, n, 3)
                times[mode].append(time.perf_counter() - t0)
                for s in range(4):
                    ctx.truncate(n, s)
    shared, alone = statistics.median(times["shared"]), statistics.median(times["alone"])
    print(f"3 replying rows + an observed window of {args.window} rows, {n} tokens a sequence, "
          f"median of {args.rounds} each:")
    print(f"| step | ms |\n|---|---|\n| window in the replies' step (now) | {shared * 1e3:.1f} |\n"
          f"| replies' step, then the window alone (before) | {alone * 1e3:.1f} |\n"
          f"| ratio, before / now | {alone / shared:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
