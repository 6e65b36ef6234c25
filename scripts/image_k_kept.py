#!/usr/bin/env python3
"""Where a merge keeps a multi-image context's bindings: for image-k contexts (three glyph pages,
each after a text line "Image k:" and holding its own 7-digit number), after one FlowMM merge at
a budget, the share of (layer, KV head) pairs whose pivots hold each page's number (every digit
token), its "Image k:" line's k, and both in the same pair, which is what answering "the number
in image k" needs.

    cd scripts && python image_k_kept.py [--budget 0.2] [--contexts 8] [--seed 2] [--methods flowmm:repeat,flowmm]
"""

from __future__ import annotations

import argparse

import numpy as np

from flowmm_edge.bindings import runtime
from flowmm_edge.bindings.multimodal import Projector
from flowmm_edge.bindings.prompt import ModalityLabels, prepare
from flowmm_edge.calibration import policy as policy_mod
from flowmm_edge.compression import reconstruction
from flowmm_edge.evaluation import evaluate, image_tasks
from flowmm_edge.models import default_model, glyph

from bench_common import pivots_after_merge


def page_layout(model, projector, book, task):
    """Per page: (the positions of its number's tokens, the position of its "Image k:" line's k)."""
    context, _ = evaluate.wrap(model, task)
    p = prepare(model, context, ModalityLabels(), projector, add_bos=True)
    try:
        tokens = reconstruction.tokens_by_position(p.pieces)
        starts = sorted(reconstruction.images_by_position(p.pieces))
    finally:
        p.close()
    images = [s.image for s in task.segments if s.kind == "image"]
    out = []
    for k, (at, png) in enumerate(zip(starts, images)):
        page = book.read(png)
        text = [model.detokenize([t]) for t in page]
        joined = "".join(text)
        needle = image_tasks.IMAGE_NEEDLE.split("{")[0]
        a = joined.find(needle) + len(needle)
        b = joined.find(".", a)
        first = np.cumsum([0] + [len(x) for x in text])[:-1]
        number = at + np.flatnonzero((first >= a) & (first < b))
        head = [i for i in range(max(0, at - 6), at) if model.detokenize([int(tokens[i])]).strip() == str(k + 1)]
        out.append((number, head[-1] if head else None, joined[a:b].strip()))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--contexts", type=int, default=8)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--methods", default="flowmm:repeat,flowmm")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    runtime.quiet_native_logs()
    path = str(default_model.ensure())
    mmproj = glyph.ensure(path)
    book = glyph.Codebook.load(mmproj)
    policy = policy_mod.shipped_for(path)
    print(f"at {args.budget:.0%}: share of (layer, KV head) pairs keeping each page's number whole, its k, both; "
          "the asked page marked *\n\n| context | method | page 1 | page 2 | page 3 |\n|---|---|---|---|---|")
    with runtime.Model(path) as model, Projector(mmproj, model, n_threads=args.threads) as projector:
        count = lambda text: len(model.tokenize(text, add_special=False))  # noqa: E731
        tasks = image_tasks.generate(["image-k"], [2048], args.contexts, args.seed, book, model, count_tokens=count)
        for task in tasks:
            layout = page_layout(model, projector, book, task)
            asked = task.questions[0].answers[0]
            for method in args.methods.split(","):
                _, _, _, kept = pivots_after_merge(model, task, method, args.budget, policy, args.threads, projector)
                cells = []
                for number, head, value in layout:
                    num = kept[:, :, number].all(axis=-1)
                    k = kept[:, :, head] if head is not None else np.zeros_like(num)
                    mark = "*" if value == asked else ""
                    cells.append(f"{mark}{num.mean():.2f} / {k.mean():.2f} / {(num & k).mean():.2f}")
                print(f"| {task.id} | {method} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
