"""PASCAL VOC 2012 + ScribbleSup as a segmentation source: which image goes with which label PNG.

The layout the scribble pre-training papers train on::

    ROOT/JPEGImages/NAME.jpg               the photographs
    ROOT/SegmentationClassAug/NAME.png     full masks (class index per pixel, 255 = object boundary)
    ROOT/pascal_2012_scribble/NAME.png     ScribbleSup scribbles (class index, 255 = not drawn)
    ROOT/ImageSets/Segmentation/train.txt  optional: one NAME per line

The label folder decides which images take part (ScribbleSup covers the 10,582 ``train_aug``
images, ``JPEGImages`` holds more); a split file narrows that further. Labels are read as
class indices (palette PNGs give their indices), so 0 = background and 1..20 the VOC classes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from slidekit.base.errors import LabelError
from slidekit.data.datasets import list_images

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
VOC_IMAGES = "JPEGImages"
VOC_LABELS = {"scribbles": "pascal_2012_scribble", "masks": "SegmentationClassAug"}


@dataclass(frozen=True)
class VocSource:
    """Where a VOC-layout folder's images and labels are, and the names that have both."""

    root: Path
    images: str
    labels: str
    names: tuple[str, ...]


def voc_source(root: str | os.PathLike, *, labels: str = "scribbles", split: str | os.PathLike | None = None
               ) -> VocSource:
    """The images of a PASCAL VOC + ScribbleSup folder that carry a label of kind ``labels``.

    Parameters
    ----------
    root
        The folder holding ``JPEGImages/`` and the label folder.
    labels
        ``"scribbles"`` (``pascal_2012_scribble/``) or ``"masks"`` (``SegmentationClassAug/``).
    split
        Optional list file (one image name per line; relative paths are taken from ``root``),
        e.g. ``ImageSets/Segmentation/train.txt``: only these images are used.

    Returns
    -------
    VocSource
        The sub-folder names for ``slidekit.data.load_image_folder`` and the image names, sorted.

    Raises
    ------
    LabelError
        A folder or the split file is missing, no image has a label, or the split names an image
        without one.
    """
    if labels not in VOC_LABELS:
        raise LabelError(f"VOC labels must be one of {', '.join(VOC_LABELS)}, got {labels!r}")
    base = Path(root)
    label_dir = VOC_LABELS[labels]
    for sub in (VOC_IMAGES, label_dir):
        if not (base / sub).is_dir():
            raise LabelError(f"not a PASCAL VOC + ScribbleSup folder: {sub}/ is missing", base)
    have_image = set(list_images(base / VOC_IMAGES))
    labelled = [n for n in list_images(base / label_dir) if n in have_image]
    if split is not None:
        split_path = Path(split) if Path(split).is_absolute() else base / split
        if not split_path.is_file():
            raise LabelError("split file not found", split_path)
        wanted = [w.strip().split()[0] for w in split_path.read_text().splitlines() if w.strip()]
        missing = sorted(set(wanted) - set(labelled))
        if missing:
            raise LabelError(f"{len(missing)} image(s) of the split have no image or no {label_dir}/ label, "
                             f"e.g. {missing[:3]}", split_path)
        labelled = sorted(set(wanted))
    if not labelled:
        raise LabelError(f"no image in {VOC_IMAGES}/ has a label in {label_dir}/", base)
    return VocSource(root=base, images=VOC_IMAGES, labels=label_dir, names=tuple(labelled))
