"""Images through llama.cpp's mtmd: an `mmproj` checked against its text model, images decoded
into a context at given positions (what the methods then see as a span of one modality)."""

from __future__ import annotations

import ctypes
import io
from pathlib import Path

from ..models import gguf_file
from . import media, runtime
from ..errors import FlowMMError, ModelFileError
from .native import llama_cpp  # noqa: F401  (loads the patched libraries first)

from llama_cpp import mtmd_cpp  # noqa: E402


# Pixel limits, checked from the image's header before anything is decoded. Vision encoders see a few
# hundred pixels a side, so a large photo loses nothing by being shrunk first; a huge one is refused.
MAX_IMAGE_PIXELS = 100_000_000      # refused above (decoding alone would take 300 MB or more)
DOWNSCALE_ABOVE = 4096 * 4096       # shrunk to about this many pixels (aspect kept) before mtmd decodes it

IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"8BPS",
                    b"P1", b"P2", b"P3", b"P4", b"P5", b"P6", b"#?RADIANCE", b"#?RGBE")


class ImageError(FlowMMError):
    """An image that cannot be read or decoded."""


def check_pair(model: gguf_file.TextModelFacts, proj: gguf_file.ProjectorFacts) -> None:
    """The mmproj must feed embeddings as wide as the text model's."""
    if proj.n_embd_out != model.n_embd:
        raise ModelFileError(f"{proj.path}: this mmproj makes {proj.n_embd_out}-wide embeddings but "
                             f"{model.path.name} takes {model.n_embd}: it belongs to another model")


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image's header, without decoding it; None if Pillow cannot tell."""
    from PIL import Image

    # our own limit (MAX_IMAGE_PIXELS) is the lower one: lift Pillow's bomb check to read the size
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except (OSError, ValueError, SyntaxError):
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


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
        self.max_image_bytes = media.MAX_IMAGE_BYTES  # the largest image file prepare() reads
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
                data = media.read_image_file(image, self.max_image_bytes)
            except media.MediaError as e:
                raise ImageError(str(e)) from None
        if not data:
            raise ImageError(f"{name}: the image file is empty")
        if not data.startswith(IMAGE_SIGNATURES):  # decided here: mtmd would go on to probe it as a video
            raise ImageError(f"{name}: not a readable image (PNG, JPEG, GIF, BMP, PNM or PSD)")
        size = image_size(data)
        if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
            raise ImageError(f"{name}: {size[0]}x{size[1]} pixels is above the limit of "
                             f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels")
        if size is not None and size[0] * size[1] > DOWNSCALE_ABOVE:
            return self._downscaled_bitmap(data, name, size)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        bmp = mtmd_cpp.mtmd_helper_bitmap_init_from_buf(self.ptr, buf, len(data), False)
        if not bmp:
            raise ImageError(f"{name}: not a readable image (PNG, JPEG, BMP, GIF, ...)")
        return bmp, None

    @staticmethod
    def _downscaled_bitmap(data: bytes, name: str, size: tuple[int, int]):
        from PIL import Image

        scale = (DOWNSCALE_ABOVE / (size[0] * size[1])) ** 0.5
        target = (max(1, int(size[0] * scale)), max(1, int(size[1] * scale)))
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.draft("RGB", target)  # JPEG: decode at a reduced scale directly
                small = img.convert("RGB")
                small.thumbnail(target, Image.Resampling.LANCZOS)
        except (OSError, ValueError) as e:
            raise ImageError(f"{name}: not a readable image ({e})") from None
        pixels = small.tobytes()
        buf = (ctypes.c_uint8 * len(pixels)).from_buffer_copy(pixels)
        bmp = mtmd_cpp.mtmd_bitmap_init(small.width, small.height, buf)
        if not bmp:
            raise ImageError(f"{name}: mtmd could not take the downscaled image")
        return bmp, f"{name}: downscaled from {size[0]}x{size[1]} to {small.width}x{small.height} pixels"

    def prepare(self, image: str | Path | bytes) -> "PreparedImage":
        """Read and preprocess an image (nothing is decoded yet): its spans are known up front.
        `.note` says if it was downscaled."""
        bmp, note = self._bitmap(image)
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
        prepared = PreparedImage(self, chunks)
        prepared.note = note
        return prepared


class PreparedImage(runtime._Handle):
    """An image's mtmd chunks: spans [(n_pos, is_image)] in order (some projectors wrap the image
    in text tokens of their own), decoded by eval()."""

    note: str | None = None  # set when the image was downscaled

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
