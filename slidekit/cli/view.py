"""`slidekit view PATH`: the local web viewer of a slide, a slide's output folder or a cohort OUT."""
from __future__ import annotations

import click

from slidekit.cli.common import backend_option, handle_errors, quiet_flag


@click.command("view")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to serve on (0: any free port).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback lets other machines see the slides (warned).")
@click.option("--open-slides", type=click.IntRange(min=1), default=8, show_default=True,
              help="Slides kept open at once (least recently viewed closed first).")
@click.option("--slide", "slide", type=click.Path(path_type=str), default=None,
              help="The slide of a per-slide output folder that does not record it (e.g. from mil-attention), or "
                   "that has moved [default: the one the folder records].")
@backend_option
@click.pass_context
@handle_errors
def view_cmd(ctx: click.Context, path: str, port: int, host: str, open_slides: int, backend: str | None,
             slide: str | None) -> None:
    """Show PATH in the browser: a slide file, a per-slide output folder (heatmap, cells or MIL
    attention: the slide with its overlay and GeoJSON objects) or a cohort OUT folder (a table of
    its slides to click through). Serves only files under PATH; Ctrl-C stops it."""
    from slidekit.view import serve

    quiet = quiet_flag(ctx)
    serve(path, host=host, port=port, open_slides=open_slides, backend=backend, slide=slide,
          on_ready=None if quiet else lambda url: click.echo(f"slidekit view: {url} (Ctrl-C to stop)", err=True))


def register(main: click.Group) -> None:
    """Add `view` to the CLI."""
    main.add_command(view_cmd)
