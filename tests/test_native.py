"""flowmm_version() is compiled into libllama and reachable from Python."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flowmm_edge import paths
from flowmm_edge.bindings import native
from flowmm_edge.errors import FlowMMError

HEADER = Path(__file__).resolve().parent.parent / "native" / "flowmm.h"


def header_version() -> tuple[int, int, int]:
    text = HEADER.read_text()
    return tuple(int(re.search(rf"#define FLOWMM_VERSION_{k}\s+(\d+)", text).group(1)) for k in ("MAJOR", "MINOR", "PATCH"))


def test_flowmm_version_matches_the_header():
    major, minor, patch = header_version()
    assert native.flowmm_version() == f"{major}.{minor}.{patch}"
    assert native.lib.flowmm_version_number() == major * 10000 + minor * 100 + patch


def test_loaded_libraries_are_the_patched_build():
    lib_dir = paths.installed_native_lib_dir().resolve()
    assert Path(native.lib_path).resolve().parent == lib_dir
    assert Path(native.mtmd_lib_path()).resolve().parent == lib_dir


def test_library_without_flowmm_is_refused_with_a_hint(tmp_path):
    """A libllama lacking the FlowMM symbols: importing flowmm_edge says what to run."""
    import subprocess
    import sys

    # an empty shared library named libllama stands in for a stock build
    src = tmp_path / "empty.c"
    src.write_text("int not_llama(void) { return 0; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / "libllama.so"), str(src)], check=True)
    proc = subprocess.run([sys.executable, "-c", "import flowmm_edge"], capture_output=True, text=True,
                          env={**__import__("os").environ, "FLOWMM_LIB_DIR": str(tmp_path),
                               "LLAMA_CPP_LIB_PATH": "", "MTMD_CPP_LIB": ""})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "NativeLibraryError" in last and "scripts/setup.sh" in last


@pytest.mark.parametrize("fa, said", [("on", "enabled"), ("off", "disabled"), ("auto", "auto"), (True, "enabled")])
def test_flash_attention_settings_reach_llama_cpp(model, fa, said):
    """-fa on|off|auto as llama.cpp's own context report states them; auto is resolved by llama.cpp
    (on a device that supports flash attention, the CPU included, it says so)."""
    from flowmm_edge.bindings import runtime

    with native.captured_log() as lines:
        runtime.Context(model, n_ctx=256, flash_attn=fa, n_threads=2).close()
    log = "".join(lines)
    assert re.search(rf"flash_attn\s+=\s+{said}", log), log[-2000:]
    if fa == "auto":
        assert "Flash Attention enabled" in log or "Flash Attention disabled" in log
    with pytest.raises(FlowMMError, match="flash attention"):
        runtime.Context(model, n_ctx=256, flash_attn="sometimes")


def test_llama_cpp_imported_first_still_loads_the_patched_library(tmp_path):
    """A user's script that imports llama_cpp before flowmm_edge (the press's usual order) gets
    the patched libllama in the set-up's environment; where llama_cpp loaded a library without the
    extension, importing flowmm_edge says in one line what to do."""
    code = ("import llama_cpp, flowmm_edge; from flowmm_edge.bindings import native; "
            "print(native.flowmm_version())")
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 0 and r.stdout.strip().startswith("0."), r.stderr
    # a libllama without the extension (a stock build), stood in for by hiding its flowmm_* symbols
    stock = ("import llama_cpp; from llama_cpp import llama_cpp as L\n"
             "class Stock:\n"
             "    def __init__(self, lib): self._lib, self._name = lib, lib._name\n"
             "    def __getattr__(self, name):\n"
             "        if name.startswith('flowmm'): raise AttributeError(name)\n"
             "        return getattr(self._lib, name)\n"
             "L._lib = Stock(L._lib)\n" + code)
    r = subprocess.run([sys.executable, "-c", stock], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "imported before flowmm_edge" in last and "import flowmm_edge first" in last, r.stderr[-2000:]
