#!/usr/bin/env python3
"""Which of a cell's cached rows predict the repeat pass's score: the measurement behind the
importance predictor's input (flowmm_edge/methods/importance_predictor.py).

    cd scripts && python predictor_features.py --docs 8 --tokens 2048 [--held-back 2] [--threads 2]

Collects the distillation corpus's first `--docs` documents (prefill + repeat pass each, as
`calibrate --distill` does), fits a ridge regression per (layer, KV head) on all but the last
`--held-back` of them for each candidate input, and prints the mean Spearman rank correlation with
the teacher on the held-back documents, and the share of the teacher's top 20% of cells that the
prediction's top 20% recovers. Candidates: the lengths of K's RoPE-rotated pairs (position-free),
raw K, V, and their combinations; also three single statistics with no fit (|V|, |K|, recency).
A second table fits on positions < tokens/2 and tests on the later half, for what a longer
context than the calibration's may do.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench_common import open_model
from flowmm_edge.bindings.native import llama_cpp
from flowmm_edge.calibration import calibration_pass
from flowmm_edge.calibration import distillation
from flowmm_edge.methods.importance_predictor import LOG_FLOOR, fit_ridge, k_pair_lengths, rope_pairing, spearman, top_recall


def inputs(k: np.ndarray, v: np.ndarray, pairing: str) -> dict[str, np.ndarray]:
    p = k_pair_lengths(k, pairing)
    return {"K pair lengths": p, "K pair lengths + V": np.c_[p, v], "V": v, "raw K": k, "raw K + V": np.c_[k, v],
            "raw K + K pair lengths (shipped)": np.c_[k, p], "raw K + K pair lengths + V": np.c_[k, p, v]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--held-back", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    _, model = open_model(args)
    docs = distillation.documents(model, args.docs, args.tokens)
    s = distillation.collect_documents(model, docs, args.tokens, args.threads, relative=False,
                                       progress=lambda a, b: print(f"  collected {a}/{b}", flush=True))
    pairing = rope_pairing(llama_cpp.llama_model_rope_type(model.ptr))
    n_layer, n_head = s.teacher[0].shape[:2]
    train = range(args.docs - args.held_back)
    test = range(args.docs - args.held_back, args.docs)
    half = args.tokens // 2
    print(f"{args.docs} documents of {args.tokens} tokens, {args.held_back} held back; ridge {distillation.RIDGE}; "
          f"teacher log(repeat-pass mass + {LOG_FLOOR:g})")
    print("| input | Spearman (held back) | top-20% recall | Spearman, fit < half, test >= half |")
    print("|---|---|---|---|")
    for name, f in [("|V| (no fit)", lambda k, v: np.linalg.norm(v, axis=1)),
                    ("|K| (no fit)", lambda k, v: np.linalg.norm(k, axis=1)),
                    ("recency (no fit)", lambda k, v: np.arange(len(k), dtype=float))]:
        r = np.mean([spearman(f(s.k[d][l, h].astype(np.float32), s.v[d][l, h].astype(np.float32)), s.teacher[d][l, h])
                     for d in test for l in range(n_layer) for h in range(n_head)])
        print(f"| {name} | {r:.3f} | — | — |")
    rows: dict[str, list[list[float]]] = {}
    for l in range(n_layer):
        for h in range(n_head):
            x = [inputs(s.k[d][l, h].astype(np.float64), s.v[d][l, h].astype(np.float64), pairing)
                 for d in range(args.docs)]
            y = [np.log(s.teacher[d][l, h] + LOG_FLOOR) for d in range(args.docs)]
            for name in x[0]:
                w, b = fit_ridge(np.concatenate([x[d][name] for d in train]), np.concatenate([y[d] for d in train]),
                                 distillation.RIDGE)
                w2, b2 = fit_ridge(np.concatenate([x[d][name][:half] for d in train]),
                                   np.concatenate([y[d][:half] for d in train]), distillation.RIDGE)
                rows.setdefault(name, []).append([
                    np.mean([spearman(x[d][name] @ w + b, y[d]) for d in test]),
                    np.mean([top_recall(x[d][name] @ w + b, y[d], 0.2) for d in test]),
                    np.mean([spearman(x[d][name][half:] @ w2 + b2, y[d][half:]) for d in test])])
    for name, vals in rows.items():
        m = np.mean(vals, axis=0)
        print(f"| {name} | {m[0]:.3f} | {m[1]:.3f} | {m[2]:.3f} |")
    print(f"(calibrate uses {calibration_pass.DISTILL_TOKENS}-token documents; the per-layer figures of the shipped "
          "predictor are in its policy file)")


if __name__ == "__main__":
    main()
