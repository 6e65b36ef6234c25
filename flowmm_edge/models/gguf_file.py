"""Reading and validating GGUF files before llama.cpp sees them.

llama.cpp answers a bad file with a log line and a NULL model; here every problem becomes
a `ModelFileError` whose one-line message names the file and what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from pathlib import Path

import gguf

from ..errors import ModelFileError

GGUF_MAGIC = b"GGUF"

# Text architectures whose KV cache the FlowMM extension handles: plain RoPE, one cache or
# interleaved sliding-window attention (gemma3: its full-attention layers are merged).
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")

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


@dataclasses.dataclass(frozen=True)
class SkippedArray:
    """A large array value (a vocabulary, merges) whose elements the header scan skipped."""

    element_type: int
    count: int
    distinct: int | None = None  # of a string array: how many different strings (raw bytes) it holds


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne0 first
    tensor_type: int
    data_offset: int  # absolute, in the file
    n_bytes: int


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
    fields: dict
    tensors: list[TensorInfo]
    data_offset: int


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY = 4096  # decode arrays up to this many elements; skip larger ones


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def raw_string(self) -> bytes:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise EOFError("string runs past the end of the file")
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s

    def string(self) -> str:
        return self.raw_string().decode("utf-8", "replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if count > _KEEP_ARRAY:
                distinct = None
                if etype in _SCALARS:
                    self.pos += count * struct.calcsize(_SCALARS[etype])
                elif etype == _STRING:  # llama.cpp asserts (aborts) on a vocabulary with repeats
                    distinct = len({self.raw_string() for _ in range(count)})
                else:
                    for _ in range(count):
                        self.value(etype)
                if self.pos > len(self.buf):
                    raise EOFError("array runs past the end of the file")
                return SkippedArray(etype, count, distinct)
            return [self.value(etype) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {vtype}")


def _scan(buf) -> GGUFHeader:
    """GGUF v2/v3 header: key/values (big arrays skipped) and tensor infos."""
    c = _Cursor(buf)
    if c.unpack("<4s") != GGUF_MAGIC:
        raise ValueError("bad magic")
    version = c.unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
    fields = {}
    for _ in range(n_kv):
        key = c.string()
        fields[key] = c.value(c.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.unpack("<I")
        shape = tuple(c.unpack("<Q") for _ in range(n_dims))
        ttype, offset = c.unpack("<I"), c.unpack("<Q")
        infos.append((name, shape, ttype, offset))
    align = int(fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    data_offset = (c.pos + align - 1) // align * align
    tensors = []
    for name, shape, ttype, offset in infos:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        n_elements = 1
        for d in shape:
            n_elements *= d
        tensors.append(TensorInfo(name, shape, ttype, data_offset + offset, n_elements // block * type_size))
    return GGUFHeader(fields, tensors, data_offset)


def open_gguf(path: str | Path) -> GGUFHeader:
    """The header of the GGUF at `path`, after checking that it exists, is a GGUF and is complete.

    A scan of the header alone (large arrays such as the vocabulary are skipped, not
    decoded): gguf-py's GGUFReader decodes every array element and takes seconds on a
    real model's 150k-token vocabulary.
    """
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"{p}: no such file")
    if not p.is_file():
        raise ModelFileError(f"{p}: not a regular file")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
            if magic != GGUF_MAGIC:
                raise ModelFileError(f"{p}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
            size = os.fstat(f.fileno()).st_size
            want = 1 << 20
            while True:  # the header's length is known only once scanned: read more until it fits
                f.seek(0)
                buf = f.read(min(want, size))
                try:
                    header = _scan(buf)
                    break
                except (struct.error, EOFError):
                    if len(buf) >= size:
                        raise
                    want *= 8
    except OSError as e:
        raise ModelFileError(f"{p}: cannot read ({e.strerror or e})") from None
    except (struct.error, EOFError, ValueError, KeyError) as e:
        raise ModelFileError(f"{p}: truncated or corrupt GGUF header ({type(e).__name__}: {e})") from None
    end = max((t.data_offset + t.n_bytes for t in header.tensors), default=header.data_offset)
    if end > size:
        raise ModelFileError(f"{p}: truncated GGUF: tensor data ends at byte {end}, file has {size}")
    return header


def _field(header: GGUFHeader, key: str, default=None):
    return header.fields.get(key, default)


def _require(header: GGUFHeader, path: Path, key: str):
    value = _field(header, key)
    if value is None:
        raise ModelFileError(f"{path}: GGUF has no '{key}' entry")
    return value


def architecture_of(path: str | Path) -> str:
    return str(_require(open_gguf(path), Path(path), "general.architecture"))


def read_text_model(path: str | Path) -> TextModelFacts:
    p = Path(path)
    header = open_gguf(p)
    arch = str(_require(header, p, "general.architecture"))
    if arch == "clip":
        raise ModelFileError(f"{p}: this is a vision projector (mmproj), not a text model")

    def key(suffix: str, default=None):
        return _field(header, f"{arch}.{suffix}", default)

    tokens = _field(header, "tokenizer.ggml.tokens") or []
    if isinstance(tokens, SkippedArray):
        distinct, count = tokens.distinct, tokens.count
    else:
        distinct, count = len(set(tokens)), len(tokens)
    if distinct != count:
        raise ModelFileError(f"{p}: the vocabulary (tokenizer.ggml.tokens) lists a token twice: a corrupt file")
    n_embd = int(_require(header, p, f"{arch}.embedding_length"))
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
        name=str(_field(header, "general.name", p.stem)),
        n_layer=int(_require(header, p, f"{arch}.block_count")),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=int(key("attention.key_length", head_dim)),
        head_dim_v=int(key("attention.value_length", head_dim)),
        n_ctx_train=int(key("context_length", 0)),
        n_params=sum(math.prod(t.shape) for t in header.tensors),
        file_size=p.stat().st_size,
    )


def read_projector(path: str | Path) -> ProjectorFacts:
    p = Path(path)
    header = open_gguf(p)
    arch = str(_require(header, p, "general.architecture"))
    if arch != "clip":
        raise ModelFileError(f"{p}: not a vision projector (mmproj): its architecture is '{arch}'")
    # the projector's last linear layer gives the width of the embeddings it feeds the text model
    n_out = 0
    for name in ("mm.2.weight", "mm.model.fc.weight", "mm.0.weight"):
        t = next((t for t in header.tensors if t.name == name), None)
        if t is not None:
            n_out = int(t.shape[-1]) if len(t.shape) > 1 else int(t.shape[0])
            break
    return ProjectorFacts(
        path=p,
        name=str(_field(header, "general.name", p.stem)),
        projector_type=str(_field(header, "clip.projector_type", _field(header, "clip.vision.projector_type", "?"))),
        image_size=int(_field(header, "clip.vision.image_size", 0)),
        patch_size=int(_field(header, "clip.vision.patch_size", 0)),
        n_embd_out=n_out,
        file_size=p.stat().st_size,
    )


def renamed_copy(src: str | Path, dst: str | Path) -> Path:
    """A copy of the GGUF `src` at `dst` with the first letter of general.name changed: the same
    weights and header size, another fingerprint (calibration/policy.py), so no policy made for `src`
    applies to it: the model a user brings, for tests and scripts/learning_curve.py."""
    src, dst = Path(src), Path(dst)
    data = bytearray(src.read_bytes())
    name = read_text_model(src).name.encode()
    at = data.find(b"general.name") + len(b"general.name") + 4 + 8  # the key, its value type, the string's length
    if not name or data[at:at + len(name)] != name:
        raise ModelFileError(f"{src}: general.name is not where a GGUF string value would be")
    data[at] = ord("X") if data[at] != ord("X") else ord("Y")
    dst.write_bytes(bytes(data))
    return dst
