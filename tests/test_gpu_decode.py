"""GPU-ready reads: which decode path a reader takes, and the CPU path's batches unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import slidekit as sk
from slidekit.infer.gpu_decode import BatchDecoder, decode_path, jpeg_stream
from slidekit.regions.tiling import TileReader
from slidekit.slides.demo import write_pyramid


def _slide(tmp_path, compression="jpeg"):
    yy, xx = np.mgrid[0:700, 0:900]
    rgb = np.stack([(xx // 3 + yy) % 251, (yy // 2) % 253, (xx + yy // 5) % 247], axis=-1).astype(np.uint8)
    return write_pyramid(tmp_path / f"{compression}.tif", rgb, 0.5, tile=256, compression=compression)


def test_the_gpu_path_is_chosen_only_for_aligned_jpeg_tiles_on_cuda(tmp_path):
    slide = sk.open_slide(_slide(tmp_path))
    aligned = TileReader(slide, sk.TileGrid.from_slide(slide, mpp=0.5, size=256, min_tissue=0))
    overlap = TileReader(slide, sk.TileGrid.from_slide(slide, mpp=0.5, size=256, overlap=64, min_tissue=0))
    resampled = TileReader(slide, sk.TileGrid.from_slide(slide, mpp=0.7, size=256, min_tissue=0))
    zlib = sk.open_slide(_slide(tmp_path, "zlib"))
    lossless = TileReader(zlib, sk.TileGrid.from_slide(zlib, mpp=0.5, size=256, min_tissue=0))
    cuda = torch.device("cuda", 0)  # the choice is made without touching a GPU
    assert decode_path(aligned, cuda)[0] == "gpu"
    assert decode_path(aligned, "cpu") == ("cpu", "not on CUDA")
    assert decode_path(overlap, cuda)[0] == "cpu"
    assert decode_path(resampled, cuda)[0] == "cpu"
    assert decode_path(lossless, cuda) == ("cpu", "stored tiles are not JPEG")


def test_cpu_batches_are_byte_identical_and_streams_are_complete_jpegs(tmp_path):
    from torchvision.io import decode_jpeg

    slide = sk.open_slide(_slide(tmp_path))
    reader = TileReader(slide, sk.TileGrid.from_slide(slide, mpp=0.5, size=256, min_tissue=0))
    dec = BatchDecoder(reader, "cpu")
    idx = np.arange(len(reader.grid))
    got, tiles = dec.read(idx)
    ref_idx, ref = reader.read_batch(idx)
    assert dec.path == "cpu" and np.array_equal(got, ref_idx) and np.array_equal(tiles.numpy(), ref)
    # The stream a GPU would get decodes (here on the CPU) to the same tile within JPEG decoder slack.
    t = decode_jpeg(torch.frombuffer(bytearray(jpeg_stream(reader, 0)), dtype=torch.uint8)).permute(1, 2, 0)
    assert np.abs(t.numpy().astype(int) - ref[0].astype(int)).mean() < 3


# -- the GPU path wired into the Predictor, run on the CPU: decode_path is told it is on CUDA and
# decode_jpeg_batch (torchvision's decode_jpeg) decodes on the CPU, so the byte streams still go
# through the DataLoader workers and are decoded and verified in the main process.

class _Pixels:
    """A spec whose model output is the input pixels (identity model, [0, 1] scaling)."""

    task, activation, classes = "segmentation", "none", ["r", "g", "b"]

    @staticmethod
    def normalize(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2).float() / 255

    @staticmethod
    def activate(y: torch.Tensor) -> torch.Tensor:
        return y


def _force_gpu_path(monkeypatch) -> list:
    """decode_path decides as on cuda:0; the decoder runs on the CPU and logs (streams, device)."""
    from slidekit.infer import gpu_decode

    choose, decode, calls = gpu_decode.decode_path, gpu_decode.decode_jpeg_batch, []
    monkeypatch.setattr(gpu_decode, "decode_path", lambda reader, device: choose(reader, torch.device("cuda", 0)))

    def on_cpu(streams, device):
        calls.append((len(streams), torch.device(device)))
        return decode(streams, torch.device("cpu"))

    monkeypatch.setattr(gpu_decode, "decode_jpeg_batch", on_cpu)
    return calls


def _pixels(pred, slide, grid) -> tuple[np.ndarray, np.ndarray]:
    out = list(pred.predict(slide, grid))
    idx = np.concatenate([i for i, _ in out])
    return idx, np.concatenate([(y * 255).round().astype(np.uint8).transpose(0, 2, 3, 1) for _, y in out])


def test_predictor_streams_jpeg_bytes_through_workers_and_decodes_them_in_the_main_process(tmp_path, monkeypatch):
    from slidekit.infer.predictor import Predictor

    slide = sk.open_slide(_slide(tmp_path))
    grid = sk.TileGrid.from_slide(slide, mpp=0.5, size=256, min_tissue=0)
    cpu = Predictor(torch.nn.Identity(), _Pixels(), device="cpu", batch_size=4, workers=0)
    ref_idx, ref = _pixels(cpu, slide, grid)
    assert cpu.decode == {"path": "cpu", "reason": "not on CUDA"}
    calls = _force_gpu_path(monkeypatch)
    gpu = Predictor(torch.nn.Identity(), _Pixels(), device="cpu", batch_size=4, workers=2)
    assert type(gpu.loader(slide, grid).dataset).__name__ == "StreamBatches"  # workers read bytes only
    idx, got = _pixels(gpu, slide, grid)
    assert gpu.decode["path"] == "gpu" and "aligned JPEG" in gpu.decode["reason"]
    # Every tile arrived as a stream plus its two verification variants, decoded in batches here.
    assert sum(n for n, _ in calls) == 3 * len(grid) and len(calls) == -(-len(grid) // 4)
    # The main process decoded one grid tile on the CPU (the check tile) where the CPU path decodes all.
    assert cpu._reader.native.decodes - gpu._reader.native.decodes == len(grid) - 1
    assert np.array_equal(idx, ref_idx)
    assert np.abs(got.astype(int) - ref.astype(int)).mean() < 1  # the same JPEGs, another decoder


def test_a_run_starting_at_an_edge_tile_keeps_the_gpu_path(tmp_path, monkeypatch):
    """The one-tile GPU-vs-CPU check compares after the edge is whitened (the CPU read is white past
    the image; the stored tile holds padding there)."""
    from slidekit.infer.predictor import Predictor

    slide = sk.open_slide(_slide(tmp_path))
    grid = sk.TileGrid.from_slide(slide, mpp=0.5, size=256, min_tissue=0)
    edge = [i for i, (x, y) in enumerate(grid.coords) if x + 256 > 900 or y + 256 > 700]
    cpu_idx, ref = _pixels(Predictor(torch.nn.Identity(), _Pixels(), device="cpu", batch_size=4, workers=0),
                           slide, grid)
    _force_gpu_path(monkeypatch)
    gpu = Predictor(torch.nn.Identity(), _Pixels(), device="cpu", batch_size=4, workers=0)
    out = list(gpu.predict(slide, grid, index=np.array(edge)))
    assert gpu.decode["path"] == "gpu", gpu.decode
    got = np.concatenate([(y * 255).round().astype(np.uint8).transpose(0, 2, 3, 1) for _, y in out])
    want = ref[np.searchsorted(cpu_idx, np.concatenate([i for i, _ in out]))]
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 1


def test_the_gpu_path_catches_damaged_tiles_as_the_cpu_path_does(tmp_path, monkeypatch):
    import tifffile

    from slidekit.base.errors import BadTileWarning, CorruptTileError
    from slidekit.infer.predictor import Predictor
    from tests.conftest import synthetic_slide

    path = synthetic_slide(tmp_path / "damaged.tif", width=1024, height=768, tissue_box=(0, 0, 1024, 768))
    with tifffile.TiffFile(path) as tif:  # zero 200 bytes in the middle of the tile at (512, 256)
        index = 1 * 4 + 2
        offset, count = tif.pages[0].dataoffsets[index], tif.pages[0].databytecounts[index]
    data = bytearray(path.read_bytes())
    data[offset + count // 2:offset + count // 2 + 200] = b"\0" * 200
    path.write_bytes(bytes(data))
    _force_gpu_path(monkeypatch)
    slide = sk.open_slide(path)
    grid = sk.TileGrid.from_slide(slide, mpp=0.5, size=256, min_tissue=0)
    bad = int(np.flatnonzero((grid.coords == (512, 256)).all(axis=1))[0])
    skip = Predictor(torch.nn.Identity(), _Pixels(), device="cpu", batch_size=4, workers=0, on_bad_tile="skip")
    with pytest.warns(BadTileWarning):
        idx, _ = _pixels(skip, slide, grid)
    assert skip.decode["path"] == "gpu", skip.decode  # found by the GPU-side checks, not by a fallback
    assert skip.bad_tiles.tolist() == [bad] and bad not in idx and len(idx) == len(grid) - 1
    strict = Predictor(torch.nn.Identity(), _Pixels(), device="cpu", batch_size=4, workers=0)
    with pytest.raises(CorruptTileError, match=r"damaged.tif: damaged tile at level-0 \(512, 256\)") as e:
        _pixels(strict, slide, grid)
    assert e.value.location == (512, 256)


def test_a_failing_gpu_decode_falls_back_to_the_cpu_and_says_why(tmp_path, monkeypatch):
    from slidekit.infer import gpu_decode
    from slidekit.infer.predictor import Predictor

    slide = sk.open_slide(_slide(tmp_path))
    grid = sk.TileGrid.from_slide(slide, mpp=0.5, size=256, min_tissue=0)
    ref_idx, ref = _pixels(Predictor(torch.nn.Identity(), _Pixels(), device="cpu", batch_size=4, workers=0),
                           slide, grid)
    _force_gpu_path(monkeypatch)

    def refuse(streams, device):
        raise RuntimeError("nvjpeg refused the stream")

    monkeypatch.setattr(gpu_decode, "decode_jpeg_batch", refuse)
    pred = Predictor(torch.nn.Identity(), _Pixels(), device="cpu", batch_size=4, workers=0)
    idx, got = _pixels(pred, slide, grid)
    assert pred.decode["path"] == "cpu" and "GPU decode failed" in pred.decode["reason"]
    assert "nvjpeg refused the stream" in pred.decode["reason"]
    assert np.array_equal(idx, ref_idx) and np.array_equal(got, ref)  # the CPU decode, byte for byte
    off = Predictor(torch.nn.Identity(), _Pixels(), device="cpu", workers=0, gpu_decode=False)
    off.loader(slide, grid)
    assert off.decode == {"path": "cpu", "reason": "GPU decode turned off (gpu_decode=False)"}


def test_heatmap_summary_records_the_decode_path(tmp_path, monkeypatch):
    from slidekit.infer.predictor import heatmap_slide
    from tests.conftest import synthetic_slide

    path = synthetic_slide(tmp_path / "s.tif")
    kw = dict(workers=0, device="cpu", progress=False)
    assert heatmap_slide(path, tmp_path / "cpu", **kw)["decode"]["path"] == "cpu"
    _force_gpu_path(monkeypatch)
    overlap = heatmap_slide(path, tmp_path / "overlap", **kw)["decode"]  # segmentation: size/4 overlap
    assert overlap == {"path": "cpu", "reason": "grid tiles are cut from several stored tiles (overlap or misaligned)"}
    assert heatmap_slide(path, tmp_path / "aligned", overlap=0, **kw)["decode"]["path"] == "gpu"


def test_gpu_check_without_cuda_exits_0_with_one_line(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_check.py"),
                           "--json", str(tmp_path / "o.json")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().count("\n") == 0 and "no CUDA" in proc.stdout
    assert not (tmp_path / "o.json").exists()  # nothing measured, nothing written
