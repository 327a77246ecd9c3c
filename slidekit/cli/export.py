"""`slidekit export CKPT --to wsinfer DIR | torchscript FILE | onnx FILE`."""
from __future__ import annotations

import click

from slidekit.cli.common import echo_json, handle_errors, option, quiet_option


@click.command("export")
@click.argument("ckpt", type=click.Path(dir_okay=False, path_type=str))
@option("to", required=True)
@quiet_option
@handle_errors
def export(ckpt: str, to: tuple[str, str]) -> None:
    """Export checkpoint CKPT for QuPath's WSInfer extension or other runtimes (see docs/models.md)."""
    from slidekit.models.export import export_model

    fmt, out = to
    path = export_model(ckpt, fmt, out)
    echo_json({"format": fmt, "out": str(path)})


def register(group: click.Group) -> None:
    """Add `export` to the main group."""
    group.add_command(export)
