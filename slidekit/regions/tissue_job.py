"""``slidekit tissue``: a slide's tissue as ``mask.png``, QuPath annotations and figures, run as a
job of the shared runner (``regions.job``)."""
from __future__ import annotations

import json
import os
from typing import Any

from shapely.geometry import box

from slidekit.annotations.formats import write_geojson
from slidekit.annotations.geometry import clip_geometry
from slidekit.annotations.objects import Annotation
from slidekit.base.io import atomic_path, write_text_atomic
from slidekit.regions.job import JobContext, SlideJob, run_job
from slidekit.regions.masks import Tissue
from slidekit.regions.options import ReadOptions, TissueOptions

TISSUE_OUTPUTS = ("mask.png", "tissue.geojson", "tissue.json")


class TissueJob(SlideJob):
    """Detect tissue and write ``mask.png``, ``tissue.geojson`` (QuPath annotations) and
    ``tissue.json`` (its figures)."""

    name = "tissue"
    outputs = TISSUE_OUTPUTS

    def __init__(self, *, tissue: TissueOptions, reading: ReadOptions) -> None:
        self.tissue, self.reading, self.region = tissue, reading, Tissue(tissue)

    def config(self) -> dict:
        return {"tissue": self.tissue.as_dict(), "slide_mpp": self.reading.slide_mpp,
                "override_mpp": self.reading.override_mpp}

    def figures(self, summary: dict) -> dict:
        return {"regions": summary["regions"], "area_mm2": round(summary["area_mm2"], 6),
                "tissue_fraction": round(summary["fraction"], 4)}

    def run(self, ctx: JobContext) -> dict:
        slide, out = ctx.slide, ctx.out
        mask = ctx.mask()
        assert mask is not None  # the job's region is the tissue
        area_px = slide.mpp[0] * slide.mpp[1]
        # A mask pixel at the edge may overhang the slide: regions are cut to the slide before measuring.
        on_slide = box(0, 0, *slide.dimensions)
        regions = [clip_geometry(p, on_slide)[0] for p in mask.polygons]
        anns = [Annotation(p, label="Tissue", color=(80, 200, 120), kind="annotation",
                           measurements={"Area µm^2": p.area * area_px}) for p in regions if not p.is_empty]
        with atomic_path(out / "mask.png") as tmp:
            mask.to_png(str(tmp.with_suffix(".png")))
            os.replace(tmp.with_suffix(".png"), tmp)
        write_geojson(anns, out / "tissue.geojson")
        summary = {"slide": str(slide.path), "mask_mpp": mask.mpp, "mask_shape": list(mask.array.shape),
                   "regions": len(anns), "area_mm2": mask.area_um2 / 1e6, "fraction": float(mask.array.mean())}
        write_text_atomic(out / "tissue.json", json.dumps(summary, indent=2))
        return summary


def save_tissue(slide_path: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True,
                **options: Any) -> dict:
    """Detect tissue and write ``mask.png``, ``tissue.geojson`` (QuPath annotations), ``tissue.json``
    and ``summary.json`` into ``out_dir``; a finished folder whose outputs verify is skipped.

    Parameters
    ----------
    slide_path
        The slide file.
    out_dir
        The slide's output folder.
    progress
        Show a progress bar for slow reads.
    **options
        :func:`tissue_job`'s options.
    """
    return run_job(tissue_job(**options), slide_path, out_dir, progress=progress)


def tissue_job(*, mask_mpp: float = 8.0, min_area_um2: float = 20_000.0, slide_mpp: float | None = None,
               backend: str | None = None, override_mpp: float | None = None, tissue: dict | None = None) -> TissueJob:
    """A :class:`TissueJob`.

    Parameters
    ----------
    mask_mpp, min_area_um2
        The mask's µm/px and the smallest region kept (µm²); ``tissue`` options win over them.
    slide_mpp, override_mpp, backend
        How the slide is read (``ReadOptions``).
    tissue
        Further ``tissue_mask`` options (``TissueParams`` fields).
    """
    opts = TissueOptions({"mpp": mask_mpp, "min_area_um2": min_area_um2, **(tissue or {})})
    return TissueJob(tissue=opts, reading=ReadOptions(slide_mpp=slide_mpp, override_mpp=override_mpp, backend=backend))

