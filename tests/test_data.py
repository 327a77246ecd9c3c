"""Datasets: image folders and slide patches, joint augmentation, labels from annotations."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_slide
from PIL import Image
from shapely.geometry import LineString, Polygon

from slidekit.annotations.formats import write_geojson
from slidekit.annotations.objects import Annotation
from slidekit.base.errors import LabelError
from slidekit.data.datasets import ImageFolderDataset, JointAugment, SlidePatchDataset, load_image_folder


def _folder(root: Path, n: int = 3, size: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        mask = (rng.random((size, size + 8)) > 0.6).astype(np.uint8)
        img = np.zeros((size, size + 8, 3), np.uint8)
        img[..., 0] = mask * 200 + 20  # the mask is readable from the image: checks joint transforms
        img[..., 1] = rng.integers(0, 255, (size, size + 8))
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    return root


def test_image_folder_crops_and_joint_augmentation(tmp_path):
    root = _folder(tmp_path / "d")
    ds = ImageFolderDataset.from_folder(root, crop=24, samples_per_image=4,
                                        transform=JointAugment(color_jitter=None))
    assert len(ds) == 12 and ds.names == ["im0", "im1", "im2"]
    torch.manual_seed(0)
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, 24, 24) and s["image"].dtype == torch.uint8
        assert s["mask"].shape == (24, 24) and s["mask"].dtype == torch.int64
        assert s["index"] == i // 4
        assert torch.equal(s["mask"], (s["image"][0] > 100).long())


def test_colour_jitter_leaves_masks_alone(tmp_path):
    root = _folder(tmp_path / "d")
    ds = ImageFolderDataset.from_folder(root, crop=None, transform=JointAugment(rot90=False, flips=False))
    torch.manual_seed(1)
    s = ds[0]
    raw = np.asarray(Image.open(root / "masks" / "im0.png"))
    assert torch.equal(s["mask"], torch.from_numpy(raw.astype(np.int64)))


def test_maps_follow_the_image_and_pad_with_nan(tmp_path):
    root = _folder(tmp_path / "d", size=16)
    ds = ImageFolderDataset.from_folder(root, crop=32, transform=JointAugment(color_jitter=None))
    ds.maps = {"m": torch.stack([m[None].float() for m in ds.masks])}
    torch.manual_seed(0)
    for i in range(len(ds)):
        s = ds[i]
        m = s["map:m"][0]
        labelled = s["mask"] != 255
        assert torch.isnan(m[~labelled]).all()  # padding: ignored in the mask, NaN in maps
        assert torch.equal(m[labelled].long(), s["mask"][labelled])
        assert int(labelled.sum()) == 16 * 24


def test_scale_and_instance_masks(tmp_path):
    root = _folder(tmp_path / "d", size=40)
    names, imgs, masks = load_image_folder(root, scale=0.5, mask_kind="binary")
    assert imgs[0].shape == (20, 24, 3) and masks[0].shape == (20, 24)
    assert set(np.unique(masks[0])) <= {0, 1}


def test_bad_folders_raise_label_errors(tmp_path):
    root = _folder(tmp_path / "d")
    (root / "masks" / "im1.png").unlink()
    with pytest.raises(LabelError, match="no mask for image 'im1'"):
        ImageFolderDataset.from_folder(root)
    with pytest.raises(LabelError, match="not found"):
        ImageFolderDataset.from_folder(tmp_path / "nowhere")
    with pytest.raises(LabelError, match="mask shape"):
        ImageFolderDataset([np.zeros((8, 8, 3), np.uint8)], [np.zeros((4, 4), np.uint8)])


def test_real_nuclei_folder(shared_data):
    ds = ImageFolderDataset.from_folder(shared_data / "nuclei_monuseg", masks="masks_instance",
                                        mask_kind="binary", scale=0.25, crop=64)
    assert len(ds) == 15
    s = ds[0]
    assert s["image"].shape == (3, 64, 64)
    fg = float(torch.cat([m.flatten() for m in ds.masks]).float().mean())
    assert 0.05 < fg < 0.5  # nuclei cover a minority of the pixels


def _slide_with_scribbles(tmp_path: Path) -> tuple[Path, Path]:
    slide = synthetic_slide(tmp_path / "s.tif", width=1024, height=768, mpp=0.5,
                            tissue_box=(256, 256, 512, 256))
    anns = [Annotation(LineString([(300, 300), (700, 300)]), label="tumour"),
            Annotation(LineString([(100, 100), (100, 600)]), label="background"),
            Annotation(Polygon([(600, 600), (700, 600), (700, 700), (600, 700)]), label="tumour"),
            Annotation(LineString([(900, 50), (950, 50)]), label="other")]
    return slide, write_geojson(anns, tmp_path / "s.geojson")


def test_slide_patches_with_rasterised_scribbles(tmp_path):
    slide, geo = _slide_with_scribbles(tmp_path)
    ds = SlidePatchDataset.from_annotations(slide, geo, labels={"background": 0, "tumour": 1}, mpp=1.0,
                                            size=64, line_width_um=4.0)
    assert 0 < len(ds) < 8 * 6  # only tiles touching the two classes' annotations
    seen = set()
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, 64, 64) and s["mask"].shape == (64, 64)
        vals = set(torch.unique(s["mask"]).tolist())
        assert vals <= {0, 1, 255}
        seen |= vals
    assert seen == {0, 1, 255}
    # The horizontal tumour line at y=300 (level 0) is 4 µm = 4 px wide at 1 µm/px.
    x, y = ds.grid.coords[0]
    rows = [i for i in range(len(ds)) if ds.grid.coords[i][1] <= 300 < ds.grid.coords[i][1] + 128
            and 300 <= ds.grid.coords[i][0] < 650]
    m = ds[rows[0]]["mask"]
    line_rows = torch.nonzero((m == 1).any(1)).flatten()
    assert 3 <= len(line_rows) <= 5


def test_slide_patches_in_worker_processes(tmp_path):
    slide, geo = _slide_with_scribbles(tmp_path)
    ds = SlidePatchDataset.from_annotations(slide, geo, labels={"background": 0, "tumour": 1}, mpp=1.0,
                                            size=64, transform=JointAugment())
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    assert sum(len(b["index"]) for b in batches) == len(ds)


def test_tile_labels_and_errors(tmp_path):
    slide, geo = _slide_with_scribbles(tmp_path)
    from slidekit.regions.tiling import TileGrid
    from slidekit.slides.slide import open_slide

    s = open_slide(slide)
    grid = TileGrid.from_slide(s, mpp=2.0, size=64, mask=None, min_tissue=0)
    ds = SlidePatchDataset(s, grid, tile_labels=np.arange(len(grid)) % 2)
    assert ds[3]["label"] == 1 and "mask" not in ds[3]
    with pytest.raises(LabelError, match="tile labels"):
        SlidePatchDataset(s, grid, tile_labels=[0, 1])
    with pytest.raises(LabelError, match="no annotations of classes"):
        SlidePatchDataset.from_annotations(slide, geo, labels={"stroma": 1})
    bad = tmp_path / "far.geojson"
    write_geojson([Annotation(LineString([(50000, 50000), (50100, 50000)]), label="tumour")], bad)
    with pytest.raises(LabelError, match="no tile"):
        SlidePatchDataset.from_annotations(slide, bad, labels={"tumour": 1})
    json.loads(Path(geo).read_text())
