"""GPU-ready reads: hand a batch's stored JPEG tiles to the GPU and decode them there.

On CUDA, when the native fast path reads one stored JPEG tile per grid tile (aligned, no
overlap), the compressed bytes (with the TIFF's shared JPEG tables spliced in, so each is a
complete stream) can be decoded in one batch by ``torchvision.io.decode_jpeg(device="cuda")``
(nvJPEG), which takes the decode off the CPU. ``decode_path`` says which path a reader takes and
why; every other case decodes on the CPU exactly as ``TileReader.read_batch`` does.

Wired into ``Predictor`` (``slidekit.infer.predictor``): on the GPU path its DataLoader workers read
``StreamBatches`` -- the byte streams of a batch, no decode -- and the main process decodes them
with ``StreamDecoder``. Damaged tiles are still caught: each stream comes with the two variants
that ``tiffio.jpeg_scan_problem`` compares (last entropy bytes changed: must decode differently;
bytes appended: must decode identically), decoded in the same GPU batch, so no stored tile is
decoded on the CPU (the GPU decodes three streams per tile instead of one). The GPU path is
checked once per run against the CPU decode of the first tile (colour conversion and chroma
upsampling differ slightly between decoders); a larger difference, or an nvJPEG failure, sends
the batch and the rest of the run to the CPU decode, with the reason recorded
(``Predictor.decode``, ``summary.json`` ``decode``). ``BatchDecoder`` is the same for a caller
with its own read loop and no DataLoader workers.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from slidekit.base.errors import CorruptTileError
from slidekit.regions.tiling import TileReader, _NativeTiles
from slidekit.slides.tiffio import JPEG_RAN_OUT, JPEG_STOPPED_EARLY, jpeg_scan_variants

# Mean absolute difference (0-255) allowed between the GPU and CPU decodes of the check tile.
GPU_DECODE_TOLERANCE = 3.0


def decode_jpeg_batch(streams: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode JPEG streams (1-D uint8 tensors) on ``device`` as (3, H, W) uint8 RGB (nvJPEG on CUDA).
    Tests replace it to run the GPU path's plumbing on the CPU."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(streams, mode=ImageReadMode.RGB, device=device)


def decode_path(reader: TileReader, device: Any) -> tuple[str, str]:
    """``("gpu", why)`` when ``reader``'s tiles can be decoded on CUDA ``device``, else ``("cpu", why)``."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "cpu", "not on CUDA"
    native = reader.native
    if native is None:
        return "cpu", "the grid does not read stored tiles directly (resampled or not a tiled TIFF)"
    if not native.stored.jpeg:
        return "cpu", "stored tiles are not JPEG"
    if native.capacity:
        return "cpu", "grid tiles are cut from several stored tiles (overlap or misaligned)"
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return "cpu", "torchvision is not installed"
    return "gpu", "aligned JPEG stored tiles: nvJPEG batch decode"


def jpeg_stream(reader: TileReader, i: int) -> bytes:
    """Grid tile ``i``'s stored JPEG as a complete stream (the TIFF's JPEG tables spliced in)."""
    return _complete_stream(_native(reader).stored, _stored_index(reader, i))


def _complete_stream(stored: Any, index: int) -> bytes:
    data = stored.raw(index)
    tables = stored._state()[2]
    if tables:  # tables: SOI ... EOI; the tile: SOI ... EOI -> SOI + tables body + tile body
        data = data[:2] + bytes(tables)[2:-2] + data[2:]
    return data


def _native(reader: TileReader) -> _NativeTiles:
    """``reader``'s stored-tile view; only readers ``decode_path`` sends to the GPU get here."""
    native = reader.native
    if native is None:
        raise ValueError("the grid does not read stored tiles directly: no GPU decode path")
    return native


def _level_origin(reader: TileReader, i: int) -> tuple[int, int]:
    """Grid tile ``i``'s top-left corner in pixels of the level the fast path reads."""
    native = _native(reader)
    x, y = (int(v) for v in reader.grid.coords[i])
    return round(x / native.downsample), round(y / native.downsample)


def _stored_index(reader: TileReader, i: int) -> int:
    """The stored tile that grid tile ``i`` is (aligned grid: one stored tile per grid tile)."""
    native = _native(reader)
    lx, ly = _level_origin(reader, i)
    return native.stored.index(lx // native.tile_w, ly // native.tile_h)


class BatchDecoder:
    """Reads batches of grid tiles for ``device`` in this process: (k, s, s, 3) uint8 on the device.

    ``path`` is ``decode_path``'s choice; on the GPU path a batch is read as ``StreamBatches``
    does and decoded by a ``StreamDecoder`` (which falls back to the CPU, ``why`` saying so).
    """

    def __init__(self, reader: TileReader, device: Any) -> None:
        self.reader, self.device = reader, torch.device(device)
        self.path, self.why = decode_path(reader, self.device)
        self._gpu = StreamDecoder(reader, self.device, self.why) if self.path == "gpu" else None

    def read(self, idx: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """(indices read, tiles on the device); damaged tiles follow the reader's ``on_bad_tile``."""
        idx = np.asarray(idx, np.int64)
        if self._gpu is not None:
            got, tiles = self._gpu.decode(StreamBatches(self.reader, idx, max(len(idx), 1))[0])
            self.path, self.why = self._gpu.path, self._gpu.why
            return got.numpy(), tiles
        read, cpu_tiles = self.reader.read_batch(idx)
        return read, torch.from_numpy(cpu_tiles).to(self.device)


# ---------------------------------------------------------------------------------------------
# The Predictor's GPU path: workers read byte streams, the main process decodes on the device


class StreamBatches(torch.utils.data.Dataset):
    """Item ``b`` is batch ``b`` of ``index`` as compressed streams, for ``StreamDecoder``:
    ``(tile indices, bytes, offsets, problems)`` -- three streams per tile (the stream, then the
    two variants ``jpeg_scan_variants`` makes; empty where not needed) concatenated in ``bytes``
    (uint8) with ``offsets`` (3k + 1, int64), and the marker-check problem of each tile (or None)."""

    def __init__(self, reader: TileReader, index: np.ndarray, batch_size: int) -> None:
        self.reader, self.index, self.batch_size = reader, np.asarray(index, np.int64), batch_size

    def __len__(self) -> int:
        return -(-len(self.index) // self.batch_size)

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
        idx = self.index[b * self.batch_size:(b + 1) * self.batch_size]
        parts: list[bytes] = []
        problems: list[str | None] = []
        stored = _native(self.reader).stored
        for i in idx:
            k = _stored_index(self.reader, int(i))
            if int(stored.counts[k]) == 0:  # never written: white
                parts += [b"", b"", b""]
                problems.append(None)
                continue
            data = _complete_stream(stored, k)
            problem, variants = jpeg_scan_variants(data)
            parts += [data, *(variants or [b"", b""])] if not problem else [b"", b"", b""]
            problems.append(problem)
        offsets = np.zeros(len(parts) + 1, np.int64)
        offsets[1:] = np.cumsum([len(p) for p in parts])
        flat = np.frombuffer(b"".join(parts), np.uint8).copy()
        return torch.from_numpy(idx), torch.from_numpy(flat), torch.from_numpy(offsets), problems


class StreamDecoder:
    """Decodes ``StreamBatches`` items on ``device`` into (k, s, s, 3) uint8 tiles there.

    Damaged tiles raise ``CorruptTileError`` (or are left out with the reader's
    ``on_bad_tile="skip"``), as on the CPU path. On a failure of the GPU decode, or a first tile
    that differs from the CPU decode by more than ``GPU_DECODE_TOLERANCE``, ``path`` becomes
    "cpu" with ``why`` saying so, and this and every later batch is read by ``reader`` here.
    """

    def __init__(self, reader: TileReader, device: Any, why: str = "") -> None:
        self.reader, self.device = reader, torch.device(device)
        self.path, self.why = "gpu", why
        self._checked = False

    def decode(self, item: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices read, tiles on the device) of one ``StreamBatches`` item."""
        idx, flat, offsets, problems = item
        if self.path == "gpu":
            try:
                return self._decode(idx.numpy(), flat, offsets.tolist(), problems)
            except CorruptTileError:
                raise
            except Exception as e:  # nvJPEG refuses a stream, or decodes differently: the CPU decodes
                self.path, self.why = "cpu", f"GPU decode failed ({type(e).__name__}: {str(e)[:200]}); CPU decode"
        got, tiles = self.reader.read_batch(idx.numpy())
        return torch.from_numpy(got), torch.from_numpy(tiles).to(self.device)

    def _decode(self, idx: np.ndarray, flat: torch.Tensor, offsets: list[int], problems: list) -> tuple:
        s = self.reader.grid.size
        streams, where = [], []  # where: (tile j, kind 0/1/2) of each stream sent to the decoder
        for j in range(len(idx)):
            for kind in range(3):
                a, b = offsets[3 * j + kind], offsets[3 * j + kind + 1]
                if b > a:
                    streams.append(flat[a:b])
                    where.append((j, kind))
        out = decode_jpeg_batch(streams, self.device) if streams else []
        tiles = torch.full((len(idx), s, s, 3), 255, dtype=torch.uint8, device=self.device)
        variants: dict[tuple[int, int], torch.Tensor] = {}
        for (j, kind), img in zip(where, out):
            if img.shape[-2:] != (s, s):
                raise ValueError(f"stored tile decoded to {tuple(img.shape[-2:])}, not {s}x{s}")
            if kind == 0:
                tiles[j] = img.permute(1, 2, 0)
            else:
                variants[(j, kind)] = img
        problems = list(problems)
        js = [j for j in range(len(idx)) if problems[j] is None and (j, 1) in variants]
        if js:  # the checks of tiffio.jpeg_scan_problem on the GPU decodes (one sync per batch)
            ref = tiles[js].permute(0, 3, 1, 2)
            changed = (torch.stack([variants[(j, 1)] for j in js]) == ref).flatten(1).all(1)
            longer = (torch.stack([variants[(j, 2)] for j in js]) == ref).flatten(1).all(1)
            for j, c, g in zip(js, changed.tolist(), longer.tolist()):
                problems[j] = JPEG_STOPPED_EARLY if c else (None if g else JPEG_RAN_OUT)
        keep = np.array([p is None for p in problems], bool)
        if not keep.all():
            j = int(np.flatnonzero(~keep)[0])
            if self.reader.on_bad_tile != "skip":
                native = _native(self.reader)
                x, y = (int(v) for v in self.reader.grid.coords[idx[j]])
                raise CorruptTileError(f"damaged tile at level-0 ({x}, {y}), level {native.level}: {problems[j]}",
                                       self.reader.slide.path, location=(x, y), level=native.level)
        if keep.all():
            got = idx
        else:  # an index tensor: a boolean mask would wait for the GPU and copy the whole batch
            got, tiles = idx[keep], tiles[torch.from_numpy(np.flatnonzero(keep)).to(self.device)]
        # White past the image edge before the check: the CPU read of an edge tile is white there.
        tiles = _white_edges(self.reader, got, tiles)
        if not self._checked and len(got):
            self._checked = True
            ref = torch.from_numpy(self.reader.read(int(got[0]))).to(self.device)
            diff = (tiles[0].short() - ref.short()).abs().float().mean().item()
            if diff > GPU_DECODE_TOLERANCE:
                raise ValueError(f"the GPU decode differs from the CPU's by {diff:.1f}/255 on average")
        return torch.from_numpy(got), tiles


def _white_edges(reader: TileReader, keep: np.ndarray, tiles: torch.Tensor) -> torch.Tensor:
    """White past the image edge, as on the CPU path."""
    native = _native(reader)
    for j, i in enumerate(keep):
        lx, ly = _level_origin(reader, int(i))
        w, h = min(native.tile_w, native.level_w - lx), min(native.tile_h, native.level_h - ly)
        if w < native.tile_w or h < native.tile_h:
            tiles[j, h:] = 255
            tiles[j, :, w:] = 255
    return tiles
