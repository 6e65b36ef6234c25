#!/usr/bin/env python3
"""Diagnostic: where a merge's slots go. For RULER-style needle contexts (multi-query: four
needles "One of the special magic numbers for gentle-falcon is: 1612688.", two asked), after one
merge at a budget: the share of the needles' tokens among the pivots of each (layer, KV head),
the share of all slots the needles hold, each needle whole in how many (layer, KV head) pairs,
and the token pieces outside the needles that hold the most slots.

    cd scripts && python where_slots_go.py [--family multi-query] [--contexts 2] [--seed 21] [--budget 0.1]
                                           [--method flowmm] [-m MODEL] [--policy P.json]
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

import numpy as np

from flowmm_edge.bindings import runtime
from flowmm_edge.calibration import policy as policy_mod
from flowmm_edge.evaluation import ruler_tasks
from flowmm_edge.models import default_model

from bench_common import pivots_after_merge

NEEDLE = re.compile(r"One of the special magic \w+ for [^.]*\.")  # ruler_tasks.NIAH_NEEDLE


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="multi-query", choices=["single-number", "single-code", "multi-value",
                                                                  "multi-query", "multi-key"])
    ap.add_argument("--contexts", type=int, default=2)
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--method", default="flowmm")
    ap.add_argument("-m", "--model", type=Path, default=None)
    ap.add_argument("--policy", type=Path, help="default: the model's shipped or learned one")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    path = str(args.model or default_model.ensure())
    pol = policy_mod.load(args.policy) if args.policy else policy_mod.choose(policy_mod.AUTO, path)
    with runtime.Model(path) as model:
        count = lambda text: len(model.tokenize(text, add_special=False))  # noqa: E731
        for task in ruler_tasks.generate([args.family], (2048,), args.contexts, args.seed, count_tokens=count):
            pieces, text, starts, kept = pivots_after_merge(model, task, args.method, args.budget, pol, args.threads)
            matches = list(NEEDLE.finditer(text))
            spans = [np.flatnonzero((starts >= m.start()) & (starts < m.end())) for m in matches]
            needle = np.zeros(len(pieces), bool)
            for idx in spans:
                needle[idx] = True
            print(f"{task.id}: {len(pieces)} positions, {int(kept[0, 0].sum())} slots per (layer, KV head); the needles' "
                  f"{needle.sum()} tokens: {kept[:, :, needle].mean():.2f} of them kept per pair, "
                  f"{kept[:, :, needle].sum() / kept.sum():.3f} of all slots")
            for m, idx in zip(matches, spans):
                k = kept[:, :, idx]
                print(f"  {m.group()!r}: whole in {k.all(axis=-1).mean():.2f} of the pairs; kept per token: "
                      + " ".join(f"{x:.2f}" for x in k.mean(axis=(0, 1))))
            held = collections.Counter()
            for i in np.flatnonzero(~needle):
                held[pieces[i]] += int(kept[:, :, i].sum())
            print("  outside the needles, most slots: "
                  + ", ".join(f"{w!r} {v / kept.sum():.3f}" for w, v in held.most_common(12)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
