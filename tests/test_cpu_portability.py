"""The build runs on any CPU of its architecture, and no weight goes to ggml's AMX buffer type.

- every CPU variant scripts/build_native.py chooses is built as a loadable module, and none of them
  carries the AMX buffer type (whose Q4_K matmul crashes in the pinned llama.cpp): checked in the
  modules themselves, so this fails on any machine, not only on an AMX Xeon;
- llama.cpp's own report of where a model's weights went: never AMX, and the CPU repack buffer kept
  wherever the loaded variant can repack;
- the built libraries, run under qemu-user emulating older CPUs than this one, load the variant that
  CPU can run and give the same logits as a native run.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import build_native  # scripts/, put on sys.path by conftest
from flowmm_edge.bindings import native, runtime
from flowmm_edge import paths

LIB_DIR = paths.installed_native_lib_dir()
SUFFIX = ".dylib" if sys.platform == "darwin" else ".so"
MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())

# (qemu CPU model, the variant ggml must pick on it): CPUs older than the machines tests run on
EMULATED = {
    "x86_64": [("Nehalem", "x64"), ("Haswell-v4", "haswell")],   # SSE4.2 only; AVX2 without AVX-512
    "aarch64": [("cortex-a53", "armv8.0_1")],                     # ARMv8.0: no dot product
}


def cpu_modules() -> list[Path]:
    return sorted(LIB_DIR.glob(f"{paths.LIB_PREFIX}ggml-cpu-*{SUFFIX}"))


def test_every_chosen_cpu_variant_is_built_and_none_carries_amx():
    built = {p.name[len(f"{paths.LIB_PREFIX}ggml-cpu-"):-len(SUFFIX)] for p in cpu_modules()}
    wanted = set(build_native.cpu_variants())
    assert built and wanted <= built, f"variants {sorted(wanted - built)} missing from {LIB_DIR}"
    assert "sapphirerapids" not in built
    if MACHINE == "x86_64":
        assert "x64" in built, "no baseline variant: a CPU without AVX2 would have nothing to load"
    for module in cpu_modules():
        # defined only where ggml compiled its AMX buffer type (ggml-cpu/amx/amx.cpp)
        assert b"ggml_backend_amx_buffer_type" not in module.read_bytes(), f"{module.name} carries the AMX buffer type"


def test_the_loaded_variant_is_one_of_the_built_modules():
    assert Path(native.loaded_backends["CPU"]).resolve().parent == LIB_DIR.resolve()
    assert f"{paths.LIB_PREFIX}ggml-cpu-{native.cpu_variant()}{SUFFIX}" in {p.name for p in cpu_modules()}


def test_weights_never_go_to_amx_and_keep_the_repack_buffer(default_model_path):
    # ggml repacks some of the default model's weights on AVX2 and on ARM with dot product
    with runtime.Model(default_model_path) as m:
        on = dict(m.buffers)
    with runtime.Model(default_model_path, repack=False) as m:
        off = dict(m.buffers)
    assert on and off, "llama.cpp reported no weight buffers"
    assert not [b for b in list(on) + list(off) if "AMX" in b.upper()]
    assert "CPU_REPACK" not in off
    feats = native.cpu_features()
    if feats.get("AVX2") == "1" or feats.get("DOTPROD") == "1":
        assert "CPU_REPACK" in on, f"repack lost on a {native.cpu_variant()} CPU: {on}"


@pytest.fixture(scope="module")
def decode_program(tmp_path_factory) -> Path:
    """tests/native/portable_decode.c compiled against the built libraries."""
    tree = build_native.prepare_source(paths.cache_dir()) / "vendor/llama.cpp"
    exe = tmp_path_factory.mktemp("portable") / "portable_decode"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc"
    subprocess.run([cc, "-O1", "-o", str(exe), str(Path(__file__).parent / "native" / "portable_decode.c"),
                    f"-I{tree / 'include'}", f"-I{tree / 'ggml/include'}", f"-L{LIB_DIR}",
                    "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{LIB_DIR}"], check=True)
    return exe


def _run(cmd: list[str]) -> tuple[str, np.ndarray]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd[:3])} exited {proc.returncode}: {proc.stderr[-800:]}"
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    return lines["variant"].strip(), np.array(lines["logits"].split(), np.float64)


@pytest.mark.skipif(sys.platform != "linux" or MACHINE not in EMULATED, reason="qemu-user emulation of older "
                    "CPUs is checked on Linux x86_64 and aarch64")
@pytest.mark.parametrize("cpu,variant", EMULATED.get(MACHINE, []))
def test_an_older_cpu_under_emulation_loads_its_variant_and_answers_the_same(decode_program, tiny_models, cpu, variant):
    qemu = shutil.which(f"qemu-{MACHINE}")
    assert qemu, f"qemu-{MACHINE} is missing (scripts/test.sh installs Debian's qemu-user)"
    model = str(tiny_models[0])
    _, want = _run([str(decode_program), str(LIB_DIR), model])
    got_variant, got = _run([qemu, "-cpu", cpu, str(decode_program), str(LIB_DIR), model])
    assert Path(got_variant).name == f"{paths.LIB_PREFIX}ggml-cpu-{variant}{SUFFIX}"
    assert got.shape == want.shape and np.all(np.isfinite(got))
    # other SIMD paths round differently; a wrong kernel would be off by far more
    assert np.max(np.abs(got - want)) <= 0.02 * np.max(np.abs(want)), np.max(np.abs(got - want))
