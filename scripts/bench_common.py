"""What the benchmark scripts share: the common arguments, the model, the long prompt."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from flowmm_edge.models import default_model, gguf_file
from flowmm_edge.bindings import runtime

FILLER = "the quick brown fox jumps over the lazy dog while the secret code stays 4711 "


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="text model GGUF (default: the embedded default model)")
    ap.add_argument("--ctx", type=int, default=4096, help="prompt tokens")
    ap.add_argument("--threads", type=int, default=None)


def open_model(args: argparse.Namespace) -> tuple[Path, runtime.Model]:
    runtime.quiet_native_logs()
    path = Path(args.model) if args.model else default_model.ensure()
    return path, runtime.Model(path)


def prompt_tokens(model: runtime.Model, n: int) -> list[int]:
    """A long plain-text prompt of n tokens (BOS first)."""
    text = FILLER * (n // 8 + 16)
    return model.tokenize(text.strip())[:n]


def unseen_copy(src: Path, folder: Path) -> Path:
    """`folder`/copy.gguf: `src` with one header string changed, so no shipped or learned policy
    matches it and FlowMM learns its predictor as for any model a user brings; what it learns
    goes to `folder`/policies (FLOWMM_POLICY_DIR), kept nowhere else."""
    os.environ["FLOWMM_POLICY_DIR"] = str(folder / "policies")
    return gguf_file.renamed_copy(src, folder / "copy.gguf")
