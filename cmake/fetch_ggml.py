"""Fetch ggml for the build: the pinned llama-cpp-python sdist from the package registry.

Run by CMakeLists.txt at configure time. Downloads llama-cpp-python==VERSION's sdist with pip (by name),
checks its sha256, extracts only vendor/llama.cpp/ggml into DEST. Idempotent: a DEST that already holds
the stamp of this sha256 is left alone. MOELITE_GGML_SDIST=/path/to/sdist.tar.gz skips the download.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
INNER = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"llama_cpp_python-{VERSION}.tar.gz"
    if target.exists() and sha256(target) == SHA256:
        return target
    local = os.environ.get("MOELITE_GGML_SDIST")
    if local:
        shutil.copyfile(local, target)
    else:
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            # --no-build-isolation + --no-deps: we want the archive only, not its metadata build
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--no-build-isolation",
                "-d",
                tmp,
                f"{PACKAGE}=={VERSION}",
            ]
            r = subprocess.run(cmd, capture_output=True, text=True)
            got = list(Path(tmp).glob("*.tar.gz"))
            if not got:
                sys.exit(f"fetch_ggml: pip download of {PACKAGE}=={VERSION} failed:\n{r.stdout}\n{r.stderr}")
            shutil.move(str(got[0]), target)
    digest = sha256(target)
    if digest != SHA256:
        target.unlink()
        sys.exit(f"fetch_ggml: sha256 mismatch for {PACKAGE}=={VERSION}: got {digest}, expected {SHA256}")
    return target


def main() -> None:
    dest = Path(sys.argv[1]).resolve()  # third_party/llama.cpp (holds ggml/ and models/)
    stamp = dest / ".stamp"
    if stamp.exists() and stamp.read_text().strip() == SHA256:
        return
    archive = download(dest.parent / "sdist")
    if dest.exists():
        shutil.rmtree(dest)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent))
    wanted = (INNER + "ggml/", INNER + "models/ggml-vocab-", INNER + "LICENSE")
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
        tar.extractall(tmp, members=members, filter="data")
    shutil.move(str(tmp / INNER), dest)
    shutil.rmtree(tmp)
    stamp.write_text(SHA256 + "\n")


if __name__ == "__main__":
    main()
