#!/usr/bin/env python3
"""Which fit of the importance predictor keeps the teacher's top cells: the measurement behind
`distillation.fit`'s loss (docs/METHOD.md, "Learned importance").

    cd scripts && python student_variants.py --docs 24 --train 16 [--threads 2] [--samples S.npz] [--out-dir D]

Collects the distillation corpus's first `--docs` documents (prefill + repeat pass each, as
`calibrate --distill` does; cached in `--samples` so a second run only fits), fits every variant
on the first `--train` of them and scores it on the rest: mean Spearman rank correlation with
the teacher, and the share of the teacher's top 5% / 10% of cells that the prediction's top 5% /
10% recovers, both after SnapKV's pooling (`FlowMM.pool`), as the merge selects; and how much
of the records planted in the held-back documents each keeps in its top 10% (the teacher's own
figure beside it; with `--surprisal`, token surprisal's too). All variants use the
features the native graph computes, so each can ship without a change to `native/`. With
`--out-dir`, each variant's predictor (refitted on every document) is written as a policy beside
the shipped one's rho, for `eval --policy`.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from bench_common import open_model
from flowmm_edge.bindings import runtime
from flowmm_edge.bindings.native import llama_cpp
from flowmm_edge.calibration import distillation, policy as policy_mod
from flowmm_edge.methods.flowmm import FlowMM
from flowmm_edge.methods.importance_predictor import ImportancePredictor, features, rope_pairing, spearman, top_recall
from flowmm_edge.methods.snapkv import avg_pool


def load_or_collect(args, model) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if args.samples and Path(args.samples).exists():
        z = np.load(args.samples)
        n = int(z["n"])
        return [z[f"k{i}"] for i in range(n)], [z[f"t{i}"] for i in range(n)]
    docs = distillation.documents(model, args.docs, args.tokens)
    t0 = time.perf_counter()
    s = distillation.collect_documents(model, docs, args.tokens, args.threads, relative=False, progress=lambda a, b: print(
        f"  collected {a}/{b} ({time.perf_counter() - t0:.0f} s)", flush=True))
    if args.samples:
        np.savez(args.samples, n=len(s.k), **{f"k{i}": k for i, k in enumerate(s.k)},
                 **{f"t{i}": t for i, t in enumerate(s.teacher)})
    return s.k, s.teacher


# How each document's cells weigh in the fit (all regress log(teacher + LOG_FLOOR), so the
# prediction stays a mass the merge can weigh values by): "log" weighs every cell alike (the
# shipped fit); "top-N" weighs a document's ceil(N%) highest cells by the teacher TOP_WEIGHT
# times (a merge at 5-20% keeps only the top; a plain fit spends itself on the order of the
# cells it drops); "rank-N" weighs by TOP_WEIGHT ** (rank quantile ** N), a smooth version.
LOSSES = ("log", "top-5", "top-10", "top-20", "rank-4", "rank-8")
TOP_WEIGHT = 10.0


def sample_weights(loss: str):
    """The weight function of a loss (None: every cell alike), for distillation.fit_head."""
    if loss == "log":
        return None
    kind, _, n = loss.partition("-")
    if loss not in LOSSES:
        raise ValueError(f"fit loss {loss!r} is not one of {', '.join(LOSSES)}")
    if kind == "top":
        def top(teacher):
            out = np.ones(len(teacher))
            out[np.argsort(-teacher, kind="stable")[:max(1, int(np.ceil(len(teacher) * int(n) / 100)))]] = TOP_WEIGHT
            return out
        return top
    return lambda teacher: TOP_WEIGHT ** (((np.argsort(np.argsort(teacher, kind="stable")) + 0.5) / len(teacher)) ** int(n))


def surprisal(model, tokens: list[int], threads) -> np.ndarray:
    """-log p(token | the tokens before it) of every token (0 for the first), from the prefill's logits."""
    out = np.zeros(len(tokens))
    with runtime.Context(model, n_ctx=len(tokens) + 256, n_batch=256, n_threads=threads) as ctx:
        for a in range(0, len(tokens), 256):
            lg = ctx.decode(tokens[a:a + 256], a, 0, all_logits=True).astype(np.float64)
            nxt = np.asarray(tokens[a + 1:a + 257])
            top = lg.max(1)
            lse = np.log(np.exp(lg - top[:, None]).sum(1)) + top
            out[a + 1:a + 1 + len(nxt)] = lse[:len(nxt)] - lg[np.arange(len(nxt)), nxt]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--docs", type=int, default=24)
    ap.add_argument("--train", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--samples", help="an .npz that caches the collected keys and teacher scores")
    ap.add_argument("--out-dir", type=Path, help="write each variant's policy here")
    ap.add_argument("--surprisal", action="store_true", help="also score the records kept by token surprisal (no fit)")
    args = ap.parse_args()
    path, model = open_model(args)
    ks, teachers = load_or_collect(args, model)
    pairing = rope_pairing(llama_cpp.llama_model_rope_type(model.ptr))
    n_layer, n_head = teachers[0].shape[:2]
    train, test = list(range(args.train)), list(range(args.train, len(ks)))
    pool = FlowMM.pool
    print(f"{len(ks)} documents of {teachers[0].shape[-1]} tokens: fitted on {len(train)}, scored on {len(test)}; "
          f"pooling {pool}")
    docs = distillation.documents(model, len(ks), args.tokens)
    n = teachers[0].shape[-1]
    spans = {d: [(a, b) for a, b in distillation.record_spans(model, docs[d]) if b <= n - FlowMM.window] for d in test}

    def records_kept(d: int, scores: np.ndarray, share: float) -> list[float]:
        """Per planted record of document d: the share of its tokens in the pooled scores' top share."""
        top = np.zeros(n, bool)
        top[np.argsort(-avg_pool(scores, pool))[:int(share * n)]] = True
        return [top[a:b].mean() for a, b in spans[d]]

    print(f"planted records in the held-back documents: {sum(len(v) for v in spans.values())}; 'records kept' is "
          "the share of their tokens in the top 10% (a random choice keeps 0.10)")
    print("| fit | Spearman | top-5% recall | top-10% recall | top-20% recall | records kept at 10% |\n"
          "|---|---|---|---|---|---|")
    kept = [k for l in range(n_layer) for h in range(n_head) for d in test
            for k in records_kept(d, teachers[d][l, h].astype(np.float64), 0.1)]
    print(f"| the teacher itself | 1 | 1 | 1 | 1 | {np.mean(kept):.3f} |")
    if args.surprisal:
        kept = [k for d in test if spans[d]
                for k in records_kept(d, surprisal(model, docs[d].tokens, args.threads)[:n], 0.1)]
        print(f"| token surprisal, no fit | — | — | — | — | {np.mean(kept):.3f} |", flush=True)
    base = policy_mod.shipped_for(path)
    for name in LOSSES:
        rows, kept = [], []
        for l in range(n_layer):
            for h in range(n_head):
                w, b = distillation.fit_head(ks, teachers, train, l, h, pairing, weight=sample_weights(name))
                for d in test:
                    log_score = features(ks[d][l, h].astype(np.float32), pairing) @ w + b
                    pred, t = avg_pool(log_score, pool), avg_pool(teachers[d][l, h].astype(np.float64), pool)
                    rows.append((spearman(pred, t), top_recall(pred, t, 0.05), top_recall(pred, t, 0.1),
                                 top_recall(pred, t, 0.2)))
                    kept += records_kept(d, np.exp(log_score), 0.1)
        r = np.mean(rows, axis=0)
        print(f"| {name} | {r[0]:.3f} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.3f} | {np.mean(kept):.3f} |", flush=True)
        if args.out_dir and base is not None:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            wts = [[distillation.fit_head(ks, teachers, train + test, l, h, pairing,
                                           weight=sample_weights(name)) for h in range(n_head)]
                   for l in range(n_layer)]
            pred = ImportancePredictor(pairing, np.asarray([[w for w, _ in r] for r in wts], np.float32),
                                       np.asarray([[b for _, b in r] for r in wts], np.float32),
                                       {"loss": name, "n_documents": len(ks)})
            dataclasses.replace(base, predictor=pred).save(args.out_dir / f"policy-{name}.json")


if __name__ == "__main__":
    main()
