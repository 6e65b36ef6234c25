"""Images through llama.cpp's mtmd: an `mmproj` checked against its text model, images decoded
into a context at given positions (what the methods then see as a span of one modality)."""

from __future__ import annotations

import ctypes
from pathlib import Path

from . import gguf_file, runtime
from .errors import FlowMMError, ModelFileError
from .native import llama_cpp  # noqa: F401  (loads the patched libraries first)

from llama_cpp import mtmd_cpp  # noqa: E402


IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"8BPS",
                    b"P1", b"P2", b"P3", b"P4", b"P5", b"P6", b"#?RADIANCE", b"#?RGBE")


class ImageError(FlowMMError):
    """An image that cannot be read or decoded."""


def check_pair(model: gguf_file.TextModelFacts, proj: gguf_file.ProjectorFacts) -> None:
    """The mmproj must feed embeddings as wide as the text model's."""
    if proj.n_embd_out != model.n_embd:
        raise ModelFileError(f"{proj.path}: this mmproj makes {proj.n_embd_out}-wide embeddings but "
                             f"{model.path.name} takes {model.n_embd}: it belongs to another model")


class Projector(runtime._Handle):
    """An mmproj loaded for `model`."""

    def __init__(self, path: str | Path, model: runtime.Model, n_threads: int = 2, use_gpu: bool = False):
        facts = gguf_file.read_projector(path)
        check_pair(model.facts, facts)
        self.facts, self.model = facts, model
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        params.warmup = False
        self.ptr = mtmd_cpp.mtmd_init_from_file(str(path).encode(), model.ptr, params)
        if not self.ptr:
            raise ModelFileError(f"{path}: mtmd could not load this mmproj (see the error above)")
        if not mtmd_cpp.mtmd_support_vision(self.ptr):
            raise ModelFileError(f"{path}: this projector has no vision encoder")

    def _free(self, ptr) -> None:
        mtmd_cpp.mtmd_free(ptr)

    def _bitmap(self, image: str | Path | bytes):
        if isinstance(image, (bytes, bytearray)):
            data, name = bytes(image), "image bytes"
        else:
            name = str(image)
            try:
                data = Path(image).read_bytes()
            except OSError as e:
                raise ImageError(f"{image}: cannot read the image ({e.strerror or e})") from None
        if not data:
            raise ImageError(f"{name}: the image file is empty")
        if not data.startswith(IMAGE_SIGNATURES):  # decided here: mtmd would go on to probe it as a video
            raise ImageError(f"{name}: not a readable image (PNG, JPEG, GIF, BMP, PNM or PSD)")
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        bmp = mtmd_cpp.mtmd_helper_bitmap_init_from_buf(self.ptr, buf, len(data), False)
        if not bmp:
            raise ImageError(f"{name}: not a readable image (PNG, JPEG, BMP, GIF, ...)")
        return bmp

    def prepare(self, image: str | Path | bytes) -> "PreparedImage":
        """Read and preprocess an image (nothing is decoded yet): its spans are known up front."""
        bmp = self._bitmap(image)
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        try:
            marker = mtmd_cpp.mtmd_default_marker()
            text = mtmd_cpp.mtmd_input_text(marker, len(marker), False, True)
            bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bmp)
            rc = mtmd_cpp.mtmd_tokenize(self.ptr, chunks, ctypes.byref(text), bitmaps, 1)
        finally:
            mtmd_cpp.mtmd_bitmap_free(bmp)
        if rc != 0:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            raise ImageError(f"mtmd could not preprocess the image (code {rc})")
        return PreparedImage(self, chunks)


class PreparedImage(runtime._Handle):
    """An image's mtmd chunks: spans [(n_pos, is_image)] in order (some projectors wrap the image
    in text tokens of their own), decoded by eval()."""

    def __init__(self, projector: Projector, chunks):
        self.projector, self.ptr = projector, chunks
        self.chunks, self.spans = [], []
        for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
            chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            n_pos = mtmd_cpp.mtmd_input_chunk_get_n_pos(chunk)
            if n_pos:
                self.chunks.append(chunk)
                self.spans.append((n_pos, mtmd_cpp.mtmd_input_chunk_get_type(chunk) != mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT))

    @property
    def n_pos(self) -> int:
        return sum(n for n, _ in self.spans)

    def eval(self, ctx: runtime.Context, pos: int, seq_id: int = 0) -> int:
        """Decode at `pos`; returns the next position."""
        for chunk in self.chunks:
            new_pos = llama_cpp.llama_pos(0)
            rc = mtmd_cpp.mtmd_helper_eval_chunk_single(self.projector.ptr, ctx.ptr, chunk, pos, seq_id, ctx.n_batch,
                                                        False, ctypes.byref(new_pos))
            if rc != 0:
                raise runtime.DecodeError(f"decoding the image failed (code {rc}; cache full?)")
            pos = new_pos.value
        return pos

    def _free(self, ptr) -> None:
        mtmd_cpp.mtmd_input_chunks_free(ptr)
