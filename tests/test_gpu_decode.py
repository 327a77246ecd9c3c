"""GPU-ready reads: which decode path a reader takes, and the CPU path's batches unchanged."""
from __future__ import annotations

import numpy as np
import torch

import slidekit as sk
from slidekit.demo import write_pyramid
from slidekit.gpu_decode import BatchDecoder, decode_path, jpeg_stream
from slidekit.tiling import TileReader


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
