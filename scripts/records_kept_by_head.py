#!/usr/bin/env python3
"""Where a merge keeps a record's parts: for RULER-style near-records contexts (eight records
"Locker 8D in the north hall holds crate 5307447." among prose), after one FlowMM merge at a
budget, the share of (layer, KV head) pairs whose pivots hold each record's value tokens, its
key label's tokens ("8D"), and both whole in the same pair, which is what answering from the
record needs.

    cd scripts && python records_kept_by_head.py [--budget 0.1] [--contexts 4] [--seed 3] [--method flowmm]
"""

from __future__ import annotations

import argparse

import numpy as np

from flowmm_edge.bindings import runtime
from flowmm_edge.calibration import policy as policy_mod
from flowmm_edge.evaluation import ruler_tasks
from flowmm_edge.models import default_model

from bench_common import pivots_after_merge

FIXED = {"in", "the", "north", "hall", "holds", "crate", "Locker", ""}  # ruler_tasks.NR_RECORD's words


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--contexts", type=int, default=4)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--method", default="flowmm")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = str(default_model.ensure())
    print(f"{args.method} at {args.budget:.0%}: share of (layer, KV head) pairs keeping each part\n"
          "| context | values | key labels | both whole | asked: value | asked: key | asked: both |\n|---|---|---|---|---|---|---|")
    with runtime.Model(path) as model:
        count = lambda text: len(model.tokenize(text, add_special=False))  # noqa: E731
        for task in ruler_tasks.generate(["near-records"], (2048,), args.contexts, args.seed, count_tokens=count):
            pieces, text, starts, kept = pivots_after_merge(model, task, args.method, args.budget,
                                                            policy_mod.shipped_for(path), args.threads)
            q = task.questions[0]
            rows = []
            for value in [*q.answers, *q.distractors]:  # the asked record first
                a = text.find(str(value))
                val = np.flatnonzero((starts >= a) & (starts < a + len(str(value))))
                before = np.arange(max(0, val[0] - 10), val[0])
                key = before[[pieces[i].strip() not in FIXED for i in before]][-3:]
                both = kept[:, :, val].all(axis=-1) & kept[:, :, key].all(axis=-1)
                rows.append((kept[:, :, val].mean(), kept[:, :, key].mean(), both.mean()))
            r = np.array(rows)
            print(f"| {task.id} | {r[:, 0].mean():.2f} | {r[:, 1].mean():.2f} | {r[:, 2].mean():.2f} | "
                  f"{r[0, 0]:.2f} | {r[0, 1]:.2f} | {r[0, 2]:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
