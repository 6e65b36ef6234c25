"""Reading and validating GGUF files before llama.cpp sees them.

llama.cpp answers a bad file with a log line and a NULL model; here every problem becomes
a `ModelFileError` whose one-line message names the file and what is wrong with it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf

from .errors import ModelFileError

GGUF_MAGIC = b"GGUF"

# Text architectures whose KV cache the FlowMM extension handles: one cache, plain RoPE.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# Bytes per element of a KV cache row for the cache types flowmm-edge offers.
KV_TYPE_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


@dataclasses.dataclass(frozen=True)
class TextModelFacts:
    path: Path
    architecture: str
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ctx_train: int
    n_params: int
    file_size: int

    @property
    def supported(self) -> bool:
        return self.architecture in SUPPORTED_ARCHITECTURES

    def kv_bytes_per_token(self, kv_type: str = "f16") -> int:
        """K and V bytes one token takes in the cache, over all layers."""
        elems = self.n_layer * self.n_head_kv * (self.head_dim_k + self.head_dim_v)
        return int(round(elems * KV_TYPE_BYTES[kv_type]))


@dataclasses.dataclass(frozen=True)
class ProjectorFacts:
    path: Path
    name: str
    projector_type: str
    image_size: int
    patch_size: int
    n_embd_out: int  # must equal the text model's n_embd
    file_size: int


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """A GGUFReader over `path`, after checking that it exists, is a GGUF and is complete."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"{p}: no such file")
    if not p.is_file():
        raise ModelFileError(f"{p}: not a regular file")
    size = p.stat().st_size
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(f"{p}: cannot read ({e.strerror})") from None
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{p}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(p, "r")
    except Exception as e:  # gguf-py raises ValueError, IndexError, struct errors… on damage
        raise ModelFileError(f"{p}: truncated or corrupt GGUF ({type(e).__name__}: {e})") from None
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=reader.data_offset)
    if end > size:
        raise ModelFileError(f"{p}: truncated GGUF: tensor data ends at byte {end}, file has {size}")
    return reader


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _require(reader: gguf.GGUFReader, path: Path, key: str):
    value = _field(reader, key)
    if value is None:
        raise ModelFileError(f"{path}: GGUF has no '{key}' entry")
    return value


def architecture_of(path: str | Path) -> str:
    return str(_require(open_gguf(path), Path(path), "general.architecture"))


def read_text_model(path: str | Path) -> TextModelFacts:
    p = Path(path)
    reader = open_gguf(p)
    arch = str(_require(reader, p, "general.architecture"))
    if arch == "clip":
        raise ModelFileError(f"{p}: this is a vision projector (mmproj), not a text model")

    def key(suffix: str, default=None):
        return _field(reader, f"{arch}.{suffix}", default)

    n_embd = int(_require(reader, p, f"{arch}.embedding_length"))
    n_head = key("attention.head_count")
    if isinstance(n_head, list):  # per-layer head counts (hybrid models)
        raise ModelFileError(f"{p}: per-layer head counts ({arch}) are not supported")
    n_head = int(n_head or 0)
    n_head_kv = key("attention.head_count_kv", n_head)
    if isinstance(n_head_kv, list):
        raise ModelFileError(f"{p}: per-layer KV head counts ({arch}) are not supported")
    n_head_kv = int(n_head_kv)
    head_dim = n_embd // n_head if n_head else 0
    return TextModelFacts(
        path=p,
        architecture=arch,
        name=str(_field(reader, "general.name", p.stem)),
        n_layer=int(_require(reader, p, f"{arch}.block_count")),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=int(key("attention.key_length", head_dim)),
        head_dim_v=int(key("attention.value_length", head_dim)),
        n_ctx_train=int(key("context_length", 0)),
        n_params=sum(int(t.n_elements) for t in reader.tensors),
        file_size=p.stat().st_size,
    )


def read_projector(path: str | Path) -> ProjectorFacts:
    p = Path(path)
    reader = open_gguf(p)
    arch = str(_require(reader, p, "general.architecture"))
    if arch != "clip":
        raise ModelFileError(f"{p}: not a vision projector (mmproj): its architecture is '{arch}'")
    # the projector's last linear layer gives the width of the embeddings it feeds the text model
    n_out = 0
    for name in ("mm.2.weight", "mm.model.fc.weight", "mm.0.weight"):
        t = next((t for t in reader.tensors if t.name == name), None)
        if t is not None:
            n_out = int(t.shape[-1]) if len(t.shape) > 1 else int(t.shape[0])
            break
    return ProjectorFacts(
        path=p,
        name=str(_field(reader, "general.name", p.stem)),
        projector_type=str(_field(reader, "clip.projector_type", _field(reader, "clip.vision.projector_type", "?"))),
        image_size=int(_field(reader, "clip.vision.image_size", 0)),
        patch_size=int(_field(reader, "clip.vision.patch_size", 0)),
        n_embd_out=n_out,
        file_size=p.stat().st_size,
    )
