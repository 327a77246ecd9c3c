"""Cohort manifests: which slides, under which output ids, with which per-slide options.

``read_slides`` accepts slide paths, folders (every slide file in them), glob patterns and
manifest CSVs, in any mix. A manifest CSV has a ``slide`` column (paths absolute or relative to
the CSV's folder), optional ``id`` (the output folder's name) and ``slide_mpp`` (a fallback pixel
size for slides without one in their metadata); any other columns are carried into the cohort
table untouched. Ids default to the file stem, made unique when stems collide by prefixing
the nearest parent folders (``a/slide.svs``, ``b/slide.svs`` -> ``a_slide``, ``b_slide``), so
two slides never share an output folder. Everything is checked before any work starts.
"""
from __future__ import annotations

import csv
import glob
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from slidekit.base.errors import ManifestError
from slidekit.slides.dicom import is_dicom_folder

# File types a folder scan treats as slides (OpenSlide's and tiffslide's formats).
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
                  ".qptiff", ".btf", ".dcm")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


# Columns slidekit writes into OUT/cohort.csv (the table's own and the tasks' figures): a manifest
# may not bring its own column of one of these names.
RESERVED_COLUMNS = frozenset({"status", "error", "seconds", "attempts", "worker", "note", "rss_mb", "peak_rss_mb",
                              "tiles", "regions", "area_mm2", "tissue_fraction", "dim"})


@dataclass
class CohortSlide:
    """One slide of a cohort: output id, path, fallback MPP and the manifest's other columns."""

    id: str
    slide: Path
    slide_mpp: float | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _is_slide_file(p: Path) -> bool:
    name = p.name.lower()
    return p.is_file() and not name.startswith(".") and name.endswith(SLIDE_SUFFIXES)


def _heatmap_folder(p: Path) -> Path | None:
    """The folder of a heatmap (``X/heatmap.zarr`` -> ``X``), or None when ``p`` holds none."""
    if p.name == "heatmap.zarr" and p.is_dir():
        return p.parent
    return p if (p / "heatmap.zarr").is_dir() else None


def _expand_heatmaps(p: Path, text: str) -> list[dict]:
    """Heatmap inputs: a heatmap folder, or a cohort OUT whose subfolders hold heatmaps."""
    if glob.has_magic(text):
        folders = [_heatmap_folder(Path(q)) for q in sorted(glob.glob(text, recursive=True))]
        found = [q for q in folders if q is not None]
        if not found:
            raise ManifestError("the pattern matches no heatmap folder", text)
        return [{"slide": q} for q in found]
    own = _heatmap_folder(p)
    if own is not None:
        return [{"slide": own}]
    if p.is_dir():
        found = sorted(q for q in p.iterdir() if q.is_dir() and _heatmap_folder(q) is not None)
        if not found:
            raise ManifestError("holds no heatmap.zarr, nor subfolders with one", p)
        return [{"slide": q} for q in found]
    return [{"slide": p}]


def _expand(item: str | os.PathLike, kind: str = "slides", skip_missing: bool = False) -> list[dict]:
    """One CLI/API item -> manifest rows ({'slide': Path, ...})."""
    text = str(item)
    p = Path(text)
    if p.suffix.lower() == ".csv" and p.is_file():
        return read_manifest(p, skip_missing=skip_missing)
    if kind == "heatmaps":
        return _expand_heatmaps(p, text)
    if p.is_dir():
        if is_dicom_folder(p):  # a DICOM WSI series: the folder is one slide
            return [{"slide": p}]
        # slide files, and subfolders each holding a DICOM series
        found = sorted(q for q in p.iterdir() if _is_slide_file(q) or (q.is_dir() and is_dicom_folder(q)))
        if not found:
            raise ManifestError(f"no slide files ({', '.join(SLIDE_SUFFIXES)}) in this folder", p)
        return [{"slide": q} for q in found]
    if glob.has_magic(text):
        found = sorted(Path(q) for q in glob.glob(text, recursive=True) if Path(q).is_file())
        if not found:
            raise ManifestError("the pattern matches no file", text)
        return [{"slide": q} for q in found]
    return [{"slide": p}]  # a path; a missing one fails as that slide, the others still run


def read_manifest(path: str | os.PathLike, *, skip_missing: bool = False) -> list[dict]:
    """Rows of a manifest CSV with ``slide`` resolved against the CSV's folder.

    Parameters
    ----------
    path
        The manifest CSV.
    skip_missing
        Keep rows whose slide file does not exist (each then fails as its own slide) instead of
        refusing the manifest with one line listing them.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ManifestError(f"cannot read the manifest ({e})", path) from None
    if not columns:
        raise ManifestError("the manifest is empty (expected a header with a 'slide' column)", path)
    if "slide" not in columns:
        raise ManifestError(f"the manifest has no 'slide' column (columns: {', '.join(columns)})", path)
    if not rows:
        raise ManifestError("the manifest lists no slides", path)
    taken = [c for c in columns if c in RESERVED_COLUMNS]
    if taken:
        # Refused rather than renamed: a script reading cohort.csv's `status` must get slidekit's
        # status whatever the manifest held, and the user's column must not vanish either.
        raise ManifestError(f"column(s) {', '.join(taken)} would collide with the columns slidekit writes into "
                            "cohort.csv; rename them (e.g. case_status) and run again", path)
    out, missing = [], []
    for i, row in enumerate(rows, start=2):
        if None in row:
            raise ManifestError(f"line {i} has more fields than the header", path)
        text = (row.get("slide") or "").strip()
        if not text:
            raise ManifestError(f"line {i} has an empty 'slide'", path)
        p = Path(text) if Path(text).is_absolute() else path.parent / text
        if not p.exists():
            missing.append(f"{text} (line {i})")
        out.append({**row, "slide": p, "_line": i})
    if missing and not skip_missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ManifestError(f"{len(missing)} slide path(s) do not exist: {', '.join(missing[:3])}{more}", path)
    return out


def _parse_mpp(value: str | None, where: str) -> float | None:
    if value is None or str(value).strip() == "":
        return None
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise ManifestError(f"{where}: slide_mpp {value!r} is not a positive number")
    return v


def unique_ids(paths: Sequence[Path]) -> list[str]:
    """File stems, made unique by prefixing parent folder names where stems collide."""
    paths = [Path(p) for p in paths]
    ids = [_safe(p.stem) for p in paths]
    for stem in sorted({s for s in ids if ids.count(s) > 1}):
        members = [i for i, s in enumerate(ids) if s == stem]
        for k in range(1, max(len(paths[i].parts) for i in members)):
            cand = [_safe("_".join(paths[i].parts[-1 - k:-1] + (paths[i].stem,))) for i in members]
            if len(set(cand)) == len(cand):
                break
        else:  # same folders all the way up: the suffix tells them apart (slide.svs, slide.tif)
            cand = [_safe(paths[i].name) for i in members]
        for i, c in zip(members, cand):
            ids[i] = c
    seen: set[str] = set()
    for i, s in enumerate(ids):  # last resort (a prefixed id met another stem): number it
        n = 2
        while ids[i] in seen:
            ids[i] = f"{s}-{n}"
            n += 1
        seen.add(ids[i])
    return ids


def _safe(name: str) -> str:
    s = _UNSAFE.sub("_", name).strip("._") or "slide"
    return s


def read_slides(items: str | os.PathLike | Iterable[str | os.PathLike], kind: str = "slides", *,
                skip_missing: bool = False) -> list[CohortSlide]:
    """Slides of a cohort from paths, folders, globs and manifest CSVs (see module docstring).

    ``skip_missing``: a manifest row whose slide does not exist is kept, to fail as its own slide
    (``read_manifest``).

    ``kind="heatmaps"``: the inputs are heatmap folders (``slidekit heatmap`` outputs) instead of slides;
    a folder whose subfolders hold heatmaps (a heatmap cohort's OUT) gives each of them.
    """
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    rows: list[dict] = []
    for item in items:
        rows += _expand(item, kind, skip_missing)
    if not rows:
        raise ManifestError("no slides given")
    seen: dict[str, int] = {}
    for n, r in enumerate(rows):
        key = str(Path(r["slide"]).resolve()) if Path(r["slide"]).exists() else str(r["slide"])
        if key in seen:
            raise ManifestError(f"slide listed twice (entries {seen[key] + 1} and {n + 1})", r["slide"])
        seen[key] = n
    given = [(r.get("id") or "").strip() for r in rows]
    auto = unique_ids([Path(r["slide"]) for r in rows])
    ids = [g or a for g, a in zip(given, auto)]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ManifestError(f"duplicate output id(s): {', '.join(dup[:5])}; ids must be unique per slide")
    bad = [i for i in given if i and (i != _safe(i) or i in (".", ".."))]
    if bad:
        raise ManifestError(f"id {bad[0]!r} is not a plain folder name (letters, digits, . _ + -)")
    out = []
    for r, i in zip(rows, ids):
        where = f"{r['slide']}" + (f" (manifest line {r['_line']})" if "_line" in r else "")
        extra = {k: v for k, v in r.items() if k not in ("slide", "id", "slide_mpp", "_line")}
        out.append(CohortSlide(i, Path(r["slide"]), _parse_mpp(r.get("slide_mpp"), where), extra))
    return out


def shard(slides: Sequence[CohortSlide], spec: str | None) -> list[CohortSlide]:
    """The i-th of N deterministic parts (``"i/N"``, 0-based) of a cohort; all slides when None.

    Slides are dealt round-robin in manifest order, so shards are balanced in count and the same
    manifest always gives the same shards.
    """
    if spec is None:
        return list(slides)
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ManifestError(f"--shard {spec!r}: expected i/N with 0 <= i < N (e.g. 3/16)")
    i, n = int(m.group(1)), int(m.group(2))
    return [s for k, s in enumerate(slides) if k % n == i]
