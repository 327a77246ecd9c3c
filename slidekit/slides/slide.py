"""One slide API over three backends: OpenSlide, tiffslide and plain images (DICOM WSI through OpenSlide).

``open_slide`` picks the backend (OpenSlide first, tiffslide when OpenSlide refuses the file,
plain images through Pillow), checks the file is whole and has a pixel size, and returns a
``Slide``. A ``Slide`` pickles as its path and options and reopens its handle lazily in each
process, so it can be handed to DataLoader workers.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

import cv2
import numpy as np

from slidekit.base.errors import CorruptTileError, MissingMPPError, MPPOverrideWarning, SlideError
from slidekit.slides.dicom import dicom_entry, dicom_stored_tiles, is_dicom_folder
from slidekit.slides.tiffio import StoredTiles, check_tiff_structure, level_page
from slidekit.slides.whole import read_downsampled

if TYPE_CHECKING:
    from slidekit.slides.dicom import DicomStoredTiles

log = logging.getLogger("slidekit")

# A plain image (PNG, JPEG, untiled TIFF) is decoded whole into memory, ~7 bytes per pixel at the
# peak (RGBA, then RGB): 2**30 pixels (a 32k x 32k image) is ~7.5 GB. Larger images should be
# tiled pyramids; raise the limit per call with ``open_slide(..., max_image_pixels=...)``.
MAX_IMAGE_PIXELS = 1 << 30
# ``read_whole`` refuses to decode more level pixels than this (2**35: ~185k x 185k px, minutes
# of decoding) when no pyramid level is close to the requested pixel size.
MAX_WHOLE_READ_PIXELS = 1 << 35

BACKENDS = ("openslide", "tiffslide", "image")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".btf", ".qptiff"}


class _Backend(Protocol):
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: dict[str, str]

    def mpp(self) -> tuple[float, float] | None: ...
    def read_rgba(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray: ...
    def set_tile_cache(self, capacity: int | None) -> None: ...
    def close(self) -> None: ...


#: OpenSlide's own decoded-tile cache per slide handle (its default capacity, bytes).
OPENSLIDE_CACHE_BYTES = 32 << 20


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


MPP_RANGE = (1e-3, 1e3)  # µm/px: from electron-microscope-fine to millimetre pixels


def plausible_mpp(mpp: tuple[float, float]) -> bool:
    """Whether a pixel size (x, y) in µm lies within ``MPP_RANGE``."""
    return all(math.isfinite(v) and MPP_RANGE[0] <= v <= MPP_RANGE[1] for v in mpp)


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

    def set_tile_cache(self, capacity: int | None) -> None:
        import openslide

        if hasattr(openslide, "OpenSlideCache"):  # OpenSlide >= 4 (openslide-bin ships it)
            self._s.set_cache(openslide.OpenSlideCache(OPENSLIDE_CACHE_BYTES if capacity is None else capacity))

    def close(self) -> None:
        self._s.close()


class _ZarrTaskNoise(logging.Filter):
    """Drops asyncio's "Task was destroyed but it is pending!" records for zarr's read tasks.

    After a tile fails to decode, zarr (under tiffslide) leaves its other read tasks pending; at
    exit asyncio logs each one (~20 lines) after the one-line error that already said it all.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("Task was destroyed but it is pending" in msg and "zarr" in msg)


def _quiet_zarr_tasks() -> None:
    aio = logging.getLogger("asyncio")
    if not any(isinstance(f, _ZarrTaskNoise) for f in aio.filters):
        aio.addFilter(_ZarrTaskNoise())
        warnings.filterwarnings("ignore", message=r"coroutine 'concurrent_map\.<locals>\.run' was never awaited",
                                category=RuntimeWarning)


class _TiffSlideBackend:
    def __init__(self, path: Path) -> None:
        import tiffslide

        _quiet_zarr_tasks()

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

    def set_tile_cache(self, capacity: int | None) -> None:
        pass  # no decoded-tile cache of its own to size

    def close(self) -> None:
        self._s.close()


class _ImageBackend:
    """A plain image (PNG, JPEG, non-pyramidal TIFF) held in memory; one level."""

    def __init__(self, path: Path, max_pixels: int | None = None) -> None:
        from PIL import Image, UnidentifiedImageError

        limit = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
        try:
            with warnings.catch_warnings():
                # Our own limit, checked on the header before decoding, replaces Pillow's bomb
                # guard (89 Mpx) for this call only; Pillow's global setting is left as it was.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                try:
                    im = Image.open(path)
                finally:
                    Image.MAX_IMAGE_PIXELS = saved
            with im:
                if im.width * im.height > limit:
                    raise SlideError(_too_big(im.width, im.height, limit), path)
                im.load()
                arr = np.asarray(im.convert("RGBA") if im.mode not in ("RGB", "L") else im)
                self._arr = _to_rgb_on_white(arr)
        except SlideError:
            raise
        except Image.DecompressionBombError as e:
            raise SlideError(f"image too large to decode ({e}); raise max_image_pixels if it is genuine",
                             path) from None
        except UnidentifiedImageError as e:
            raise SlideError("not a slide or image that OpenSlide, tiffslide or Pillow can read", path) from e
        except MemoryError:
            raise SlideError("not enough memory to decode this image whole", path) from None
        except (OSError, SyntaxError, ValueError) as e:
            raise SlideError(f"cannot decode image ({e})", path) from e
        h, w = self._arr.shape[:2]
        self.level_dimensions: tuple[tuple[int, int], ...] = ((w, h),)
        self.level_downsamples: tuple[float, ...] = (1.0,)
        self.properties: dict[str, str] = {}

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

    def set_tile_cache(self, capacity: int | None) -> None:
        pass  # no decoded-tile cache of its own to size

    def close(self) -> None:
        self._arr = np.zeros((0, 0, 3), np.uint8)


def _too_big(w: int, h: int, limit: int) -> str:
    return (f"image is {w} x {h} = {w * h:,} pixels, over the limit of {limit:,} for images decoded whole "
            "(a possible decompression bomb); pass max_image_pixels= if it is genuine")


_BACKEND_CLASSES: dict[str, Callable[[Path], _Backend]] = {
    "openslide": _OpenSlideBackend, "tiffslide": _TiffSlideBackend, "image": _ImageBackend}


def check_tiff_complete(path: Path) -> None:
    """Raise SlideError when a TIFF-family file is truncated (see ``tiffio.check_tiff_structure``)."""
    check_tiff_structure(path)


def _open_backend(path: Path, backend: str | None, max_pixels: int | None = None) -> tuple[str, _Backend]:
    if backend is not None:
        if backend not in BACKENDS:
            raise SlideError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}", path)
        if backend == "image":
            return backend, _ImageBackend(path, max_pixels)
        return backend, _BACKEND_CLASSES[backend](path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "image", _ImageBackend(path, max_pixels)
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
            return "image", _ImageBackend(path, max_pixels)
        return name, b
    try:
        return "image", _ImageBackend(path, max_pixels)
    except SlideError as e:
        if "pixels, over the limit" in str(e):
            raise
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

    Use ``open_slide`` to make one. Coordinates are level-0 pixels ``(x, y)``. ``mpp`` is the
    level-0 pixel size (x, y) in µm, or None for a slide opened with ``require_mpp=False`` that
    has none (then every method that needs it raises MissingMPPError); ``mpp_source`` says where
    it came from ("metadata", "fallback", "override") and ``metadata_mpp`` is the file's own.
    """

    def __init__(self, path: str | os.PathLike, mpp: float | tuple[float, float] | None = None,
                 backend: str | None = None, override_mpp: float | tuple[float, float] | None = None,
                 require_mpp: bool = True, max_image_pixels: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise SlideError("file not found", self.path)
        # A DICOM WSI folder opens through one file of its series (slidekit.slides.dicom); self.path stays the folder.
        self._source = self.path
        if self.path.is_dir():
            if not is_dicom_folder(self.path):
                raise SlideError("is a directory, not a slide file (nor a DICOM WSI folder)", self.path)
            self._source = dicom_entry(self.path)
        if self._source.stat().st_size == 0:
            raise SlideError("file is empty", self.path)
        fallback, override = self._check_mpp(mpp, "mpp"), self._check_mpp(override_mpp, "override_mpp")
        if self.path.suffix.lower() in TIFF_SUFFIXES:
            check_tiff_complete(self.path)
        self._max_image_pixels = max_image_pixels
        self.backend, handle = _open_backend(self._source, backend, max_image_pixels)
        self._handle: _Backend | None = handle
        self._pid = os.getpid()
        self._requested_backend = backend
        self._stored: dict[int, Any] = {}
        self.metadata_mpp: tuple[float, float] | None = handle.mpp()
        self.mpp: tuple[float, float] | None
        self.mpp_source: str | None
        if override is not None:
            self.mpp, self.mpp_source = override, "override"
            meta = self.metadata_mpp
            if meta is not None and any(abs(o / m - 1) > 1e-3 for o, m in zip(override, meta)):
                warnings.warn(MPPOverrideWarning(
                    f"{self.path}: pixel size overridden: metadata says {meta[0]:.4g} x {meta[1]:.4g} µm/px, "
                    f"using {override[0]:.4g} x {override[1]:.4g} µm/px as asked"), stacklevel=3)
        elif self.metadata_mpp is not None and not plausible_mpp(self.metadata_mpp):
            # damaged or foreign metadata (an SVS saying 9e9 µm/px): not a pixel size to size arrays by
            why = (f"metadata pixel size {self.metadata_mpp[0]:.4g} x {self.metadata_mpp[1]:.4g} µm/px is implausible "
                   f"(outside {MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} µm/px: damaged metadata?)")
            if fallback is not None:
                self.mpp, self.mpp_source = fallback, "fallback"
                warnings.warn(MPPOverrideWarning(f"{self.path}: {why}; using the given {fallback[0]:.4g} µm/px"),
                              stacklevel=3)
            elif require_mpp:
                self.close()
                raise SlideError(f"{why}; give the right one with --override-mpp (API: override_mpp=)", self.path)
            else:
                self.mpp, self.mpp_source = None, None
                self._mpp_problem = why
        elif self.metadata_mpp is not None:
            self.mpp, self.mpp_source = self.metadata_mpp, "metadata"
            if fallback is not None:
                # The fallback is for slides without an MPP; the metadata wins (use override_mpp to force).
                log.info("%s: metadata MPP %.4g used; fallback mpp %.4g ignored", self.path,
                         self.metadata_mpp[0], fallback[0])
        elif fallback is not None:
            self.mpp, self.mpp_source = fallback, "fallback"
        elif require_mpp:
            self.close()
            raise MissingMPPError(
                "slide has no microns-per-pixel (MPP) in its metadata; pass mpp= (CLI: --slide-mpp)", self.path)
        else:
            self.mpp, self.mpp_source = None, None
        w0, h0 = handle.level_dimensions[0]
        self.dimensions: tuple[int, int] = (w0, h0)
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple((w, h) for w, h in handle.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(handle.level_downsamples)
        self.properties: dict[str, str] = dict(handle.properties)

    def _check_mpp(self, value: Any, name: str) -> tuple[float, float] | None:
        if value is None:
            return None
        pair: Any = (value, value) if np.isscalar(value) else value
        mx, my = pair
        if not (_float_or_none(mx) and _float_or_none(my)):
            raise SlideError(f"invalid {name} {value!r}: must be a positive number", self.path)
        if not plausible_mpp((float(mx), float(my))):
            raise SlideError(f"invalid {name} {value!r}: a pixel size must lie within {MPP_RANGE[0]:g}-"
                             f"{MPP_RANGE[1]:g} µm/px", self.path)
        return float(mx), float(my)

    def _need_mpp(self) -> tuple[float, float]:
        if self.mpp is None and getattr(self, "_mpp_problem", None):
            raise MissingMPPError(f"{self._mpp_problem}; give the right one with --override-mpp "
                                  "(API: override_mpp=)", self.path)
        if self.mpp is None:
            raise MissingMPPError("slide has no microns-per-pixel (MPP) in its metadata and none was given; "
                                  "pass mpp= (CLI: --slide-mpp)", self.path)
        return self.mpp

    # -- pickling: a handle never crosses a process boundary -------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_stored"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_stored", {})
        self._pid = -1

    @property
    def handle(self) -> _Backend:
        """The backend handle for this process, reopened after fork/spawn or close()."""
        if self._handle is None or self._pid != os.getpid():
            _, self._handle = _open_backend(getattr(self, "_source", self.path), self.backend,
                                            getattr(self, "_max_image_pixels", None))
            self._pid = os.getpid()
            self._stored = {}
        return self._handle

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def name(self) -> str:
        return self.path.name

    def level_mpp(self, level: int) -> tuple[float, float]:
        """Pixel size (µm/px) of a pyramid level."""
        mx, my = self._need_mpp()
        ds = self.level_downsamples[level]
        return mx * ds, my * ds

    def best_level_for_mpp(self, mpp: float, tolerance: float = 1e-3) -> int:
        """The coarsest level whose pixels are no larger than ``mpp`` (within a relative tolerance)."""
        return self._best_level_for_downsample(mpp / self._need_mpp()[0], tolerance)

    def _best_level_for_downsample(self, scale: float, tolerance: float = 1e-3) -> int:
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= scale * (1 + tolerance):
                best = i
        return best

    def stored_tiles(self, level: int) -> Any:
        """The level's stored tiles (``tiffio.StoredTiles``) for TIFF-family slides and plain DICOM
        WSI levels (``dicom.DicomStoredTiles``), else None."""
        if level not in self._stored:
            st: StoredTiles | DicomStoredTiles | None = None
            if self.backend == "openslide" and self.properties.get("openslide.vendor") == "dicom":
                try:
                    st = dicom_stored_tiles(self._source, self.level_dimensions[level])
                except Exception:  # an unusual layout: read through OpenSlide instead
                    st = None
            elif self.backend != "image" and self.path.suffix.lower() in TIFF_SUFFIXES:
                address = level_page(self.path, self.level_dimensions[level])
                if address is not None:
                    try:
                        st = StoredTiles(self.path, address)
                    except Exception:
                        st = None
            self._stored[level] = st
        return self._stored[level]

    def check_tiles(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> None:
        """Raise CorruptTileError when a stored JPEG tile under the region is damaged.

        Decoders only warn about corrupt JPEG data and return garbage; each stored tile is
        checked once per process (see ``tiffio.jpeg_scan_problem``).
        """
        _ = self.handle  # resets per-process caches after a fork
        st = self.stored_tiles(level)
        if st is None or not st.jpeg:
            return
        ds = self.level_downsamples[level]
        lx, ly = int(location[0] // ds), int(location[1] // ds)
        bad = st.verify_box(max(lx, 0), max(ly, 0), min(lx + size[0], st.width), min(ly + size[1], st.height))
        if bad is not None:
            (tx, ty), problem = bad
            x0, y0 = round(tx * ds), round(ty * ds)
            raise CorruptTileError(f"damaged tile at level-0 ({x0}, {y0}), level {level}: {problem}",
                                   self.path, location=(x0, y0), level=level)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int],
                    verify: bool = True) -> np.ndarray:
        """Read ``size`` (w, h) pixels of ``level`` whose top-left is level-0 ``location``.

        Returns RGB uint8 (h, w, 3); transparent or out-of-slide areas are white. ``verify``
        checks the stored JPEG tiles under the region (once each) and raises CorruptTileError
        for a damaged one instead of returning what the decoder made of it.
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
            self.check_tiles(location, level, (w, h))  # names the damaged tile when it can
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SlideError(f"cannot read region at {tuple(location)} level {level}: {msg}", self.path) from None
        if verify:
            self.check_tiles(location, level, (w, h))
        return _to_rgb_on_white(arr)

    def read_scaled(self, location: tuple[int, int], size: tuple[int, int], mpp: float,
                    tolerance: float = 1e-3, verify: bool = True) -> np.ndarray:
        """Read a region at an exact pixel size ``mpp`` (µm/px): ``size`` is (w, h) at that MPP.

        Reads from the best pyramid level and resamples (area averaging when shrinking), so
        the result is at the requested MPP, not at the nearest level's.
        """
        w, h = int(size[0]), int(size[1])
        smx, smy = self._need_mpp()
        level = self.best_level_for_mpp(mpp, tolerance)
        ds = self.level_downsamples[level]
        fx, fy = mpp / (smx * ds), mpp / (smy * ds)
        if abs(fx - 1) <= tolerance and abs(fy - 1) <= tolerance:
            return self.read_region(location, level, (w, h), verify=verify)
        rw, rh = max(1, round(w * fx)), max(1, round(h * fy))
        region = self.read_region(location, level, (rw, rh), verify=verify)
        interp = cv2.INTER_AREA if fx >= 1 else cv2.INTER_LINEAR
        return cv2.resize(region, (w, h), interpolation=interp)

    def tile_size(self, level: int) -> tuple[int, int] | None:
        """The stored tile size (width, height) of a pyramid level, where the backend says it (OpenSlide's
        ``openslide.level[N].tile-width``/``-height``), else None."""
        w = self.properties.get(f"openslide.level[{level}].tile-width")
        h = self.properties.get(f"openslide.level[{level}].tile-height")
        try:
            return (int(w), int(h)) if w and h and int(w) > 0 and int(h) > 0 else None
        except ValueError:
            return None

    @contextlib.contextmanager
    def tile_cache(self, capacity: int | None) -> Iterator[Slide]:
        """Reads inside keep at most ``capacity`` bytes of decoded tiles; OpenSlide's default after.

        OpenSlide keeps up to ``OPENSLIDE_CACHE_BYTES`` (32 MiB) of decoded tiles per slide. A pass that
        reads a slide once, band after band, needs only the tile rows a band touches: sized to those, the
        cache does not grow with the slide. Other backends keep no tile cache of their own: a no-op.

        Parameters
        ----------
        capacity
            Bytes of decoded tiles to keep (None: OpenSlide's default).
        """
        self.handle.set_tile_cache(capacity)
        try:
            yield self
        finally:
            self.handle.set_tile_cache(None)

    def read_whole(self, mpp: float, max_pixels_per_read: int = 1 << 24, progress: bool | None = None,
                   max_read_pixels: int | None = None) -> np.ndarray:
        """The whole slide at a coarse pixel size ``mpp``, read in bands so memory stays bounded.

        When the nearest level is much finer than ``mpp`` (a single-level slide), stored tiles are
        decoded directly and shrunk band by band. ``progress``: a bar (None: only for big reads).
        Refuses (SlideError) to decode more than ``max_read_pixels`` (default
        ``MAX_WHOLE_READ_PIXELS``) level pixels.
        """
        mx, my = self._need_mpp()
        W, H = self.dimensions
        return self._read_downsampled(max(1, round(W * mx / mpp)), max(1, round(H * my / mpp)),
                                      mpp / mx, max_pixels_per_read, progress, max_read_pixels)

    def _read_downsampled(self, out_w: int, out_h: int, scale: float, max_pixels_per_read: int = 1 << 24,
                          progress: bool | None = None, max_read_pixels: int | None = None,
                          sample: bool = False) -> np.ndarray:
        return read_downsampled(self, out_w, out_h, scale, max_pixels_per_read, progress,
                                MAX_WHOLE_READ_PIXELS if max_read_pixels is None else max_read_pixels, sample=sample)

    def thumbnail(self, max_size: int = 1024, progress: bool | None = None) -> np.ndarray:
        """RGB thumbnail whose longer side is at most ``max_size`` pixels (needs no MPP)."""
        W, H = self.dimensions
        factor = max(max(W, H) / max_size, 1.0)
        # a preview: on a huge single-level slide it may come from a strided sample of stored tiles
        # (warned); read_whole, which tissue detection and QC use, never samples
        return self._read_downsampled(max(1, round(W / factor)), max(1, round(H / factor)), factor,
                                      progress=progress, sample=True)

    def info(self) -> dict:
        """A JSON-ready description: geometry, pixel size (None when unknown), backend and vendor."""
        mpp = self.mpp
        return {
            "path": str(self.path),
            "backend": self.backend,
            "vendor": self.properties.get("openslide.vendor") or self.properties.get("tiffslide.vendor"),
            "dimensions": list(self.dimensions),
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": [round(d, 4) for d in self.level_downsamples],
            "mpp": None if mpp is None else list(mpp),
            "mpp_source": self.mpp_source,
            "metadata_mpp": None if self.metadata_mpp is None else list(self.metadata_mpp),
            "magnification": None if mpp is None else round(mpp_to_magnification(mpp[0]), 2),
            "size_mm": None if mpp is None else [round(self.dimensions[0] * mpp[0] / 1000, 3),
                                                 round(self.dimensions[1] * mpp[1] / 1000, 3)],
        }

    def close(self) -> None:
        """Release the backend handle (a later read reopens it)."""
        for st in getattr(self, "_stored", {}).values():
            if st is not None:
                st.close()
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mpp = "unknown" if self.mpp is None else f"{self.mpp[0]:.4g}"
        return (f"Slide({self.path.name!r}, {self.dimensions[0]}x{self.dimensions[1]}, "
                f"mpp={mpp}, levels={self.level_count}, backend={self.backend})")


def open_slide(path: str | os.PathLike, mpp: float | tuple[float, float] | None = None,
               backend: str | None = None, override_mpp: float | tuple[float, float] | None = None,
               require_mpp: bool = True, max_image_pixels: int | None = None) -> Slide:
    """Open a slide. ``backend``: "openslide" | "tiffslide" | "image" | None (auto).

    Pixel size: the slide's metadata; ``mpp`` is a fallback used only where the metadata has
    none; ``override_mpp`` replaces the metadata (with an ``MPPOverrideWarning`` when they
    differ). Without either, a slide lacking an MPP raises ``MissingMPPError`` unless
    ``require_mpp=False`` (then ``slide.mpp`` is None). ``max_image_pixels`` raises the limit
    for plain images decoded whole (``MAX_IMAGE_PIXELS``).
    """
    return Slide(path, mpp=mpp, backend=backend, override_mpp=override_mpp, require_mpp=require_mpp,
                 max_image_pixels=max_image_pixels)


# 10x objective ~ 1.0 µm/px is the usual convention (20x ~ 0.5, 40x ~ 0.25).
MPP_AT_10X = 10.0


def mpp_to_magnification(mpp: float) -> float:
    """Nominal objective magnification for a pixel size (10 / mpp)."""
    return MPP_AT_10X / mpp


def magnification_to_mpp(magnification: float) -> float:
    """Nominal pixel size (µm/px) for an objective magnification (10 / mag)."""
    return MPP_AT_10X / magnification
