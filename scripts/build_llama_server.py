#!/usr/bin/env python3
"""Build stock llama.cpp's `llama-server` (the pinned version, unpatched) into the cache, for
`scripts/bench_serve.py --peer`: what a user would otherwise run, built at its fastest setting
for this machine (GGML_NATIVE). A bench tool, not shipped.

    python scripts/build_llama_server.py [--jobs 2]      # prints the binary's path

The source is the stock tree `build_native.py --stock` prepares (the same sdist, no FlowMM
patches); the build folder is the cache's stock/llama-server (ccache makes a second build quick).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_native  # noqa: E402

from flowmm_edge import paths  # noqa: E402


def build(jobs: int) -> Path:
    cache = paths.cache_dir()
    tree = build_native.prepare_source(cache, stock=True) / "vendor" / "llama.cpp"
    out = paths.stock_dir() / "llama-server"
    binary = out / "bin" / "llama-server"
    args = (["-G", "Ninja"] if shutil.which("ninja") else []) + [
        "-S", str(tree), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"]
    if shutil.which("ccache"):
        args += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
    if not (out / "CMakeCache.txt").is_file():
        subprocess.run(["cmake", *args], check=True)
    subprocess.run(["cmake", "--build", str(out), "--config", "Release", "-j", str(jobs), "--target", "llama-server"],
                   check=True)
    return binary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    print(build(ap.parse_args().jobs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
