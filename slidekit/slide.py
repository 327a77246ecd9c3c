"""One slide API over three backends: OpenSlide, tiffslide and plain images.

``open_slide`` picks the backend (OpenSlide first, tiffslide when OpenSlide refuses the file,
plain images through Pillow), checks the file is whole and has a pixel size, and returns a
``Slide``. A ``Slide`` pickles as its path and options and reopens its handle lazily in each
process, so it can be handed to DataLoader workers.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from slidekit.errors import MissingMPPError, SlideError

BACKENDS = ("openslide", "tiffslide", "image")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".btf", ".qptiff"}


class _Backend(Protocol):
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: dict[str, str]

    def mpp(self) -> tuple[float, float] | None: ...
    def read_rgba(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray: ...
    def close(self) -> None: ...


def _to_rgb_on_white(arr: np.ndarray) -> np.ndarray:
    """RGBA (straight alpha) or RGB or grey -> RGB uint8, transparent pixels composited on white."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2).astype(np.uint8, copy=False)
    if arr.shape[2] == 3:
        return np.ascontiguousarray(arr, dtype=np.uint8)
    rgb, alpha = arr[..., :3], arr[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.float32) / 255.0
    out = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _float_or_none(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


class _OpenSlideBackend:
    def __init__(self, path: Path) -> None:
        import openslide

        try:
            self._s = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as e:
            raise SlideError("OpenSlide does not support this file format", path) from e
        except openslide.OpenSlideError as e:
            raise SlideError(f"OpenSlide cannot read the file ({e})", path) from e
        self.level_dimensions = tuple(self._s.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._s.level_downsamples)
        self.properties = dict(self._s.properties)

    def mpp(self) -> tuple[float, float] | None:
        x = _float_or_none(self.properties.get("openslide.mpp-x"))
        y = _float_or_none(self.properties.get("openslide.mpp-y"))
        return (x, y) if x and y else None

    def read_rgba(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return np.asarray(self._s.read_region(location, level, size))

    def close(self) -> None:
        self._s.close()


class _TiffSlideBackend:
    def __init__(self, path: Path) -> None:
        import tiffslide

        try:
            self._s = tiffslide.TiffSlide(str(path))
            self.level_dimensions = tuple(self._s.level_dimensions)
        except Exception as e:  # tiffslide raises tifffile/zarr/ValueError variants
            raise SlideError(f"tiffslide cannot read the file ({type(e).__name__}: {e})", path) from e
        self.level_downsamples = tuple(float(d) for d in self._s.level_downsamples)
        self.properties = {k: str(v) for k, v in self._s.properties.items()}

    def mpp(self) -> tuple[float, float] | None:
        x = _float_or_none(self.properties.get("tiffslide.mpp-x"))
        y = _float_or_none(self.properties.get("tiffslide.mpp-y"))
        return (x, y) if x and y else None

    def read_rgba(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        # tiffslide pads out-of-bounds areas with black; slidekit's contract is white glass.
        w, h = size
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        lx, ly = int(location[0] / ds), int(location[1] / ds)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, lw), min(ly + h, lh)
        out = np.full((h, w, 3), 255, np.uint8)
        if x1 > x0 and y1 > y0:
            arr = self._s.read_region((int(x0 * ds), int(y0 * ds)), level, (x1 - x0, y1 - y0),
                                      as_array=True, padding=False)
            out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = _to_rgb_on_white(np.asarray(arr))
        return out

    def close(self) -> None:
        self._s.close()


class _ImageBackend:
    """A plain image (PNG, JPEG, non-pyramidal TIFF) held in memory; one level."""

    def __init__(self, path: Path) -> None:
        from PIL import Image, UnidentifiedImageError

        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(path) as im:
                self._arr = _to_rgb_on_white(np.asarray(im.convert("RGBA")))
        except UnidentifiedImageError as e:
            raise SlideError("not a slide or image that OpenSlide, tiffslide or Pillow can read", path) from e
        except (OSError, SyntaxError, ValueError) as e:
            raise SlideError(f"cannot decode image ({e})", path) from e
        h, w = self._arr.shape[:2]
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)
        self.properties = {}

    def mpp(self) -> tuple[float, float] | None:
        return None

    def read_rgba(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        (x, y), (w, h) = location, size
        H, W = self._arr.shape[:2]
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._arr[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        self._arr = np.zeros((0, 0, 3), np.uint8)


_BACKEND_CLASSES = {"openslide": _OpenSlideBackend, "tiffslide": _TiffSlideBackend, "image": _ImageBackend}


def check_tiff_complete(path: Path) -> None:
    """Raise SlideError when a TIFF-family file is truncated (a tile or strip lies past the end)."""
    import tifffile

    size = path.stat().st_size
    first_ifd = _first_ifd_offset(path)
    if first_ifd is not None and first_ifd >= size:
        raise SlideError(f"truncated file: its first image directory lies past the file's {size} "
                         "bytes; the copy is incomplete", path)
    try:
        with tifffile.TiffFile(path) as tif:
            if not len(tif.pages):
                raise SlideError("TIFF file holds no readable image", path)
            for page in tif.pages:
                offsets, counts = page.dataoffsets, page.databytecounts
                if offsets and max(o + c for o, c in zip(offsets, counts)) > size:
                    raise SlideError(
                        f"truncated file: image data ends past the file's {size} bytes "
                        f"(page {page.index}); the copy is incomplete", path)
    except SlideError:
        raise
    except Exception as e:  # tifffile raises TiffFileError, ValueError, struct.error ...
        raise SlideError(f"not a readable TIFF-family file ({e})", path) from e


def _first_ifd_offset(path: Path) -> int | None:
    """Offset of the first IFD from a TIFF/BigTIFF header, or None when it is not a TIFF."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:2] not in (b"II", b"MM") or len(head) < 8:
        return None
    order = "little" if head[:2] == b"II" else "big"
    version = int.from_bytes(head[2:4], order)
    if version == 42:
        return int.from_bytes(head[4:8], order)
    if version == 43 and len(head) >= 16:
        return int.from_bytes(head[8:16], order)
    return None


def _open_backend(path: Path, backend: str | None) -> tuple[str, _Backend]:
    if backend is not None:
        if backend not in BACKENDS:
            raise SlideError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}", path)
        return backend, _BACKEND_CLASSES[backend](path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "image", _ImageBackend(path)
    reasons = []
    for name in ("openslide", "tiffslide"):
        try:
            b = _BACKEND_CLASSES[name](path)
        except SlideError as e:
            reasons.append(str(e).split(": ", 1)[-1])
            continue
        # A single-level, untiled TIFF is a plain image: keep it out of the tiled readers.
        if name == "tiffslide" and len(b.level_dimensions) == 1 and not _is_tiled(path):
            b.close()
            return "image", _ImageBackend(path)
        return name, b
    try:
        return "image", _ImageBackend(path)
    except SlideError:
        raise SlideError("not a slide or image that OpenSlide, tiffslide or Pillow can read "
                         f"({'; '.join(reasons)})", path) from None


def _is_tiled(path: Path) -> bool:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.pages[0].is_tiled)
    except Exception:
        return False


class Slide:
    """A whole-slide image: level-0 geometry, pixel size and RGB reads on white.

    Use ``open_slide`` to make one. Coordinates are level-0 pixels ``(x, y)``.
    """

    def __init__(self, path: str | os.PathLike, mpp: float | tuple[float, float] | None = None,
                 backend: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise SlideError("file not found", self.path)
        if self.path.is_dir():
            raise SlideError("is a directory, not a slide file", self.path)
        if self.path.stat().st_size == 0:
            raise SlideError("file is empty", self.path)
        if self.path.suffix.lower() in TIFF_SUFFIXES:
            check_tiff_complete(self.path)
        self.backend, self._handle = _open_backend(self.path, backend)
        self._pid = os.getpid()
        self._requested_backend = backend
        if mpp is not None:
            mx, my = (mpp, mpp) if np.isscalar(mpp) else mpp
            if not (_float_or_none(mx) and _float_or_none(my)):
                raise SlideError(f"invalid mpp {mpp!r}: must be a positive number", self.path)
            self.mpp = (float(mx), float(my))
            self.mpp_source = "user"
        else:
            native = self._handle.mpp()
            if native is None:
                self.close()
                raise MissingMPPError(
                    "slide has no microns-per-pixel (MPP) in its metadata; pass mpp= (CLI: --slide-mpp)",
                    self.path)
            self.mpp = native
            self.mpp_source = "metadata"
        self.dimensions: tuple[int, int] = tuple(self._handle.level_dimensions[0])
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            tuple(d) for d in self._handle.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(self._handle.level_downsamples)
        self.properties: dict[str, str] = dict(self._handle.properties)

    # -- pickling: a handle never crosses a process boundary -------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = -1

    @property
    def handle(self) -> _Backend:
        """The backend handle for this process, reopened after fork/spawn or close()."""
        if self._handle is None or self._pid != os.getpid():
            _, self._handle = _open_backend(self.path, self.backend)
            self._pid = os.getpid()
        return self._handle

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def name(self) -> str:
        return self.path.name

    def level_mpp(self, level: int) -> tuple[float, float]:
        """Pixel size (µm/px) of a pyramid level."""
        ds = self.level_downsamples[level]
        return self.mpp[0] * ds, self.mpp[1] * ds

    def best_level_for_mpp(self, mpp: float, tolerance: float = 1e-3) -> int:
        """The coarsest level whose pixels are no larger than ``mpp`` (within a relative tolerance)."""
        scale = mpp / self.mpp[0]
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= scale * (1 + tolerance):
                best = i
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read ``size`` (w, h) pixels of ``level`` whose top-left is level-0 ``location``.

        Returns RGB uint8 (h, w, 3); transparent or out-of-slide areas are white.
        """
        if not 0 <= level < self.level_count:
            raise SlideError(f"level {level} out of range (slide has {self.level_count})", self.path)
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise SlideError(f"invalid region size {size!r}", self.path)
        try:
            arr = self.handle.read_rgba((int(location[0]), int(location[1])), level, (w, h))
        except SlideError:
            raise
        except Exception as e:  # decoder errors from corrupt tiles
            raise SlideError(f"cannot read region at {tuple(location)} level {level}: {e}", self.path) from e
        return _to_rgb_on_white(arr)

    def read_scaled(self, location: tuple[int, int], size: tuple[int, int], mpp: float,
                    tolerance: float = 1e-3) -> np.ndarray:
        """Read a region at an exact pixel size ``mpp`` (µm/px): ``size`` is (w, h) at that MPP.

        Reads from the best pyramid level and resamples (area averaging when shrinking), so
        the result is at the requested MPP, not at the nearest level's.
        """
        w, h = int(size[0]), int(size[1])
        level = self.best_level_for_mpp(mpp, tolerance)
        ds = self.level_downsamples[level]
        fx, fy = mpp / (self.mpp[0] * ds), mpp / (self.mpp[1] * ds)
        if abs(fx - 1) <= tolerance and abs(fy - 1) <= tolerance:
            return self.read_region(location, level, (w, h))
        rw, rh = max(1, round(w * fx)), max(1, round(h * fy))
        region = self.read_region(location, level, (rw, rh))
        interp = cv2.INTER_AREA if fx >= 1 else cv2.INTER_LINEAR
        return cv2.resize(region, (w, h), interpolation=interp)

    def read_whole(self, mpp: float, max_pixels_per_read: int = 1 << 24) -> np.ndarray:
        """The whole slide at a coarse pixel size ``mpp``, read in bands so memory stays bounded."""
        W, H = self.dimensions
        out_w = max(1, round(W * self.mpp[0] / mpp))
        out_h = max(1, round(H * self.mpp[1] / mpp))
        level = self.best_level_for_mpp(mpp)
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        out = np.empty((out_h, out_w, 3), np.uint8)
        rows_per_band = max(1, int(max_pixels_per_read / max(lw, 1) * out_h / max(lh, 1)))
        for r0 in range(0, out_h, rows_per_band):
            r1 = min(out_h, r0 + rows_per_band)
            ly0, ly1 = round(r0 * lh / out_h), max(round(r1 * lh / out_h), round(r0 * lh / out_h) + 1)
            band = self.read_region((0, int(ly0 * ds)), level, (lw, ly1 - ly0))
            out[r0:r1] = cv2.resize(band, (out_w, r1 - r0), interpolation=cv2.INTER_AREA)
        return out

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """RGB thumbnail whose longer side is at most ``max_size`` pixels."""
        W, H = self.dimensions
        factor = max(W, H) / max_size
        return self.read_whole(self.mpp[0] * max(factor, 1.0))

    def info(self) -> dict:
        """A JSON-ready description: geometry, pixel size, backend and vendor."""
        return {
            "path": str(self.path),
            "backend": self.backend,
            "vendor": self.properties.get("openslide.vendor") or self.properties.get("tiffslide.vendor"),
            "dimensions": list(self.dimensions),
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": [round(d, 4) for d in self.level_downsamples],
            "mpp": list(self.mpp),
            "mpp_source": self.mpp_source,
            "magnification": round(mpp_to_magnification(self.mpp[0]), 2),
            "size_mm": [round(self.dimensions[0] * self.mpp[0] / 1000, 3),
                        round(self.dimensions[1] * self.mpp[1] / 1000, 3)],
        }

    def close(self) -> None:
        """Release the backend handle (a later read reopens it)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Slide({self.path.name!r}, {self.dimensions[0]}x{self.dimensions[1]}, "
                f"mpp={self.mpp[0]:.4g}, levels={self.level_count}, backend={self.backend})")


def open_slide(path: str | os.PathLike, mpp: float | tuple[float, float] | None = None,
               backend: str | None = None) -> Slide:
    """Open a slide. ``backend``: "openslide" | "tiffslide" | "image" | None (auto).

    A slide without an MPP in its metadata raises ``MissingMPPError`` unless ``mpp`` is given.
    """
    return Slide(path, mpp=mpp, backend=backend)


# 10x objective ~ 1.0 µm/px is the usual convention (20x ~ 0.5, 40x ~ 0.25).
MPP_AT_10X = 10.0


def mpp_to_magnification(mpp: float) -> float:
    """Nominal objective magnification for a pixel size (10 / mpp)."""
    return MPP_AT_10X / mpp


def magnification_to_mpp(magnification: float) -> float:
    """Nominal pixel size (µm/px) for an objective magnification (10 / mag)."""
    return MPP_AT_10X / magnification
