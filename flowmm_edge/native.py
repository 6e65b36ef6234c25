"""The patched libllama/libmtmd, loaded through llama-cpp-python, and the FlowMM C API.

Importing this module points llama-cpp-python at the libraries scripts/build_native.py
built (unless LLAMA_CPP_LIB_PATH / MTMD_CPP_LIB already say otherwise) and checks that
the libllama it loaded carries the FlowMM extension.
"""

from __future__ import annotations

import ctypes
import os
import sys

from . import paths
from .errors import NativeLibraryError

SETUP_HINT = "run scripts/setup.sh (or python scripts/build_native.py) to build the patched llama.cpp"

# The C API version these bindings were written against (native/flowmm.h).
EXPECTED_VERSION_MAJOR = 0


def _point_llama_cpp_at_patched_build() -> str:
    lib_dir = str(paths.installed_native_lib_dir())
    if "llama_cpp" not in sys.modules:
        for var in ("LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB"):
            if not os.environ.get(var):
                os.environ[var] = lib_dir
    return lib_dir


_expected_dir = _point_llama_cpp_at_patched_build()

try:
    import llama_cpp  # noqa: E402
    from llama_cpp import llama_cpp as _llama_cpp  # noqa: E402
except (ImportError, OSError, RuntimeError, AttributeError) as e:  # Python layer or libllama missing
    raise NativeLibraryError(f"cannot load llama-cpp-python's libllama from {_expected_dir} ({e}); {SETUP_HINT}") from None

lib: ctypes.CDLL = _llama_cpp._lib
lib_path: str = getattr(lib, "_name", "?")

try:
    lib.flowmm_version.restype = ctypes.c_char_p
    lib.flowmm_version.argtypes = []
    lib.flowmm_version_number.restype = ctypes.c_int32
    lib.flowmm_version_number.argtypes = []
except AttributeError:
    raise NativeLibraryError(f"{lib_path} was built without the FlowMM extension (no flowmm_version symbol); {SETUP_HINT}") from None

if lib.flowmm_version_number() // 10000 != EXPECTED_VERSION_MAJOR:
    raise NativeLibraryError(
        f"{lib_path} carries FlowMM C API {lib.flowmm_version().decode()}, these bindings need "
        f"{EXPECTED_VERSION_MAJOR}.x; {SETUP_HINT}")


def flowmm_version() -> str:
    """Version string of the FlowMM native extension compiled into libllama."""
    return lib.flowmm_version().decode()


def mtmd_lib_path() -> str:
    from llama_cpp import mtmd_cpp

    return getattr(mtmd_cpp._libmtmd, "_name", "?")


# ggml's device registry, reached through libllama's handle (libggml is loaded with it)
lib.ggml_backend_dev_count.restype = ctypes.c_size_t
lib.ggml_backend_dev_get.restype = ctypes.c_void_p
lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
lib.ggml_backend_dev_name.restype = ctypes.c_char_p
lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]


def backend_devices() -> list[str]:
    """Names of the ggml devices llama.cpp can use (e.g. ['CPU'], ['CUDA0', 'CPU'])."""
    llama_cpp.llama_backend_init()
    return [lib.ggml_backend_dev_name(lib.ggml_backend_dev_get(i)).decode() for i in range(lib.ggml_backend_dev_count())]
