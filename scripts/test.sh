#!/usr/bin/env bash
# The test command: set up (idempotent), then run the test suite.
#
#   bash scripts/test.sh [pytest args...]
#
# The default run includes one small case of every slow check on the real model
# (tests/conftest.py); FLOWMM_SLOW=1 runs all of them.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$REPO/scripts/setup.sh"
cd "$REPO"
# the portability tests run the built libraries on emulated older CPUs (tests/test_cpu_portability.py)
if [ "$(uname -s)" = Linux ] && ! command -v "qemu-$(uname -m)" >/dev/null && command -v apt-get >/dev/null &&
    [ "$(id -u)" = 0 ]; then
    echo "[test] installing qemu-user"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user; } >/dev/null ||
        echo "[test] apt-get could not install qemu-user" >&2
fi
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
    echo "[test] pytest collected no tests: that is a failure here" >&2
    exit 1
fi
exit "$rc"
