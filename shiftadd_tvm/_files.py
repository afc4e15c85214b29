"""Atomic file writes: a reader never sees a half-written file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def export_with_manifest(executable, manifest: dict, path: str | os.PathLike) -> Path:
    """Write one self-describing file: the shared library with the manifest appended (layout in
    ``runtime.py``). Written to a temporary name and renamed, so ``path`` is never half-written."""
    from .runtime import TRAILER_MAGIC

    dest = Path(path)
    with atomic_path(dest, suffix=".tmp.so") as tmp:  # TVM picks the format from ".so"
        executable.export_library(str(tmp))
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        manifest = dict(manifest)
        manifest["library_sha256"] = h.hexdigest()
        manifest["library_bytes"] = tmp.stat().st_size
        blob = json.dumps(manifest, sort_keys=True).encode("utf-8")
        with open(tmp, "ab") as f:
            f.write(blob)
            f.write(hashlib.sha256(blob).digest())
            f.write(len(blob).to_bytes(8, "little"))
            f.write(TRAILER_MAGIC)
    return dest
