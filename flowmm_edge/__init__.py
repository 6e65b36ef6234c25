"""flowmm-edge: FlowMM KV-cache merging for multimodal GGUF models on llama.cpp.

Importing the package loads the patched libllama (see flowmm_edge.native) and fails with
a NativeLibraryError that says what to run if it is missing or stale.
"""

from .errors import DownloadError, FlowMMError, ModelFileError, NativeLibraryError
from .native import flowmm_version

__version__ = "0.1.0"

__all__ = [
    "DownloadError",
    "FlowMMError",
    "ModelFileError",
    "NativeLibraryError",
    "__version__",
    "flowmm_version",
]
