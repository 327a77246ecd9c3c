"""Cohort options shared by every per-slide command (heatmap, embed, tissue, tile, features), and
the one call that runs such a command over a cohort (``slidekit.cohort.run.run_cohort``)."""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import click

from slidekit.cli.common import Context, cohort_options, fail
from slidekit.cli.scverse import export_after
from slidekit.cohort.engines import CohortInterrupted, CohortRun
from slidekit.cohort.run import run_cohort
from slidekit.slides.dicom import is_dicom_folder

__all__ = ["cohort_options", "is_cohort", "run_cohort_cli", "single_slide", "slides_argument"]

COHORT_PARAMS = ("manifest", "engine", "jobs", "gpus", "shard", "ray_address", "retry_failed")


def is_cohort(ctx: click.Context, items: list[str], manifest: tuple[str, ...]) -> bool:
    """Cohort mode: several inputs, a folder (other than one DICOM WSI series), glob or manifest,
    or any cohort option given."""
    explicit = any(ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE
                   for p in COHORT_PARAMS if p in ctx.params)
    many = len(items) > 1 or any((Path(i).is_dir() and not is_dicom_folder(i)) or glob.has_magic(i)
                                 or i.lower().endswith(".csv") for i in items)
    return bool(manifest) or explicit or many


# SLIDES of a per-slide command: slide files, folders, globs or manifest CSVs.
slides_argument = click.argument("slides", nargs=-1, type=click.Path(path_type=str))


def single_slide(ctx: click.Context, slides: tuple[str, ...], cohort: dict) -> bool:
    """True for the classic one-slide call; False for a cohort; a usage error when nothing is given."""
    if not slides and not cohort.get("manifest"):
        raise click.UsageError("give a SLIDE (or several, a folder, a glob or --manifest CSV)")
    return not is_cohort(ctx, list(slides), cohort.get("manifest") or ())


def run_cohort_cli(ctx: click.Context, task: str, items: list[str], out: str, quiet: bool,
                   options: dict[str, Any]) -> None:
    """Run ``task`` over the cohort; print the summary line; exit 1 when any slide failed."""
    p = ctx.params
    if p.get("threads") is not None:
        raise click.UsageError("--threads is for one slide; a cohort gives each of its --jobs workers "
                               "an equal share of the CPUs")
    run = CohortRun(engine=p["engine"], jobs=p["jobs"], gpus=p["gpus"], shard=p["shard"], ray_address=p["ray_address"],
                    retry_failed=p["retry_failed"], skip_missing=bool(ctx.meta.get("skip_missing")), progress=not quiet,
                    debug=_debug(ctx))
    try:
        table = run_cohort(task, list(items) + list(p.get("manifest") or ()), out, run=run, **options)
    except CohortInterrupted as e:  # cohort.csv is written: say what it holds, then exit 130
        click.echo(e.table.summary(), err=True)
        fail(f"interrupted ({e.signame}); running slides were recorded as interrupted and resume on a rerun", 130)
    for row in table:
        if row["status"] == "failed":  # one line per failed slide, with --quiet too
            click.echo(f"slidekit: failed: {row['id']}: {row['error']}", err=True)
    click.echo(table.summary())
    export_after(ctx, out, cohort=True)  # --spatialdata: the done slides' folders
    if table.failed:
        fail(f"{table.failed} of {len(table)} slides failed; see {table.csv}", 1)


def _debug(ctx: click.Context) -> bool:
    obj = ctx.find_object(Context)
    return bool(obj and obj.debug)
