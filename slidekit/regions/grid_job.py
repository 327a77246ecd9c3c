"""``slidekit tile`` over a cohort: a slide's tile grid saved as ``grid.npz`` in its folder, run as a
job of the shared runner (``regions.job``). The single-slide ``slidekit tile --out FILE`` form, which
writes one grid file anywhere, is ``regions.tiling.make_grid``."""
from __future__ import annotations

import os

from slidekit.regions.job import JobContext, SlideJob, run_job
from slidekit.regions.masks import Tissue
from slidekit.regions.options import ReadOptions, TileOptions, TissueOptions


class GridJob(SlideJob):
    """Tile a slide's tissue at ``tiles`` and write ``grid.npz`` (``TileGrid.save``)."""

    name = "tile"
    outputs = ("grid.npz",)

    def __init__(self, *, tiles: TileOptions, tissue: TissueOptions, reading: ReadOptions) -> None:
        self.tiles, self.tissue, self.reading = tiles, tissue, reading
        self.region = Tissue(tissue) if tiles.min_tissue > 0 else None

    def config(self) -> dict:
        t = self.tiles
        return {"mpp": t.mpp, "size": t.size, "overlap": t.overlap, "min_tissue": t.min_tissue,
                "tissue": self.tissue.as_dict(), "slide_mpp": self.reading.slide_mpp,
                "override_mpp": self.reading.override_mpp}

    def figures(self, summary: dict) -> dict:
        return {"tiles": summary["tiles"]}

    def run(self, ctx: JobContext) -> dict:
        t = self.tiles
        grid = ctx.grid(mpp=float(t.mpp or 0.5), size=int(t.size or 256), overlap=int(t.overlap or 0),
                        min_tissue=t.min_tissue, whole_slide=self.region is None)
        grid.save(ctx.out / "grid.npz")
        return {"tiles": len(grid), "mpp": grid.mpp, "size": grid.size, "overlap": grid.overlap}


def grid_job(*, mpp: float = 0.5, size: int = 256, overlap: int = 0, min_tissue: float = 0.5,
             slide_mpp: float | None = None, backend: str | None = None, mask_mpp: float = 8.0,
             override_mpp: float | None = None, tissue: dict | None = None) -> GridJob:
    """A :class:`GridJob` from ``make_grid``'s keyword arguments (``tissue`` options win over ``mask_mpp``)."""
    return GridJob(tiles=TileOptions(mpp=mpp, size=size, overlap=overlap, min_tissue=min_tissue),
                   tissue=TissueOptions({"mpp": mask_mpp, **(tissue or {})}),
                   reading=ReadOptions(slide_mpp=slide_mpp, override_mpp=override_mpp, backend=backend))


def save_grid(slide_path: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True,
              **options: object) -> dict:
    """Tile one slide into ``out_dir/grid.npz`` (+ ``summary.json``); skipped when finished and verified.

    Parameters
    ----------
    slide_path
        The slide file.
    out_dir
        The slide's output folder.
    progress
        Show progress bars.
    **options
        :func:`grid_job`'s options.
    """
    return run_job(grid_job(**options), slide_path, out_dir, progress=progress)  # type: ignore[arg-type]
