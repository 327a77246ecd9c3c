"""Per-tile artefact fractions from a QC folder, and the tile filter every job applies with
``--exclude-qc QC_DIR [--qc-max ...]``.

A tile's fraction of a class is the share of its area covered by that class's QC label pixels (the
``qc_labels.zarr`` map at 8 µm/px; label pixels cut by the tile's edge count by the part inside, as for
a tile's tissue fraction: ``TissueMask.fractions``). A tile is left out when any class's
fraction exceeds that class's maximum (``--qc-max``: one number for every class and/or ``NAME=F`` per
class; default :data:`DEFAULT_QC_MAX`). The kept tiles' fractions go with the job's outputs
(``tiles.csv``, the feature files), so a user can filter again more strictly without recomputing.

:class:`TileQc` is what the job runner applies in ``JobContext.grid`` (``SlideJob.qc``): checked against
the slide before anything is written, part of the job's configuration, and its counts (tiles before,
removed in all, removed per class) recorded in the job's summary.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from slidekit.base.errors import ConfigError, TissueError
from slidekit.base.io import file_identity, write_text_atomic
from slidekit.regions.qc import ARTEFACTS, LABELS, check_qc_folder, qc_slide, read_qc_labels
from slidekit.regions.tiling import TileGrid
from slidekit.regions.tissue import TissueMask

#: A tile is left out when more than this fraction of it is one artefact class (unless --qc-max says else).
DEFAULT_QC_MAX = 0.5
#: ``--exclude-qc auto``: QC each slide first (default QC options) into the job's folder, ``OUT/qc/``.
AUTO = "auto"


def _fraction(text: str, what: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"--qc-max {what!r}: {text!r} is not a number (expected 0..1)") from None
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"--qc-max {what!r}: a fraction between 0 and 1, not {value:g}")
    return value


def qc_max_of(value: float | str | Mapping[str, float] | Iterable[float | str] | None) -> dict[str, float]:
    """The maximum artefact fraction of every class from ``--qc-max`` values: a number for every class
    (``0.5``), ``NAME=F`` for one (``"Pen ink=0.1"``; names as in QuPath, any case), a mapping, or a
    list of those (numbers apply first, then the named classes). Unset classes: :data:`DEFAULT_QC_MAX`.

    Raises ConfigError naming the value when a name is not a QC class or a number is not in 0..1.
    """
    out = dict.fromkeys(ARTEFACTS, DEFAULT_QC_MAX)
    if value is None:
        return out
    if isinstance(value, Mapping):
        items: list[Any] = [f"{k}={v}" for k, v in value.items()]
    elif isinstance(value, (str, int, float)):
        items = [value]
    else:
        items = list(value)
    by_lower = {n.lower(): n for n in ARTEFACTS}
    named = []
    for item in items:
        if isinstance(item, str) and "=" in item:
            named.append(item)
        else:
            out = dict.fromkeys(ARTEFACTS, _fraction(str(item), str(item)))
    for item in named:
        name, _, number = item.partition("=")
        key = by_lower.get(name.strip().lower())
        if key is None:
            raise ConfigError(f"--qc-max {item!r}: unknown QC class {name.strip()!r} (known: {', '.join(ARTEFACTS)})")
        out[key] = _fraction(number.strip(), item)
    return out


def check_qc_options(exclude_qc: str | os.PathLike | None, qc_max: Any = None) -> None:
    """Refuse ``--exclude-qc``/``--qc-max`` that no slide could use, before a cohort starts: a ``qc_max``
    without a QC folder, a bad ``qc_max`` value, a QC folder that is not a folder (ConfigError, one line)."""
    TileQc.of(exclude_qc, qc_max)
    if exclude_qc is not None and str(exclude_qc) != AUTO and not Path(exclude_qc).is_dir():
        raise ConfigError(f"--exclude-qc {exclude_qc}: not a folder (a `slidekit qc` output folder; for a cohort "
                          "the QC cohort's --out)")


def tile_fractions(labels: np.ndarray, mpp: float, slide_mpp: tuple[float, float],
                   grid: TileGrid | np.ndarray) -> np.ndarray:
    """(N, len(ARTEFACTS)) float32: each tile's fraction of each artefact class, from a QC label map at
    ``mpp`` µm/px of a slide at ``slide_mpp`` (level-0 µm/px): each class is a ``TissueMask`` and its
    ``fractions`` (area-weighted over the label pixels, as a tile's tissue fraction is). ``grid``: a
    TileGrid or (N, 4) level-0 boxes (x, y, w, h)."""
    boxes = grid.boxes if isinstance(grid, TileGrid) else np.asarray(grid, np.float64).reshape(-1, 4)
    out = np.zeros((len(boxes), len(ARTEFACTS)), np.float32)
    if len(boxes):
        for c, name in enumerate(ARTEFACTS):
            out[:, c] = TissueMask(array=labels == LABELS[name], mpp=mpp, slide_mpp=slide_mpp).fractions(boxes)
    return out


@dataclass(frozen=True)
class TileQc:
    """Leave out the tiles whose artefact fraction (from the QC folder ``path`` of the same slide file)
    exceeds ``max_fraction`` of its class; keep the kept tiles' fractions.

    Parameters
    ----------
    path
        A ``slidekit qc`` output folder of the slide, or ``"auto"``: QC the slide first (default
        ``QcOptions``) into ``qc/`` inside the job's own folder (a rerun finds it finished).
    max_fraction
        Per artefact class the largest fraction a kept tile may have (:func:`qc_max_of`).
    """

    path: str | os.PathLike
    max_fraction: Mapping[str, float] = field(default_factory=lambda: qc_max_of(None))

    @classmethod
    def of(cls, exclude_qc: str | os.PathLike | None, qc_max: Any = None) -> "TileQc | None":
        """The filter for ``--exclude-qc``/``--qc-max`` (None without a QC folder; a ``qc_max`` without
        one is a ConfigError: it would be ignored)."""
        if exclude_qc is None:
            if qc_max not in (None, (), []):
                raise ConfigError("--qc-max needs --exclude-qc QC_DIR (the QC folder whose fractions it limits)")
            return None
        return cls(exclude_qc, qc_max_of(qc_max))

    def ready(self, slide: Any, folder: str | os.PathLike, reading: Any = None, progress: bool = True) -> "TileQc":
        """This filter with its QC folder: for ``"auto"``, ``slidekit qc`` of ``slide`` (read as ``reading``
        says) into ``folder`` first (skipped when finished there); otherwise itself."""
        if str(self.path) != AUTO:
            return self
        qc_slide(slide.path, folder, slide_mpp=getattr(reading, "slide_mpp", None),
                 override_mpp=getattr(reading, "override_mpp", None), backend=getattr(reading, "backend", None),
                 progress=progress)
        return TileQc(folder, self.max_fraction)

    def check(self, slide: Any) -> None:
        """Refuse a QC folder that is not a finished QC of ``slide``'s file (ConfigError, one line)."""
        check_qc_folder(self.path, slide)

    def config(self) -> dict:
        """What the filter adds to a job's configuration: the QC run (its summary) and the limits."""
        return {"summary": file_identity(Path(self.path) / "summary.json"),
                "max": {k: float(v) for k, v in self.max_fraction.items()}}

    def fractions(self, slide: Any, boxes: np.ndarray) -> np.ndarray:
        """(N, classes) artefact fractions of level-0 ``boxes`` (x, y, w, h) of ``slide``."""
        labels, mpp = read_qc_labels(self.path, slide)
        return tile_fractions(labels, mpp, tuple(slide.mpp), boxes)

    def filter(self, slide: Any, grid: TileGrid) -> tuple[TileGrid, np.ndarray, dict]:
        """``(kept grid, kept tiles' fractions (N, classes), counts)``; counts: ``tiles_before``,
        ``tiles_removed``, ``removed_by_class`` (a tile over two limits counts under both),
        ``max_fraction`` and ``classes`` (the fraction columns' names). TissueError naming the slide
        when no tile is left."""
        labels, mpp = read_qc_labels(self.path, slide)
        frac = tile_fractions(labels, mpp, tuple(slide.mpp), grid)
        limits = np.array([float(self.max_fraction.get(n, DEFAULT_QC_MAX)) for n in ARTEFACTS], np.float32)
        over = frac > limits[None, :]
        drop = over.any(axis=1)
        try:  # the slide's QC verdict goes with the counts (cohort tables, the viewer)
            report = json.loads((Path(self.path) / "qc.json").read_text())
            verdict = {"verdict": str(report["verdict"]), "reasons": list(report.get("reasons") or [])}
        except (OSError, ValueError, KeyError, TypeError):
            verdict = {}
        counts = {**verdict, "tiles_before": len(grid), "tiles_removed": int(drop.sum()),
                  "removed_by_class": {n: int(over[:, c].sum()) for c, n in enumerate(ARTEFACTS)},
                  "max_fraction": {n: float(self.max_fraction.get(n, DEFAULT_QC_MAX)) for n in ARTEFACTS},
                  "classes": list(ARTEFACTS)}
        keep = np.flatnonzero(~drop)
        if len(keep) == 0:
            raise TissueError(f"every one of its {len(grid)} tiles has more artefact than --qc-max allows", slide.path)
        return grid.subset(keep), frac[keep], counts


def fraction_columns() -> list[str]:
    """The per-tile fraction columns of ``tiles.csv`` (``qc_pen_ink``, ``qc_air_bubble_edge``, ...), in
    ``ARTEFACTS`` order."""
    return ["qc_" + re.sub(r"[^a-z0-9]+", "_", n.lower()).strip("_") for n in ARTEFACTS]


def write_tiles_csv(path: str | os.PathLike, grid: TileGrid, fractions: np.ndarray | None) -> Path:
    """``tiles.csv``: one row per tile (level-0 ``x``, ``y``, ``width``, ``height``) with, when given, its
    fraction of each artefact class (:func:`fraction_columns`); atomic."""
    cols = ["x", "y", "width", "height"] + (fraction_columns() if fractions is not None else [])
    w, h = grid.extent
    lines = [",".join(cols)]
    for i, (x, y) in enumerate(grid.coords):
        row = [str(int(x)), str(int(y)), f"{w:g}", f"{h:g}"]
        if fractions is not None:
            row += [f"{v:.4f}" for v in fractions[i]]
        lines.append(",".join(row))
    return write_text_atomic(path, "\n".join(lines) + "\n")


def qc_figures(summary: dict) -> dict:
    """A job summary's QC counts as cohort-table figures: ``qc verdict`` (the slide's), ``qc removed`` and
    ``qc removed <class>`` (none without ``--exclude-qc``)."""
    qc = summary.get("qc")
    if not isinstance(qc, dict):
        return {}
    return {**({"qc verdict": qc["verdict"]} if "verdict" in qc else {}), "qc removed": qc.get("tiles_removed"),
            **{f"qc removed {n}": v for n, v in (qc.get("removed_by_class") or {}).items()}}
