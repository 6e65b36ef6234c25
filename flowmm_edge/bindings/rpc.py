"""llama.cpp's RPC backend (ggml-rpc): tensors, and the KV cache with them, behind a socket.

    rpc.serve("127.0.0.1:50052")          # blocks: this process's CPU as an RPC device (rpc-server)
    rpc.add_server("127.0.0.1:50052")     # in the client: the server's device joins llama.cpp's
    runtime.Model(path, n_gpu_layers=99)  # layers and their KV cache on it

The build compiles the backend as a module beside libllama (scripts/build_native.py,
-DGGML_RPC=ON), which native.py loads with the others. A KV cache on an RPC device is not in this
process's memory: any native path that read it through a host pointer would fail there, as it
would on CUDA or Metal. The tests run every native path on it (tests/test_rpc_backend.py).
"""

from __future__ import annotations

import ctypes
import os
import socket

from ..errors import FlowMMError
from . import native

lib = native.lib  # libllama, linked against libggml: the backend registry's functions
lib.ggml_backend_reg_by_name.restype = ctypes.c_void_p
lib.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
lib.ggml_backend_register.restype = None
lib.ggml_backend_register.argtypes = [ctypes.c_void_p]
lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]

_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
_START_SERVER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                 ctypes.POINTER(ctypes.c_void_p))
DEVICE_TYPE_CPU = 0  # enum ggml_backend_dev_type
CONNECT_TIMEOUT_S = 3.0  # how long add_server waits for a server to accept a connection


class RPCError(FlowMMError):
    pass


def _proc(name: str):
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise RPCError("this build has no RPC backend (libggml-rpc): rebuild with scripts/setup.sh")
    addr = lib.ggml_backend_reg_get_proc_address(reg, name.encode())
    if not addr:
        raise RPCError(f"the RPC backend has no {name}")
    return addr


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RPCError(f"RPC server {endpoint!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def add_server(endpoint: str) -> None:
    """Register the device of the RPC server at host:port; models loaded afterwards may place
    layers (-ngl) and their KV cache on it. The server must accept a connection within
    CONNECT_TIMEOUT_S first: ggml-rpc aborts the process when it cannot connect, so an
    unreachable server is refused here with a one-line error instead."""
    host, port = parse_endpoint(endpoint)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise RPCError(f"cannot reach the RPC server at {endpoint} ({e.strerror or e})") from None
    reg = _ADD_SERVER(_proc("ggml_backend_rpc_add_server"))(endpoint.encode())
    if not reg:
        raise RPCError(f"cannot use the RPC server at {endpoint}")
    lib.ggml_backend_register(reg)


def serve(endpoint: str, n_threads: int | None = None) -> None:
    """Serve this process's CPU backend as an RPC device at host:port (llama.cpp's rpc-server);
    blocks until the process ends."""
    cpu = lib.ggml_backend_dev_by_type(DEVICE_TYPE_CPU)
    if not cpu:
        raise RPCError("no CPU backend is loaded")
    devices = (ctypes.c_void_p * 1)(cpu)
    _START_SERVER(_proc("ggml_backend_rpc_start_server"))(endpoint.encode(), None,
                                                          n_threads or max(1, os.cpu_count() or 1), 1, devices)
