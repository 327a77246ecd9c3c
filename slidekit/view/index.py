"""What the viewer knows about PATH: its items (a slide, or a slide's output folder) and, for a
cohort OUT folder, the table of its slides from ``cohort.csv``.

An item is named by its request path (``ServedRoot``): ``OUT`` for a per-slide output folder,
``OUT/<id>`` for one slide of a cohort, ``slide.svs`` for a slide given as PATH. ``Index.item``
says which slide it shows (the one the folder records), its heatmap store and GeoJSON files and
the figures of its ``summary.json``; answers are cached (a server restart sees new results).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from urllib.parse import quote

from slidekit.base.errors import ConfigError, FeatureError, OutputError, SlideError
from slidekit.slidelevel.spatialdata_read import is_spatialdata_path, shape_elements
from slidekit.view.overlay import QC_LABELS, geojson_files
from slidekit.view.paths import (
    HEATMAP_STORES,
    Refused,
    ServedRoot,
    classify,
    find_heatmap,
    is_output_folder,
    read_cohort_csv,
    recorded_slide,
)

# summary.json figures shown beside a slide (the rest stay in the file)
SUMMARY_FIGURES = ("task", "classes", "tiles", "regions", "region_area_mm2", "nuclei", "heatmap_mpp", "seconds")
# cohort.csv columns the table leaves out (shown per slide on its page instead)
HIDDEN_COLUMNS = ("worker",)


def url(prefix: str, rel: str, suffix: str = "") -> str:
    """``prefix/rel+suffix`` with each path segment percent-encoded."""
    return f"{prefix}/{quote(rel, safe='/')}{suffix}"


class Index:
    """PATH's mode ("cohort", "output" or "slide") and its items."""

    def __init__(self, path: str | Path, slide: str | Path | None = None) -> None:
        self.mode = classify(path)  # one-line typed error for a missing/unreadable PATH
        self.root = ServedRoot(Path(path).resolve())
        self.slide = None  # the slide of PATH given by the caller (--slide), for folders that do not record it
        if slide is not None:
            if self.mode != "output":
                raise ConfigError(f"--slide is for one slide's output folder; {path} is a {self.mode}")
            if classify(slide) != "slide":
                raise SlideError("is a folder of outputs, not a slide", slide)
            self.slide = Path(slide).resolve()
        self._items: dict[Path, dict] = {}
        self._lock = threading.Lock()

    def info(self) -> dict:
        """What the page shows first: the cohort table, or the one item."""
        return {"mode": self.mode, "name": self.root.name,
                "item": None if self.mode == "cohort" else self.root.name}

    def slide_path(self, target: Path) -> Path:
        """The slide file an item (a slide under PATH or an output folder) shows."""
        return self.item(target)["_slide"]

    def item(self, target: Path) -> dict:
        """The item at ``target`` (a resolved path under PATH); OutputError when it is neither a
        slide nor an output folder that records one."""
        with self._lock:
            if target in self._items:
                return self._items[target]
        item = self._describe(target)
        with self._lock:
            self._items[target] = item
        return item

    def _describe(self, target: Path) -> dict:
        rel = self.root.rel(target)
        item: dict = {"key": rel, "name": target.name, "heatmap": None, "qc": None, "geojson": [], "summary": {},
                      "cohort": None, "notes": []}
        if target.is_dir() and is_output_folder(target):
            slide = recorded_slide(target, self.slide if target == self.root.path else None)
            hm = find_heatmap(target)
            if hm is not None:
                item["heatmap"] = hm.name
            item["notes"] = [f"{n} is unfinished (an interrupted run?); not shown" for n in HEATMAP_STORES
                             if (target / f"{n}.part").exists()]
            item["geojson"] = [{"name": g.name, "url": url("/geojson", rel_g), "bytes": g.stat().st_size}
                               for g in geojson_files(target) if (rel_g := self._inside(g))]
            item["geojson"] += self._store_shapes(target)
            try:
                summary = json.loads((target / "summary.json").read_text())
            except (OSError, ValueError):
                summary = {}
            item["summary"] = {k: summary[k] for k in SUMMARY_FIGURES if k in summary}
            if self.mode == "cohort" and target.parent == self.root.path:
                item["cohort"] = self.root.name
        elif classify(target) == "slide":  # a slide file or DICOM folder (else a one-line error)
            slide = target
        else:
            raise OutputError("is a cohort folder, not one slide's", target)
        if item["heatmap"] is None and target.is_dir() and (target / QC_LABELS).is_dir():
            item["qc"] = QC_LABELS  # a QC folder: its label map is the overlay
        item.update(_slide=slide, slide_name=slide.name, dzi=url("/dzi", rel, ".dzi"),
                    overlay=url("/overlay", rel, ".png") if item["heatmap"] or item.get("qc") else None,
                    thumbnail=url("/thumb", rel, ".jpg"))
        return item

    def _store_shapes(self, folder: Path) -> list[dict]:
        """The tissues and tiles of the SpatialData stores in ``folder`` (``export-spatialdata``'s, or
        wsidata/LazySlide's), each drawn like a GeoJSON file (``/spatialdata/<store>/<element>``)."""
        out = []
        for store in sorted(p for p in folder.iterdir() if p.suffix == ".zarr" and is_spatialdata_path(p)):
            rel_s = self._inside(store)
            if rel_s is None:
                continue
            try:
                elements = shape_elements(store)
            except FeatureError:
                continue  # unreadable metadata: the store is not offered
            out += [{"name": f"{store.name}/{e}", "url": url("/spatialdata", rel_s, f"/{e}"),
                     "bytes": sum(f.stat().st_size for f in (store / "shapes" / e).glob("*.parquet"))}
                    for e in elements]
        return out

    def _inside(self, path: Path) -> str | None:
        """The request path of ``path`` when it resolves under PATH (None for a link out of it)."""
        try:
            return self.root.rel(self.root.resolve(self.root.rel_unresolved(path)))
        except (Refused, ValueError):
            return None

    def cohort(self) -> dict:
        """The table of a cohort OUT: ``columns`` of cohort.csv (less ``HIDDEN_COLUMNS``) and one row per
        slide with ``_item`` (its request path, None when it has no output folder) and ``_thumb``."""
        if self.mode != "cohort":
            raise OutputError("is not a cohort output folder (no cohort.csv)", self.root.path)
        columns, rows = read_cohort_csv(self.root.path)
        out = []
        for r in rows:
            sid = r.get("id") or ""
            folder = self.root.path / sid
            key = f"{self.root.name}/{sid}" if sid and is_output_folder(folder) else None
            if key is not None:
                try:  # an id that leaves the folder (../x, a link out) is not offered
                    self.root.resolve(key)
                except Refused:
                    key = None
            out.append({**{c: r.get(c, "") for c in columns if c not in HIDDEN_COLUMNS},
                        "_item": key, "_thumb": url("/thumb", key, ".jpg") if key else None})
        counts: dict[str, int] = {}
        for r in out:
            counts[r.get("status") or "?"] = counts.get(r.get("status") or "?", 0) + 1
        return {"name": self.root.name, "columns": [c for c in columns if c not in HIDDEN_COLUMNS],
                "rows": out, "counts": counts}


def public(item: dict) -> dict:
    """An item as the page gets it (no server-side paths)."""
    return {k: v for k, v in item.items() if not k.startswith("_")}
