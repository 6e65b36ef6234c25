"""flowmm-edge: FlowMM KV-cache merging for multimodal GGUF models on llama.cpp.

Importing the package loads the patched libllama (see flowmm_edge.bindings.native) and fails with
a NativeLibraryError that says what to run if it is missing or stale.
"""

from .errors import DownloadError, FlowMMError, ModelFileError, NativeLibraryError
from .bindings.native import flowmm_version

__version__ = "0.1.0"

__all__ = [
    "DownloadError",
    "FlowMMError",
    "ModelFileError",
    "NativeLibraryError",
    "Session",
    "__version__",
    "flowmm_version",
]


def __getattr__(name: str):
    """`flowmm_edge.Session` without importing the chat machinery for every use of the package."""
    if name == "Session":
        from .app.session import Session

        return Session
    raise AttributeError(f"module 'flowmm_edge' has no attribute {name!r}")
