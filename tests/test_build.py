"""The patched native build: pinned sdist, patches, native sources, idempotent rebuilds."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import build_native  # scripts/, put on sys.path by conftest
from flowmm_edge import paths

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fresh_sdist_tree(tmp_path_factory) -> Path:
    sdist = build_native.fetch_sdist(paths.cache_dir())
    return build_native.extract_sdist(sdist, tmp_path_factory.mktemp("sdist"))


def test_sdist_checksum_is_the_pinned_one():
    sdist = build_native.fetch_sdist(paths.cache_dir())
    import hashlib

    assert hashlib.sha256(sdist.read_bytes()).hexdigest() == "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"


def test_sdist_with_wrong_checksum_is_refused(tmp_path):
    bad = tmp_path / "sdist" / build_native.SDIST_NAME
    bad.parent.mkdir()
    bad.write_bytes(b"not the sdist")
    with pytest.raises(build_native.BuildError, match="differs from the pinned"):
        build_native.fetch_sdist(tmp_path)


def test_patches_apply_cleanly_to_a_fresh_sdist(fresh_sdist_tree, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(fresh_sdist_tree, tree)
    patches = build_native.patch_files()
    assert patches, "patches/ is empty"
    build_native.apply_patches(tree, patches)
    cmake = (tree / "vendor/llama.cpp/src/CMakeLists.txt").read_text()
    assert "flowmm/*.cpp" in cmake and "target_sources(llama PRIVATE ${FLOWMM_SOURCES})" in cmake
    # a second application must fail loudly, not silently double-apply
    with pytest.raises(build_native.BuildError, match="does not apply"):
        build_native.apply_patches(tree, patches[:1])


def test_a_patch_that_does_not_apply_names_the_failing_hunk(fresh_sdist_tree, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(fresh_sdist_tree / "vendor/llama.cpp/src", tree / "vendor/llama.cpp/src")
    broken = tmp_path / "0001-broken.patch"
    text = build_native.patch_files()[0].read_text()
    broken.write_text(text.replace(" target_link_libraries(llama PUBLIC ggml)", " target_link_libraries(llama PUBLIC nothing)"))
    with pytest.raises(build_native.BuildError) as e:
        build_native.apply_patches(tree, [broken])
    assert "0001-broken.patch" in str(e.value) and re.search(r"Hunk #1 FAILED", str(e.value))


def test_sync_tree_touches_only_changed_files(tmp_path):
    staging, tree = tmp_path / "staging", tmp_path / "tree"
    for root in (staging, tree):
        (root / "d").mkdir(parents=True)
        (root / "d" / "same.txt").write_text("same")
    (staging / "d" / "changed.txt").write_text("new")
    (tree / "d" / "changed.txt").write_text("old")
    (tree / "d" / "gone.txt").write_text("stale")
    os.utime(tree / "d" / "same.txt", (1_000_000, 1_000_000))
    assert build_native.sync_tree(staging, tree) == 2
    assert (tree / "d" / "same.txt").stat().st_mtime == 1_000_000
    assert (tree / "d" / "changed.txt").read_text() == "new"
    assert not (tree / "d" / "gone.txt").exists()


def test_build_produced_the_libraries():
    lib_dir = paths.installed_native_lib_dir()
    names = {p.name for p in lib_dir.iterdir()}
    suffix = ".dylib" if "darwin" in os.sys.platform else ".so"
    for lib in ("libllama", "libggml", "libggml-base", "libmtmd"):
        assert lib + suffix in names, f"{lib}{suffix} missing from {lib_dir}"
    assert any(n.startswith("libggml-cpu-") and n.endswith(suffix) for n in names), f"no CPU backend module in {lib_dir}"


def test_native_sources_are_in_the_patched_tree():
    tree = build_native.prepare_source(paths.cache_dir())
    for src in build_native.native_files():
        assert (tree / build_native.NATIVE_DEST / src.name).read_bytes() == src.read_bytes()


def test_second_build_compiles_nothing():
    lib = paths.installed_native_lib_dir() / "libllama.so"
    if not lib.exists():
        lib = lib.with_suffix(".dylib")
    before = lib.stat().st_mtime_ns
    backend = paths.default_backend()
    out = subprocess.run([os.sys.executable, str(REPO / "scripts/build_native.py"), "--backend", backend],
                         capture_output=True, text=True, check=True).stdout
    assert lib.stat().st_mtime_ns == before
    assert "no work to do" in out or "Nothing to be done" in out or not re.search(r"Building (C|CXX)", out)


def test_stock_tree_is_the_sdist_with_only_build_patches(fresh_sdist_tree, tmp_path, monkeypatch):
    """bench's stock baseline: the pinned source with none of the FlowMM hooks or native/; the
    patches it does take change only CMake files (what is compiled, not what the code does)."""
    for name in build_native.STOCK_PATCHES:
        touched = re.findall(r"^\+\+\+ b/(\S+)", (REPO / "patches" / name).read_text(), re.MULTILINE)
        assert touched and all(Path(t).name == "CMakeLists.txt" or t.endswith(".cmake") for t in touched)
    sdist = build_native.fetch_sdist(paths.cache_dir())
    monkeypatch.setenv("FLOWMM_CACHE", str(tmp_path))
    (tmp_path / "sdist").mkdir()
    (tmp_path / "sdist" / build_native.SDIST_NAME).symlink_to(sdist)
    tree = build_native.prepare_source(tmp_path, stock=True)
    assert tree.is_relative_to(tmp_path / "stock")
    src = Path("vendor/llama.cpp/src")
    assert not (tree / build_native.NATIVE_DEST).exists()
    for f in (fresh_sdist_tree / src).rglob("*"):
        if f.is_file():
            assert (tree / src / f.relative_to(fresh_sdist_tree / src)).read_bytes() == f.read_bytes(), f
    assert "GGML_CPU_VARIANTS" in (tree / "vendor/llama.cpp/ggml/src/CMakeLists.txt").read_text()
