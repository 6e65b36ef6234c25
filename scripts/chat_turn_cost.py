"""What a chat turn costs with each method and schedule: a RULER-style document as the first turn,
then short questions, through the real `Session`, as `chat` runs them.

Per method, schedule and turn, side by side in one run with the full cache (no merge) as the
reference a user would otherwise run: the turn's positions, the time to the first reply token
(from sending the turn, so it includes any merge the turn waited for), its ratio to the full
cache's for the same turn, the merge seconds waited for and those spent after the reply (in the
background, while the user reads), the cells after, and whether the greedy reply equals the
full cache's.

`--recall N` turns on chat's recall (compression/recall.py; the Session API's default is off)
and adds the document's own question as a last turn, which names the sentence it needs: its
first token then includes decoding the quoted sentences.

The reader: `--read wait` (default) sends the next turn once the background merge is done (a
reader slower than the merge); `--read S` sends it S seconds after the reply, stopping a merge
still running at its next chunk boundary.

    cd scripts && python chat_turn_cost.py --length 4096 --ctx 6144 --budget 1024 \\
        --methods full,snapkv,flowmm --schedules reply_first,blocking
"""

from __future__ import annotations

import argparse
import time

from bench_common import open_model
from flowmm_edge.evaluation import ruler_tasks
from flowmm_edge.app.session import Session

QUESTIONS = ["What is this document about?", "Which numbers does it mention?", "Say that again, briefly."]


def run_turns(path, turns, method: str, schedule: str, args) -> list[dict]:
    out = []
    with Session(path, method=method, budget=args.budget, n_ctx=args.ctx, n_threads=args.threads, max_reply=8,
                 schedule=schedule, recall_tokens=args.recall) as s:
        for k, turn in enumerate(turns):
            fg0 = s.stats.merge_seconds
            t0 = time.perf_counter()
            n = s.add_user_turn(**turn)
            gen = s.reply()
            first = next(gen, "")
            ttft = time.perf_counter() - t0
            reply = first + "".join(gen)
            if args.read == "wait":
                while s.merging_in_background():
                    time.sleep(0.05)
            else:
                time.sleep(float(args.read))
            cells = s.report()["cells"]  # what the context held before a merge still running
            out.append(dict(turn=k, positions=n, ttft=ttft, waited=s.stats.merge_seconds - fg0, reply=reply,
                            cells=cells, recalled=s.stats.recalled_tokens))
        s.stop_background_merge()  # one still running stops at its next chunk boundary; its seconds count then
        out[-1]["background_total"] = s.stats.background_merge_seconds
        out[-1]["background_merges"] = s.stats.background_merges
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--length", type=int, default=2048, help="document tokens (about)")
    ap.add_argument("--methods", default="full,snapkv,flowmm")
    ap.add_argument("--schedules", default="reply_first,blocking")
    ap.add_argument("--budget", default="1024", help="cells (or a ratio of --ctx), as chat's --budget")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--read", default="wait", help="'wait' for the background merge, or seconds between turns")
    ap.add_argument("--recall", type=int, default=0, help="chat's --recall (default 0 here: off); N adds the "
                                                          "document's question as a last turn")
    args = ap.parse_args()
    path, model = open_model(args)
    task = ruler_tasks.generate(["single-number"], [args.length], 1, 0,
                                count_tokens=lambda t: len(model.tokenize(t, add_special=False)))[0]
    model.close()
    turns = [dict(segments=task.segments)] + [dict(text=q) for q in QUESTIONS]
    if args.recall:
        turns.append(dict(text=task.questions[0].text))
    ref = run_turns(path, turns, "full", "reply_first", args)
    print("| method | schedule | turn | positions | first token s | / full | merge waited s | cells after | "
          "recalled tokens so far | reply = full |\n|---|---|---|---|---|---|---|---|---|---|")
    runs = [("full", "reply_first", ref)] + [(m, sc, run_turns(path, turns, m, sc, args))
                                               for m in args.methods.split(",") if m != "full"
                                               for sc in args.schedules.split(",")]
    for method, schedule, rows in runs:
        for r, f in zip(rows, ref):
            print(f"| {method} | {schedule} | {r['turn']} | {r['positions']} | {r['ttft']:.2f} | "
                  f"{r['ttft'] / f['ttft']:.2f}x | {r['waited']:.2f} | {r['cells']} | {r['recalled']} | "
                  f"{'yes' if r['reply'] == f['reply'] else 'no'} |")
        print(f"| {method} | {schedule} | after the replies | | | | {rows[-1]['background_total']:.2f} s in "
              f"{rows[-1]['background_merges']} merges | | | |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
