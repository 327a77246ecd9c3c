"""`slidekit cells` (a slide -> every nucleus as QuPath detections, a per-nucleus table, summary.json)."""
from __future__ import annotations

from pathlib import Path

import click

from slidekit.cli.cohort import cohort_options, run_cohort_cli, single_slide, slides_argument
from slidekit.cli.common import device_option, handle_errors, quiet_flag, threads_option


@click.command("cells")
@slides_argument
@click.option("--model", required=True, metavar="NAME|CKPT",
              help="A segmentation checkpoint (e.g. from `slidekit train s2l`) or the built-in hematoxylin.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Output directory (OUT/<slide id>/ per slide plus OUT/cohort.csv for a cohort).")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Tile pixel size in µm/px [default: the model's].")
@click.option("--size", type=click.IntRange(min=16), default=None, help="Tile size in px [default: the model's].")
@click.option("--overlap", type=click.IntRange(min=1), default=None,
              help="Tile overlap in px; must exceed a nucleus diameter [default: size/4].")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Foreground probability of a nucleus pixel.")
@click.option("--min-distance", "min_distance_um", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Smallest distance between two nucleus centres (watershed seeds), µm.")
@click.option("--min-area", "min_area_um2", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Smallest nucleus kept, µm².")
@click.option("--min-tissue", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="Smallest tissue fraction of a tile; 0 (without --roi) tiles the whole slide, no tissue detection.")
@click.option("--roi", type=click.Path(dir_okay=False, path_type=str), default=None, metavar="GEOJSON|XML",
              help="Only inside these polygons; also writes regions.csv (counts and densities per polygon).")
@click.option("--split", type=click.Choice(["auto", "boundary", "distance"]), default="auto", show_default=True,
              help="Touching nuclei: seeds from the model's outline class (boundary/contour/border/edge) when it "
                   "has one (auto), always (boundary), or from the distance transform (distance).")
@click.option("--gzip/--no-gzip", "gzip", default=None,
              help="Write cells.geojson.gz / plain cells.geojson [default: gzip above 20000 nuclei].")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True)
@threads_option
@device_option
@click.option("--quiet", "-q", "quiet_local", is_flag=True, help="No progress bars.")
@cohort_options
@click.pass_context
@handle_errors
def cells_cmd(ctx: click.Context, slides: tuple[str, ...], model: str, out: str, quiet_local: bool,
              manifest: tuple[str, ...], engine: str, jobs: int, gpus: str | None, shard: str | None,
              ray_address: str | None, retry_failed: bool, **options: object) -> None:
    """Detect every nucleus in the tissue of each SLIDE; write OUT/cells.geojson (.gz when large; open
    in QuPath), OUT/cells.csv and OUT/summary.json. SLIDES: slide files, folders, globs or manifest
    CSVs; a cohort writes OUT/<slide id>/ per slide plus OUT/cohort.csv (see docs/cohorts.md).
    Reruns skip finished slides and resume interrupted ones."""
    from slidekit.infer.cells import cells_slide

    quiet = quiet_local or quiet_flag(ctx)
    if not single_slide(ctx, slides, {"manifest": manifest}):
        if options.get("roi") is not None:
            raise click.UsageError("--roi belongs to one slide (its annotations); run `slidekit cells` per slide")
        options.pop("threads")  # a cohort shares the CPUs among its --jobs (given, it is refused)
        run_cohort_cli(ctx, "cells", list(slides), out, quiet, {"model": model, **options})
        return
    s = cells_slide(slides[0], out, model=model, progress=not quiet, **options)
    if not quiet:
        state = "skipped (finished earlier)" if s.get("skipped") else f"{s['seconds']} s"
        click.echo(f"{Path(slides[0]).name}: {s['nuclei']} nuclei in {s['tiles']} tiles -> {out} [{state}]")


def register(main: click.Group) -> None:
    main.add_command(cells_cmd)
