"""Where flowmm-edge keeps what it builds and downloads.

Standard library only: scripts/build_native.py loads this file before the package (and
llama-cpp-python) is installed.

Layout of the cache folder (``$FLOWMM_CACHE`` or ``$XDG_CACHE_HOME/flowmm-edge``):

    sdist/                      pinned llama-cpp-python sdist, sha256-verified
    src/llama_cpp_python-V/     the sdist, patched, with native/ copied in
    native/<backend>/bin/       libllama, libggml*, libmtmd of that backend
    models/                     generated test models and the assembled default model
    wheels/                     the PyPI packages the default model is assembled from
    python-wheels/              llama-cpp-python's Python layer, built once without compiling
    stock/src/, stock/native/   the stock (unpatched) llama.cpp and its libllama: bench's baseline
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

BACKENDS = ("cpu", "cuda", "metal")

# What shared libraries' file names start with on this platform (libggml-cpu-haswell.so, ggml-cpu-haswell.dll)
LIB_PREFIX = "" if sys.platform == "win32" else "lib"
SHARED_SUFFIX = {"win32": ".dll", "darwin": ".dylib"}.get(sys.platform, ".so")
LIBLLAMA = f"{LIB_PREFIX}llama{SHARED_SUFFIX}"  # the file a library folder must hold

# The file, inside the virtual environment, in which setup records the libraries it built.
NATIVE_POINTER = "flowmm-native.json"


def cache_dir() -> Path:
    env = os.environ.get("FLOWMM_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "flowmm-edge"


def python_wheels_dir() -> Path:
    """Wheels setup builds for `pip install --find-links` (llama-cpp-python's Python layer)."""
    return cache_dir() / "python-wheels"


def models_dir() -> Path:
    return cache_dir() / "models"


def default_backend() -> str:
    """FLOWMM_BACKEND if set, else Metal on macOS and CPU elsewhere."""
    backend = os.environ.get("FLOWMM_BACKEND", "").strip().lower()
    if backend:
        if backend not in BACKENDS:
            raise ValueError(f"FLOWMM_BACKEND={backend!r} is not one of {', '.join(BACKENDS)}")
        return backend
    return "metal" if sys.platform == "darwin" else "cpu"


def native_build_dir(backend: str) -> Path:
    return cache_dir() / "native" / backend


def stock_dir() -> Path:
    """The stock, unpatched llama.cpp's own cache folder (src/ and native/ as the patched one's)."""
    return cache_dir() / "stock"


def stock_build_dir(backend: str) -> Path:
    return stock_dir() / "native" / backend


def stock_lib_dir(backend: str) -> Path:
    return stock_build_dir(backend) / "bin"


def native_lib_dir(backend: str) -> Path:
    return native_build_dir(backend) / "bin"


def package_lib_dir() -> Path:
    """Where a wheel of this package carries its libraries (CMakeLists.txt installs them there)."""
    return Path(__file__).resolve().parent / "lib"


def installed_native_lib_dir() -> Path:
    """The folder flowmm_edge loads libllama/libmtmd from.

    FLOWMM_LIB_DIR wins; then the libraries installed with the package (`pip install`); then
    the folder setup recorded in the active virtual environment; then the default backend's
    build folder.
    """
    env = os.environ.get("FLOWMM_LIB_DIR")
    if env:
        return Path(env).expanduser()
    if (package_lib_dir() / LIBLLAMA).is_file():
        return package_lib_dir()
    pointer = Path(sys.prefix) / NATIVE_POINTER
    if pointer.is_file():
        try:
            return Path(json.loads(pointer.read_text())["lib_dir"])
        except (ValueError, KeyError, TypeError):
            pass
    return native_lib_dir(default_backend())


def repo_root() -> Path:
    """The source checkout this package runs from (scripts/ lives there)."""
    return Path(__file__).resolve().parent.parent
