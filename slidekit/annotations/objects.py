"""An annotation object and its QuPath GeoJSON Feature: the data model every reader, writer and
geometry rule shares.

``Annotation`` is one QuPath object (annotation, detection, cell or tile): a shapely geometry in
level-0 pixels with its class, colour, measurements and the properties slidekit does not model.
``feature_out`` writes one as a QuPath-ready Feature; ``Notes`` collects the repairs made while
reading or writing one file, reported as one ``AnnotationWarning``.
"""
from __future__ import annotations

import math
import uuid
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import Polygon, mapping
from shapely.geometry.base import BaseGeometry

from slidekit.base.errors import AnnotationError, AnnotationWarning

KINDS = ("annotation", "detection", "cell", "tile")


class Notes:
    """Repairs made while reading or writing one file, reported as one warning line."""

    def __init__(self) -> None:
        self.items: dict[str, list[str]] = {}

    def add(self, what: str, where: str) -> None:
        self.items.setdefault(what, []).append(where)

    def warn(self, path: Path, stacklevel: int = 3) -> None:
        if not self.items:
            return
        parts = []
        for what, where in self.items.items():
            shown = ", ".join(where[:3]) + (f", ... ({len(where)} in all)" if len(where) > 3 else "")
            parts.append(f"{what} ({shown})")
        warnings.warn(AnnotationWarning(f"{path}: " + "; ".join(parts)), stacklevel=stacklevel)


@dataclass
class Annotation:
    """One object: a shapely geometry in level-0 pixels plus QuPath's properties.

    ``extra`` keeps properties slidekit does not model (``isLocked``, a cell's
    ``nucleusGeometry``...) so that read -> write -> read loses nothing.
    """

    geometry: BaseGeometry
    label: str | None = None
    kind: str = "annotation"
    color: tuple[int, int, int] | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    name: str | None = None
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    extra: dict[str, Any] = field(default_factory=dict)

    def to_feature(self) -> dict:
        """This object as a QuPath-ready GeoJSON Feature (see ``write_geojson`` for the repairs;
        raises AnnotationError for what cannot be written)."""
        try:
            feature = feature_out(self, Notes(), "object")
        except ValueError as e:
            raise AnnotationError(str(e)) from None
        if feature is None:
            raise AnnotationError("object has an empty geometry")
        return feature


def default_color(label: str) -> tuple[int, int, int]:
    """A stable colour for a class name (QuPath needs one with every classification)."""
    h = zlib.crc32(label.encode())
    return (64 + h % 192, 64 + (h >> 8) % 192, 64 + (h >> 16) % 192)


def _json_number(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None  # JSON has no NaN; QuPath reads null as missing


def finite_json(v: Any, fixed: list) -> Any:
    """``v`` with non-finite floats replaced by null (JSON has no NaN); ``fixed`` counts them."""
    if isinstance(v, float) or isinstance(v, np.floating):
        if not math.isfinite(v):
            fixed.append(1)
            return None
        return float(v)
    if isinstance(v, dict):
        return {k: finite_json(x, fixed) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite_json(x, fixed) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def clean_geometry(g: BaseGeometry, where: str, notes: Notes) -> BaseGeometry | None:
    """Refuse non-finite coordinates; drop empty rings and parts (noted). None: nothing left."""
    if not isinstance(g, BaseGeometry):
        raise ValueError(f"{where}: geometry is a {type(g).__name__}, not a shapely geometry")
    if g.is_empty:
        notes.add("objects with an empty geometry dropped", where)
        return None
    coords = shapely.get_coordinates(g, include_z=bool(shapely.has_z(g)))
    if not np.isfinite(coords).all():
        raise ValueError(f"{where}: {g.geom_type} has a non-finite coordinate (NaN or infinity)")
    fixed, changed = _drop_empty(g)
    if changed:
        notes.add("empty rings or parts removed", where)
    return fixed


def _drop_empty(g: BaseGeometry) -> tuple[BaseGeometry, bool]:
    gt = g.geom_type
    if gt == "Polygon":
        holes = [h for h in g.interiors if not h.is_empty]
        if len(holes) == len(g.interiors):
            return g, False
        return Polygon(g.exterior, holes), True
    if gt.startswith("Multi") or gt == "GeometryCollection":
        parts = [_drop_empty(p) for p in g.geoms if not p.is_empty]
        changed = len(parts) != len(g.geoms) or any(c for _, c in parts)
        if not changed:
            return g, False
        return type(g)([p for p, _ in parts]), True
    return g, False


def feature_out(ann: Annotation, notes: Notes, where: str) -> dict | None:
    """The GeoJSON Feature of ``ann`` (None when its geometry is empty); ValueError naming
    ``where`` for what cannot be written."""
    geom = clean_geometry(ann.geometry, where, notes)
    if geom is None:
        return None
    if ann.kind not in KINDS:
        raise ValueError(f"{where}: kind {ann.kind!r} is not one of {', '.join(KINDS)}")
    props: dict = {"objectType": ann.kind}
    if ann.name:
        props["name"] = as_text(ann.name, "name", where)
    color = None if ann.color is None else parse_rgb(ann.color, where, notes)
    if ann.label is not None:
        label = as_text(ann.label, "class name", where)
        props["classification"] = {"name": label, "color": list(color or default_color(label))}
    elif color is not None:
        props["color"] = list(color)  # an unclassified object's own colour
    if ann.measurements:
        try:
            props["measurements"] = {str(k): _json_number(v) for k, v in ann.measurements.items()}
        except (TypeError, ValueError):
            bad = {k: v for k, v in ann.measurements.items() if not isinstance(v, (int, float, np.number))}
            raise ValueError(f"{where}: measurement values must be numbers ({bad!r:.80})") from None
    feature = {"type": "Feature", "id": str(ann.id), "geometry": mapping(geom), "properties": props}
    fixed: list = []
    for k, v in ann.extra.items():
        if k == "nucleusGeometry":
            feature[k] = finite_json(v, fixed)
        elif k not in props:
            props[k] = finite_json(v, fixed)
    if fixed:
        notes.add("non-finite numbers in extra properties written as null", where)
    return feature


def as_text(v: Any, what: str, where: str) -> str:
    """A name or class: a string (a number is accepted and written as text), nothing else."""
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return str(v)
    raise ValueError(f"{where}: {what} must be a string, not {type(v).__name__} {v!r:.60}")


def parse_rgb(v: Any, where: str, notes: Notes) -> tuple[int, int, int]:
    """(r, g, b) in 0-255 from a packed (A)RGB int, [r, g, b(, a)] or '#rrggbb'; components out
    of range are clipped (noted)."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):  # packed (A)RGB, maybe a negative Java int
        v = int(v) & 0xFFFFFF
        return (v >> 16) & 255, (v >> 8) & 255, v & 255
    if isinstance(v, str) and v.startswith("#") and len(v) == 7:
        try:
            return parse_hex(v)
        except ValueError:
            pass
    if (isinstance(v, (list, tuple)) and len(v) >= 3
            and all(isinstance(x, (int, float, np.number)) and not isinstance(x, bool) for x in v[:3])
            and all(math.isfinite(x) for x in v[:3])):
        rgb = tuple(int(round(float(x))) for x in v[:3])
        clipped = tuple(min(255, max(0, x)) for x in rgb)
        if clipped != rgb:
            notes.add("colours outside 0-255 clipped", where)
        return clipped  # type: ignore[return-value]
    raise ValueError(f"{where}: colour {v!r:.60} is not [r, g, b]")


def parse_hex(s: str) -> tuple[int, int, int]:
    s = s.lstrip("#")
    return int(s[0:2], 16), int(s[2:4], 16), int(s[4:6], 16)
