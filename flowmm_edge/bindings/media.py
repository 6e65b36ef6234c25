"""Reading the image bytes a user or a client names, with bounds: what `chat`'s /image, a Session
and `serve` all go through before a picture reaches the projector.

    data = read_image_file("cat.png")                                   # chat, Session: any path
    data = image_from_url(url, allowed_dir=None)                        # serve: data URLs only
    data = image_from_url(url, allowed_dir=Path("/srv/media"))          # serve --allowed-local-media

- A file is read only if it is a regular file (not a FIFO, a device such as /dev/zero, a socket
  or a directory), checked on the open descriptor (opened non-blocking, so a FIFO without a
  writer cannot hang the open), and only if its size is at most `max_bytes` (default 20 MiB,
  OpenAI's limit for an image). The read itself stops at max_bytes + 1, so a file that grows
  while it is read cannot run on either.
- A data URL's size is checked from its base64 length before it is decoded.
- A server reads local files only under an allowed directory (vLLM's --allowed-local-media-path):
  symlinks are resolved first, and a path outside the directory is refused with the same message
  whether or not it exists, so a client learns nothing about the server's files.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path

from ..errors import FlowMMError

MAX_IMAGE_BYTES = 20 * 2 ** 20  # OpenAI's per-image limit
LOCAL_REFUSED = ("local image paths are not read by this server: send the image as a data URL "
                 "(data:image/png;base64,...)")


class MediaError(FlowMMError):
    pass


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.0f} MiB" if n >= 2 ** 20 else f"{n} bytes"


def read_image_file(path: str | Path, max_bytes: int = MAX_IMAGE_BYTES, shown: str | None = None) -> bytes:
    """The bytes of a regular file of at most max_bytes; anything else is a one-line MediaError
    naming `shown` (default: the path)."""
    shown = str(path) if shown is None else shown
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError) as e:
        raise MediaError(f"{shown}: cannot read the image ({getattr(e, 'strerror', None) or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MediaError(f"{shown}: not a regular file, so not read as an image")
        if st.st_size > max_bytes:
            raise MediaError(f"{shown}: {_mib(st.st_size)} is above the image size limit of {_mib(max_bytes)}")
        chunks, left = [], max_bytes + 1
        while left > 0:
            block = os.read(fd, min(left, 1 << 20))
            if not block:
                break
            chunks.append(block)
            left -= len(block)
        if left <= 0:
            raise MediaError(f"{shown}: grew past the image size limit of {_mib(max_bytes)} while being read")
        return b"".join(chunks)
    except OSError as e:
        raise MediaError(f"{shown}: cannot read the image ({e.strerror or e})") from None
    finally:
        os.close(fd)


def _decode_data_url(url: str, max_bytes: int) -> bytes:
    head, _, data = url.partition(",")
    if not head.endswith(";base64") or not data:
        raise MediaError("an image data URL must be base64 (data:image/png;base64,...)")
    if (len(data) * 3) // 4 > max_bytes + 3:
        raise MediaError(f"an image data URL of about {_mib(len(data) * 3 // 4)} is above the image size limit "
                         f"of {_mib(max_bytes)}")
    try:
        out = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("an image data URL is not valid base64") from None
    if len(out) > max_bytes:
        raise MediaError(f"an image of {_mib(len(out))} is above the image size limit of {_mib(max_bytes)}")
    return out


def image_from_url(url: str, allowed_dir: Path | None = None, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """An OpenAI image_url's bytes: a base64 data URL, or (only with `allowed_dir`) a local path
    or file:// URL under that directory."""
    if url.startswith("data:"):
        return _decode_data_url(url, max_bytes)
    if url.startswith(("http://", "https://")):
        raise MediaError("image URLs are not fetched (no network): send the image as a data URL")
    if allowed_dir is None:
        raise MediaError(LOCAL_REFUSED)
    raw = url[len("file://"):] if url.startswith("file://") else url
    root = Path(allowed_dir).resolve()
    try:
        # symlinks resolved; a relative path is the current directory's, as for any local file (a
        # Session's caller names files as its shell would; serve's root check then applies)
        real = Path(raw).resolve(strict=False)
    except (OSError, RuntimeError, ValueError):
        raise MediaError(f"{raw}: not under the allowed media directory") from None
    if real != root and root not in real.parents:
        raise MediaError(f"{raw}: not under the allowed media directory")
    return read_image_file(real, max_bytes, shown=raw)
