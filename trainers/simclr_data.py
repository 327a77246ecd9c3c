"""Unlabelled patch sources for SimCLR: slides (through a TileGrid, capped per slide), image
folders and zip archives of tiles, pooled into one dataset whose sources a sampler balances.

Ciga et al. found that a few patches from many slides beat many patches from few, so every
slide (and every large image) contributes at most ``cap`` patches, chosen once per seed. A
source is a dict (YAML-friendly):

``{"slides": [PATH or GLOB, ...], "mpp": 1.0, "size": 128, "cap": 100, "min_tissue": 0.5}``
``{"folder": DIR, "pattern": "*.png", "image_mpp": 0.25, "cap": 16}``
``{"zip": FILE, "pattern": "*/train/*", "members": [...], "image_mpp": 0.5}``

Every source may set ``weight`` (its share of each batch; default 1). Patches are ``size`` px at
``mpp`` µm/px; folder and zip images are resampled from ``image_mpp`` (default: ``mpp``, i.e. as
they are) and cut into non-overlapping ``size`` windows when larger.
"""
from __future__ import annotations

import fnmatch
import functools
import glob
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from slidekit.base.errors import ConfigError, SlideError, TissueError
from slidekit.data.datasets import IMAGE_SUFFIXES
from slidekit.regions.masks import Tissue, build_region
from slidekit.regions.options import TissueOptions
from slidekit.regions.tiling import TileGrid, TileReader
from slidekit.slides.slide import open_slide

SOURCE_KINDS = ("slides", "folder", "zip")
SOURCE_KEYS = {"slides", "folder", "zip", "pattern", "members", "mpp", "size", "cap", "min_tissue",
               "slide_mpp", "tissue_mpp", "image_mpp", "weight", "name"}


@dataclass
class PatchSource:
    """One source: a name, a batch share, and ``len(items)`` patches that ``load(i)`` reads."""

    name: str
    weight: float
    items: list[tuple]  # (reader key, ...) per patch; see PatchPool._load
    readers: dict[str, Any]
    per_group: dict[str, int]  # patches per slide / image (for reports and cap checks)

    def __len__(self) -> int:
        return len(self.items)


def _windows(w: int, h: int, win: float) -> list[tuple[int, int, int, int]]:
    """Non-overlapping square windows of side ``win`` covering a w x h image (centred grid)."""
    if win >= min(w, h):
        side = min(w, h)
        return [((w - side) // 2, (h - side) // 2, side, side)]
    cols, rows = int(w // win), int(h // win)
    x0, y0 = (w - cols * win) / 2, (h - rows * win) / 2
    s = int(round(win))
    return [(int(x0 + c * win), int(y0 + r * win), s, s) for r in range(rows) for c in range(cols)]


def _cap(items: list, cap: int | None, rng: np.random.Generator) -> list:
    if cap is None or len(items) <= cap:
        return items
    keep = np.sort(rng.choice(len(items), size=cap, replace=False))
    return [items[i] for i in keep]


def slide_source(spec: dict, defaults: dict, rng: np.random.Generator, index: int) -> PatchSource:
    """Tiles of every slide in ``spec["slides"]`` (paths or globs), at most ``cap`` per slide."""
    paths: list[str] = []
    for p in spec["slides"] if isinstance(spec["slides"], (list, tuple)) else [spec["slides"]]:
        hits = sorted(glob.glob(str(p))) if glob.has_magic(str(p)) else [str(p)]
        if not hits:
            raise ConfigError(f"no slides match {p!r}")
        paths += hits
    mpp, size = float(spec.get("mpp", defaults["mpp"])), int(spec.get("size", defaults["size"]))
    cap = spec.get("cap", defaults["cap"])
    min_tissue = float(spec.get("min_tissue", 0.5))
    items, readers, per_group = [], {}, {}
    for p in paths:
        slide = open_slide(p, mpp=spec.get("slide_mpp"))
        try:
            region = Tissue(TissueOptions({"mpp": float(spec.get("tissue_mpp", 8.0))}))
            mask = build_region(region, slide) if min_tissue > 0 else None
        except TissueError:
            continue  # a slide without tissue gives no patches
        grid = TileGrid.from_slide(slide, mpp=mpp, size=size, mask=mask, min_tissue=min_tissue)
        idx = _cap(list(range(len(grid))), cap, rng)
        if not idx:
            continue
        key = f"slide:{p}"
        readers[key] = TileReader(slide, grid.subset(np.asarray(idx, dtype=np.int64)))
        items += [(key, j) for j in range(len(idx))]
        per_group[p] = len(idx)
    return PatchSource(spec.get("name", f"slides#{index}"), float(spec.get("weight", 1.0)), items,
                       readers, per_group)


def _image_source(kind: str, spec: dict, defaults: dict, rng: np.random.Generator, index: int,
                  names: list[str], size_of: Callable[[str], tuple[int, int]]) -> PatchSource:
    mpp, size = float(spec.get("mpp", defaults["mpp"])), int(spec.get("size", defaults["size"]))
    image_mpp = float(spec.get("image_mpp", mpp))
    cap = spec.get("cap", defaults["cap"])
    win = size * mpp / image_mpp  # window side in image pixels
    items, per_group = [], {}
    for name in names:
        w, h = size_of(name)
        wins = _cap(_windows(w, h, win), cap, rng)
        items += [(kind, name, box, size) for box in wins]
        per_group[name] = len(wins)
    return PatchSource(spec.get("name", f"{kind}#{index}"), float(spec.get("weight", 1.0)), items, {},
                       per_group)


def folder_source(spec: dict, defaults: dict, rng: np.random.Generator, index: int) -> PatchSource:
    """Images under ``spec["folder"]`` (recursive; ``pattern`` filters names)."""
    from PIL import Image

    root = Path(spec["folder"])
    if not root.is_dir():
        raise ConfigError("image folder not found", root)
    pattern = spec.get("pattern", "*")
    names = sorted(str(p) for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and fnmatch.fnmatch(p.name, pattern))
    if not names:
        raise ConfigError(f"no images matching {pattern!r}", root)

    def size_of(name: str) -> tuple[int, int]:
        try:
            with Image.open(name) as im:
                return im.size
        except Exception as e:
            raise SlideError(f"cannot read image ({e})", name) from None

    return _image_source("file", spec, defaults, rng, index, names, size_of)


def zip_source(spec: dict, defaults: dict, rng: np.random.Generator, index: int) -> PatchSource:
    """Image members of the zip archive ``spec["zip"]`` (``members`` list and/or ``pattern``)."""
    from PIL import Image

    path = Path(spec["zip"])
    try:
        with zipfile.ZipFile(path) as zf:
            all_names = [n for n in zf.namelist() if Path(n).suffix.lower() in IMAGE_SUFFIXES]
            wanted = spec.get("members")
            if wanted is not None:
                missing = sorted(set(wanted) - set(all_names))
                if missing:
                    raise ConfigError(f"{len(missing)} listed members not in the archive, e.g. {missing[0]}",
                                      path)
                all_names = [n for n in all_names if n in set(wanted)]
            names = sorted(n for n in all_names if fnmatch.fnmatch(n, spec.get("pattern", "*")))
            sizes = {}
            for n in names:
                with Image.open(io.BytesIO(zf.read(n))) as im:
                    sizes[n] = im.size
    except FileNotFoundError:
        raise ConfigError("zip archive not found", path) from None
    except zipfile.BadZipFile as e:
        raise ConfigError(f"not a readable zip archive ({e})", path) from None
    if not names:
        raise ConfigError(f"no images matching {spec.get('pattern', '*')!r}", path)
    src = _image_source("zip", spec, defaults, rng, index, names, sizes.__getitem__)
    src.items = [(f"zip:{path}", n, box, s) for (_, n, box, s) in src.items]
    return src


def build_sources(specs: Sequence[dict], mpp: float, size: int, cap: int | None,
                  seed: int = 0) -> list[PatchSource]:
    """Turn source dicts into ``PatchSource`` objects (the capped subsets depend on ``seed``)."""
    rng = np.random.default_rng(seed)
    defaults = {"mpp": mpp, "size": size, "cap": cap}
    out = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ConfigError(f"source #{i} must be a mapping, got {spec!r}")
        kinds = [k for k in SOURCE_KINDS if k in spec]
        if len(kinds) != 1:
            raise ConfigError(f"source #{i} needs exactly one of {', '.join(SOURCE_KINDS)}: {spec!r}")
        unknown = set(spec) - SOURCE_KEYS
        if unknown:
            raise ConfigError(f"source #{i}: unknown key(s) {', '.join(sorted(unknown))}")
        make = {"slides": slide_source, "folder": folder_source, "zip": zip_source}[kinds[0]]
        src = make(spec, defaults, rng, i)
        if len(src) == 0:
            raise ConfigError(f"source #{i} ({src.name}) yields no patches")
        out.append(src)
    if not out:
        raise ConfigError("SimCLR needs at least one patch source (slides, folder or zip)")
    return out


@functools.lru_cache(maxsize=16)
def _decoded_file(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise SlideError(f"cannot read image ({e})", path) from None


class PatchPool(Dataset):
    """The sources end to end (source ``i`` owns a contiguous index range, as ConcatDataset).

    ``pool[i]`` is a ``(3, size, size)`` uint8 tensor, or, with ``transform`` (e.g. the geometric
    part of the SimCLR augmentation) and ``views=2``, a tuple of independently transformed views.
    Picklable: slide readers and zip handles reopen in each DataLoader worker.
    """

    def __init__(self, sources: Sequence[PatchSource], transform: Callable | None = None, views: int = 1) -> None:
        self.sources = list(sources)
        self.transform, self.views = transform, views
        self.items = [it for s in self.sources for it in s.items]
        self.readers = {k: r for s in self.sources for k, r in s.readers.items()}
        self._zips: dict[str, zipfile.ZipFile] = {}
        self._pid = os.getpid()

    @property
    def sizes(self) -> list[int]:
        """Number of patches of each source, in order."""
        return [len(s) for s in self.sources]

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.sources]

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict:
        d = self.__dict__.copy()
        d["_zips"] = {}
        return d

    def _zip(self, path: str) -> zipfile.ZipFile:
        if self._pid != os.getpid():
            self._zips, self._pid = {}, os.getpid()
        if path not in self._zips:
            self._zips[path] = zipfile.ZipFile(path)
        return self._zips[path]

    def patch(self, i: int) -> np.ndarray:
        """Patch ``i`` as (size, size, 3) uint8."""
        item = self.items[i]
        key = item[0]
        if key.startswith("slide:"):
            return self.readers[key].read(item[1])
        _, name, (x, y, w, h), size = item
        if key.startswith("zip:"):
            from PIL import Image

            with Image.open(io.BytesIO(self._zip(key[4:]).read(name))) as im:
                arr = np.asarray(im.convert("RGB"))
        else:
            arr = _decoded_file(name)
        crop = arr[y:y + h, x:x + w]
        if crop.shape[:2] != (size, size):
            import cv2

            interp = cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_LINEAR
            crop = cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=interp)
        return crop

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
        t = torch.from_numpy(np.array(self.patch(i))).permute(2, 0, 1).contiguous()  # copy: PIL arrays are read-only
        if self.transform is None:
            return t
        if self.views == 1:
            return self.transform(t)
        return tuple(self.transform(t) for _ in range(self.views))

    def source_of(self, i: int) -> int:
        """Which source owns global index ``i``."""
        return int(np.searchsorted(np.cumsum(self.sizes), i, side="right"))
