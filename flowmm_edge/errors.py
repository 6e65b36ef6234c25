"""Exceptions of flowmm-edge. Each carries a one-line message naming the problem."""


class FlowMMError(Exception):
    """Base class: the CLI prints `error: <message>` for these instead of a traceback."""


class ModelFileError(FlowMMError):
    """A model file is missing, unreadable, not a GGUF, truncated or of an unsupported kind."""


class NativeLibraryError(FlowMMError):
    """libllama/libmtmd are missing or were built without the FlowMM extension."""


class MethodError(FlowMMError):
    """A method's settings, statistics or budget cannot make a plan."""


class DownloadError(FlowMMError):
    """A package or file could not be fetched, or its checksum differs."""
