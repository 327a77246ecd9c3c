"""`slidekit view PATH`: the local web viewer of a slide, a slide's output folder or a cohort OUT."""
from __future__ import annotations

import click

from slidekit.cli.common import backend_option, handle_errors, option, quiet_flag, quiet_option


@click.command("view")
@click.argument("path", type=click.Path(path_type=str))
@option("port")
@option("host")
@option("open_slides")
@option("slide", detail="that of a per-slide output folder that does not record it (e.g. from mil-attention), or "
                        "that has moved [default: the one the folder records].")
@backend_option  # serve() reads each slide's own MPP: it takes no --slide-mpp/--override-mpp
@quiet_option
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
