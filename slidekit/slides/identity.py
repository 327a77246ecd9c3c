"""A slide file's identity, cheap to compute: what output folders and tile grids record so that a
rerun notices another file at the same path."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from slidekit.slides.dicom import dicom_entry


def slide_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity for a slide file: size plus hashes of its first and last 64 KiB (for a
    DICOM WSI folder: of the series file it opens through)."""
    p = Path(path)
    if p.is_dir():
        p = dicom_entry(p)
    size = p.stat().st_size
    h = hashlib.sha1(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(65536))
        f.seek(max(0, size - 65536))
        h.update(f.read(65536))
    return h.hexdigest()[:16]
