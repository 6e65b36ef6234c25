"""Prompts as segments (text, or an image), each of a modality, fed into a context; the label of
every position they take is what the methods see (0 = text, 1 = image, then other names).

A text segment may carry a modality other than "text": it is fed as text, but labelled as that
modality. That is how a text-only model stands in for a vision model in calibration and eval.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..errors import FlowMMError


class PromptError(FlowMMError):
    pass


def valid_text(text: str | bytes) -> str:
    """Whatever a terminal, a pipe or a caller delivers, as text a model can take: bytes and the lone
    surrogates Python makes of undecodable input become UTF-8, each invalid byte U+FFFD; NULs (which
    would cut a C string) go."""
    if isinstance(text, str):
        try:
            text = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate outside the escape range
            text = text.encode("utf-8", "surrogatepass")
    return bytes(text).decode("utf-8", "replace").replace("\x00", "")


@dataclasses.dataclass(frozen=True)
class Segment:
    kind: str                         # "text" or "image"
    text: str = ""
    image: str | Path | bytes | None = None
    modality: str = "text"


class ModalityLabels:
    """Names to labels: text 0, image 1, other names 2, 3, ... in the order first seen."""

    def __init__(self):
        self.names = ["text", "image"]

    def __call__(self, name: str) -> int:
        if name not in self.names:
            self.names.append(name)
        return self.names.index(name)


def jsonl_lines(path: str | Path, what: str) -> list[tuple[str, object]]:
    """(where, parsed object or the JSON error) for each non-blank line; `where` is "file:line"."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise PromptError(f"{p}: cannot read the {what} file ({e.strerror or e})") from None
    out = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append((f"{p}:{i}", json.loads(line)))
            except ValueError as e:
                out.append((f"{p}:{i}", e))
    return out


def parse_segments(items, where: str, base_dir: Path | None = None) -> list[Segment]:
    """Segments from JSON ([{"type": "text", "text": ..., "modality": ...}, {"type": "image", "path": ...}])."""
    if not isinstance(items, list) or not items:
        raise PromptError(f"{where}: 'segments' must be a non-empty list")
    out = []
    for k, item in enumerate(items):
        if not isinstance(item, dict):
            raise PromptError(f"{where}: segment {k} is not an object")
        kind = item.get("type", "text")
        if kind == "text":
            text, modality = item.get("text"), item.get("modality", "text")
            if not isinstance(text, str) or not isinstance(modality, str) or not modality:
                raise PromptError(f"{where}: segment {k} needs a string 'text' (and a string 'modality')")
            out.append(Segment("text", text=text, modality=modality))
        elif kind == "image":
            path = item.get("path")
            if not isinstance(path, str):
                raise PromptError(f"{where}: image segment {k} needs a string 'path'")
            p = Path(path)
            out.append(Segment("image", image=p if p.is_absolute() or base_dir is None else base_dir / p, modality="image"))
        else:
            raise PromptError(f"{where}: segment {k} has unknown type {kind!r} (text or image)")
    return out


@dataclasses.dataclass
class Prepared:
    """Segments tokenized (text) and preprocessed (images), not yet decoded: `labels` holds the
    label of each position they will take, so statistics and budgets can be set up first."""

    pieces: list            # list[int] tokens, or a multimodal.PreparedImage
    labels: np.ndarray

    @property
    def n_pos(self) -> int:
        return len(self.labels)

    def close(self) -> None:
        for p in self.pieces:
            if not isinstance(p, list):
                p.close()

    def give_up(self, pieces) -> None:
        """Stop owning these prepared images: whoever took them closes them (close() skips them)."""
        self.pieces = [p for p in self.pieces if isinstance(p, list) or all(p is not q for q in pieces)]


def prepare(model, segments: list[Segment], labels: ModalityLabels, projector=None, add_bos: bool = False) -> Prepared:
    pieces, out = [], []
    try:
        for seg in segments:
            if seg.kind == "image":
                if projector is None:
                    raise PromptError("an image was given but the model has no mmproj (a text-only model)")
                img = projector.prepare(seg.image)
                pieces.append(img)
                for n_pos, is_image in img.spans:
                    out += [labels("image" if is_image else "text")] * n_pos
            else:
                tokens = model.tokenize(seg.text, add_special=add_bos, parse_special=True)
                add_bos = False
                if tokens:
                    pieces.append(tokens)
                    out += [labels(seg.modality)] * len(tokens)
    except BaseException:
        Prepared(pieces, np.zeros(0, np.int32)).close()
        raise
    return Prepared(pieces, np.asarray(out, dtype=np.int32))


def feed(ctx, prepared: Prepared, pos0: int, seq_id: int = 0) -> np.ndarray | None:
    """Decode a prepared prompt from position pos0; the logits after its last text token, or None
    if it ended on an image."""
    return feed_pieces(ctx, prepared.pieces, pos0, seq_id)


def feed_pieces(ctx, pieces: list, pos0: int, seq_id: int = 0) -> np.ndarray | None:
    """Decode prompt pieces (token lists, prepared images) from position pos0, as `feed` does."""
    pos, logits = pos0, None
    for p in pieces:
        if isinstance(p, list):
            logits = ctx.decode(p, pos, seq_id)
            pos += len(p)
        else:
            pos = p.eval(ctx, pos, seq_id)
            logits = None
    return logits
