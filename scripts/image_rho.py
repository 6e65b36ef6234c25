#!/usr/bin/env python3
"""rho per layer (FlowMM's cross-modal flow, docs/METHOD.md) on image chunks against labelled text.

    cd scripts && python image_rho.py [--tasks 4] [--threads 2] [--json ../docs/runs/image-rho.json]

The contexts are the eval's image families (glyph pages, docs/GLYPH.md) at 2k tokens. Each is run
twice: with its pages as mtmd image chunks (image positions, image label), and as a twin whose
pages are replaced by the same text as a text span labelled "image", which is how every earlier
measurement in this project played the image modality. The content the model sees is the same
(a page's embeddings are its tokens' embeddings), so a difference is the image path's: its
positions, its chunking, no BOS-like boundaries. Printed beside the shipped policy's rho (its
calibration prompts) and whether each layer's mode (rho >= theta: cross-modal) differs.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from flowmm_edge.bindings import runtime
from flowmm_edge.bindings.multimodal import Projector
from flowmm_edge.bindings.prompt import Segment
from flowmm_edge.evaluation import image_tasks
from flowmm_edge.calibration import calibration_pass
from flowmm_edge.calibration import policy as policy_mod
from flowmm_edge.compression.compressor import rho_from_flow
from flowmm_edge.models import default_model, glyph


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=4, help="contexts per family")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    runtime.quiet_native_logs()
    path = default_model.ensure()
    mmproj = glyph.ensure(path)
    book = glyph.Codebook.load(mmproj)
    pol = policy_mod.shipped_for(path)
    with runtime.Model(path) as model:
        tasks = image_tasks.generate(image_tasks.FAMILIES, [2048], args.tasks, 0, book, model)

        def twin(segments):
            return [Segment("text", model.detokenize([t for t in book.read(s.image) if t != book.filler]) + "\n",
                            modality="image") if s.kind == "image" else s for s in segments]

        with Projector(mmproj, model, n_threads=args.threads) as proj:
            as_images = calibration_pass.layer_flows(model, [t.segments for t in tasks], proj, args.threads, progress=False)
        as_text = calibration_pass.layer_flows(model, [twin(t.segments) for t in tasks], None, args.threads, progress=False)
    n_layer = len(as_images[0])
    rho_img = np.array([rho_from_flow([f[l] for f in as_images]) for l in range(n_layer)])
    rho_txt = np.array([rho_from_flow([f[l] for f in as_text]) for l in range(n_layer)])
    rho_pol = np.asarray(pol.rho)
    theta = pol.theta
    print(f"{len(tasks)} contexts of 2k tokens (3 glyph pages each); theta {theta}")
    print("| layer | rho, image chunks | rho, same text labelled image | shipped policy | mode differs (images vs text) |")
    print("|---|---|---|---|---|")
    for l in range(n_layer):
        differs = (rho_img[l] >= theta) != (rho_txt[l] >= theta)
        print(f"| {l} | {rho_img[l]:.3f} | {rho_txt[l]:.3f} | {rho_pol[l]:.3f} | {'yes' if differs else ''} |")
    print(f"| mean | {rho_img.mean():.3f} | {rho_txt.mean():.3f} | {rho_pol.mean():.3f} | "
          f"{int(((rho_img >= theta) != (rho_txt >= theta)).sum())} layers |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"contexts": len(tasks), "theta": theta, "rho_images": rho_img.tolist(),
                       "rho_text_twin": rho_txt.tolist(), "rho_policy": rho_pol.tolist()}, f, indent=1)


if __name__ == "__main__":
    main()
