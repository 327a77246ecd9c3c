"""`slidekit cells` (a slide -> every nucleus as QuPath detections, a per-nucleus table, summary.json)."""
from __future__ import annotations

from pathlib import Path

import click

from slidekit.cli.common import device_option, handle_errors, quiet_flag, threads_option


@click.command("cells")
@click.argument("slide", type=click.Path(path_type=str))
@click.option("--model", required=True, metavar="NAME|CKPT",
              help="A segmentation checkpoint (e.g. from `slidekit train s2l`) or the built-in hematoxylin.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=str))
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
@click.option("--roi", type=click.Path(dir_okay=False, path_type=str), default=None, metavar="GEOJSON|XML",
              help="Only inside these polygons; also writes regions.csv (counts and densities per polygon).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True)
@threads_option
@device_option
@click.option("--quiet", "-q", "quiet_local", is_flag=True, help="No progress bars.")
@click.pass_context
@handle_errors
def cells_cmd(ctx: click.Context, slide: str, model: str, out: str, quiet_local: bool, **options: object) -> None:
    """Detect every nucleus in the tissue of SLIDE; write OUT/cells.geojson.gz (open in QuPath),
    OUT/cells.csv and OUT/summary.json. Reruns skip a finished slide and resume an interrupted one."""
    from slidekit.infer.cells import cells_slide

    quiet = quiet_local or quiet_flag(ctx)
    s = cells_slide(slide, out, model=model, progress=not quiet, **options)
    if not quiet:
        state = "skipped (finished earlier)" if s.get("skipped") else f"{s['seconds']} s"
        click.echo(f"{Path(slide).name}: {s['nuclei']} nuclei in {s['tiles']} tiles -> {out} [{state}]")


def register(main: click.Group) -> None:
    main.add_command(cells_cmd)
