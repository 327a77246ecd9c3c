"""``slidekit tile`` over a cohort: a slide's tile grid saved as ``grid.npz`` in its folder, run as a
job of the shared runner (``regions.job``). The single-slide ``slidekit tile --out FILE`` form, which
writes one grid file anywhere, is ``regions.tiling.make_grid``."""
from __future__ import annotations

import os
from typing import Any

from slidekit.regions.job import JobContext, SlideJob, run_job
from slidekit.regions.masks import Tissue
from slidekit.regions.options import GridOptions, ReadOptions, TileOptions, TissueOptions
from slidekit.regions.qc_tiles import TileQc, qc_figures, write_tiles_csv


class GridJob(SlideJob):
    """Tile a slide's tissue at ``tiles`` and write ``grid.npz`` (``TileGrid.save``); with ``qc`` (a
    :class:`TileQc`: ``--exclude-qc``) the tiles over its limits are left out and ``tiles.csv`` lists the
    kept tiles with their artefact fractions."""

    name = "tile"
    outputs = ("grid.npz", "tiles.csv")

    def __init__(self, *, tiles: TileOptions, tissue: TissueOptions, reading: ReadOptions,
                 qc: TileQc | None = None) -> None:
        self.tiles, self.tissue, self.reading, self.qc = tiles, tissue, reading, qc
        self.region = Tissue(tissue) if tiles.min_tissue > 0 else None

    def config(self) -> dict:
        t = self.tiles
        return {"mpp": t.mpp, "size": t.size, "overlap": t.overlap, "min_tissue": t.min_tissue,
                "tissue": self.tissue.as_dict(), "slide_mpp": self.reading.slide_mpp,
                "override_mpp": self.reading.override_mpp}

    def figures(self, summary: dict) -> dict:
        return {"tiles": summary["tiles"], **qc_figures(summary)}

    def run(self, ctx: JobContext) -> dict:
        t = self.tiles
        grid = ctx.grid(mpp=float(t.mpp or 0.5), size=int(t.size or 256), overlap=int(t.overlap or 0),
                        min_tissue=t.min_tissue, whole_slide=self.region is None)
        grid.save(ctx.out / "grid.npz")
        if ctx.tile_qc is not None:
            write_tiles_csv(ctx.out / "tiles.csv", grid, ctx.tile_qc)
        return {"tiles": len(grid), "mpp": grid.mpp, "size": grid.size, "overlap": grid.overlap}


def grid_job(*, options: GridOptions | None = None, mask_mpp: float = 8.0, exclude_qc: str | os.PathLike | None = None,
             qc_max: Any = None, **flat: Any) -> GridJob:
    """A :class:`GridJob`.

    Parameters
    ----------
    options
        :class:`GridOptions` (None: the defaults).
    mask_mpp
        µm/px of the tissue mask (a ``tissue`` option ``mpp`` wins).
    exclude_qc, qc_max
        A ``slidekit qc`` folder of the slide and the largest artefact fraction per class a kept tile
        may have (:class:`TileQc`; ``qc_max`` default 0.5 each).
    **flat
        Single fields by their flat names (``mpp``, ``size``, ``overlap``, ``min_tissue``, ``slide_mpp``,
        ``override_mpp``, ``backend``, ``tissue``).
    """
    o = GridOptions.of(options, **flat)
    return GridJob(tiles=o.tiles, tissue=TissueOptions({"mpp": mask_mpp, **o.tissue.as_dict()}), reading=o.reading,
                   qc=TileQc.of(exclude_qc, qc_max))


def save_grid(slide_path: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True,
              **options: Any) -> dict:
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
    return run_job(grid_job(**options), slide_path, out_dir, progress=progress)
