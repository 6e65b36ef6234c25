"""What the benchmark scripts share: the common arguments, the model, the long prompt."""

from __future__ import annotations

import argparse
from pathlib import Path

from flowmm_edge.models import default_model
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
