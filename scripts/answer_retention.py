"""How much of the answer survives a compression made before the question exists.

Per method and budget: the share of the answer's tokens in the context (the values the
questions ask for) that each (layer, KV head) keeps as a slot of its own ("kept") or folds into
another token's slot ("merged"), averaged over layers, heads and tasks. The compression is the
one `eval --question after` makes (the observation window is the end of the context). A method
that drops the answer's tokens cannot answer a later question whatever its merge does, so this
separates what a method chooses from how it merges.

    python scripts/answer_retention.py --lengths 2048 --per-kind 2 --budgets 0.05,0.1,0.2,0.35,0.5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench_common import open_model
from flowmm_edge import evaluation, ruler_tasks, runtime
from flowmm_edge.prompt import ModalityLabels, prepare


def answer_positions(model, pieces, values: list[str]) -> np.ndarray:
    """Positions of the tokens that spell any of `values` in a text-only prompt."""
    tokens = [t for piece in pieces for t in piece]
    ends = np.cumsum([len(model.token_to_piece(t)) for t in tokens])
    starts = ends - np.array([len(model.token_to_piece(t)) for t in tokens])
    text = b"".join(model.token_to_piece(t) for t in tokens)
    hit = np.zeros(len(tokens), bool)
    for v in values:
        at = text.find(v.encode())
        while at >= 0:
            hit |= (starts < at + len(v.encode())) & (ends > at)
            at = text.find(v.encode(), at + 1)
    return np.flatnonzero(hit)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--families", default=",".join(ruler_tasks.KEPT_FAMILIES))
    ap.add_argument("--lengths", default="2048")
    ap.add_argument("--per-kind", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="streaming,h2o,snapkv,lookm,flowmm")
    ap.add_argument("--budgets", default="0.05,0.1,0.2,0.35,0.5")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the rows as JSON")
    args = ap.parse_args()
    _, model = open_model(args)
    tasks = ruler_tasks.generate(args.families.split(","), [int(x) for x in args.lengths.split(",")], args.per_kind,
                                 args.seed, count_tokens=lambda t: len(model.tokenize(t, add_special=False)))
    budgets = [float(b) for b in args.budgets.split(",")]
    shares: dict[tuple[str, float], list[tuple[float, float]]] = {}
    for task in tasks:
        context, _ = evaluation.wrap(model, task)
        p = prepare(model, context, ModalityLabels(), add_bos=True)
        where = answer_positions(model, p.pieces, [a for q in task.questions for a in q.answers])
        comps = evaluation.compressions(args.methods.split(","), budgets, None)
        with runtime.Context(model, n_ctx=p.n_pos + 8, n_threads=args.threads) as ctx:
            pre = evaluation.Prefill(ctx, p, comps)
            for name, budget, comp in comps:
                _, report = pre.compress(comp)
                if report.plan is None:  # every cell kept as it was
                    shares.setdefault((name, budget), []).append((1.0, 0.0))
                    continue
                src = report.plan.src  # [n_layer, n_head_kv, slots, sources], indices in position order
                kept = np.isin(src[..., 0], where).sum(axis=-1) / len(where)
                merged = np.isin(src[..., 1:], where).sum(axis=(-1, -2)) / len(where)
                shares.setdefault((name, budget), []).append((float(kept.mean()), float(merged.mean())))
        print(f"{task.id}: {len(where)} answer tokens of {p.n_pos}", file=sys.stderr)
    rows = [{"method": m, "budget": b, "kept": float(np.mean([k for k, _ in v])),
             "merged": float(np.mean([g for _, g in v])), "tasks": len(v)} for (m, b), v in sorted(shares.items())]
    print("| method | budget | answer tokens kept | merged into a kept slot | tasks |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['budget']:.0%} | {r['kept']:.0%} | {r['merged']:.0%} | {r['tasks']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
