#!/usr/bin/env python3
"""Distil a policy's importance predictor again, keeping its rho and settings: after the teacher
changed (the repeat pass now re-reads images and no longer counts its prefix's rows), or to
include images in the corpus (a projector: every third document holds a glyph page of its own
text and a generated picture, calibration/distillation.py).

    cd scripts && python redistill.py [-m MODEL] [--mmproj glyph|FILE] [--docs 16] [--threads 2] --out P.json

The policy starts from the model's shipped one (or --policy); only its predictor is replaced.
`calibrate --distill N --mmproj FILE` does the same and also recalibrates rho from the projector's images.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from flowmm_edge.bindings import runtime
from flowmm_edge.bindings.multimodal import Projector
from flowmm_edge.calibration import calibration_pass, policy as policy_mod
from flowmm_edge.models import default_model, glyph


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", type=Path, default=None)
    ap.add_argument("--policy", type=Path, help="the policy to start from (default: the model's shipped one)")
    ap.add_argument("--mmproj", help="'glyph' (the model's glyph projector, built if needed) or an mmproj file")
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--doc-tokens", type=int, default=calibration_pass.DISTILL_TOKENS)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    path = args.model or default_model.ensure()
    base = policy_mod.load(args.policy) if args.policy else policy_mod.shipped_for(path)
    if base is None:
        raise SystemExit(f"{path}: no shipped policy; give --policy")
    mmproj = glyph.ensure(path) if args.mmproj == "glyph" else args.mmproj
    t0 = time.perf_counter()
    with runtime.Model(path) as model:
        proj = Projector(mmproj, model, n_threads=args.threads) if mmproj else None
        try:
            predictor, record = calibration_pass.distill(model, args.docs, args.doc_tokens, args.threads,
                                                         projector=proj)
        finally:
            if proj is not None:
                proj.close()
    out = dataclasses.replace(base, predictor=predictor)
    out.save(args.out)
    print(f"{args.out}: held-back Spearman {record['held_back_spearman_mean']:.3f} over {record['n_documents']} "
          f"documents ({record.get('n_documents_with_images', 0)} with images), {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
