"""The scribble trainer reads a PASCAL VOC + ScribbleSup folder (issue 34): layout, split, errors, training."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import trainers
from slidekit.base.errors import ConfigError, LabelError
from slidekit.data import VOC_CLASSES, voc_source
from slidekit.models.checkpoint import load_checkpoint
from trainers.scribble import ScribbleTrainer


def _palette_png(labels: np.ndarray, path: Path) -> None:
    """A palette ('P') PNG of class indices, as VOC and ScribbleSup ship them."""
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    im.save(path)


def make_voc(root: Path, names=("2007_000032", "2007_000039", "2007_000063"), size: int = 48,
             unlabelled: str = "2007_000099") -> Path:
    """A tiny VOC folder: every class striped into the masks, thin strokes of them as scribbles."""
    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClassAug", "pascal_2012_scribble", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for k, name in enumerate((*names, unlabelled)):
        mask = (np.arange(size)[None, :].repeat(size, 0) * len(VOC_CLASSES) // size + k) % len(VOC_CLASSES)
        palette = rng.integers(0, 255, (len(VOC_CLASSES), 3))
        img = palette[mask].astype(np.uint8)
        Image.fromarray(img).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        if name == unlabelled:
            continue  # in JPEGImages but in neither label folder (as most VOC photographs)
        boundary = mask.copy()
        boundary[:, ::7] = 255  # VOC's object-boundary label
        _palette_png(boundary, root / "SegmentationClassAug" / f"{name}.png")
        scrib = np.full_like(mask, 255)
        scrib[size // 2 - 1:size // 2 + 1] = mask[size // 2 - 1:size // 2 + 1]  # one horizontal stroke
        _palette_png(scrib, root / "pascal_2012_scribble" / f"{name}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(names[:2]) + "\n")
    return root


def test_voc_source_pairs_images_with_labels(tmp_path):
    root = make_voc(tmp_path / "voc")
    src = voc_source(root)
    assert src.images == "JPEGImages" and src.labels == "pascal_2012_scribble"
    assert src.names == ("2007_000032", "2007_000039", "2007_000063")  # the unlabelled photograph is left out
    assert voc_source(root, labels="masks").labels == "SegmentationClassAug"
    split = voc_source(root, split="ImageSets/Segmentation/train.txt")
    assert split.names == ("2007_000032", "2007_000039")


def test_voc_source_errors_name_the_problem(tmp_path):
    root = make_voc(tmp_path / "voc")
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000099\n")
    with pytest.raises(LabelError, match="no image or no pascal_2012_scribble"):
        voc_source(root, split="ImageSets/Segmentation/val.txt")
    with pytest.raises(LabelError, match="split file not found"):
        voc_source(root, split="ImageSets/Segmentation/test.txt")
    scribbles_only = make_voc(tmp_path / "voc2")
    shutil.rmtree(scribbles_only / "SegmentationClassAug")
    with pytest.raises(LabelError, match="SegmentationClassAug/ is missing"):
        voc_source(scribbles_only, labels="masks")
    with pytest.raises(LabelError, match="must be one of"):
        voc_source(root, labels="boxes")


def _cfg(root: Path, **kw):
    opts = dict(data=str(root), layout="voc", epochs=1, batch_size=2, crop=32, samples_per_image=1,
                backbone="resnet18", lr=1e-3, seed=0, augment=False)
    opts.update(kw)
    return trainers.make_config(ScribbleTrainer.Config, opts)


def test_voc_masks_are_read_as_class_indices(tmp_path):
    root = make_voc(tmp_path / "voc")
    ds = ScribbleTrainer(_cfg(root, voc_labels="masks")).build_dataset()
    assert ds.names == ["2007_000032", "2007_000039", "2007_000063"]
    m = ds.masks[0].numpy()  # palette indices, 255 (VOC's object boundary) kept as the ignore label
    assert set(np.unique(m)) == set(range(21)) | {255}
    assert (m[:, ::7] == 255).all()


def test_scribble_trainer_trains_on_voc_scribbles(tmp_path):
    root = make_voc(tmp_path / "voc")
    cfg = _cfg(root, split="ImageSets/Segmentation/train.txt")
    assert cfg.classes == list(VOC_CLASSES)  # the VOC classes unless the config names its own
    trainer = ScribbleTrainer(cfg)
    ckpt = trainer.fit(tmp_path / "run", device="cpu", progress=False)
    assert trainer.dataset.names == ["2007_000032", "2007_000039"]
    m = trainer.dataset.masks[0].numpy()  # one stroke of every class, the rest not drawn
    assert len(np.unique(m[m != 255])) == 21 and (m == 255).mean() > 0.9
    spec = load_checkpoint(ckpt).spec
    assert spec.classes == list(VOC_CLASSES) and spec.num_outputs == 21


def test_voc_layout_options_are_checked(tmp_path):
    root = make_voc(tmp_path / "voc")
    with pytest.raises(ConfigError, match="voc_labels"):
        _cfg(root, voc_labels="boxes")
    with pytest.raises(ConfigError, match="layout"):
        _cfg(root, layout="coco")
    # a folder that is not VOC-shaped: one line naming what is missing
    with pytest.raises(LabelError, match="JPEGImages/ is missing"):
        ScribbleTrainer(_cfg(tmp_path)).fit(tmp_path / "run", device="cpu", progress=False)


def test_classes_given_for_a_voc_folder_are_kept(tmp_path):
    """A lab's own data in the VOC layout: the classes it names are used as given, not replaced by VOC's
    21; real VOC masks (values up to 20) with two classes named are then refused in one line."""
    root = make_voc(tmp_path / "voc")
    cfg = _cfg(root, classes=["background", "foreground"], voc_labels="masks")
    assert cfg.classes == ["background", "foreground"]
    with pytest.raises(ConfigError, match="hold values outside 0..1"):
        ScribbleTrainer(cfg).build_dataset()
    assert _cfg(tmp_path / "plain", layout="folder").classes == ["background", "foreground"]
