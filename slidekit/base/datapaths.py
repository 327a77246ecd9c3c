"""Where the real data lives, for tests, benchmarks and examples: one rule, one place.

An explicit path (a ``--data`` option) wins; otherwise the environment variable ``SLIDEKIT_DATA``;
otherwise ``../shared/data`` beside the repository root. Nothing here is used by the library proper.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from slidekit.base.errors import SlidekitError

ENV_VAR = "SLIDEKIT_DATA"
#: ``../shared/data`` relative to the repository root (the checkout holding ``slidekit/``).
DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def data_dir(explicit: str | Path | None = None) -> Path:
    """The real-data folder: ``explicit``, else ``$SLIDEKIT_DATA``, else ``../shared/data``.

    The folder is not checked; see ``require_data_dir`` and ``data_missing_reason``.
    """
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser()
    env = os.environ.get(ENV_VAR, "")
    return Path(env).expanduser() if env else DEFAULT_DATA


def data_missing_reason(explicit: str | Path | None = None) -> str | None:
    """None when the data folder exists, else one line saying where it was looked for and how to point elsewhere."""
    path = data_dir(explicit)
    if path.is_dir():
        return None
    if explicit is not None and str(explicit) != "":
        how = "given with --data"
    elif os.environ.get(ENV_VAR):
        how = f"from ${ENV_VAR} or --data"
    else:
        how = f"the default; set {ENV_VAR} or pass --data"
    return f"real data not found at {path} ({how})"


def require_data_dir(explicit: str | Path | None = None) -> Path:
    """``data_dir(explicit)``, or a one-line ``SlidekitError`` when that folder does not exist."""
    reason = data_missing_reason(explicit)
    if reason is not None:
        raise SlidekitError(reason)
    return data_dir(explicit)


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    """Add the shared ``--data DIR`` option (default: ``$SLIDEKIT_DATA``, else ``../shared/data``)."""
    parser.add_argument("--data", type=Path, default=None, metavar="DIR",
                        help=f"real-data folder (default: ${ENV_VAR}, else ../shared/data beside the checkout; "
                             f"now {data_dir()})")
