"""TIFF-level checks and stored-tile access that the slide readers do not give.

- ``check_tiff_structure``: walks every image directory (IFD chain and SubIFDs) and the data
  offsets, so a truncated copy is refused instead of opening with fewer pyramid levels.
- ``StoredTiles``: one pyramid level's stored tiles, decoded directly (tifffile/imagecodecs),
  with ``verify`` for JPEG tiles. libjpeg only *warns* about corrupt entropy data and then
  decodes garbage, and imagecodecs drops those warnings; ``verify`` detects the same two
  conditions libjpeg warns about (the scan ends before its data does, or needs more data than
  there is) by decoding the tile again with its last entropy bytes changed and with bytes
  appended, plus the marker structure of the scan.
"""
from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np

from slidekit.base.errors import SlideError

# TIFF field type -> bytes per value (1 BYTE, 2 ASCII, 3 SHORT, 4 LONG, 5 RATIONAL, 6 SBYTE,
# 7 UNDEFINED, 8 SSHORT, 9 SLONG, 10 SRATIONAL, 11 FLOAT, 12 DOUBLE, 13 IFD, 16 LONG8, 17 SLONG8, 18 IFD8)
_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4,
              16: 8, 17: 8, 18: 8}
_SUBIFDS = 330
_MAX_IFDS = 100_000  # a loop guard for corrupt chains


def _ifd_problem(path: Path) -> str | None:
    """Walk the IFD chain (and SubIFDs); describe the first directory or tag value past the end."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
        if head[:2] not in (b"II", b"MM") or len(head) < 8:
            return None
        bo = "<" if head[:2] == b"II" else ">"
        version = struct.unpack(bo + "H", head[2:4])[0]
        if version == 42:
            big, first = False, struct.unpack(bo + "I", head[4:8])[0]
        elif version == 43 and len(head) >= 16:
            big, first = True, struct.unpack(bo + "Q", head[8:16])[0]
        else:
            return None
        cnt_fmt, ent_size, off_fmt, off_size = ("Q", 20, "Q", 8) if big else ("H", 12, "I", 4)
        cnt_size = 8 if big else 2
        todo, seen, n = [first], set(), 0
        while todo:
            offset = todo.pop()
            if offset == 0 or offset in seen:
                continue
            seen.add(offset)
            n += 1
            if n > _MAX_IFDS:
                return "too many image directories (a loop in a corrupt file?)"
            if offset + cnt_size > size:
                return f"image directory {n} lies at byte {offset}, past the file's end"
            f.seek(offset)
            count = struct.unpack(bo + cnt_fmt, f.read(cnt_size))[0]
            end = offset + cnt_size + count * ent_size + off_size
            if end > size:
                return f"image directory {n} ({count} entries at byte {offset}) ends past the file's end"
            raw = f.read(count * ent_size + off_size)
            for i in range(count):
                e = raw[i * ent_size:(i + 1) * ent_size]
                tag, typ = struct.unpack(bo + "HH", e[:4])
                vcount = struct.unpack(bo + off_fmt, e[4:4 + off_size])[0]
                nbytes = _TYPE_SIZE.get(typ, 1) * vcount
                if nbytes > off_size:
                    voff = struct.unpack(bo + off_fmt, e[4 + off_size:4 + 2 * off_size])[0]
                    if voff + nbytes > size:
                        return f"tag {tag} of image directory {n} lies past the file's end"
                if tag == _SUBIFDS and typ in (4, 13, 16, 18):
                    isz = 8 if typ in (16, 18) else 4
                    fmt = bo + ("Q" if isz == 8 else "I") * vcount
                    if nbytes > off_size:
                        pos = f.tell()
                        f.seek(voff)
                        todo.extend(struct.unpack(fmt, f.read(nbytes)))
                        f.seek(pos)
                    else:
                        todo.extend(struct.unpack(fmt, e[4 + off_size:4 + off_size + nbytes]))
            todo.append(struct.unpack(bo + off_fmt, raw[-off_size:])[0])
    return None


def check_tiff_structure(path: Path) -> None:
    """Raise SlideError when a TIFF-family file is truncated or its directories are unreadable.

    Every IFD (the main chain and SubIFD pyramids, as in OME-TIFF), every out-of-line tag value
    and every strip/tile of every pyramid level must lie inside the file.
    """
    import tifffile

    size = path.stat().st_size
    problem = _ifd_problem(path)
    if problem:
        raise SlideError(f"truncated or damaged file: {problem} ({size} bytes); the copy is incomplete", path)
    try:
        with tifffile.TiffFile(path) as tif:
            if not len(tif.pages):
                raise SlideError("TIFF file holds no readable image", path)
            pages = list(tif.pages)
            for series in tif.series:
                for level in series.levels:
                    pages.extend(p for p in level.pages if p is not None)
            for page in pages:
                offsets, counts = page.dataoffsets, page.databytecounts
                if offsets and max(o + c for o, c in zip(offsets, counts)) > size:
                    raise SlideError(
                        f"truncated file: image data ends past the file's {size} bytes "
                        f"(page {page.index}); the copy is incomplete", path)
    except SlideError:
        raise
    except Exception as e:  # tifffile raises TiffFileError, ValueError, struct.error ...
        raise SlideError(f"not a readable TIFF-family file ({e})", path) from e


def level_page(path: Path, level_dims: tuple[int, int]) -> tuple | None:
    """Where the tiled 8-bit RGB(A) page with ``level_dims`` is: ``("series", s, level)`` (series
    levels first, so OME SubIFD pyramids are found) or ``("page", i)``; None when there is none."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            for s, series in enumerate(tif.series):
                for lv, level in enumerate(series.levels):
                    if _usable(level.keyframe, level_dims):
                        return ("series", s, lv)
            for i, page in enumerate(tif.pages):
                if _usable(page, level_dims):
                    return ("page", i)
    except Exception:
        return None
    return None


def _usable(page, level_dims: tuple[int, int]) -> bool:
    return (getattr(page, "is_tiled", False) and (page.imagewidth, page.imagelength) == tuple(level_dims)
            and page.dtype == np.uint8 and page.samplesperpixel in (3, 4) and page.planarconfig == 1
            and page.imagedepth == 1)


class StoredTiles:
    """The stored tiles of one tiled TIFF page: direct decode by (col, row) and JPEG checks.

    Picklable (handles are per process); reads use ``os.pread`` so threads can share it.
    """

    def __init__(self, path: Path, address: tuple) -> None:
        import tifffile

        self.path, self.address = Path(path), tuple(address)
        with tifffile.TiffFile(self.path) as tif:
            page = self._page(tif)
            self.width, self.height = page.imagewidth, page.imagelength
            self.tile_w, self.tile_h = page.tilewidth, page.tilelength
            self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            self.counts = np.asarray(page.databytecounts, dtype=np.int64)
            self.jpeg = page.compression == 7
            photometric = int(page.photometric)
            rgb3 = page.samplesperpixel == 3
        self.across = math.ceil(self.width / self.tile_w)
        self.down = math.ceil(self.height / self.tile_h)
        self._local: dict[int, tuple] = {}
        self.verified: set[int] = set()
        # One strict decode (simplejpeg) checks and decodes a tile at once; it cannot be told the
        # colour space, so RGB-coded tiles (photometric 2) are tried strict too and the first-tile
        # check against the backend (regions.tiling.native_tiles_for) turns it off on a mismatch.
        if not self.jpeg:
            self.strict, self.check_reason = False, "tiles are not JPEG"
        elif not rgb3:
            self.strict, self.check_reason = False, "JPEG tiles with an alpha sample: decode + variant check"
        else:
            self.strict = True
            self.check_reason = ("YCbCr JPEG tiles: strict decode" if photometric == 6 else
                                 "RGB-coded JPEG tiles: strict decode, confirmed by the first-tile check")

    def use_variant_check(self, reason: str) -> None:
        """Fall back to decode + the two-variant check (``jpeg_scan_problem``), saying why."""
        self.strict, self.check_reason = False, reason

    @property
    def check(self) -> str:
        """How a first read checks each JPEG tile: "strict" (one strict decode) or "variants"."""
        return "strict" if self.strict else "variants"

    def _page(self, tif):
        if self.address[0] == "series":
            return tif.series[self.address[1]].levels[self.address[2]].keyframe
        return tif.pages[self.address[1]]

    def _state(self) -> tuple:
        pid = os.getpid()
        if pid not in self._local:
            import tifffile

            tif = tifffile.TiffFile(self.path)
            page = self._page(tif)
            self._local = {pid: (tif, page.decode, page.jpegtables, os.open(self.path, os.O_RDONLY))}
            self.verified = set()
        return self._local[pid]

    def __getstate__(self) -> dict:
        d = self.__dict__.copy()
        d["_local"], d["verified"] = {}, set()
        return d

    def close(self) -> None:
        """Close this process's file handles (a later read reopens them)."""
        state = self._local.pop(os.getpid(), None)
        self._local = {}
        if state is not None:
            state[0].close()
            os.close(state[3])

    def index(self, col: int, row: int) -> int:
        return row * self.across + col

    def raw(self, index: int) -> bytes:
        fd = self._state()[3]
        return os.pread(fd, int(self.counts[index]), int(self.offsets[index]))

    def decode(self, index: int, data: bytes | None = None) -> np.ndarray:
        """Tile ``index`` as (tile_h, tile_w, 3) uint8 (tiles never written are white)."""
        _, decode, tables, _ = self._state()
        if int(self.counts[index]) == 0:
            return np.full((self.tile_h, self.tile_w, 3), 255, np.uint8)
        data = self.raw(index) if data is None else data
        seg = decode(data, index, jpegtables=tables)[0]
        return np.asarray(seg).reshape(self.tile_h, self.tile_w, -1)[..., :3]

    def stream(self, index: int, data: bytes | None = None) -> bytes:
        """Tile ``index``'s JPEG stream completed with the page's shared JPEGTables."""
        tables = self._state()[2]
        data = self.raw(index) if data is None else data
        if tables and len(tables) > 4 and data[:2] == b"\xff\xd8":
            return data[:2] + bytes(tables[2:-2]) + data[2:]
        return data

    def decode_checked(self, index: int, out: np.ndarray | None = None) -> tuple[np.ndarray | None, str | None]:
        """(tile, None) or (None, what is wrong with it): one strict decode where ``strict``,
        else a decode plus ``verify``. Decoder errors are problems, never raised. ``out`` may
        receive the strict decode's pixels (see ``strict_decode``)."""
        try:
            if not self.strict or int(self.counts[index]) == 0:
                tile = self.decode(index)
                problem = self.verify(index, tile)
                return (None, problem) if problem else (tile, None)
            return strict_decode(self.stream(index), self.tile_w, self.tile_h, out)
        except Exception as e:  # a decoder error is a damaged tile too
            return None, f"{type(e).__name__}: {e}"

    def verify(self, index: int, decoded: np.ndarray | None = None) -> str | None:
        """None when stored tile ``index`` is sound, else what is wrong with it (JPEG only)."""
        if not self.jpeg or index in self.verified or int(self.counts[index]) == 0:
            return None
        data = self.raw(index)
        problem = jpeg_scan_problem(data, lambda d: self.decode(index, d),
                                    self.decode(index, data) if decoded is None else decoded)
        if problem is None:
            self.verified.add(index)
        return problem

    def verify_box(self, x0: int, y0: int, x1: int, y1: int) -> tuple[tuple[int, int], str] | None:
        """Verify every stored tile touching the level pixel box; the first bad one's
        (level x, y) and problem, or None."""
        c0, r0 = max(0, x0 // self.tile_w), max(0, y0 // self.tile_h)
        c1, r1 = min(self.across - 1, (x1 - 1) // self.tile_w), min(self.down - 1, (y1 - 1) // self.tile_h)
        for r in range(r0, r1 + 1):
            for c in range(c0, c1 + 1):
                index = self.index(c, r)
                if index in self.verified:
                    continue
                _, problem = self.decode_checked(index)
                if problem is None:
                    self.verified.add(index)
                if problem:
                    return (c * self.tile_w, r * self.tile_h), problem
        return None


def strict_decode(stream: bytes, width: int, height: int,
                  out: np.ndarray | None = None) -> tuple[np.ndarray | None, str | None]:
    """Decode a complete baseline JPEG stream once, strictly: libjpeg's warnings about corrupt
    data (which other decoders drop) are problems: a stray marker, a scan that stops before its
    data or runs out of it (the facts ``jpeg_scan_problem`` tests with two more decodes; on 1,000
    seeded random damages the full marker walk of ``jpeg_scan_variants`` caught none that this
    missed, so only the stream's two ends are checked here).
    (tile (height, width, 3), None) or (None, problem). ``out``, a C-contiguous (height, width, 3)
    uint8 array, receives the pixels (the batch a reader fills: no copy), and is the tile returned."""
    import simplejpeg

    if stream[:2] != b"\xff\xd8":
        return None, "not a JPEG stream"
    if stream[-2:] != b"\xff\xd9":
        return None, "JPEG stream does not end with its end-of-image marker"
    try:
        if out is not None:  # the header first, so that a tile of another size is named as such
            h, w = simplejpeg.decode_jpeg_header(stream)[:2]
            if (h, w) != (height, width):
                return None, f"JPEG tile is {w}x{h}, not {width}x{height}"
            tile = simplejpeg.decode_jpeg(stream, colorspace="RGB", strict=True, buffer=out)
        else:
            tile = simplejpeg.decode_jpeg(stream, colorspace="RGB", strict=True)
    except ValueError as e:
        return None, f"corrupt JPEG data ({e})"
    if tile.shape[:2] != (height, width):
        return None, f"JPEG tile is {tile.shape[1]}x{tile.shape[0]}, not {width}x{height}"
    return tile, None


def jpeg_scan_problem(data: bytes, decode, reference: np.ndarray) -> str | None:
    """Why a baseline JPEG stream is corrupt, or None.

    ``decode(bytes) -> array`` decodes a variant of the stream; ``reference`` is the decode of
    ``data`` itself. Checks: the scan's markers (only stuffed 0xFF00 and RST0-7 in order, EOI
    last), that changing the last entropy bytes changes the image (else the decoder stopped
    early: libjpeg's "extraneous bytes before marker") and that appending bytes does not (else it
    ran out of data: libjpeg's "premature end of data segment").
    """
    problem, variants = jpeg_scan_variants(data)
    if problem or not variants:
        return problem
    changed, longer = variants
    if np.array_equal(decode(changed), reference):
        return JPEG_STOPPED_EARLY
    if not np.array_equal(decode(longer), reference):
        return JPEG_RAN_OUT
    return None


JPEG_STOPPED_EARLY = "JPEG scan ends before its data does (corrupt entropy data)"
JPEG_RAN_OUT = "JPEG scan needs more data than it has (corrupt entropy data)"


def jpeg_scan_variants(data: bytes, variants: bool = True) -> tuple[str | None, list[bytes]]:
    """The marker checks of ``jpeg_scan_problem`` (problem or None) and the two variant streams
    whose decodes it compares with the stream's own: ``[last entropy bytes changed, bytes
    appended]`` (empty when the stream has too little entropy data, or is progressive). The
    first must decode differently, the second identically (the GPU decode path batches them)."""
    buf = np.frombuffer(data, np.uint8)
    if len(buf) < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return "not a JPEG stream", []
    if buf[-2] != 0xFF or buf[-1] != 0xD9:
        return "JPEG stream does not end with its end-of-image marker", []
    # Walk the header segments to the (single, baseline) scan.
    pos, scan_start = 2, None
    while pos + 4 <= len(buf):
        if buf[pos] != 0xFF:
            return f"bad JPEG marker structure at byte {pos}", []
        marker = int(buf[pos + 1])
        if marker == 0xFF:
            pos += 1
            continue
        length = int(buf[pos + 2]) << 8 | int(buf[pos + 3])
        if marker == 0xDA:
            scan_start = pos + 2 + length
            break
        if marker in (0xC2, 0xC6, 0xCA):
            return None, []  # progressive: not used in TIFF tiles; libjpeg's own checks only
        pos += 2 + length
    if scan_start is None or scan_start >= len(buf) - 2:
        return "JPEG stream has no scan data", []
    scan = buf[scan_start:-2]
    ff = np.flatnonzero(scan[:-1] == 0xFF)
    if len(ff) and scan[-1] == 0xFF:
        return "JPEG scan data ends with a stray 0xFF", []
    after = scan[ff + 1] if len(ff) else np.zeros(0, np.uint8)
    ok = (after == 0x00) | ((after >= 0xD0) & (after <= 0xD7))
    if not ok.all():
        return f"unexpected marker 0xFF{int(after[~ok][0]):02X} inside JPEG scan data", []
    rst = after[after != 0x00].astype(np.int64) - 0xD0
    if len(rst) and (rst != np.arange(len(rst)) % 8).any():
        return "JPEG restart markers out of sequence (data lost or damaged)", []
    # Bytes that are entropy data proper: not 0xFF, not a stuffed 0x00, not a RST code.
    marker_bytes = np.zeros(len(scan), bool)
    if len(ff):
        marker_bytes[ff] = True
        marker_bytes[ff + 1] = True
    candidates = np.flatnonzero(~marker_bytes)
    if len(candidates) < 3 or not variants:
        return None, []
    end = scan_start + len(scan)
    changed = bytearray(data)
    for i in candidates[-3:-1]:  # the last byte may be mostly padding bits
        v = changed[scan_start + i] ^ 0x55
        changed[scan_start + i] = v if v != 0xFF else 0xFE
    longer = bytes(data[:end]) + b"\x5a" * 64 + b"\xff\xd9"
    return None, [bytes(changed), longer]
