"""DICOM WSI: a slide is one DICOM series, given as any of its files or as the folder holding it.

OpenSlide (4.0 and later) reads a DICOM WSI from one file of the series and finds the other
instances (the pyramid levels, label, overview) beside it in the same folder. For a folder,
``dicom_entry`` picks the file to hand it: the largest VOLUME instance of the folder's one
series. A folder with no DICOM file, or with several WSI series, is a one-line SlideError.
"""
from __future__ import annotations

import os
from pathlib import Path

from slidekit.errors import SlideError

DICOM_SUFFIX = ".dcm"
_TAGS = ["SeriesInstanceUID", "ImageType", "TotalPixelMatrixColumns", "TotalPixelMatrixRows"]


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A ``.dcm`` file, or any file with the DICOM preamble marker ``DICM`` at byte 128."""
    p = Path(path)
    if not p.is_file() or p.name.startswith("."):
        return False
    if p.suffix.lower() == DICOM_SUFFIX:
        return True
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(folder: str | os.PathLike) -> list[Path]:
    """The DICOM files directly in ``folder``, sorted by name."""
    return sorted(q for q in Path(folder).iterdir() if is_dicom_file(q))


def is_dicom_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds DICOM files (a DICOM series given as its folder)."""
    p = Path(folder)
    return p.is_dir() and any(is_dicom_file(q) for q in p.iterdir())


def dicom_entry(folder: str | os.PathLike) -> Path:
    """The file of the folder's one DICOM WSI series that OpenSlide opens: its largest VOLUME image."""
    folder = Path(folder)
    files = dicom_files(folder)
    if not files:
        raise SlideError("is a directory with no DICOM files, not a slide", folder)
    try:
        import pydicom
    except ImportError:  # without pydicom (the dicom extra) OpenSlide finds the series from any file
        return files[0]
    volumes: dict[str, list[tuple[int, Path]]] = {}
    for q in files:
        try:
            ds = pydicom.dcmread(q, stop_before_pixels=True, specific_tags=_TAGS)
        except Exception as e:  # every pydicom parse error
            raise SlideError(f"unreadable DICOM file {q.name} ({type(e).__name__})", folder) from None
        if "VOLUME" not in [str(v).upper() for v in (ds.get("ImageType") or [])]:
            continue  # label, overview, thumbnail instances
        pixels = int(ds.get("TotalPixelMatrixColumns") or 0) * int(ds.get("TotalPixelMatrixRows") or 0)
        volumes.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((pixels, q))
    if not volumes:
        raise SlideError("holds DICOM files but no WSI volume image (ImageType VOLUME)", folder)
    if len(volumes) > 1:
        raise SlideError(f"holds {len(volumes)} DICOM WSI series; a slide folder holds one "
                         f"(open one file of the series instead)", folder)
    return max(next(iter(volumes.values())))[1]
