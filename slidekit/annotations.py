"""Annotations: QuPath GeoJSON (and, later, ASAP XML) in and out.

QuPath's rules for what it imports: ``objectType`` lives in ``properties``; ``classification``
is ``{"name", "color": [r, g, b]}`` (both keys); ``measurements`` is a name -> number map; ids
are UUID strings; coordinates are level-0 pixels; polygon holes are kept.
"""
from __future__ import annotations

import gzip
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from shapely.geometry import mapping
from shapely.geometry.base import BaseGeometry

from slidekit.io import atomic_path

KINDS = ("annotation", "detection", "cell", "tile")


@dataclass
class Annotation:
    """One object: a shapely geometry in level-0 pixels plus QuPath's properties."""

    geometry: BaseGeometry
    label: str | None = None
    kind: str = "annotation"
    color: tuple[int, int, int] | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    name: str | None = None
    id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def to_feature(self) -> dict:
        """This object as a QuPath-ready GeoJSON Feature."""
        props: dict = {"objectType": self.kind}
        if self.name:
            props["name"] = self.name
        if self.label is not None:
            props["classification"] = {"name": self.label, "color": list(self.color or default_color(self.label))}
        if self.measurements:
            props["measurements"] = {k: float(v) for k, v in self.measurements.items()}
        return {"type": "Feature", "id": self.id, "geometry": mapping(self.geometry), "properties": props}


def default_color(label: str) -> tuple[int, int, int]:
    """A stable colour for a class name (QuPath needs one with every classification)."""
    import zlib

    h = zlib.crc32(label.encode())
    return (64 + h % 192, 64 + (h >> 8) % 192, 64 + (h >> 16) % 192)


def write_geojson(annotations: Iterable[Annotation], path: str | os.PathLike) -> Path:
    """Write a FeatureCollection QuPath imports, streaming feature by feature, atomically.

    A path ending in ``.gz`` is gzip-compressed.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with atomic_path(path) as tmp:
        with opener(tmp, "wt", encoding="utf-8") as f:
            f.write('{"type": "FeatureCollection", "features": [')
            for i, ann in enumerate(annotations):
                f.write(",\n" if i else "\n")
                f.write(json.dumps(ann.to_feature(), separators=(",", ":")))
            f.write("\n]}\n")
    return path
