"""`slidekit cells` (a slide -> every nucleus as QuPath detections, a per-nucleus table, summary.json)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from slidekit.cli.cohort import cohort_options, run_cohort_cli, single_slide, slides_argument
from slidekit.cli.common import (
    device_option,
    handle_errors,
    min_tissue_option,
    option,
    quiet_flag,
    quiet_option,
    slide_reading_options,
    threads_option,
    tile_geometry_options,
)
from slidekit.cli.scverse import export_after
from slidekit.regions.options import ReadOptions
from slidekit.regions.qc_tiles import check_qc_options


@click.command("cells")
@slides_argument
@option("model", required=True,
        detail="a segmentation checkpoint (e.g. from `slidekit train s2l`) or the built-in hematoxylin.")
@option("out", type=click.Path(file_okay=False, path_type=str), required=True,
        detail="directory (OUT/<slide id>/ per slide plus OUT/cohort.csv for a cohort).")
@tile_geometry_options(minimum=(16, 1), aliases={"tile_mpp": ("--mpp",), "tile_size": ("--size",)},
                       overlap_detail="Must exceed a nucleus diameter [default: size/4].")
@option("threshold", detail="a nucleus pixel.")
@option("min_distance")
@option("min_area", default=10.0, detail="nuclei [10 here: a nucleus, not a region].")
@min_tissue_option(0.05, "[0.05 here: nuclei at the edge of the tissue count]; 0 (without --roi) tiles the "
                         "whole slide, no tissue detection.")
@option("roi", detail="Also writes regions.csv (counts and densities per polygon).")
@option("exclude_qc")
@option("qc_max")
@option("split")
@option("gzip")
@option("batch_size", default=16, detail="[16 here: cells_slide's default]")
@option("workers")
@threads_option
@device_option
@slide_reading_options
@option("spatialdata")
@quiet_option
@cohort_options
@click.pass_context
@handle_errors
def cells_cmd(ctx: click.Context, slides: tuple[str, ...], model: str, out: str, tile_mpp: float | None,
              tile_size: int | None,
              manifest: tuple[str, ...], engine: str, jobs: int, gpus: str | None, shard: str | None,
              ray_address: str | None, retry_failed: bool, **options: Any) -> None:
    """Detect every nucleus in the tissue of each SLIDE; write OUT/cells.geojson (.gz when large; open
    in QuPath), OUT/cells.csv and OUT/summary.json. SLIDES: slide files, folders, globs or manifest
    CSVs; a cohort writes OUT/<slide id>/ per slide plus OUT/cohort.csv (see docs/cohorts.md).
    Reruns skip finished slides and resume interrupted ones."""
    from slidekit.infer.cells import cells_slide

    quiet = quiet_flag(ctx)
    options.update(mpp=tile_mpp, size=tile_size, qc_max=list(options.pop("qc_max")) or None)
    check_qc_options(options.get("exclude_qc"), options.get("qc_max"))
    if not single_slide(ctx, slides, {"manifest": manifest}):
        if options.get("roi") is not None:
            raise click.UsageError("--roi belongs to one slide; run `slidekit cells` per slide")
        options.pop("threads")  # a cohort shares the CPUs among its --jobs (given, it is refused)
        run_cohort_cli(ctx, "cells", list(slides), out, quiet, {"model": model, **options})
        return
    s = cells_slide(slides[0], out, model=model, progress=not quiet, **options)
    export_after(ctx, out, slide=slides[0], reading=ReadOptions(options.get("slide_mpp"), options.get("override_mpp"),
                                                                 options.get("backend")))
    if not quiet:
        state = "skipped (finished earlier)" if s.get("skipped") else f"{s['seconds']} s"
        click.echo(f"{Path(slides[0]).name}: {s['nuclei']} nuclei in {s['tiles']} tiles -> {out} [{state}]")


def register(main: click.Group) -> None:
    main.add_command(cells_cmd)
