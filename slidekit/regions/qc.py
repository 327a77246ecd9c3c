"""Slide QC as a job: ``qc_slide``/``QcJob`` write the label map, its legend, ``qc.geojson`` and ``qc.json``;
``QcArtefacts`` is the QC folder as a region that composes with the others. The detectors are
:mod:`slidekit.regions.qc_detect`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
from shapely.affinity import affine_transform
from shapely.geometry import MultiPolygon, box

from slidekit.annotations.formats import write_geojson
from slidekit.annotations.geometry import clip_geometry
from slidekit.annotations.objects import Annotation
from slidekit.base.errors import ConfigError
from slidekit.base.io import atomic_path, file_identity, write_text_atomic
from slidekit.regions.job import JobContext, SlideJob, run_job
from slidekit.regions.masks import Region, _onto
from slidekit.regions.options import ReadOptions
from slidekit.regions.qc_detect import (  # noqa: F401  (re-exported: the names of slidekit.regions.qc)
    ARTEFACTS,
    COLORS,
    GLASS,
    LABELS,
    QC_OUTPUTS,
    THRESHOLD_OF,
    TISSUE,
    QcOptions,
    colour_artefacts,
    focus_artefact,
    focus_on_raster,
    qc_labels,
    qc_report,
    sharpness,
)
from slidekit.regions.tissue import TissueMask, mask_to_polygons
from slidekit.slides.identity import same_slide


class QcJob(SlideJob):
    """Slide QC: ``qc_labels.png`` (label map), ``qc_classes.json`` (its legend), ``qc.geojson`` (one
    classed QuPath annotation per artefact class) and ``qc.json`` (areas, fractions, verdict)."""

    name = "qc"
    outputs = QC_OUTPUTS

    def __init__(self, *, options: QcOptions | None = None, reading: ReadOptions | None = None) -> None:
        self.options, self.reading = options or QcOptions(), reading or ReadOptions()

    def config(self) -> dict:
        return {"qc": self.options.as_dict(), "slide_mpp": self.reading.slide_mpp,
                "override_mpp": self.reading.override_mpp}

    def figures(self, summary: dict) -> dict:
        return {"verdict": summary["verdict"],
                **{f"{n} fraction": round(c["fraction_of_tissue"], 4) for n, c in summary["classes"].items()}}

    def run(self, ctx: JobContext) -> dict:
        slide, out = ctx.slide, ctx.out
        labels, mpp, skipped = qc_labels(slide, self.options, progress=None if ctx.progress else False)
        report = qc_report(labels, mpp, self.options, skipped)
        with atomic_path(out / "qc_labels.png") as tmp:
            png = tmp.with_suffix(".png")
            if not cv2.imwrite(str(png), labels):
                raise OSError(f"{out / 'qc_labels.png'}: could not be written")
            os.replace(png, tmp)
        legend = {"mpp": mpp, "slide_mpp": list(slide.mpp), "shape": list(labels.shape),
                  "labels": {name: {"value": v, "color": list(COLORS[name])} for name, v in LABELS.items()}}
        write_text_atomic(out / "qc_classes.json", json.dumps(legend, indent=2))
        sx, sy = mpp / slide.mpp[0], mpp / slide.mpp[1]
        on_slide = box(0, 0, *slide.dimensions)
        anns = []
        for name in ARTEFACTS:
            polys = [affine_transform(p, [sx, 0, 0, sy, 0, 0]) for p in mask_to_polygons(labels == LABELS[name])]
            clipped = [clip_geometry(p, on_slide)[0] for p in polys]
            parts = [q for c in clipped for q in getattr(c, "geoms", [c])
                     if not q.is_empty and q.geom_type == "Polygon"]
            if parts:
                anns.append(Annotation(MultiPolygon(parts) if len(parts) > 1 else parts[0], label=name,
                                       color=COLORS[name], kind="annotation",
                                       measurements={"Area µm^2": report["classes"][name]["area_um2"]}))
        write_geojson(anns, out / "qc.geojson")
        report = {"slide": str(slide.path), **report}
        write_text_atomic(out / "qc.json", json.dumps(report, indent=2))
        return report


def qc_slide(slide: str | os.PathLike, out: str | os.PathLike, *, options: QcOptions | None = None,
             slide_mpp: float | None = None, override_mpp: float | None = None, backend: str | None = None,
             progress: bool = True) -> dict:
    """Run slide QC on ``slide`` into ``out`` (``QcJob`` through the shared runner); return the summary
    (with ``qc.json``'s fields; ``skipped: True`` when the folder was finished already).

    Parameters
    ----------
    slide
        A slide file, or an overview image with ``slide_mpp`` (its µm/px).
    out
        The slide's QC folder.
    options
        Detector thresholds and verdict limits (:class:`QcOptions`; default: its defaults).
    slide_mpp, override_mpp, backend
        How the slide is read (:class:`ReadOptions`).
    progress
        Progress bars for slow reads.
    """
    job = QcJob(options=options, reading=ReadOptions(slide_mpp=slide_mpp, override_mpp=override_mpp, backend=backend))
    return run_job(job, slide, out, progress=progress)


@dataclass(frozen=True)
class QcArtefacts(Region):
    """The artefacts of a QC folder (``qc_slide``'s label map): ``Tissue() - QcArtefacts("OUT/qc")``.

    ``classes``: the artefact class names to take (default: every artefact class, not glass).
    """

    path: str | os.PathLike
    classes: Sequence[str] | str | None = None

    def _names(self) -> list[str]:
        names = [self.classes] if isinstance(self.classes, str) else list(self.classes or ARTEFACTS)
        unknown = [n for n in names if n not in LABELS]
        if unknown:
            raise ConfigError(f"{self.path}: unknown QC class {unknown[0]!r} (known: {', '.join(LABELS)})")
        return names

    def build(self, slide: Any, like: TissueMask | None = None, progress: bool | None = None) -> TissueMask:
        folder = Path(self.path)
        try:
            legend = json.loads((folder / "qc_classes.json").read_text())
            mpp = float(legend["mpp"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"{folder / 'qc_classes.json'}: missing or damaged (not a QC output folder?)") from None
        try:  # a hand-over: the QC must be of this slide file (its summary records the fingerprint)
            recorded = json.loads((folder / "summary.json").read_text())["config"]["slide_id"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"{folder / 'summary.json'}: missing or damaged; cannot tell which slide this QC "
                              "is of (run `slidekit qc` again)") from None
        if not same_slide(recorded, slide.path):
            raise ConfigError(f"{folder}: QC of another slide file than {slide.path} (its summary records "
                              f"{recorded})")
        labels = cv2.imread(str(folder / "qc_labels.png"), cv2.IMREAD_UNCHANGED)
        if labels is None or labels.ndim != 2:
            raise ConfigError(f"{folder / 'qc_labels.png'}: missing or not a label map")
        values = [LABELS[n] for n in self._names()]
        mask = TissueMask(array=np.isin(labels, values), mpp=mpp, slide_mpp=tuple(slide.mpp))
        return _onto(mask, like)

    def config(self) -> dict:
        return {"qc": {"labels": file_identity(Path(self.path) / "qc_labels.png"), "classes": self._names()}}
