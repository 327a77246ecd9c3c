"""Stage-2 commands: `stage` (pN staging of node labels) and `features` (heatmap morphology)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from slidekit.base.resources import configure_threads
from slidekit.cli.cohort import cohort_options, is_cohort, run_cohort_cli
from slidekit.cli.common import handle_errors, option, quiet_flag, quiet_option, threads_option
from slidekit.slidelevel.features import features_table
from slidekit.slidelevel.staging import stage_csv


@click.command()
@click.argument("nodes", type=click.Path(dir_okay=False, path_type=Path))
@option("out", type=click.Path(dir_okay=False, path_type=Path), required=True,
        detail="submission CSV to write (patient rows followed by their node rows).")
@option("reference")
@quiet_option
@handle_errors
def stage(nodes: Path, out: Path, reference: Path | None) -> None:
    """Stage patients (pN, CAMELYON17 rules) from the node labels in NODES (CSV: patient,stage)."""
    r = stage_csv(nodes, out, reference=reference)
    counts = ", ".join(f"{k} {v}" for k, v in r["stages"].items())
    click.echo(f"{r['patients']} patients from {r['nodes']} nodes ({counts}) -> {out}")
    if r["kappa"] is not None:
        click.echo(f"kappa: {r['kappa']:.4f}")


@click.command()
@click.argument("heatmaps", nargs=-1, type=click.Path(path_type=Path))
@option("out", type=click.Path(path_type=Path), required=True,
        detail="feature table to write (CSV, one row per heatmap); with cohort options, a folder "
               "(OUT/<id>/features.csv and the features joined into OUT/cohort.csv).")
@option("thresholds")
@option("channel")
@option("work_mpp", aliases=("--mpp",))
@threads_option
@quiet_option
@cohort_options
@handle_errors
@click.pass_context
def features(ctx: click.Context, heatmaps: tuple[Path, ...], out: Path, thresholds: str,
             channel: int | None, work_mpp: float | None, threads: int | None, **cohort: Any) -> None:
    """Morphology features (µm, µm²) of slide heatmaps (HEATMAP_DIR with heatmap.zarr) to a CSV.

    With --manifest or any cohort option (--jobs, --engine, --shard, ...), runs as a cohort over the
    heatmap folders (a heatmap cohort's OUT gives each of its slides); see docs/cohorts.md."""
    try:
        ths = tuple(float(t) for t in thresholds.split(",") if t.strip())
    except ValueError:
        raise click.BadParameter(f"not a list of numbers: {thresholds!r}", param_hint="--thresholds") from None
    if not heatmaps and not cohort.get("manifest"):
        raise click.UsageError("give at least one HEATMAP folder (or --manifest CSV)")
    # Several heatmap folders alone make one table; a folder of per-slide outputs (a heatmap
    # cohort's OUT, holding no heatmap.zarr itself) is a cohort by itself.
    outputs_folder = any(Path(h).is_dir() and not (Path(h) / "heatmap.zarr").is_dir()
                         and not str(h).rstrip("/").endswith(".zarr") for h in heatmaps)
    if outputs_folder or is_cohort(ctx, [], cohort.get("manifest") or ()):
        return run_cohort_cli(ctx, "features", [str(h) for h in heatmaps], str(out), quiet_flag(ctx),
                              dict(thresholds=ths, channel=channel, work_mpp=work_mpp))

    if threads is not None:  # else the libraries keep their own defaults
        configure_threads(threads)
    rows = features_table(heatmaps, out=out, thresholds=ths, channel=channel, work_mpp=work_mpp,
                        progress=not quiet_flag(ctx))
    click.echo(f"{len(rows)} heatmaps, {len(rows[0]) if rows else 0} columns -> {out}")


def register(group: click.Group) -> None:
    """Add the staging and feature commands to the main group."""
    for cmd in (stage, features):
        group.add_command(cmd)
