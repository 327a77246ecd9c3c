"""DICOM WSI: a slide is one DICOM series, given as any of its files or as the folder holding it.

OpenSlide (4.0 and later) reads a DICOM WSI from one file of the series and finds the other
instances (the pyramid levels, label, overview) beside it in the same folder. For a folder,
``dicom_entry`` picks the file to hand it: the largest VOLUME instance of the folder's one
series. A folder with no DICOM file, or with several WSI series, is a one-line SlideError.

``DicomStoredTiles`` decodes a level's stored JPEG frames directly (the native-tile fast path of
``tiling.TileReader``, as for TIFF tiles) where the level is a plain TILED_FULL baseline-JPEG volume.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from slidekit.base.errors import SlideError
from slidekit.slides.tiffio import StoredTiles

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


# -- stored tiles: the fast path ------------------------------------------------------------------

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
_PIXEL_DATA_UNDEFINED = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"  # (7FE0,0010) OB, encapsulated
_ITEM, _SEQ_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"


def _frame_table(path: Path) -> tuple[object, np.ndarray, np.ndarray] | None:
    """(header, frame byte offsets, frame byte counts) of an encapsulated single-fragment-per-frame
    DICOM image, or None when its pixel data is laid out otherwise."""
    import pydicom

    with open(path, "rb") as f:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if f.read(12) != _PIXEL_DATA_UNDEFINED:  # stop_before_pixels leaves the file at Pixel Data
            return None
        offsets, counts, first = [], [], True
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            length = int.from_bytes(head[4:], "little")
            if head[:4] == _SEQ_END:
                break
            if head[:4] != _ITEM:
                return None
            if first:  # the Basic Offset Table item (possibly empty)
                first = False
                f.seek(length, 1)
                continue
            offsets.append(f.tell())
            counts.append(length)
            f.seek(length, 1)
    if len(offsets) != int(ds.get("NumberOfFrames") or 1):
        return None  # frames split over several fragments
    return ds, np.asarray(offsets, np.int64), np.asarray(counts, np.int64)


def dicom_stored_tiles(entry: str | os.PathLike, level_dims: tuple[int, int]) -> "DicomStoredTiles | None":
    """Direct decoding of the stored JPEG frames of the series level of size ``level_dims``, or
    None when that level is not a plain TILED_FULL, baseline-JPEG, one-plane RGB volume."""
    import pydicom

    for q in dicom_files(Path(entry).parent):
        try:
            ds = pydicom.dcmread(q, stop_before_pixels=True)
        except Exception:
            continue
        if (int(ds.get("TotalPixelMatrixColumns") or 0), int(ds.get("TotalPixelMatrixRows") or 0)) != tuple(level_dims):
            continue
        plain = ("VOLUME" in [str(v).upper() for v in (ds.get("ImageType") or [])]
                 and str(ds.file_meta.get("TransferSyntaxUID", "")) == JPEG_BASELINE
                 and str(ds.get("DimensionOrganizationType", "TILED_FULL")) == "TILED_FULL"
                 and int(ds.get("TotalPixelMatrixFocalPlanes") or 1) == 1
                 and int(ds.get("NumberOfOpticalPaths") or 1) == 1
                 and int(ds.get("SamplesPerPixel") or 0) == 3 and int(ds.get("BitsAllocated") or 0) == 8)
        if not plain:
            return None
        table = _frame_table(q)
        if table is None:
            return None
        _, offsets, counts = table
        st = DicomStoredTiles(q, level_dims, (int(ds.Columns), int(ds.Rows)), offsets, counts)
        return st if len(offsets) == st.across * st.down else None
    return None


class DicomStoredTiles(StoredTiles):
    """The JPEG frames of one DICOM WSI level, with ``tiffio.StoredTiles``' interface (direct decode
    by (col, row), JPEG checks), so the native-tile fast path reads them as it reads TIFF tiles."""

    def __init__(self, path: Path, level_dims: tuple[int, int], tile: tuple[int, int],
                 offsets: np.ndarray, counts: np.ndarray) -> None:
        self.path, self.address = Path(path), ("dicom",)
        self.width, self.height = (int(v) for v in level_dims)
        self.tile_w, self.tile_h = tile
        self.offsets, self.counts, self.jpeg = offsets, counts, True
        self.across = math.ceil(self.width / self.tile_w)
        self.down = math.ceil(self.height / self.tile_h)
        self._local: dict[int, tuple] = {}
        self.verified: set[int] = set()
        # Frames are complete JPEG streams: one strict decode, confirmed by the first-tile check.
        self.strict, self.check_reason = True, "DICOM JPEG frames: strict decode"

    def _state(self) -> tuple:
        pid = os.getpid()
        if pid not in self._local:
            self._local = {pid: (None, None, None, os.open(self.path, os.O_RDONLY))}
            self.verified = set()
        return self._local[pid]

    def close(self) -> None:
        """Close this process's file handle (a later read reopens it)."""
        state = self._local.pop(os.getpid(), None)
        self._local = {}
        if state is not None:
            os.close(state[3])

    def raw(self, index: int) -> bytes:
        data = super().raw(index)
        # DICOM pads a fragment to an even length: a 0x00 after the JPEG's end-of-image marker
        return data[:-1] if data.endswith(b"\xff\xd9\x00") else data

    def decode(self, index: int, data: bytes | None = None) -> np.ndarray:
        """Frame ``index`` as (tile_h, tile_w, 3) uint8 (YCbCr JPEG frames come out as RGB)."""
        import imagecodecs

        arr = imagecodecs.jpeg8_decode(self.raw(index) if data is None else data)
        return np.asarray(arr).reshape(self.tile_h, self.tile_w, -1)[..., :3]
