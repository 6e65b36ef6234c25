#!/usr/bin/env python3
"""Diagnostic: is near-records lost by the selection? For RULER-style near-records contexts, every
record's tokens ("Locker 4C in the north hall holds crate 7636500.") are forced into every
(layer, KV head)'s pivots of FlowMM's merge (its own scores choose the rest of the budget), and
the question is asked after compression, as `eval --question after` asks it.

    cd scripts && python forced_records.py [--records all|asked|none] [--contexts 4] [--seed 5]

`none` is FlowMM as it runs; `asked` forces the asked record's tokens only.
"""

from __future__ import annotations

import argparse

import numpy as np

from flowmm_edge.bindings import runtime
from flowmm_edge.bindings.prompt import ModalityLabels, prepare
from flowmm_edge.calibration import policy as policy_mod
from flowmm_edge.evaluation import evaluate, ruler_tasks
from flowmm_edge.methods import flowmm
from flowmm_edge.models import default_model


def record_positions(model, task, which: str) -> np.ndarray:
    """The positions of the records' tokens (from "Locker" to the value's end) in the task's prompt."""
    context, _ = evaluate.wrap(model, task)
    p = prepare(model, context, ModalityLabels(), None, add_bos=True)
    try:
        tokens = evaluate.reconstruction.tokens_by_position(p.pieces)
    finally:
        p.close()
    pieces = [model.detokenize([int(t)]) if t >= 0 else "" for t in tokens]
    text, starts = "".join(pieces), np.cumsum([0] + [len(x) for x in pieces])[:-1]
    q = task.questions[0]
    pos: set[int] = set()
    for value in ([*q.answers, *q.distractors] if which == "all" else list(q.answers)):
        end = text.find(str(value)) + len(str(value))
        begin = text.rfind("Locker", 0, end)
        pos.update(np.flatnonzero((starts >= begin - 1) & (starts < end + 1)).tolist())
    return np.array(sorted(pos), np.int64)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", choices=("all", "asked", "none"), default="all")
    ap.add_argument("--contexts", type=int, default=4)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--budgets", default="0.05,0.1,0.2")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    forced = np.zeros(0, np.int64)
    choose = flowmm.top_by_score

    def with_records(scores, protected, slots):
        return choose(scores, np.union1d(protected, forced), slots)

    flowmm.top_by_score = with_records
    path = str(default_model.ensure())
    scores: dict[tuple[str, float], list[float]] = {}
    with runtime.Model(path) as model:
        count = lambda text: len(model.tokenize(text, add_special=False))  # noqa: E731
        for task in ruler_tasks.generate(["near-records"], (2048,), args.contexts, args.seed, count_tokens=count):
            forced = record_positions(model, task, args.records) if args.records != "none" else np.zeros(0, np.int64)
            rows = evaluate.evaluate_task(model, task, ["flowmm"], budgets, policy_mod.shipped_for(path),
                                          n_threads=args.threads)
            for r in rows:
                scores.setdefault((r.method, r.budget), []).append(r.score)
            print(f"{task.id}: {len(forced)} positions forced; " +
                  ", ".join(f"{r.method} {r.budget:.0%} {r.answer.strip()[:10]!r} {r.score:.0f}" for r in rows), flush=True)
    print(f"\n| records forced: {args.records} | " + " | ".join(f"{m} {b:.0%}" for m, b in scores) + " |")
    print("|---|" + "---|" * len(scores))
    print("| score | " + " | ".join(f"{np.mean(v):.2f}" for v in scores.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
