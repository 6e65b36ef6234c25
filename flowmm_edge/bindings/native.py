"""The patched libllama/libmtmd, loaded through llama-cpp-python, and the FlowMM C API.

Importing this module points llama-cpp-python at the libraries scripts/build_native.py
built (unless LLAMA_CPP_LIB_PATH / MTMD_CPP_LIB already say otherwise) and checks that
the libllama it loaded carries the FlowMM extension.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
import threading

from .. import paths
from ..errors import NativeLibraryError

SETUP_HINT = "run scripts/setup.sh (or python scripts/build_native.py) to build the patched llama.cpp"

# The C API version these bindings were written against (native/flowmm.h). Before 1.0 a minor
# version may change the API (0.4 added flowmm_merge_plan.v_weight, 0.5 row groups, key matching and
# free cells, 0.8 flowmm_predictor's RoPE, 0.9 flowmm_abort_when_set, 0.10 statistics per sequence,
# 0.11 flowmm_kv_value_norms, 0.12 an iSWA memory is its full-attention cache, 0.13
# flowmm_kv_near_copies),
# so major and minor must match.
EXPECTED_VERSION = (0, 13)


def _point_llama_cpp_at_patched_build() -> str:
    lib_dir = str(paths.installed_native_lib_dir())
    if "llama_cpp" not in sys.modules:
        for var in ("LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB"):
            if not os.environ.get(var):
                os.environ[var] = lib_dir
    return lib_dir


_imported_first = "llama_cpp" in sys.modules  # by the caller, before flowmm_edge could point it at the patched build
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
    if _imported_first:
        raise NativeLibraryError(
            f"llama_cpp was imported before flowmm_edge and loaded a libllama without the FlowMM extension "
            f"({lib_path}): import flowmm_edge first, or set LLAMA_CPP_LIB_PATH={_expected_dir}") from None
    raise NativeLibraryError(f"{lib_path} was built without the FlowMM extension (no flowmm_version symbol); {SETUP_HINT}") from None

if lib.flowmm_version_number() // 100 != EXPECTED_VERSION[0] * 100 + EXPECTED_VERSION[1]:
    raise NativeLibraryError(
        f"{lib_path} carries FlowMM C API {lib.flowmm_version().decode()}, these bindings need "
        f"{EXPECTED_VERSION[0]}.{EXPECTED_VERSION[1]}.x; {SETUP_HINT}")


def flowmm_version() -> str:
    """Version string of the FlowMM native extension compiled into libllama."""
    return lib.flowmm_version().decode()


def mtmd_lib_path() -> str:
    from llama_cpp import mtmd_cpp

    return getattr(mtmd_cpp._libmtmd, "_name", "?")


# -- llama.cpp's and ggml's log ------------------------------------------------------------------
# One callback for libllama, libggml and libmtmd. It passes llama.cpp's errors to stderr (every
# line with FLOWMM_VERBOSE set) and, inside `captured_log()`, also records each line: that is how
# the backend variant ggml loaded and the buffer types a model's weights went to are read, from
# llama.cpp's own reports.

# ggml_log_level: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous line
LOG_ERROR, _LOG_CONT = 4, 5
_log = {"last": 0, "threshold": 0 if os.environ.get("FLOWMM_VERBOSE") else LOG_ERROR, "captures": []}


_thread = threading.local()  # .interrupt: the flag of a Context.interruptible() block this thread is in


@llama_cpp.llama_log_callback
def _log_router(level, text, _user_data):
    if level == _LOG_CONT:
        level = _log["last"]
    _log["last"] = level
    line = text.decode("utf-8", "replace")
    for capture in _log["captures"]:
        capture.append(line)
    flag = getattr(_thread, "interrupt", None)
    if flag is not None and flag.value:  # a decode stopped on purpose: llama.cpp's report of it is no error
        return
    if level >= _log["threshold"]:
        sys.stderr.write(line)


@contextlib.contextmanager
def quiet_when_interrupted(flag: ctypes.c_int32):
    """On this thread, inside the block: no log line once `flag` is set (llama.cpp reports an
    interrupted decode as failed graph computes)."""
    before, _thread.interrupt = getattr(_thread, "interrupt", None), flag
    try:
        yield
    finally:
        _thread.interrupt = before


class captured_log:
    """`with captured_log() as lines:` collects every line llama.cpp and ggml log meanwhile."""

    def __enter__(self) -> list[str]:
        self.lines: list[str] = []
        _log["captures"].append(self.lines)
        return self.lines

    def __exit__(self, *exc) -> None:
        _log["captures"].remove(self.lines)


def route_mtmd_logs() -> None:
    """Send the vision encoder's (clip) and mtmd's helpers' logs through the same callback."""
    from llama_cpp import mtmd_cpp

    mtmd_cpp.mtmd_log_set(_log_router, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(_log_router, ctypes.c_void_p(0))


llama_cpp.llama_log_set(_log_router, ctypes.c_void_p(0))


# -- ggml backends: the CPU variant for this CPU, and any GPU backend -----------------------------
# The build makes every backend a loadable module (GGML_BACKEND_DL, scripts/build_native.py), and
# ggml looks for modules next to the executable -- python here -- unless told where: load them
# from the folder libllama came from, before anything initialises llama.cpp.

lib.ggml_backend_load_all_from_path.restype = None
lib.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
lib.ggml_backend_reg_by_name.restype = ctypes.c_void_p
lib.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
lib.ggml_backend_dev_count.restype = ctypes.c_size_t
lib.ggml_backend_dev_get.restype = ctypes.c_void_p
lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
lib.ggml_backend_dev_name.restype = ctypes.c_char_p
lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
lib.ggml_backend_dev_description.restype = ctypes.c_char_p
lib.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]


def _load_backends(lib_dir: str) -> dict[str, str]:
    """Load the best module of each backend from lib_dir; returns {backend name: module path}."""
    if lib.ggml_backend_reg_by_name(b"CPU"):  # a build with the CPU backend linked in
        return {"CPU": "(linked into libggml)"}
    with captured_log() as lines:
        lib.ggml_backend_load_all_from_path(lib_dir.encode())
    loaded = dict(re.findall(r"loaded (\S+) backend from (.+?)\s*$", "".join(lines), re.MULTILINE))
    if not lib.ggml_backend_reg_by_name(b"CPU"):
        raise NativeLibraryError(f"no CPU backend in {lib_dir} runs on this CPU (no libggml-cpu-*.so module "
                                 f"loaded); {SETUP_HINT}")
    return loaded


loaded_backends: dict[str, str] = _load_backends(os.path.dirname(lib_path) if os.path.isabs(lib_path) else _expected_dir)


def cpu_variant() -> str:
    """The CPU backend module ggml chose for this CPU, e.g. 'haswell' (libggml-cpu-haswell.so)."""
    path = loaded_backends.get("CPU", "")
    m = re.search(r"ggml-cpu-([^/\\]+?)\.(so|dylib|dll)$", path)
    return m.group(1) if m else path or "unknown"


_features_fn = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)


class _Feature(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


def cpu_features() -> dict[str, str]:
    """The CPU features the loaded CPU backend reports (ggml_backend_get_features): those it was
    compiled for and found on this CPU, e.g. {'AVX2': '1', 'REPACK': '1', ...}."""
    reg = lib.ggml_backend_reg_by_name(b"CPU")
    addr = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features") if reg else None
    if not addr:
        return {}
    ptr = ctypes.cast(_features_fn(addr)(reg), ctypes.POINTER(_Feature))
    out, i = {}, 0
    while ptr[i].name:
        out[ptr[i].name.decode()] = ptr[i].value.decode()
        i += 1
    return out


def backend_devices() -> list[str]:
    """Names of the ggml devices llama.cpp can use (e.g. ['CPU'], ['CUDA0', 'CPU'])."""
    llama_cpp.llama_backend_init()
    return [lib.ggml_backend_dev_name(lib.ggml_backend_dev_get(i)).decode() for i in range(lib.ggml_backend_dev_count())]


def backend_device_descriptions() -> list[str]:
    """Each device as `name (description)`, in llama.cpp's order (-ts shares follow it); an RPC
    device's description is its server's endpoint."""
    llama_cpp.llama_backend_init()
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        out.append(f"{lib.ggml_backend_dev_name(dev).decode()} ({lib.ggml_backend_dev_description(dev).decode()})")
    return out
