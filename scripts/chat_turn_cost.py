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

`--unseen` runs FlowMM on a copy of the model with one header string changed, so no policy
matches it and it learns (the repeat pass after each reply, teaching its student), each round
from nothing. `--text-only` labels the document's picture spans text, as a plain chat holds one
modality. `--rounds R` repeats every conversation R times, the full cache first in odd
rounds and last in even ones, and prints each turn's median first token and the median and
range of its ratio to the same round's full cache (the machine's speed moves between runs); the
other columns are the first round's.

    cd scripts && python chat_turn_cost.py --length 4096 --ctx 6144 --budget 1024 \\
        --methods full,snapkv,flowmm --schedules reply_first,blocking
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench_common import open_model, unseen_copy
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
    ap.add_argument("--unseen", action="store_true", help="FlowMM on a renamed copy of the model: it learns, "
                                                           "from nothing each round")
    ap.add_argument("--rounds", type=int, default=1, help="conversations of each method and schedule, alternated")
    ap.add_argument("--text-only", action="store_true", help="label the document's picture spans text too: one "
                                                               "modality, as a plain chat")
    args = ap.parse_args()
    path, model = open_model(args)
    task = ruler_tasks.generate(["single-number"], [args.length], 1, 0,
                                count_tokens=lambda t: len(model.tokenize(t, add_special=False)))[0]
    model.close()
    segments = [dataclasses.replace(seg, modality="text") for seg in task.segments] if args.text_only else task.segments
    turns = [dict(segments=segments)] + [dict(text=q) for q in QUESTIONS]
    if args.recall:
        turns.append(dict(text=task.questions[0].text))
    tmp = tempfile.TemporaryDirectory()
    path = unseen_copy(path, Path(tmp.name)) if args.unseen else path  # the full cache reads the same file
    others = [(m, sc) for m in args.methods.split(",") if m != "full" for sc in args.schedules.split(",")]
    runs: dict[tuple[str, str], list[list[dict]]] = {("full", "reply_first"): []}
    for r in range(args.rounds):
        order = [("full", "reply_first")] + others if r % 2 == 0 else others + [("full", "reply_first")]
        for method, schedule in order:
            if args.unseen:  # every round learns from nothing
                os.environ["FLOWMM_POLICY_DIR"] = str(Path(tmp.name) / f"policies-{r}-{method}-{schedule}")
            runs.setdefault((method, schedule), []).append(
                run_turns(path, turns, method, schedule, args))
    ref = runs[("full", "reply_first")]
    print("| method | schedule | turn | positions | first token s | / full | merge waited s | cells after | "
          "recalled tokens so far | reply = full |\n|---|---|---|---|---|---|---|---|---|---|")
    for (method, schedule), rounds in runs.items():
        for k, row in enumerate(rounds[0]):
            ttft = [rs[k]["ttft"] for rs in rounds]
            ratios = sorted(rs[k]["ttft"] / fs[k]["ttft"] for rs, fs in zip(rounds, ref))
            spread = f" [{ratios[0]:.2f}–{ratios[-1]:.2f}]" if len(ratios) > 1 else ""
            same = sum(rs[k]["reply"] == fs[k]["reply"] for rs, fs in zip(rounds, ref))
            print(f"| {method} | {schedule} | {row['turn']} | {row['positions']} | {statistics.median(ttft):.2f} | "
                  f"{statistics.median(ratios):.2f}x{spread} | {row['waited']:.2f} | {row['cells']} | "
                  f"{row['recalled']} | {same}/{len(rounds)} |")
        last = [rs[-1] for rs in rounds]
        print(f"| {method} | {schedule} | after the replies | | | | "
              f"{statistics.median(x['background_total'] for x in last):.2f} s in "
              f"{last[0]['background_merges']} merges | | | |", flush=True)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
