"""The session file: a conversation and its compressed cache on disk, checked before use.

Layout (little-endian):

    b"FLOWMMS3"  u32 header length  u64 cache length  u64 logits length  u64 bias length  sha256 (32 bytes)
    header (JSON)  cache (llama.cpp's sequence state)  logits (float32)  slot bias (float32)

The slot bias (kv_cache.set_slot_bias) is not part of llama.cpp's state: it is stored apart,
[n_layer, n_head_kv, n_cells] with the cells in position order, or empty. Version 2 files (no
bias section, b"FLOWMMS2") are still read. The header's optional "tokens" (the token at each
position, -1 where an image sits) feeds reconstruction scores; a file without it resumes, and
its earlier positions are then not repeated.

The sha256 covers everything after it, so a flipped bit anywhere or a cut file is refused before
anything is restored. The header is then validated field by field (`read`), so a file that is
well framed but says something impossible gets a one-line error naming the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

from ..errors import FlowMMError

MAGIC, VERSION = b"FLOWMMS3", 3
FORMAT = "flowmm-edge/session"
_FRAME = struct.Struct("<IQQQ32s")
_FRAMES = {MAGIC: (VERSION, _FRAME), b"FLOWMMS2": (2, struct.Struct("<IQQ32s"))}  # magic -> (version, frame)
ROLES = ("system", "user", "assistant")


class SessionFileError(FlowMMError):
    pass


def write(path: str | Path, header: dict, cache: bytes, logits: bytes, bias: bytes = b"") -> None:
    """Write atomically (a temporary file renamed over `path`)."""
    blob = json.dumps({"format": FORMAT, "version": VERSION, **header}).encode()
    digest = hashlib.sha256(blob + cache + logits + bias).digest()
    tmp = Path(str(path) + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + _FRAME.pack(len(blob), len(cache), len(logits), len(bias), digest) + blob + cache + logits
                    + bias)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SessionFileError(f"{path}: cannot save the session ({e.strerror or e})") from None


def read(path: str | Path, stats_fields: tuple[str, ...], optional_stats: tuple[str, ...] = ()) -> tuple[dict, bytes, bytes, bytes]:
    """(header, cache bytes, logits bytes, bias bytes) of a whole, intact, well-formed session file
    (`optional_stats`: fields of `stats_fields` that files written before them lack)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise SessionFileError(f"{path}: cannot read the session file ({e.strerror or e})") from None
    magic = raw[:len(MAGIC)]
    if raw[:6] == MAGIC[:6] and magic not in _FRAMES:
        raise SessionFileError(f"{path}: a session file of another flowmm-edge version (this one reads "
                               f"versions {', '.join(str(v) for v, _ in sorted(_FRAMES.values()))})")
    if magic not in _FRAMES or len(raw) < len(MAGIC) + _FRAMES[magic][1].size:
        raise SessionFileError(f"{path}: not a flowmm-edge session file")
    version, frame = _FRAMES[magic]
    start = len(MAGIC) + frame.size
    *lengths, digest = frame.unpack(raw[len(MAGIC):start])
    n_blob, n_cache, n_logits, n_bias = lengths + [0] * (4 - len(lengths))
    if len(raw) != start + n_blob + n_cache + n_logits + n_bias:
        raise SessionFileError(f"{path}: the session file is truncated or corrupt (size differs from its header)")
    if hashlib.sha256(raw[start:]).digest() != digest:
        raise SessionFileError(f"{path}: the session file is corrupt (checksum mismatch)")
    try:
        header = json.loads(raw[start:start + n_blob])
    except ValueError:
        raise SessionFileError(f"{path}: the session header is not valid JSON") from None
    problem = _header_problem(header, stats_fields, version, optional_stats)
    if problem:
        raise SessionFileError(f"{path}: invalid session header: {problem}")
    cache = raw[start + n_blob:start + n_blob + n_cache]
    logits = raw[start + n_blob + n_cache:start + n_blob + n_cache + n_logits]
    bias = raw[start + n_blob + n_cache + n_logits:]
    if n_logits % 4 or n_bias % 4:
        raise SessionFileError(f"{path}: invalid session file: logits or bias of {n_logits}/{n_bias} bytes are not float32")
    return header, cache, logits, bias


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _header_problem(h, stats_fields: tuple[str, ...], version: int = VERSION,
                    optional_stats: tuple[str, ...] = ()) -> str | None:
    """What is wrong with a decoded header, naming the field; None when it is well formed."""
    if not isinstance(h, dict):
        return "not a JSON object"
    if h.get("format") != FORMAT or h.get("version") != version:
        return f"'format'/'version' are not {FORMAT!r} version {version}"
    model = h.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        return "'model' is missing or not a model fingerprint"
    if not isinstance(h.get("kv_type"), str):
        return "'kv_type' is missing or not a string"
    messages = h.get("messages")
    if not isinstance(messages, list):
        return "'messages' is missing or not a list"
    for i, m in enumerate(messages):
        if not (isinstance(m, list) and len(m) == 2 and m[0] in ROLES and isinstance(m[1], str)):
            return f"'messages'[{i}] is not a [role, text] pair with role one of {', '.join(ROLES)}"
    if not isinstance(h.get("cached_text"), str):
        return "'cached_text' is missing or not a string"
    pos = h.get("pos")
    if not _is_int(pos) or pos < 0:
        return "'pos' is missing or not a non-negative integer"
    names = h.get("label_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return "'label_names' is missing or not a list of names"
    labels = h.get("labels")
    if not isinstance(labels, list) or len(labels) != pos:
        return f"'labels' is missing or does not hold one label per position ({pos})"
    if not all(_is_int(v) and 0 <= v < len(names) for v in labels):
        return f"'labels' holds a value that is not an integer in [0, {len(names)})"
    tokens = h.get("tokens", [])  # optional (files before it hold none): the token at each position, -1 an image
    if not isinstance(tokens, list) or (tokens and len(tokens) != pos):
        return f"'tokens' is not a list of one token per position ({pos})"
    if not all(_is_int(v) and v >= -1 for v in tokens):
        return "'tokens' holds a value that is not an integer >= -1"
    stats = h.get("stats")
    if not isinstance(stats, dict) or set(stats) - set(optional_stats) != set(stats_fields) - set(optional_stats) \
            or not set(stats) <= set(stats_fields):
        return f"'stats' is missing or does not have the fields {', '.join(stats_fields)}"
    for k, v in stats.items():
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
            return f"'stats'.{k} is not a finite number >= 0"
    return None
