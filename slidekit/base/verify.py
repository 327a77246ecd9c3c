"""Output records: what a job wrote, so that a rerun knows the outputs are still the ones it wrote.

A record of a file or folder (a zarr store) holds its file count, its bytes, a *stamp* and a content
*digest*. The stamp hashes each file's relative path, size, modification and status-change times
(``st_ctime_ns`` cannot be set by a user or a copy tool), so checking an untouched output costs one
``stat`` per file, whatever its size. When the stamp differs (a copied or restored folder, a file
touched) the contents are hashed again and compared with the digest: a copy with the same bytes
verifies, a flipped byte at the same size and time (``cp -p``, ``rsync -t``) does not.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

_BLOCK = 1 << 20


def _files(path: Path) -> Iterator[tuple[str, Path]]:
    """(relative name, file) of a file, or of every file under a folder in a stable order."""
    if path.is_file():
        yield "", path
        return
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            yield p.relative_to(path).as_posix(), p


def _stamp(path: Path) -> tuple[str, int, int]:
    h = hashlib.blake2b(digest_size=16)
    n = size = 0
    for rel, p in _files(path):
        st = p.stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
        n, size = n + 1, size + st.st_size
    return h.hexdigest(), n, size


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=20)
    for rel, p in _files(path):
        h.update(f"{rel}\0".encode())
        with open(p, "rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def output_record(path: str | os.PathLike) -> dict:
    """The record of an output file or folder (``files``, ``bytes``, ``stamp``, ``digest``)."""
    path = Path(path)
    stamp, n, size = _stamp(path)
    return {"files": n, "bytes": size, "stamp": stamp, "digest": _digest(path)}


def check_output(path: str | os.PathLike, record: dict) -> str | None:
    """Why ``path`` is not the output ``record`` describes (one short phrase), or None when it is."""
    path = Path(path)
    if not path.exists():
        return f"{path.name} is missing"
    if not isinstance(record, dict) or not {"files", "bytes", "stamp", "digest"} <= set(record):
        return f"{path.name} has no usable record"
    stamp, n, size = _stamp(path)
    if stamp == record["stamp"]:
        return None
    if n != record["files"]:
        return f"{path.name} has {n} file(s), {record['files']} were written"
    if size != record["bytes"]:
        return f"{path.name} holds {size} bytes, {record['bytes']} were written"
    if _digest(path) != record["digest"]:
        return f"{path.name} changed since it was written (same size, other contents)"
    return None
