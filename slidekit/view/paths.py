"""What ``slidekit view PATH`` may serve, and what PATH is.

Every path a browser names is relative to PATH's parent and starts with PATH's own name
(``OUT/a/predictions.geojson``). ``ServedRoot.resolve`` joins it, resolves it (``..``, symlinks)
and refuses anything that then lies outside PATH: a request can never name a file elsewhere.

The slides that output folders record (``.slidekit.json``, ``summary.json``, ``cohort.csv``) may lie
outside PATH, as slides and outputs usually do; the server opens those itself and sends only their
decoded pixels (tiles, thumbnails), never the files. A recorded path that is relative was relative to
the folder the command ran in, so it is looked for there, beside the output folder and beside its
parent; a file found that way must have the recorded fingerprint.
"""
from __future__ import annotations

import csv
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import zarr

from slidekit.base.errors import OutputError, SlideError, SlidekitWarning
from slidekit.base.outputs import MARKER
from slidekit.slides.identity import same_slide
from slidekit.slides.slide import open_slide

COHORT_CSV = "cohort.csv"
# The stores a slidekit command leaves in a slide's folder: heatmap, MIL attention.
HEATMAP_STORES = ("heatmap.zarr", "attention.zarr")


class Refused(Exception):
    """A requested path outside PATH (HTTP 403) or not there (HTTP 404)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class ServedRoot:
    """PATH, resolved once; ``resolve`` turns a requested relative path into a file under it."""

    path: Path  # PATH as resolved (symlinks followed)

    @property
    def name(self) -> str:
        return self.path.name

    def resolve(self, rel: str) -> Path:
        """The file or folder ``rel`` names (``PATH-name/...``); Refused(403) when it resolves
        outside PATH (``..``, an absolute path, a symlink out), Refused(404) when it does not exist."""
        if "\x00" in rel:
            raise Refused(404, "not found")
        p = Path(rel)
        if p.is_absolute() or not p.parts or p.parts[0] != self.name:
            raise Refused(403, "outside the served folder")
        target = (self.path.parent / p).resolve()
        if target != self.path and not target.is_relative_to(self.path):
            raise Refused(403, "outside the served folder")
        if not target.exists():
            raise Refused(404, "not found")
        return target

    def rel_unresolved(self, path: Path) -> str:
        """The request path naming ``path`` (under PATH as spelt, links not followed)."""
        return Path(self.name, Path(os.path.abspath(path)).relative_to(self.path)).as_posix()

    def rel(self, target: Path) -> str:
        """The request path of ``target`` (a path under PATH)."""
        return Path(self.name, target.resolve().relative_to(self.path)).as_posix().rstrip("/.") or self.name


def find_heatmap(folder: Path) -> Path | None:
    """The first finished heatmap store of ``folder`` (None when it has none)."""
    for name in HEATMAP_STORES:
        if (folder / name).is_dir() and not (folder / f"{name}.part").exists():
            return folder / name
    return None


def is_output_folder(path: Path) -> bool:
    """A per-slide output folder of slidekit: its marker, a summary.json, or a heatmap store
    (``mil-attention`` writes only ``attention.zarr`` and its overlay)."""
    return path.is_dir() and ((path / MARKER).is_file() or (path / "summary.json").is_file()
                              or find_heatmap(path) is not None)


def _record(folder: Path) -> dict:
    """The folder's own record of its slide: {"slide": path or name, "slide_id": fingerprint or None}."""
    for name in (MARKER, "summary.json"):
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("slide"):
            ident = data.get("slide_id") or (data.get("config") or {}).get("slide_id")
            return {"slide": str(data["slide"]), "slide_id": ident}
    store = find_heatmap(folder)  # a heatmap store names its slide (file name and fingerprint)
    if store is not None:
        try:
            slide = zarr.open_group(str(store), mode="r").attrs.get("slide")
        except Exception:  # zarr raises several kinds for a damaged store; then it records nothing
            slide = None
        if isinstance(slide, dict) and slide.get("name"):
            return {"slide": str(slide["name"]), "slide_id": slide.get("id")}
    raise OutputError(f"records no slide (no readable {MARKER}, summary.json or heatmap store); "
                      "give it with --slide", folder)


def find_slide(recorded: str, near: list[Path], fingerprint: str | None, folder: Path) -> Path:
    """Where the slide a folder recorded as ``recorded`` is now: as given (absolute, or relative
    to the working directory), else relative to each folder of ``near``; a relative hit must
    have ``fingerprint`` (when recorded). One-line OutputError when none is found."""
    p = Path(recorded)
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = [Path.cwd() / p] + [base / p for base in near] + [base / p.name for base in near]
    seen = set()
    for c in candidates:
        if c in seen or not c.exists():
            continue
        seen.add(c)
        if p.is_absolute() or fingerprint is None:
            return c
        try:
            if same_slide(fingerprint, c):
                return c
        except OSError:
            continue
    raise OutputError(f"records slide {recorded}, which is not found (looked in the working directory and "
                      f"beside the output folder; give it with --slide)", folder)


def recorded_slide(folder: Path, given: Path | None = None) -> Path:
    """The slide a per-slide output folder belongs to; ``given`` (``--slide``) instead of its record,
    with a warning when the folder records another slide's fingerprint."""
    if given is not None:
        try:
            rec = _record(folder)
        except OutputError:
            rec = {}
        if rec.get("slide_id") and not same_slide(rec["slide_id"], given):
            warnings.warn(SlidekitWarning(f"{given}: not the slide {folder} records ({rec['slide']}: another "
                                          "fingerprint); showing it as asked"), stacklevel=2)
        return given
    rec = _record(folder)
    return find_slide(rec["slide"], [folder, folder.parent, folder.parent.parent], rec["slide_id"], folder)


def read_cohort_csv(folder: Path) -> tuple[list[str], list[dict]]:
    """(columns, rows) of ``folder/cohort.csv``."""
    try:
        with open(folder / COHORT_CSV, newline="") as f:
            reader = csv.DictReader(f)
            rows = [dict(r) for r in reader]
            return list(reader.fieldnames or []), rows
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise OutputError(f"{COHORT_CSV} cannot be read ({type(e).__name__}: {e})", folder) from None


def classify(path: str | os.PathLike) -> str:
    """What PATH is: "cohort" (a folder with cohort.csv), "output" (a per-slide output folder) or
    "slide" (a file a slide reader opens). Typed one-line errors for anything else."""
    p = Path(path)
    if not p.exists():
        raise SlideError("not found", p)
    if p.is_dir():
        if (p / COHORT_CSV).is_file():
            return "cohort"
        if is_output_folder(p):
            return "output"
        try:  # a DICOM WSI folder is a slide
            open_slide(p, require_mpp=False).close()
            return "slide"
        except SlideError:
            raise OutputError(f"is neither a slide nor a slidekit output folder (no {COHORT_CSV}, {MARKER} "
                              "or summary.json)", p) from None
    open_slide(p, require_mpp=False).close()  # SlideError names the file and what is wrong
    return "slide"
