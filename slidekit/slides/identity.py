"""A slide file's identity, cheap to compute: what output folders and tile grids record so that a
rerun notices another file at the same path.

``slide_fingerprint`` (form ``v2:<16 hex>``) hashes the file's size, its first and last 64 KiB and
blocks sampled through its middle (``SAMPLE_BLOCK`` bytes at deterministic offsets, one per
``SAMPLE_SPACING`` bytes, at least ``MIN_SAMPLES`` and at most ``MAX_SAMPLES`` of them), so a copy
damaged over a stretch longer than the spacing (a zeroed or lost range, a truncated-and-padded
copy) has another identity although its size and ends are the same. It reads at most
~4.1 MiB whatever the file's size; damage smaller than the spacing (one tile of a gigabyte slide)
may fall between the samples — the slide reader's tile checks still refuse such a tile when read.

Records written before the middle was sampled hold the old form (16 hex: size and ends only);
``same_slide(recorded, path)`` accepts either form, recomputing the old one for an old record.
Every comparison of a recorded fingerprint with a slide file goes through it.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from slidekit.base.outputs import register_slide_matcher
from slidekit.slides.dicom import dicom_entry

FINGERPRINT_VERSION = "v2"
END_BYTES = 65536
SAMPLE_BLOCK = 4096
SAMPLE_SPACING = 1 << 20
MIN_SAMPLES, MAX_SAMPLES = 64, 1024


def _file(path: str | os.PathLike) -> Path:
    p = Path(path)
    return dicom_entry(p) if p.is_dir() else p


def _key(p: Path) -> tuple:
    """What identifies one state of a file without reading it (a replaced or rewritten file has
    another inode or ctime, even when ``cp -p`` kept its size and mtime)."""
    st = p.stat()
    return (str(p.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sample_offsets(size: int) -> list[int]:
    """The deterministic offsets of the blocks sampled between the file's ends."""
    lo, hi = END_BYTES, size - END_BYTES - SAMPLE_BLOCK
    if hi <= lo:
        return []
    n = min(MAX_SAMPLES, max(MIN_SAMPLES, (hi - lo) // SAMPLE_SPACING))
    return sorted({lo + (hi - lo) * (i + 1) // (n + 1) for i in range(n)})


@functools.lru_cache(maxsize=4096)
def _fingerprint(key: tuple, sampled: bool) -> str:
    path, size = key[0], key[3]
    h = hashlib.sha1(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(END_BYTES))
        f.seek(max(0, size - END_BYTES))
        h.update(f.read(END_BYTES))
        if not sampled:
            return h.hexdigest()[:16]
        for off in sample_offsets(size):
            f.seek(off)
            h.update(f.read(SAMPLE_BLOCK))
    return f"{FINGERPRINT_VERSION}:{h.hexdigest()[:16]}"


def slide_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity for a slide file (``v2:<16 hex>``): size plus hashes of its ends and of
    blocks sampled through its middle (for a DICOM WSI folder: of the series file it opens through).
    Computed once per state of the file in a process."""
    return _fingerprint(_key(_file(path)), True)


def legacy_fingerprint(path: str | os.PathLike) -> str:
    """The fingerprint records held before the middle was sampled (16 hex: size and ends only)."""
    return _fingerprint(_key(_file(path)), False)


def same_slide(recorded: str | None, path: str | os.PathLike) -> bool:
    """Whether the slide file at ``path`` is the one a record's fingerprint ``recorded`` names, in
    either form (``v2:...`` now, 16 hex from before). False for an empty or unknown record."""
    if not recorded or not isinstance(recorded, str):
        return False
    if recorded.startswith(f"{FINGERPRINT_VERSION}:"):
        return slide_fingerprint(path) == recorded
    if ":" in recorded:  # a form this version does not know (a newer slidekit's)
        return False
    return legacy_fingerprint(path) == recorded


register_slide_matcher(same_slide)  # OutputDir compares recorded fingerprints through same_slide
