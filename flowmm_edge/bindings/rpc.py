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
import re
import socket
import subprocess
import sys
import time

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


_registered: list[str] = []  # endpoints whose devices this process registered, in order


def add_server(endpoint: str) -> None:
    """Register the device of the RPC server at host:port; models loaded afterwards may place
    layers (-ngl) and their KV cache on it. The server must accept a connection within
    CONNECT_TIMEOUT_S first: ggml-rpc aborts the process when it cannot connect, so an
    unreachable server is refused here with a one-line error instead. An endpoint registered
    before is not registered again (it would be a second device on the same server)."""
    host, port = parse_endpoint(endpoint)
    if endpoint in _registered:
        return
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise RPCError(f"cannot reach the RPC server at {endpoint} ({e.strerror or e})") from None
    reg = _ADD_SERVER(_proc("ggml_backend_rpc_add_server"))(endpoint.encode())
    if not reg:
        raise RPCError(f"cannot use the RPC server at {endpoint}")
    lib.ggml_backend_register(reg)
    _registered.append(endpoint)
    _stop_on_abort()


def add_servers(servers: str | list[str] | None) -> list[str]:
    """add_server for each of "HOST:PORT,HOST:PORT" (llama.cpp's --rpc) or a list; returns them."""
    if not servers:
        return []
    endpoints = [e.strip() for e in (servers.split(",") if isinstance(servers, str) else servers)]
    for endpoint in endpoints:
        add_server(endpoint)
    return endpoints


# ggml-rpc cannot go on when a server stops answering mid-call (a set_tensor or graph_compute has
# no error return): it calls GGML_ABORT, which prints a backtrace and aborts the process. With RPC
# servers registered, the abort is one line on stderr naming them, and the process exits with
# EXIT_RPC_LOST at once instead of dumping core; a supervisor (or the user) starts it again.
EXIT_RPC_LOST = 75  # EX_TEMPFAIL: the server may come back
_ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
_on_abort_ref = None


def abort_message(raw: bytes) -> str:
    """The one line printed when ggml aborts in a process with RPC servers."""
    text = re.sub(r"^\S+:\d+: ", "", raw.decode(errors="replace").strip())  # without ggml's file:line
    return (f"error: llama.cpp stopped: {text} (RPC servers: {', '.join(_registered)}); the cache held there "
            f"is lost, start again or /load a saved session")


def _stop_on_abort() -> None:
    global _on_abort_ref
    if _on_abort_ref is not None:
        return

    def on_abort(raw):
        os.write(2, (abort_message(raw or b"") + "\n").encode())
        os._exit(EXIT_RPC_LOST)

    _on_abort_ref = _ABORT_CALLBACK(on_abort)
    lib.ggml_set_abort_callback.restype = ctypes.c_void_p
    lib.ggml_set_abort_callback.argtypes = [_ABORT_CALLBACK]
    lib.ggml_set_abort_callback(_on_abort_ref)


def serve(endpoint: str, n_threads: int | None = None) -> None:
    """Serve this process's CPU backend as an RPC device at host:port (llama.cpp's rpc-server);
    blocks until the process ends."""
    cpu = lib.ggml_backend_dev_by_type(DEVICE_TYPE_CPU)
    if not cpu:
        raise RPCError("no CPU backend is loaded")
    devices = (ctypes.c_void_p * 1)(cpu)
    _START_SERVER(_proc("ggml_backend_rpc_start_server"))(endpoint.encode(), None,
                                                          n_threads or max(1, os.cpu_count() or 1), 1, devices)


def spawn_local(port: int, n_threads: int = 2, wait_s: float = 30.0) -> subprocess.Popen:
    """`python -m flowmm_edge rpc-server` on 127.0.0.1:port in a child process, returned once it
    accepts a connection (for tests and benchmarks; the caller kills it)."""
    proc = subprocess.Popen([sys.executable, "-m", "flowmm_edge", "rpc-server", "-p", str(port), "-t", str(n_threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise RPCError(f"the RPC server on 127.0.0.1:{port} did not listen within {wait_s:g} s")
