#!/usr/bin/env python3
"""Every native path with the KV cache on the build's own GPU (CUDA, Metal) against the host run.

    python scripts/gpu_equality.py [--json OUT.json]

tests/test_rpc_backend.py proves, on every machine, that no native path assumes host memory (the
cache on llama.cpp's RPC device). This is the same run (tests/rpc_client.py, the tiny model pair:
the entry points, SnapKV / FlowMM / Expected Attention merges, a press on a llama_cpp.Llama, two
merging conversations with an image) with the layers on a real GPU, for machines that have one.
CI has none, so this is a script, not a test.

A GPU computes in another order (cuBLAS, its own softmax), so values are compared within a float
tolerance relative to each quantity's scale, and what is chosen must be equal: the cells each
merge keeps, the best matches, the cache's size after each merge, the greedy replies. Prints one
line per quantity; exit 1 if any differs beyond its bound or the cache did not land on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flowmm_edge.models import tiny  # noqa: E402

# values: |gpu - host| <= RTOL * max(1, max|host|)
RTOL = 1e-2
CHOSEN = ("match_best", "snapkv_cells", "flowmm_cells", "expected_attention_cells", "snapkv_state_bytes",
          "flowmm_state_bytes", "expected_attention_state_bytes",
          "press_text", "press_compressions", "press_cells", "slot_replies", "slot_merges", "slot_cells")
NOT_COMPARED = ("state_sha",)  # the bytes of K and V: a GPU's rounding changes them


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    a = ap.parse_args(argv)
    text, mmproj = tiny.ensure_tiny_models()
    out = subprocess.run([sys.executable, str(REPO / "tests" / "rpc_client.py"), "gpu", str(text), str(mmproj)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "FLOWMM_VERBOSE": "1"})
    if out.returncode != 0:
        print(out.stderr[-4000:], file=sys.stderr)
        print(f"gpu_equality: the run failed with exit code {out.returncode}", file=sys.stderr)
        return 1
    kv = sorted(set(re.findall(r"(\w+) KV buffer size", out.stderr)))
    on_gpu = [d for d in kv if d not in ("CPU", "CPU_Mapped")]
    print(f"KV buffers on: {', '.join(kv) or 'none reported'}")
    runs = json.loads(out.stdout.strip().splitlines()[-1])
    host, gpu = runs["host"], runs["rpc"]
    failed = [] if on_gpu else ["no KV buffer on a GPU device"]
    figures = {"kv_devices": kv}
    for key in sorted(host):
        if key in NOT_COMPARED:
            continue
        if key in CHOSEN:
            same = gpu[key] == host[key]
            figures[key] = {"equal": same}
            print(f"{key:28s} {'equal' if same else 'DIFFERS'}")
            if not same:
                failed.append(key)
                print(f"    host {host[key]}\n    gpu  {gpu[key]}")
            continue
        h = np.nan_to_num(np.asarray(host[key], np.float64), neginf=-1e30)
        g = np.nan_to_num(np.asarray(gpu[key], np.float64), neginf=-1e30)
        if h.shape != g.shape:
            failed.append(key)
            print(f"{key:28s} shape {g.shape} against {h.shape}")
            continue
        finite = np.abs(h) < 1e29
        scale = max(1.0, float(np.abs(h[finite]).max())) if finite.any() else 1.0
        masks_equal = bool(np.array_equal(finite, np.abs(g) < 1e29))
        err = float(np.abs(g - h)[finite].max() / scale) if finite.any() else 0.0
        ok = masks_equal and err <= RTOL
        figures[key] = {"max_rel_diff": err, "masked_cells_equal": masks_equal, "n": int(h.size)}
        print(f"{key:28s} max |gpu-host| / scale = {err:.2e}{'' if masks_equal else ', masked cells differ'}"
              f"{'' if ok else '  OVER ' + str(RTOL)}")
        if not ok:
            failed.append(key)
    if a.json:
        a.json.write_text(json.dumps(figures, indent=1) + "\n")
    print("gpu_equality: " + ("all equal within bounds" if not failed else "FAILED: " + ", ".join(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
