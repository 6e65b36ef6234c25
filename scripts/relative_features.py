#!/usr/bin/env python3
"""Which inputs let a predictor see positions only relative to the sequence's end, and what each
costs on calibration documents (where absolute positions are the ones the fit sees).

    cd scripts && python relative_features.py [-m MODEL] [--docs 8] [--threads 2]

Distillation documents of 2,048 tokens (calibration/distillation.py), all but the last two fitted
(ridge, as `calibrate --distill`), the last two held back. Mean over layers and KV heads of the
held-back Spearman with the teacher and the top-10% recall of the teacher's top 10%, for:
raw k (k as cached, after RoPE: predictors before 2026-12-06), k turned back by RoPE alone, and
turned back with log(1 + distance to the end) (the relative predictor), with two more distance
terms, and with log(1 + position) too (absolute again).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from flowmm_edge.bindings import runtime
from flowmm_edge.calibration import distillation
from flowmm_edge.compression.compressor import rope_geometry
from flowmm_edge.methods.importance_predictor import LOG_FLOOR, features, fit_ridge, spearman, unrope
from flowmm_edge.models import default_model

VARIANTS = ("raw k", "turned back", "turned back + log distance", "turned back + 3 distance terms",
            "turned back + distance terms + log position")


def variant_features(kind: str, k: np.ndarray, rope) -> np.ndarray:
    n = k.shape[0]
    pos = np.arange(n)
    dist = np.log1p(n - 1 - pos)[:, None]
    if kind == "raw k":
        return features(k, rope.pairing)
    f = features(unrope(k, pos, rope), rope.pairing)
    extra = {"turned back": [], "turned back + log distance": [dist],
             "turned back + 3 distance terms": [dist, dist ** 2, 1 / (1 + np.exp(dist))],
             "turned back + distance terms + log position": [dist, dist ** 2, np.log1p(pos)[:, None]]}[kind]
    return np.concatenate([f, *extra], 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", type=Path, default=None)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    path = args.model or default_model.ensure()
    with runtime.Model(path) as model:
        rope = rope_geometry(model)
        docs = distillation.documents(model, args.docs, 2048)
        s = distillation.collect_documents(model, docs, 2048, args.threads, relative=False)  # keys as cached
    n_doc = len(s.teacher)
    n_layer, n_head = s.teacher[0].shape[:2]
    train, test = list(range(n_doc - 2)), [n_doc - 2, n_doc - 1]
    print("| input | held-back Spearman | top-10% recall |\n|---|---|---|")
    for kind in VARIANTS:
        sp, rec = [], []
        for l in range(n_layer):
            for h in range(n_head):
                x = np.concatenate([variant_features(kind, s.k[d][l, h].astype(np.float64), rope) for d in train])
                y = np.concatenate([np.log(s.teacher[d][l, h] + LOG_FLOOR) for d in train])
                w, b = fit_ridge(x, y, distillation.RIDGE)
                for d in test:
                    p, t = variant_features(kind, s.k[d][l, h].astype(np.float64), rope) @ w + b, s.teacher[d][l, h]
                    top = len(t) // 10
                    sp.append(spearman(p, t))
                    rec.append(len(set(np.argsort(-p)[:top].tolist()) & set(np.argsort(-t)[:top].tolist())) / top)
        print(f"| {kind} | {np.mean(sp):.3f} | {np.mean(rec):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
