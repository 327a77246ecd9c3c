"""`slidekit` command line: a thin skin over the Python API (one API call per command).

Imports: anything in slidekit and the trainers; a command module loads torch-heavy modules inside
the command, so `slidekit --help` and slide commands start without torch.
"""
from __future__ import annotations

import importlib

import click

from slidekit import __version__
from slidekit.base.resources import prefer_passive_waits
from slidekit.cli.common import Context

prefer_passive_waits()  # before any command loads torch: idle OpenMP threads sleep instead of spinning

# Each module registers its commands on `main`; one module per area keeps this file small.
COMMAND_MODULES = ["slidekit.cli.core", "slidekit.cli.train", "slidekit.cli.stage", "slidekit.cli.heatmap",
                   "slidekit.cli.embed", "slidekit.cli.export", "slidekit.cli.mil",
                   "slidekit.cli.cells", "slidekit.cli.view"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="slidekit")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or chatter.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, quiet: bool, debug: bool) -> None:
    """slidekit: whole-slide images to patches, models, heatmaps and QuPath GeoJSON."""
    ctx.obj = Context(quiet=quiet, debug=debug)


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(main)
