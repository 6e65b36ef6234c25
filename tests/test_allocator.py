"""The allocator setting `serve` makes at start: freed large blocks leave the process.

Each case runs in a fresh interpreter, so the allocator's state is the one the case makes. The
reference is the kernel's own count of the process's resident memory (/proc/self/statm)."""

import platform
import subprocess
import sys
import textwrap

import pytest

GLIBC = platform.libc_ver()[0] == "glibc"

# A 28 MiB block (a large request body) is allocated and freed first: glibc then raises its mmap
# threshold to 28 MiB. An 8 MiB block is then allocated, written, freed; the script prints how
# much of it is still resident (MiB).
SCRIPT = textwrap.dedent("""
    import os, sys
    from flowmm_edge.bindings.allocator import return_freed_blocks
    was_set = return_freed_blocks() if sys.argv[1] == "set" else None
    page = os.sysconf("SC_PAGE_SIZE")
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page / 2 ** 20
    body = b"\\x01" * (28 << 20)
    del body
    before = rss()
    block = b"\\x02" * (8 << 20)
    held = rss() - before
    del block
    print(was_set, f"{held:.2f}", f"{rss() - before:.2f}")
""")


def _run(mode: str) -> tuple[str, float, float]:
    """In a fresh interpreter (the test process's own allocator is left as it is): whether the
    setting was made ("None" when not asked), and the 8 MiB block's resident MiB alive and freed."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=60, check=True)
    was_set, held, kept = out.stdout.split()
    return was_set, float(held), float(kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_freed_large_blocks_leave_the_process_after_the_setting():
    was_set, held, kept = _run("set")
    if not GLIBC:
        assert was_set == "False"  # an allocator without glibc's threshold: nothing is set, and it says so
        return
    assert was_set == "True"
    assert held > 7.5  # the block was resident while it lived
    assert kept < 1.0  # and left with its free
    # the control: without the setting, glibc keeps the block after the large one raised its threshold
    was_set, held, kept = _run("default")
    assert was_set == "None" and held > 7.5 and kept > 7.5
