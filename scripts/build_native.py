#!/usr/bin/env python3
"""Build the patched llama.cpp that flowmm-edge runs on.

    python scripts/build_native.py [--backend cpu|cuda|metal] [--jobs N] [--record-in VENV]

1. downloads the pinned llama-cpp-python sdist (cached) and checks its sha256;
2. extracts it, applies every patches/*.patch (stopping at the first hunk that fails) and
   copies native/ into vendor/llama.cpp/src/flowmm, where the patch's hook compiles it into
   libllama; files whose content did not change keep their timestamps, so a rebuild
   recompiles only what changed;
3. configures (once) and builds libllama, libggml* and libmtmd in a persistent folder,
   with ccache when it is installed.

Idempotent: with nothing changed, a second run compiles nothing. Standard library only.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PACKAGE_INDEX = os.environ.get("FLOWMM_PACKAGE_INDEX", "https://pypi.org/simple")

# Where native/ lands inside the vendored tree; patches/0001 compiles src/flowmm/*.cpp.
NATIVE_DEST = Path("vendor/llama.cpp/src/flowmm")
BUILD_TARGETS = ("llama", "mtmd")

# The stock build (--stock): the pinned llama.cpp as upstream ships it, which `bench` times
# against the patched build with FlowMM off. Of patches/ it takes only those that change what
# CMake compiles and no source (0006, the CPU variant filter), so both builds carry the same CPU
# variants and differ exactly by the FlowMM hooks and native/. Only libllama is needed from it.
STOCK_PATCHES = ("0006-ggml-cpu-variant-selection.patch",)
STOCK_TARGETS = ("llama",)

# The CPU backend is built the way llama.cpp's releases and Ollama ship it: GGML_BACKEND_DL with
# GGML_CPU_ALL_VARIANTS and GGML_NATIVE off. Each variant is a libggml-cpu-<name> module compiled
# for one instruction-set level; at run time ggml scores every module against the running CPU
# (cpuid / hwcaps) and loads the best one, so one build runs on any CPU of its architecture and a
# cache or image moved to an older CPU never meets an illegal instruction.
#
# Of the variants ggml defines, these are built (each costs a full ggml-cpu compile). A CPU gets
# the highest one it supports; anything older than the second entry gets the baseline, slow but
# correct. `sapphirerapids` is left out on purpose: it is the only variant that compiles ggml's AMX
# extra buffer type, whose Q4_K matmul crashes in the pinned llama.cpp (upstream #20824); an AMX
# Xeon loads `zen4` (AVX-512 VBMI/VNNI/BF16) instead and keeps the CPU repack buffers.
# An architecture not listed builds every variant ggml defines for it. patches/0006 adds the
# GGML_CPU_VARIANTS filter: upstream builds all of them, as libggml depends on each.
CPU_VARIANTS = {
    "x86_64": ("x64", "haswell", "skylakex", "icelake", "zen4"),
    "aarch64-linux": ("armv8.0_1", "armv8.2_2", "armv8.6_1", "armv9.2_1"),
}


def _load_stdlib_module(name: str):
    """A standard-library-only module of flowmm_edge, loaded without importing the package
    (whose __init__ needs the libraries this script builds)."""
    spec = importlib.util.spec_from_file_location(f"flowmm_{name}", REPO / "flowmm_edge" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


paths = _load_stdlib_module("paths")
sha256_of = _load_stdlib_module("checksums").sha256_of


class BuildError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[build_native] {msg}", flush=True)


# ---------------------------------------------------------------------------------------
# 1. the pinned sdist


def sdist_url(index: str = PACKAGE_INDEX) -> str:
    """The sdist's download URL, read from the package index's simple page (PEP 503)."""
    page_url = f"{index.rstrip('/')}/llama-cpp-python/"
    with urllib.request.urlopen(page_url, timeout=60) as resp:
        page = resp.read().decode("utf-8", "replace")
    for href in re.findall(r'href="([^"]+)"', page):
        if href.split("#")[0].endswith("/" + SDIST_NAME):
            return urllib.parse.urljoin(page_url, href.split("#")[0])
    raise BuildError(f"{SDIST_NAME} is not listed on {page_url}")


def fetch_sdist(cache: Path) -> Path:
    dest = cache / "sdist" / SDIST_NAME
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        url = sdist_url()
        log(f"downloading {url}")
        tmp = dest.with_suffix(".part")
        with urllib.request.urlopen(url, timeout=300) as resp, open(tmp, "wb") as f:
            shutil.copyfileobj(resp, f)
        tmp.replace(dest)
    digest = sha256_of(dest)
    if digest != SDIST_SHA256:
        raise BuildError(
            f"{dest}: sha256 {digest} differs from the pinned {SDIST_SHA256}; "
            "refusing to build from it (delete the file to download it again)"
        )
    return dest


# ---------------------------------------------------------------------------------------
# 2. patched source tree


def patch_files(repo: Path = REPO) -> list[Path]:
    return sorted((repo / "patches").glob("*.patch"))


def native_files(repo: Path = REPO) -> list[Path]:
    return sorted(p for p in (repo / "native").iterdir() if p.is_file() and p.suffix in (".h", ".cpp", ".c"))


def extract_sdist(sdist: Path, dest_parent: Path) -> Path:
    with tarfile.open(sdist) as tar:
        tar.extractall(dest_parent, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(dest_parent)
    return dest_parent / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"


def apply_patches(tree: Path, patches: list[Path]) -> None:
    """Apply each patch with `patch -p1`; on failure raise with the hunks that failed."""
    for p in patches:
        cmd = ["patch", "-p1", "--forward", "--batch", "--fuzz=0", "--no-backup-if-mismatch", "-r", "-", "-i", str(p)]
        dry = subprocess.run(cmd + ["--dry-run"], cwd=tree, capture_output=True, text=True)
        if dry.returncode != 0:
            raise BuildError(f"{p.name} does not apply to llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}:\n{dry.stdout}{dry.stderr}")
        subprocess.run(cmd, cwd=tree, check=True, capture_output=True, text=True)


def install_native(tree: Path, sources: list[Path]) -> None:
    if not sources:  # the stock tree
        return
    dest = tree / NATIVE_DEST
    dest.mkdir(parents=True, exist_ok=True)
    for src in sources:
        shutil.copy2(src, dest / src.name)


def sync_tree(staging: Path, tree: Path) -> int:
    """Make `tree` equal to `staging`, touching only files whose content differs.

    Returns how many files changed. Unchanged files keep their timestamps, so the build
    system recompiles only what really changed.
    """
    changed = 0
    for root, dirs, files in os.walk(staging):
        rel = Path(root).relative_to(staging)
        (tree / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            src, dst = Path(root) / name, tree / rel / name
            if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
                continue
            shutil.copy2(src, dst)
            os.utime(dst)  # newer than any object built from the old content
            changed += 1
    for root, dirs, files in os.walk(tree, topdown=False):
        rel = Path(root).relative_to(tree)
        for name in files:
            if not (staging / rel / name).exists():
                (Path(root) / name).unlink()
                changed += 1
        if not (staging / rel).exists():
            shutil.rmtree(root, ignore_errors=True)
    return changed


def source_fingerprint(patches: list[Path], sources: list[Path]) -> str:
    h = hashlib.sha256(SDIST_SHA256.encode())
    for p in patches + sources:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def prepare_source(cache: Path, repo: Path = REPO, stock: bool = False) -> Path:
    """The patched source tree in the cache, brought up to date with patches/ and native/; with
    `stock`, the stock tree (only STOCK_PATCHES, no native/) in the cache's stock/ folder."""
    sdist = fetch_sdist(cache)
    patches, sources = patch_files(repo), native_files(repo)
    if stock:
        patches, sources, cache = [p for p in patches if p.name in STOCK_PATCHES], [], paths.stock_dir()
        cache.mkdir(parents=True, exist_ok=True)
    tree = cache / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    stamp = tree / ".flowmm-source-fingerprint"
    fingerprint = source_fingerprint(patches, sources)
    if stamp.is_file() and stamp.read_text().strip() == fingerprint:
        log(f"source tree up to date: {tree}")
        return tree
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        staging = extract_sdist(sdist, Path(tmp))
        apply_patches(staging, patches)
        install_native(staging, sources)
        changed = sync_tree(staging, tree)
    stamp.write_text(fingerprint + "\n")
    log(f"source tree {tree}: {changed} file(s) updated ({len(patches)} patch(es), {len(sources)} native file(s))")
    return tree


# ---------------------------------------------------------------------------------------
# 3. configure and build


def cmake_args(backend: str, tree: Path, build: Path) -> list[str]:
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    args = generator + [
        "-S", str(tree), "-B", str(build),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_BUILD=ON", "-DLLAVA_BUILD=ON",
        "-DLLAMA_OPENSSL=OFF",
        # mtmd is added outside llama.cpp's scope: put every library in one folder
        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={build / 'bin'}",
        f"-DCMAKE_RUNTIME_OUTPUT_DIRECTORY={build / 'bin'}",
        # one file per library (libllama.so, no .so.0 links): a wheel cannot hold symbolic links,
        # and two copies of one library under two names would be loaded twice
        "-DCMAKE_PLATFORM_NO_VERSIONED_SONAME=ON",
        f"-DGGML_CUDA={'ON' if backend == 'cuda' else 'OFF'}",
        f"-DGGML_METAL={'ON' if backend == 'metal' else 'OFF'}",
        # llama.cpp's RPC backend (a module, libggml-rpc): tensors behind a socket, the non-host
        # backend the tests run the native code on (bindings/rpc.py)
        "-DGGML_RPC=ON",
        # portable CPU backend: every variant a module, the best loaded at run time (see CPU_VARIANTS)
        "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON", "-DGGML_NATIVE=OFF",
        f"-DGGML_CPU_VARIANTS={';'.join(cpu_variants())}",  # patches/0006: build only these
    ]
    if shutil.which("ccache"):
        args += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache",
                 "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
    args += [a for a in os.environ.get("FLOWMM_CMAKE_ARGS", "").split() if a]
    return args


def _platform_key() -> str:
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    return machine if machine == "x86_64" else f"{machine}-{sys.platform}"


def cpu_variants(platform_key: str | None = None) -> tuple[str, ...]:
    """The CPU variants to build here (CPU_VARIANTS); empty: every variant ggml defines."""
    return CPU_VARIANTS.get(platform_key or _platform_key(), ())


def built_cpu_variants(build: Path) -> list[str]:
    """The CPU variants a configured build folder defines (its ggml-cpu-<name> targets)."""
    listing = subprocess.run(["cmake", "--build", str(build), "--target", "help"],
                             capture_output=True, text=True, check=True).stdout
    return sorted(set(re.findall(r"\bggml-cpu-([A-Za-z0-9_.]+?)(?=[:\s]|$)", listing, re.MULTILINE)))


def build_native(backend: str, jobs: int, variant: str = "", extra_args: tuple[str, ...] = (),
                 stock: bool = False) -> Path:
    """Build into native/<backend>[-<variant>]; a variant is a second build with extra CMake flags.
    `stock` builds libllama of the stock tree (prepare_source) into the cache's stock/ folder."""
    cache = paths.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tree = prepare_source(cache, stock=stock)
    targets = STOCK_TARGETS if stock else BUILD_TARGETS
    build = (paths.stock_build_dir if stock else paths.native_build_dir)(backend + (f"-{variant}" if variant else ""))
    args = cmake_args(backend, tree, build) + list(extra_args)
    args_stamp = build / ".flowmm-cmake-args.json"
    if not (build / "CMakeCache.txt").is_file() or not args_stamp.is_file() or json.loads(args_stamp.read_text()) != args:
        log(f"configuring {build} ({backend})")
        # modules of an earlier configuration (another variant list, a non-DL build) would still be
        # found and loaded by ggml at run time: remove them, the build makes the current ones again
        for stale in (build / "bin").glob(f"{paths.LIB_PREFIX}ggml-*"):
            if stale.name.split(".")[0] not in (f"{paths.LIB_PREFIX}ggml", f"{paths.LIB_PREFIX}ggml-base"):
                stale.unlink()
        for stale in (build / "bin").glob("*.so.*"):  # versioned names of a build before unversioned SONAMEs
            stale.unlink()
        subprocess.run(["cmake", *args], check=True)
        args_stamp.write_text(json.dumps(args))
    variants = built_cpu_variants(build)
    if not variants:
        raise BuildError(f"this llama.cpp defines none of the CPU variants {', '.join(cpu_variants())}")
    # libggml depends on every backend module, so these targets build the CPU variants too
    log(f"building {', '.join(targets)} and CPU variants {', '.join(variants)} with {jobs} job(s)")
    t0 = time.time()
    subprocess.run(["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs),
                    "--target", *targets], check=True)
    log(f"build finished in {time.time() - t0:.1f} s; libraries in {build / 'bin'}")
    return build / "bin"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=paths.BACKENDS, default=None,
                    help="default: $FLOWMM_BACKEND, else metal on macOS, cpu elsewhere")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--record-in", type=Path, default=None,
                    help="virtual environment in which to record the library folder")
    ap.add_argument("--variant", default="", help="name of a second build with --cmake-arg flags (e.g. valgrind)")
    ap.add_argument("--cmake-arg", action="append", default=[], help="extra CMake argument for a variant")
    ap.add_argument("--lib-dir-file", type=Path, default=None,
                    help="write the folder of the built libraries to this file (the wheel's CMakeLists reads it)")
    ap.add_argument("--stock", action="store_true",
                    help="build the stock, unpatched libllama of the pinned version (bench's baseline)")
    ap.add_argument("--print-source-tree", action="store_true",
                    help="prepare the patched source tree, print its path and stop")
    a = ap.parse_args(argv)
    try:
        if a.print_source_tree:
            print(prepare_source(paths.cache_dir(), stock=a.stock))
            return 0
        backend = a.backend or paths.default_backend()
        lib_dir = build_native(backend, a.jobs, a.variant, tuple(a.cmake_arg), stock=a.stock)
    except (BuildError, ValueError) as e:
        print(f"build_native: error: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"build_native: error: {' '.join(map(str, e.cmd[:2]))} failed with exit code {e.returncode}", file=sys.stderr)
        return 1
    if a.lib_dir_file:
        a.lib_dir_file.write_text(f"{lib_dir}\n")
    if a.record_in and not a.stock:
        (a.record_in / paths.NATIVE_POINTER).write_text(json.dumps({"backend": backend, "lib_dir": str(lib_dir)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
