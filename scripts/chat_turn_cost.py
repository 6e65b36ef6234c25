"""What a chat turn costs with each method: a RULER-style document as the first turn, then short
questions, through the real `Session` (the cache merged after every turn, as `chat` does).

Per method and turn: the turn's positions, the seconds decoding it (prefill) and the seconds of
its merge (statistics re-decode, reconstruction pass, plan, apply), side by side in one run, with
the full cache (no merge) as the reference a user would otherwise run.

    cd scripts && python chat_turn_cost.py --length 2048 --methods full,snapkv,flowmm --budget 1024
"""

from __future__ import annotations

import argparse

from bench_common import open_model
from flowmm_edge.evaluation import ruler_tasks
from flowmm_edge.app.session import Session

QUESTIONS = ["What is this document about?", "Which numbers does it mention?", "Say that again, briefly."]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--length", type=int, default=2048, help="document tokens (about)")
    ap.add_argument("--methods", default="full,snapkv,flowmm")
    ap.add_argument("--budget", default="1024", help="cells (or a ratio of --ctx), as chat's --budget")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    path, model = open_model(args)
    task = ruler_tasks.generate(["single-number"], [args.length], 1, 0,
                                count_tokens=lambda t: len(model.tokenize(t, add_special=False)))[0]
    model.close()
    print("| method | turn | positions | prefill s | merge s | cells after |\n|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        with Session(path, method=method, budget=args.budget, n_ctx=args.ctx, n_threads=args.threads,
                     max_reply=8) as s:
            turns = [dict(segments=task.segments)] + [dict(text=q) for q in QUESTIONS]
            for k, turn in enumerate(turns):
                before = (s.stats.prefill_seconds, s.stats.merge_seconds)
                n = s.add_user_turn(**turn)
                prefill = s.stats.prefill_seconds - before[0] - (s.stats.merge_seconds - before[1])
                print(f"| {method} | {k} | {n} | {prefill:.2f} | {s.stats.merge_seconds - before[1]:.2f} | {s.cells()} |",
                      flush=True)
                for _ in s.reply():
                    pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
