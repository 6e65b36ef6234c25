"""Capture named graph tensors during llama_decode through llama.cpp's cb_eval callback."""

from __future__ import annotations

import ctypes

import numpy as np

from flowmm_edge.bindings.native import lib, llama_cpp


class _TensorHead(ctypes.Structure):  # the leading fields of struct ggml_tensor (ggml.h)
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4)]


lib.ggml_get_name.restype = ctypes.c_char_p
lib.ggml_get_name.argtypes = [ctypes.c_void_p]
lib.ggml_nbytes.restype = ctypes.c_size_t
lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
lib.ggml_backend_tensor_get.restype = None
lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]

GGML_TYPE_F32 = 0


class Capture:
    """cb_eval callback keeping the last F32 value of each wanted tensor name, shaped [ne3, ne2, ne1, ne0]."""

    def __init__(self, names):
        self.names = set(names)
        self.tensors: dict[str, np.ndarray] = {}  # last value of each name
        self.calls: dict[str, list[np.ndarray]] = {}  # every value, in evaluation order
        self.enabled = True
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._cb)

    def _cb(self, t, ask, _user_data):
        name = lib.ggml_get_name(t).decode()
        if ask:
            return self.enabled and name in self.names
        if name in self.names:
            head = _TensorHead.from_address(t)
            assert head.type == GGML_TYPE_F32, f"{name} is not F32"
            n = lib.ggml_nbytes(t)
            buf = np.empty(n // 4, dtype=np.float32)
            lib.ggml_backend_tensor_get(t, buf.ctypes.data, 0, n)
            self.tensors[name] = buf.reshape(tuple(reversed(list(head.ne))))
            self.calls.setdefault(name, []).append(self.tensors[name])
        return True
