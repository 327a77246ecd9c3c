"""`slidekit export-spatialdata OUT_OR_COHORT`: slidekit results as SpatialData stores (wsidata, LazySlide, sopa)."""
from __future__ import annotations

from pathlib import Path

import click

from slidekit.cli.common import echo_json, handle_errors, option, quiet_flag, quiet_option, slide_reading_options
from slidekit.regions.options import ReadOptions


@click.command("export-spatialdata")
@click.argument("source", metavar="OUT_OR_COHORT", type=click.Path(file_okay=False, path_type=Path))
@option("store")
@option("slide", detail="the slide of a single output folder [default: the one the folder records].")
@option("feature_key")
@option("tile_key")
@slide_reading_options
@quiet_option
@handle_errors
def export_spatialdata_cmd(source: Path, store: str | None, slide: str | None, feature_key: str | None,
                           tile_key: str, slide_mpp: float | None, override_mpp: float | None,
                           backend: str | None) -> None:
    """Write one slide's output folder, or each done slide of a cohort --out folder (cohort.csv), as a
    SpatialData store that wsidata.open_wsi, LazySlide and sopa open (see docs/scverse.md). Prints the
    stores written; a cohort's slides that were not exported are one line each on stderr."""
    from slidekit.slidelevel.spatialdata_export import (  # loads spatialdata
        SpatialDataOptions,
        export_cohort_spatialdata,
        export_spatialdata,
    )

    reading = ReadOptions(slide_mpp=slide_mpp, override_mpp=override_mpp, backend=backend)
    opts = SpatialDataOptions(model=feature_key, tile_key=tile_key)
    if (source / "cohort.csv").is_file():
        stores, problems = export_cohort_spatialdata(source, store_dir=store, options=opts, reading=reading)
        for line in problems:
            click.echo(f"slidekit: not exported: {line}", err=True)
    else:
        stores, problems = [export_spatialdata(source, store, slide=slide, options=opts, reading=reading)], []
    echo_json({"stores": [str(s) for s in stores], "not_exported": problems})


def export_after(ctx: click.Context, out: str | Path, *, slide: str | None = None, cohort: bool = False,
                 reading: ReadOptions | None = None) -> None:
    """``--spatialdata`` of a per-slide command: export what it wrote in ``out`` (one slide's folder, or each
    done slide of a cohort's) as SpatialData stores, after the command's own work; nothing when not asked."""
    if not ctx.meta.get("spatialdata"):
        return
    from slidekit.slidelevel.spatialdata_export import export_cohort_spatialdata, export_spatialdata

    if cohort:
        stores, problems = export_cohort_spatialdata(out, reading=reading)
        for line in problems:
            click.echo(f"slidekit: not exported: {line}", err=True)
    else:
        stores = [export_spatialdata(out, slide=slide, reading=reading)]
    if not quiet_flag(ctx):
        click.echo(f"SpatialData: {len(stores)} store(s)" + (f" -> {stores[0]}" if len(stores) == 1 else ""))


def register(main: click.Group) -> None:
    """Add `export-spatialdata` to the main group."""
    main.add_command(export_spatialdata_cmd)
