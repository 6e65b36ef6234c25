#!/usr/bin/env python3
"""Does a learned importance rank a document the same wherever it sits in the cache?

    cd scripts && python importance_positions.py [-m MODEL] [--policy P.json ...] [--docs 3]
                                                 [--offsets 0,2048,6144] [--threads 2] [--markdown OUT.md]

A chat's or a pool's later turns sit at positions far beyond the 2k-token documents a predictor
is distilled on. Each document (1,024 tokens of the distillation corpus, past the part the shipped
predictor was fitted on) is decoded after a preamble of other corpus text of each --offsets
length, in one context; then, over the document's own cells:

- the teacher (the repeat pass over the whole sequence) and each predictor score them;
- "same as at 0": Spearman between a predictor's ranking there and its ranking of the document
  decoded at position 0 (the teacher's line: the teacher against itself);
- "vs teacher": Spearman and top-10% overlap with the teacher's ranking at that offset.

Each is the mean over documents, layers and KV heads. The predictors: the model's shipped policy
and each --policy file (label: the file's name).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from flowmm_edge.bindings import kv_cache, runtime
from flowmm_edge.calibration import distillation, policy as policy_mod
from flowmm_edge.compression import reconstruction
from flowmm_edge.compression.compressor import predicted_scores
from flowmm_edge.methods.importance_predictor import spearman, top_recall
from flowmm_edge.models import default_model

SHIPPED_CORPUS_TOKENS = 16 * 2048  # what the shipped predictor was fitted on (calibrate --distill 16)
DOC_TOKENS = 1024


def per_head(fn, a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([fn(a[l, h], b[l, h]) for l in range(a.shape[0]) for h in range(a.shape[1])]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", type=Path, default=None)
    ap.add_argument("--policy", type=Path, action="append", default=[])
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--offsets", default="0,2048,6144")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    path = args.model or default_model.ensure()
    offsets = [int(o) for o in args.offsets.split(",")]
    if offsets[0] != 0:
        offsets = [0] + offsets
    predictors = {}
    shipped = policy_mod.shipped_for(path)
    if shipped is not None and shipped.predictor is not None:
        predictors["shipped"] = shipped.predictor
    for p in args.policy:
        predictors[p.stem] = policy_mod.load(p).predictor
    names = ["teacher", *predictors]
    rows = {(o, n): {"same": [], "sp": [], "top": []} for o in offsets for n in names}
    with runtime.Model(path) as model:
        skip = SHIPPED_CORPUS_TOKENS // DOC_TOKENS + 1
        docs = distillation.documents(model, skip + args.docs + max(offsets) // DOC_TOKENS + 2, DOC_TOKENS)[skip:]
        preamble = [t for d in docs[args.docs:] for t in d.tokens[1:]]
        prefix = reconstruction.repeat_prefix(model)
        with runtime.Context(model, n_ctx=max(offsets) + DOC_TOKENS + reconstruction.ROOM + 64, n_batch=512,
                             n_threads=args.threads) as ctx:
            for i, doc in enumerate(docs[:args.docs]):
                at0 = {}
                for off in offsets:
                    ctx.clear()
                    tokens = doc.tokens[:1] + preamble[:off] + doc.tokens[1:]  # BOS, the preamble, the document
                    ctx.decode(tokens, 0)
                    cells, pos = kv_cache.seq_cells(ctx)
                    order = np.argsort(pos)
                    mine = order[pos[order] >= off + 1]  # the document's own cells (after BOS and preamble)
                    scored = reconstruction.reconstruction_scores(ctx, np.asarray(tokens, np.int32), prefix)
                    got = {"teacher": scored.at(pos[mine])}
                    for name, pred in predictors.items():
                        got[name] = predicted_scores(pred, ctx)[..., mine]
                    for name in names:
                        if off == 0:
                            at0[name] = got[name]
                        r = rows[(off, name)]
                        r["same"].append(per_head(spearman, got[name], at0[name]))
                        r["sp"].append(per_head(spearman, got[name], got["teacher"]))
                        r["top"].append(per_head(top_recall, got[name], got["teacher"]))
                    print(f"doc {i + 1}, offset {off}: " + ", ".join(
                        f"{n} {rows[(off, n)]['same'][-1]:.3f}/{rows[(off, n)]['sp'][-1]:.3f}" for n in names), flush=True)
    lines = [f"Importance at every position: `{path.name}`, {args.docs} documents of {DOC_TOKENS} tokens, each after "
             f"a preamble of each length. Means over documents, layers and KV heads.", "",
             "| preamble (tokens) | scorer | same as at 0 (Spearman) | vs teacher (Spearman) | vs teacher (top-10% overlap) |",
             "|---|---|---|---|---|"]
    for off in offsets:
        for name in names:
            r = rows[(off, name)]
            lines.append(f"| {off} | {name} | {np.mean(r['same']):.3f} | {np.mean(r['sp']):.3f} | {np.mean(r['top']):.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
