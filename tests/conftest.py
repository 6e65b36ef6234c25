"""Shared fixtures.

Slow checks on the real default model are marked `slow`. The default run keeps the first
case of each slow group (its parameters are not marked) and deselects the rest; set
FLOWMM_SLOW=1 (or pass `-m slow`) to run them all.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from flowmm_edge.models import tiny as make_tiny_models  # noqa: E402
from flowmm_edge.bindings import runtime  # noqa: E402

runtime.quiet_native_logs()  # llama.cpp's errors still reach stderr; FLOWMM_VERBOSE=1 shows all


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FLOWMM_SLOW") or "slow" in (config.getoption("-m") or ""):
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("slow") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def tiny_models() -> tuple[Path, Path]:
    """(text GGUF, mmproj GGUF) of the tiny synthetic LLaVA pair, generated once."""
    return make_tiny_models.ensure_tiny_models()


@pytest.fixture(scope="session")
def model(tiny_models):
    """The tiny text model, opened once for the whole run (it is only read)."""
    with runtime.Model(tiny_models[0]) as m:
        yield m


TINY_PROMPT = ("the secret key is red and the code is 1234 please tell me what color the cat is "
               "and how many dogs are here in the picture of the city")
IMAGE_SPAN = (10, 30)  # positions the tests label 1 ("image"); the rest are text (0)


def span_labels(n: int):
    """Labels by position for a prompt of n tokens plus a few decoded after it."""
    import numpy as np

    lab = np.zeros(n + 8, np.int32)
    lab[IMAGE_SPAN[0]:IMAGE_SPAN[1]] = 1
    return lab


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from flowmm_edge.models import default_model

    return default_model.ensure()


@pytest.fixture(scope="session")
def mmproj(default_model_path) -> Path:
    """The default model's glyph projector (docs/GLYPH.md), built once."""
    from flowmm_edge.models import glyph

    return glyph.ensure(default_model_path)


@pytest.fixture(scope="module")
def text_model(default_model_path):
    """The default model's weights and tokenizer, loaded once per test module."""
    from flowmm_edge.bindings import runtime

    with runtime.Model(default_model_path) as m:
        yield m


def write_png(path: Path, width: int, height: int) -> Path:
    """An RGB PNG written with zlib alone (a gradient), independent of any image library."""
    rows = b"".join(
        b"\x00" + bytes(v for x in range(width) for v in ((x * 255) // max(1, width - 1), (y * 255) // max(1, height - 1), 96))
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


# Policies that self-distillation learns go to a folder of the test run's own (the servers the
# tests start inherit it), never to the user's cache where a later run would find them; and each
# test has its own, so a model that learned in one test is unseen in the next.
# The run's folder is removed when the run ends (it was left in /tmp by every run before).
if "FLOWMM_POLICY_DIR" not in os.environ:
    _run_policy_dir = tempfile.TemporaryDirectory(prefix="flowmm-policies-")
    os.environ["FLOWMM_POLICY_DIR"] = _run_policy_dir.name


@pytest.fixture(autouse=True)
def _own_policy_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FLOWMM_POLICY_DIR", str(tmp_path_factory.mktemp("policies")))
