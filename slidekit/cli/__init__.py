"""`slidekit` command line: a thin skin over the Python API (one API call per command).

Imports: anything in slidekit and the trainers; a command module loads torch-heavy modules inside
the command, so `slidekit --help` and slide commands start without torch.
"""
from __future__ import annotations

import importlib

import click

from slidekit import __version__
from slidekit.base.resources import prefer_passive_waits
from slidekit.cli.common import Context, debug_option, quiet_option, version_option

prefer_passive_waits()  # before any command loads torch: idle OpenMP threads sleep instead of spinning

# Each module registers its commands on `main`; one module per area keeps this file small.
COMMAND_MODULES = ["slidekit.cli.core", "slidekit.cli.train", "slidekit.cli.stage", "slidekit.cli.heatmap",
                   "slidekit.cli.embed", "slidekit.cli.export", "slidekit.cli.mil",
                   "slidekit.cli.cells", "slidekit.cli.view", "slidekit.cli.qc",
                   "slidekit.cli.outcomes", "slidekit.cli.scverse"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@version_option(__version__)
@quiet_option
@debug_option
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """slidekit: whole-slide images to patches, models, heatmaps and QuPath GeoJSON."""
    ctx.ensure_object(Context).debug = debug  # --quiet (here or on the command) is set by its option


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(main)
