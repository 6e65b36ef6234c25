"""`pip install` of this package's sdist into a fresh virtual environment builds (with the
build cache warm: scripts/build_native.py's folder) and carries the patched llama.cpp, and the
installed package runs on it alone: no FLOWMM_LIB_DIR, no pointer from setup, no checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flowmm_edge import paths

REPO = Path(__file__).resolve().parent.parent


def run(cmd: list, cwd: Path, env: dict, timeout: int = 900) -> str:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd[:4]} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_the_sdist_installs_into_a_fresh_venv_with_the_patched_library(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("FLOWMM_LIB_DIR", "LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB", "VIRTUAL_ENV", "PYTHONPATH")}
    env["FLOWMM_CACHE"] = str(paths.cache_dir())  # the warm build folder and ccache, wherever they are
    run([sys.executable, "-m", "build", "--sdist", "--outdir", tmp_path / "dist", REPO], tmp_path, env)
    (sdist,) = (tmp_path / "dist").glob("flowmm_edge-*.tar.gz")
    run([sys.executable, "-m", "venv", tmp_path / "venv"], tmp_path, env)
    py = tmp_path / "venv" / "bin" / "python"
    run([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--find-links", paths.python_wheels_dir(), sdist], tmp_path, env)
    site = Path(run([py, "-c", "import flowmm_edge, os; print(os.path.dirname(flowmm_edge.__file__))"],
                    tmp_path, env).strip())
    assert site.is_relative_to(tmp_path / "venv") and not (tmp_path / "venv" / paths.NATIVE_POINTER).exists()
    lib = site / "lib"
    llama, mtmd = (lib / f"{paths.LIB_PREFIX}{name}{paths.SHARED_SUFFIX}" for name in ("llama", "mtmd"))
    assert llama.is_file() and mtmd.is_file()
    assert not [p for p in lib.iterdir() if p.is_symlink()]  # a wheel holds files, and each library once
    backend = paths.default_backend()
    assert json.loads((lib / paths.NATIVE_POINTER).read_text())["backend"] == backend
    info = run([py, "-m", "flowmm_edge", "info"], tmp_path, env)
    assert f"libllama             {llama}" in info and f"libmtmd              {mtmd}" in info
    assert f"backend (built for)  {backend}" in info
    # the console script the package declares
    assert "flowmm-edge native" in run([tmp_path / "venv" / "bin" / "flowmm-edge", "info"], tmp_path, env)
