"""How much of the answer survives a compression made before the question exists.

Per method and budget: the share of the answer's tokens in the context (the values the
questions ask for) that each (layer, KV head) keeps as a slot of its own ("kept") or folds into
another token's slot ("merged"), averaged over layers, heads and tasks. The compression is the
one `eval --question after` makes (the observation window is the end of the context). A method
that drops the answer's tokens cannot answer a later question whatever its merge does, so this
separates what a method chooses from how it merges.

With --compare-scores it also ranks importance scores a selection could start from, each turned
into SnapKV's selection (average pooling 7, top-k per layer and KV head, sinks and the last 32
kept): "window", attention from the last 32 rows of the context (SnapKV's, here with no
question in them); "prompt", attention from every prompt row (H2O's); "reconstruction",
the largest mass any group of 64 rows of a second pass that makes the model repeat the context
sends it (flowmm_edge/reconstruction.py, after KVzip, Kim et al. 2025: a token the model needs to
reproduce the context gets mass, whatever the question will be). That pass costs a second prefill.

    cd scripts && python answer_retention.py --lengths 2048 --per-kind 2 --budgets 0.05,0.1,0.2,0.35,0.5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench_common import open_model
from flowmm_edge.evaluation import evaluate, ruler_tasks
from flowmm_edge.bindings import kv_cache, runtime
from flowmm_edge.compression import reconstruction
from flowmm_edge.bindings.attention_stats import AttentionStats
from flowmm_edge.methods.base import top_by_score
from flowmm_edge.methods.snapkv import SnapKV, avg_pool
from flowmm_edge.bindings.prompt import ModalityLabels, prepare


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


def _scores_by_position(ctx, stats: AttentionStats, n: int) -> np.ndarray:
    """[n_layer, n_head_kv, n]: the mass each of positions 0..n-1 received."""
    _, pos = kv_cache.seq_cells(ctx)
    order = np.argsort(pos, kind="stable")
    keep = order[pos[order] < n]
    return np.stack([stats.column_scores(l, per_kv_head=True)[:, keep] for l in range(stats.n_layer)])


def _context(model, task):
    """The task's context as eval prepares it, and the positions of the answers' tokens in it."""
    context, _ = evaluate.wrap(model, task)
    p = prepare(model, context, ModalityLabels(), add_bos=True)
    return p, answer_positions(model, p.pieces, [a for q in task.questions for a in q.answers])


def importance_scores(model, ctx, p, window: int) -> dict[str, np.ndarray]:
    """The three scores for a prompt decoded from an empty cache."""
    tokens = [t for piece in p.pieces for t in piece]
    n = len(tokens)
    out = {}
    with AttentionStats(ctx) as whole:
        ctx.decode(tokens, 0)
    out["prompt"] = _scores_by_position(ctx, whole, n)
    ctx.truncate(n - window)
    with AttentionStats(ctx, prompt_end=n, window=window) as last:
        ctx.decode(tokens[-window:], n - window)
    out["window"] = _scores_by_position(ctx, last, n)
    rec = reconstruction.reconstruction_scores(ctx, np.r_[-1, tokens[1:]], reconstruction.repeat_prefix(model))
    out["reconstruction"] = rec.scores  # the context again without its BOS (the methods' pass repeats that one token too)
    return out


def compare_scores(model, tasks, budgets, n_threads) -> list[dict]:
    """Per score and budget, the share of the answer's tokens SnapKV's selection on that score keeps."""
    snap = SnapKV()  # its pooling, sinks and window
    shares: dict[tuple[str, float], list[float]] = {}
    for task in tasks:
        p, where = _context(model, task)
        with runtime.Context(model, n_ctx=2 * p.n_pos + 64, n_threads=n_threads) as ctx:
            scores = importance_scores(model, ctx, p, snap.window)
        for kind, sc in scores.items():
            for b in budgets:
                sel = top_by_score(avg_pool(sc.astype(np.float64), snap.kernel), snap.protected(p.n_pos),
                                   int(np.ceil(b * p.n_pos)))
                shares.setdefault((kind, b), []).append(float(np.isin(sel, where).sum(axis=-1).mean() / len(where)))
        print(f"{task.id}: scores compared", file=sys.stderr)
    return [{"score": k, "budget": b, "kept": float(np.mean(v)), "tasks": len(v)} for (k, b), v in sorted(shares.items())]


def method_shares(model, tasks, methods: list[str], budgets, n_threads) -> list[dict]:
    """Per method and budget, the share of the answer's tokens kept as slots and merged into slots."""
    shares: dict[tuple[str, float], list[tuple[float, float]]] = {}
    for task in tasks:
        p, where = _context(model, task)
        comps = evaluate.compressions(methods, budgets, None)
        with runtime.Context(model, n_ctx=p.n_pos + 8, n_threads=n_threads) as ctx:
            pre = evaluate.Prefill(ctx, p, comps)
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
    return [{"method": m, "budget": b, "kept": float(np.mean([k for k, _ in v])),
             "merged": float(np.mean([g for _, g in v])), "tasks": len(v)} for (m, b), v in sorted(shares.items())]


def _emit(rows: list[dict], columns: list[tuple[str, str, str]], json_path) -> None:
    """A Markdown table of rows (columns: header, key, format) on stdout, and the rows as JSON."""
    print("| " + " | ".join(c[0] for c in columns) + " |\n|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(format(r[key], fmt) for _, key, fmt in columns) + " |")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))


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
    ap.add_argument("--compare-scores", action="store_true",
                    help="rank importance scores (window, prompt, reconstruction) instead of the methods")
    args = ap.parse_args()
    _, model = open_model(args)
    tasks = ruler_tasks.generate(args.families.split(","), [int(x) for x in args.lengths.split(",")], args.per_kind,
                                 args.seed, count_tokens=lambda t: len(model.tokenize(t, add_special=False)))
    budgets = [float(b) for b in args.budgets.split(",")]
    if args.compare_scores:
        _emit(compare_scores(model, tasks, budgets, args.threads),
              [("importance score", "score", ""), ("budget", "budget", ".0%"), ("answer tokens kept", "kept", ".0%")],
              args.json)
    else:
        _emit(method_shares(model, tasks, args.methods.split(","), budgets, args.threads),
              [("method", "method", ""), ("budget", "budget", ".0%"), ("answer tokens kept", "kept", ".0%"),
               ("merged into a kept slot", "merged", ".0%"), ("tasks", "tasks", "")], args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
