"""Torch datasets for training: patches of slides through a TileGrid, and image + mask folders.

Samples are dicts: ``image`` (3, s, s) uint8, ``mask`` (s, s) int64 class indices with an ignore
value where nothing was drawn (when the dataset has pixel labels), ``label`` (int, per-tile
labels), ``index`` (the tile or image index) and any per-image ``maps`` cropped and augmented
together with the image (e.g. Scribble2Label's prediction averages). Normalisation belongs to the
model's spec (``ModelSpec.normalize``), so datasets hand out uint8.

Augmentation is joint: ``JointAugment`` flips and rotates image, mask and maps by the same
random draw (torchvision transforms v2) and colour-jitters only the image.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from slidekit.annotations.formats import read_annotations
from slidekit.annotations.geometry import rasterize
from slidekit.annotations.scribbles import IGNORE
from slidekit.base.errors import LabelError, SlideError
from slidekit.regions.tiling import TileGrid, TileReader
from slidekit.slides.slide import Slide, open_slide

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


# --------------------------------------------------------------------------------- augmentation

class RandomRot90(v2.Transform):
    """Rotate by 0, 90, 180 or 270 degrees with equal probability (exact, no resampling); every
    input v2 selects for transforming (image, masks, maps) gets the same rotation."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"k": int(torch.randint(4, ()))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        out = torch.rot90(inpt.as_subclass(torch.Tensor), params["k"], dims=(-2, -1))
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


def JointAugment(flips: bool = True, rot90: bool = True,
                 color_jitter: tuple[float, float, float, float] | None = (0.15, 0.15, 0.1, 0.03)
                 ) -> v2.Compose:
    """Joint image + mask augmentation: flips, 90-degree rotations, colour jitter (image only).

    Call it on a sample dict whose image is a ``tv_tensors.Image`` and whose masks/maps are
    ``tv_tensors.Mask``; the datasets below do that wrapping.
    """
    steps: list[v2.Transform] = []
    if flips:
        steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if rot90:
        steps.append(RandomRot90())
    if color_jitter is not None:
        b, c, s, h = color_jitter
        steps.append(v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h))
    return v2.Compose(steps)


def apply_joint(transform: Callable | None, sample: dict[str, Any]) -> dict[str, Any]:
    """Run ``transform`` on a sample dict with the tv_tensor wrapping it needs, then unwrap."""
    if transform is None:
        return sample
    wrapped = {}
    for k, v in sample.items():
        if k == "image":
            wrapped[k] = tv_tensors.Image(v)
        elif k == "mask" or k.startswith("map:"):
            wrapped[k] = tv_tensors.Mask(v)
        else:
            wrapped[k] = v
    out = transform(wrapped)
    return {k: (v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


# ------------------------------------------------------------------------------- image folders

def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB") if im.mode not in ("RGB",) else im)
    except Exception as e:
        raise SlideError(f"cannot read image ({e})", path) from None


def _read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except Exception as e:
        raise LabelError(f"cannot read mask ({e})", path) from None
    if arr.ndim != 2:
        raise LabelError(f"mask must be single-channel, got shape {arr.shape}", path)
    return arr


def _find(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        p = folder / f"{stem}{suffix}"
        if p.exists():
            return p
    return None


def _resize(arr: np.ndarray, shape: tuple[int, int], nearest: bool) -> np.ndarray:
    """Resize to ``shape`` (rows, cols): area-averaged for images, nearest (any dtype) for labels."""
    if arr.shape[:2] == tuple(shape):
        return arr
    if nearest:
        rows = np.minimum(((np.arange(shape[0]) + 0.5) * arr.shape[0] / shape[0]).astype(int), arr.shape[0] - 1)
        cols = np.minimum(((np.arange(shape[1]) + 0.5) * arr.shape[1] / shape[1]).astype(int), arr.shape[1] - 1)
        return arr[rows[:, None], cols[None, :]]
    import cv2

    return cv2.resize(arr, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def list_images(folder: str | os.PathLike) -> list[str]:
    """Sorted image stems in a folder (png, jpg, tif, bmp)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LabelError("image folder not found", folder)
    return sorted(p.stem for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_image_folder(root: str | os.PathLike, images: str = "images", masks: str | None = "masks",
                      names: Sequence[str] | None = None, scale: float = 1.0,
                      mask_kind: str = "labels") -> tuple[list[str], list[np.ndarray], list[np.ndarray] | None]:
    """Read ``root/images/NAME.png`` (+ ``root/masks/NAME.png``) into memory, resized by ``scale``.

    ``mask_kind`` "labels": class indices (255 = ignore), resized nearest; "instances": an
    instance map (0 = background), returned as given (resized nearest) for metrics and scribble
    generation; "binary": any non-zero value is foreground (class 1).
    """
    root = Path(root)
    names = list(names) if names is not None else list_images(root / images)
    if not names:
        raise LabelError("no images found", root / images)
    imgs: list[np.ndarray] = []
    msks: list[np.ndarray] = []
    for name in names:
        ipath = _find(root / images, name)
        if ipath is None:
            raise LabelError(f"image {name!r} not found", root / images)
        img = _read_image(ipath)
        shape = (max(1, round(img.shape[0] * scale)), max(1, round(img.shape[1] * scale)))
        imgs.append(_resize(img, shape, nearest=False))
        if masks:
            mpath = _find(root / masks, name)
            if mpath is None:
                raise LabelError(f"no mask for image {name!r}", root / masks)
            m = _read_mask(mpath)
            if mask_kind == "binary":
                m = (m > 0).astype(np.uint8)
            elif mask_kind not in ("labels", "instances"):
                raise ValueError(f"unknown mask_kind {mask_kind!r}")
            msks.append(_resize(m, shape, nearest=True))
    return names, imgs, (msks if masks else None)


class ImageFolderDataset(Dataset):
    """Random crops of images held in memory, with pixel labels and optional per-image maps.

    ``images`` are (H, W, 3) uint8 arrays, ``masks`` (H, W) class-index arrays (``ignore`` where
    unlabelled). An epoch visits every image ``samples_per_image`` times, each visit a random
    ``crop`` (the whole image when ``crop`` is None; images smaller than the crop are padded
    with ignored pixels). ``maps`` (name -> (N, C, H, W) float tensor, e.g. in shared memory so
    that worker processes see in-place updates) are cropped and augmented with the image and
    returned as ``map:NAME``; padding there is NaN.
    """

    names: list[str]  # the images' file stems; set by from_folder

    def __init__(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None = None,
                 crop: int | None = None, samples_per_image: int = 1, transform: Callable | None = None,
                 ignore: int = IGNORE, maps: dict[str, torch.Tensor] | None = None) -> None:
        if masks is not None and len(masks) != len(images):
            raise LabelError(f"{len(images)} images but {len(masks)} masks")
        self.images = [torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous() for im in images]
        self.masks = None if masks is None else [torch.from_numpy(np.asarray(m).astype(np.int64)) for m in masks]
        for i, im in enumerate(self.images):
            if self.masks is not None and tuple(self.masks[i].shape) != tuple(im.shape[1:]):
                raise LabelError(f"image {i}: mask shape {tuple(self.masks[i].shape)} != image "
                                 f"shape {tuple(im.shape[1:])}")
        self.crop = crop
        self.samples_per_image = samples_per_image
        self.transform = transform
        self.ignore = ignore
        self.maps: dict[str, torch.Tensor] = dict(maps or {})

    @classmethod
    def from_folder(cls, root: str | os.PathLike, images: str = "images", masks: str | None = "masks",
                    names: Sequence[str] | None = None, scale: float = 1.0, mask_kind: str = "labels",
                    **kwargs: Any) -> "ImageFolderDataset":
        """Build from ``root/images`` and ``root/masks`` (same file stems), resized by ``scale``."""
        stems, imgs, msks = load_image_folder(root, images, masks, names, scale, mask_kind)
        ds = cls(imgs, msks, **kwargs)
        ds.names = stems
        return ds

    def __len__(self) -> int:
        return len(self.images) * self.samples_per_image

    def _window(self, h: int, w: int) -> tuple[int, int, int, int]:
        c = self.crop
        if c is None:
            return 0, 0, h, w
        y = int(torch.randint(0, max(h - c, 0) + 1, ()).item())
        x = int(torch.randint(0, max(w - c, 0) + 1, ()).item())
        return y, x, min(c, h), min(c, w)

    def _pad(self, t: torch.Tensor, value: float) -> torch.Tensor:
        c = self.crop
        if c is None or (t.shape[-2] >= c and t.shape[-1] >= c):
            return t
        out = torch.full((*t.shape[:-2], max(c, t.shape[-2]), max(c, t.shape[-1])), value, dtype=t.dtype)
        out[..., :t.shape[-2], :t.shape[-1]] = t
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = i // self.samples_per_image
        img = self.images[k]
        y, x, h, w = self._window(*img.shape[1:])
        sample: dict[str, Any] = {"image": self._pad(img[:, y:y + h, x:x + w], 0)}
        if self.masks is not None:
            sample["mask"] = self._pad(self.masks[k][y:y + h, x:x + w], self.ignore)
        for name, arr in self.maps.items():
            sample[f"map:{name}"] = self._pad(arr[k, :, y:y + h, x:x + w].clone(), float("nan"))
        sample = apply_joint(self.transform, sample)
        sample["index"] = k
        return sample


# ------------------------------------------------------------------------------------- slides

class SlidePatchDataset(Dataset):
    """Patches of one slide through a ``TileGrid``, with pixel labels and/or per-tile labels.

    Pixel labels are rasterised patch by patch from ``annotations`` (QuPath GeoJSON objects,
    ``slidekit.annotations.formats.rasterize``): ``labels`` maps class names to indices, unlabelled
    pixels get ``ignore``, and lines (scribbles) are drawn ``line_width_um`` wide. Nothing
    slide-sized is ever built. ``tile_labels`` (one int per tile) gives ``label`` instead or as
    well. The slide is opened lazily: every DataLoader worker gets its own ``TileReader``.
    """

    def __init__(self, slide: Any, grid: Any, annotations: Sequence[Any] | None = None,
                 labels: dict[str | None, int] | None = None, tile_labels: Sequence[int] | None = None,
                 line_width_um: float = 4.0, transform: Callable | None = None, ignore: int = IGNORE) -> None:
        # the grid's MPP
        self.slide = slide if isinstance(slide, Slide) else open_slide(slide, override_mpp=grid.slide_mpp)
        self.grid = grid
        self.annotations = list(annotations) if annotations is not None else None
        if self.annotations is not None and labels is None:
            raise LabelError("pixel labels from annotations need a class -> index map (labels=)")
        self.labels = dict(labels) if labels is not None else None
        if tile_labels is not None and len(tile_labels) != len(grid):
            raise LabelError(f"{len(tile_labels)} tile labels for a grid of {len(grid)} tiles")
        self.tile_labels = None if tile_labels is None else np.asarray(tile_labels, dtype=np.int64)
        self.line_width_um = line_width_um
        self.transform = transform
        self.ignore = ignore
        self._reader: TileReader | None = None

    @classmethod
    def from_annotations(cls, slide_path: str | os.PathLike, annotation_path: str | os.PathLike,
                         labels: dict[str | None, int], mpp: float = 0.5, size: int = 256, overlap: int = 0,
                         slide_mpp: float | None = None, only_annotated: bool = True,
                         **kwargs: Any) -> "SlidePatchDataset":
        """Tile a slide at ``mpp`` and keep the tiles touching an annotation of a class in ``labels``."""
        from shapely import STRtree, box


        anns = [a for a in read_annotations(annotation_path) if a.label in labels and not a.geometry.is_empty]
        if not anns:
            raise LabelError(f"no annotations of classes {sorted(map(str, labels))}", annotation_path)
        slide = open_slide(slide_path, mpp=slide_mpp)
        grid = TileGrid.from_slide(slide, mpp=mpp, size=size, overlap=overlap, mask=None, min_tissue=0)
        if only_annotated:
            assert slide.mpp is not None  # open_slide requires one
            pad = kwargs.get("line_width_um", 4.0) / min(slide.mpp)
            tree = STRtree([a.geometry.buffer(pad) if a.geometry.geom_type in ("LineString", "Point",
                                                                                 "MultiLineString") else a.geometry
                            for a in anns])
            tiles = [box(x, y, x + w, y + h) for x, y, w, h in grid.boxes]
            hits = np.unique(tree.query(tiles, predicate="intersects")[0]) if tiles else np.empty(0, int)
            if len(hits) == 0:
                raise LabelError("no tile of the slide touches the annotations (wrong slide or MPP?)",
                                 annotation_path)
            grid = grid.subset(hits)
        return cls(slide, grid, annotations=anns, labels=labels, **kwargs)

    @property
    def reader(self) -> Any:
        if self._reader is None:
            self._reader = TileReader(self.slide, self.grid)
        return self._reader

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_reader"] = None  # each worker opens its own handles
        return state

    def __len__(self) -> int:
        return len(self.grid)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img = self.reader.read(int(i))
        sample: dict[str, Any] = {"image": torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)}
        if self.annotations is not None:
            x, y, w, h = self.grid.boxes[int(i)]
            m = rasterize(self.annotations, (x, y, w, h), self.grid.mpp, labels=self.labels,
                          slide_mpp=self.slide.mpp, fill=self.ignore, line_width_um=self.line_width_um)
            s = self.grid.size
            if m.shape != (s, s):  # rounding at non-integer scales
                m = _resize(m, (s, s), nearest=True)
            sample["mask"] = torch.from_numpy(m.astype(np.int64))
        sample = apply_joint(self.transform, sample)
        if self.tile_labels is not None:
            sample["label"] = int(self.tile_labels[int(i)])
        sample["index"] = int(i)
        return sample
