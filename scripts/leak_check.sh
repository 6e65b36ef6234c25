#!/usr/bin/env bash
# Memory errors and leaks of the native extension over repeated merge/decode cycles, under valgrind.
#
#   bash scripts/leak_check.sh [merge_cycles.py args...]     (default: --cycles 200)
#
# CPython and numpy make valgrind report their own arena use, so this counts only what
# involves llama.cpp's libraries: invalid reads/writes and uninitialised-value uses with a
# libllama/libggml/libmtmd frame, and "definitely lost" blocks allocated from them. Exit 1 if
# any. Slow (minutes): CI does not run it; run it after native changes and report the result.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
command -v valgrind >/dev/null || { echo "leak_check: valgrind is not installed" >&2; exit 2; }
# valgrind cannot run AVX-512 code, and its CPUID says so: ggml then loads a CPU variant without it
# (haswell) from the ordinary portable build, so no separate build is needed
bash "$REPO/scripts/setup.sh" >/dev/null
LOG=$(mktemp /tmp/flowmm-valgrind.XXXXXX)
args=("$@")
((${#args[@]})) || args=(--cycles 200)
PYTHONMALLOC=malloc valgrind --tool=memcheck --leak-check=full --show-leak-kinds=definite \
    --num-callers=40 --log-file="$LOG" \
    "$REPO/.venv/bin/python" "$REPO/scripts/merge_cycles.py" "${args[@]}"
"$REPO/.venv/bin/python" - "$LOG" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
records = re.split(r"\n==\d+== \n", text)
ours = re.compile(r"lib(llama|ggml[\w-]*|mtmd)\.so")
errors = [r for r in records if re.search(r"Invalid (read|write|free)|uninitialised|Mismatched free", r) and ours.search(r)]
leaks = [r for r in records if "definitely lost" in r and "blocks are definitely lost" in r and ours.search(r)]
summary = re.findall(r"ERROR SUMMARY: .*", text)
print(f"valgrind log: {sys.argv[1]}")
print(f"memory errors involving llama.cpp/FlowMM libraries: {len(errors)}")
print(f"definitely-lost blocks allocated in them: {len(leaks)}")
print(f"whole-process {summary[-1] if summary else 'ERROR SUMMARY missing'}")
for r in (errors + leaks)[:5]:
    print(r[:3000])
sys.exit(1 if errors or leaks else 0)
PY
