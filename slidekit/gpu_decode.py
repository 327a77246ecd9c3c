"""GPU-ready reads: hand a batch's stored JPEG tiles to the GPU and decode them there.

On CUDA, when the native fast path reads one stored JPEG tile per grid tile (aligned, no
overlap), the compressed bytes (with the TIFF's shared JPEG tables spliced in, so each is a
complete stream) can be decoded in one batch by ``torchvision.io.decode_jpeg(device="cuda")``
(nvJPEG), which takes the decode off the CPU. ``decode_path`` says which path a reader takes and
why; every other case decodes on the CPU exactly as ``TileReader.read_batch`` does. The GPU path
is checked once per reader against the CPU decode of the first tile (colour conversion and
chroma upsampling differ slightly between decoders; a larger difference falls back to the CPU).
Each stored tile is still verified on the CPU (``StoredTiles.verify``, once per process) before
its bytes go out: the GPU path saves the CPU decode on every later pass over the same slide
(epochs, several models), not on the first. Not yet wired into ``Predictor``: the benchmark
``benchmarks/gpu_heatmap.py`` measures it on the day a GPU is lent.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from slidekit.tiling import TileReader

# Mean absolute difference (0-255) allowed between the GPU and CPU decodes of the check tile.
GPU_DECODE_TOLERANCE = 3.0


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
    native = reader.native
    x, y = (int(v) for v in reader.grid.coords[i])
    lx, ly = round(x / native.downsample), round(y / native.downsample)
    index = native.stored.index(lx // native.tile_w, ly // native.tile_h)
    data = native.stored.raw(index)
    tables = native.stored._state()[2]
    if tables:  # tables: SOI ... EOI; the tile: SOI ... EOI -> SOI + tables body + tile body
        data = data[:2] + bytes(tables)[2:-2] + data[2:]
    return data


class BatchDecoder:
    """Reads batches of grid tiles for ``device``: (k, s, s, 3) uint8 on the device.

    ``path`` is ``decode_path``'s choice; the GPU path falls back to the CPU (``path`` becomes
    "cpu", ``why`` says so) when its check tile differs from the CPU decode, or when nvJPEG fails.
    """

    def __init__(self, reader: TileReader, device: Any) -> None:
        self.reader, self.device = reader, torch.device(device)
        self.path, self.why = decode_path(reader, self.device)
        self._checked = False

    def read(self, idx: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """(indices read, tiles on the device); damaged tiles follow the reader's ``on_bad_tile``."""
        if self.path == "gpu":
            try:
                return self._read_gpu(np.asarray(idx, np.int64))
            except Exception as e:  # nvJPEG refuses a stream: the CPU decodes it
                self.path, self.why = "cpu", f"GPU decode failed ({type(e).__name__}: {e}); CPU decode"
        got, tiles = self.reader.read_batch(idx)
        return got, torch.from_numpy(tiles).to(self.device)

    def _read_gpu(self, idx: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        from torchvision.io import decode_jpeg

        native = self.reader.native
        keep = []
        for i in idx:  # each stored tile verified (decoded) on the CPU once per process, as ever
            x, y = (int(v) for v in self.reader.grid.coords[i])
            try:
                native.read(x, y) if not self._verified(i) else None
                keep.append(int(i))
            except Exception:
                if self.reader.on_bad_tile != "skip":
                    raise
        keep = np.asarray(keep, np.int64)
        streams = [torch.frombuffer(bytearray(jpeg_stream(self.reader, int(i))), dtype=torch.uint8) for i in keep]
        out = decode_jpeg(streams, device=self.device) if streams else []
        tiles = torch.stack([t.permute(1, 2, 0)[..., :3] for t in out]) if len(out) else torch.zeros(
            (0, self.reader.grid.size, self.reader.grid.size, 3), dtype=torch.uint8, device=self.device)
        if not self._checked and len(keep):
            self._checked = True
            ref = torch.from_numpy(self.reader.read(int(keep[0]))).to(self.device)
            diff = (tiles[0].short() - ref.short()).abs().float().mean().item()
            if diff > GPU_DECODE_TOLERANCE or tiles.shape[1:3] != ref.shape[:2]:
                raise ValueError(f"GPU decode differs from the CPU's by {diff:.1f}/255 on average")
        return keep, self._edges(keep, tiles)

    def _verified(self, i: int) -> bool:
        native = self.reader.native
        x, y = (int(v) for v in self.reader.grid.coords[i])
        lx, ly = round(x / native.downsample), round(y / native.downsample)
        return native.stored.index(lx // native.tile_w, ly // native.tile_h) in native.stored.verified

    def _edges(self, keep: np.ndarray, tiles: torch.Tensor) -> torch.Tensor:
        """White past the image edge, as on the CPU path."""
        native = self.reader.native
        for j, i in enumerate(keep):
            x, y = (int(v) for v in self.reader.grid.coords[i])
            lx, ly = round(x / native.downsample), round(y / native.downsample)
            w, h = min(native.tile_w, native.level_w - lx), min(native.tile_h, native.level_h - ly)
            tiles[j, h:] = 255
            tiles[j, :, w:] = 255
        return tiles
