"""Annotation files: QuPath GeoJSON and ASAP/ImageScope XML in and out (the object model is
``slidekit.annotations.objects``; rasterising, the fill rule and clipping live in
``slidekit.annotations.geometry``).

QuPath's rules for what it imports: ``objectType`` lives in ``properties``; ``classification``
is ``{"name", "color": [r, g, b]}`` (both keys); ``measurements`` is a name -> number map; ids
are UUID strings; coordinates are level-0 pixels; polygon holes are kept.

Reading is lenient about what QuPath versions wrote: a FeatureCollection, a single Feature, a
list of Features or a bare geometry; ``classification`` as a plain string, with ``colorRGB``
(packed ARGB int) or with ``names`` (derived classes); measurements as a list of
``{"name", "value"}``; QuPath 0.2's object type in the feature ``id``; gzip-compressed files.
It is strict about what would be wrong downstream: non-finite coordinates, a class name that is
not a string, a malformed id are errors naming the file and the feature; empty rings, colours
outside 0-255 and objects without vertices are repaired or dropped with one AnnotationWarning
per file saying what and where.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import uuid
import warnings
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from typing import Any, Iterable

import shapely
from shapely.geometry import LineString, MultiPoint, Point, Polygon, shape
from shapely.geometry.base import BaseGeometry

from slidekit.annotations.geometry import bounds_geometry, clip_annotations
from slidekit.annotations.objects import (
    KINDS,
    Annotation,
    Notes,
    as_text,
    clean_geometry,
    feature_out,
    parse_hex,
    parse_rgb,
)
from slidekit.base.errors import AnnotationError
from slidekit.base.io import atomic_path

# QuPath 0.2 put the object type in the feature id instead of properties.objectType.
_LEGACY_IDS = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection",
               "PathCellObject": "cell", "PathTileObject": "tile"}
# Feature members and properties that Annotation models itself; everything else rides in `extra`.
_CORE_PROPS = {"objectType", "classification", "measurements", "name", "color"}
_GEOMETRY_TYPES = {"Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon",
                   "GeometryCollection"}
# Largest annotation file read, after decompression: a gzip bomb stops here with one line instead
# of exhausting memory. 2 GiB holds about a million QuPath cells.
MAX_ANNOTATION_BYTES = 2 << 30


def write_geojson(annotations: Iterable[Annotation], path: str | os.PathLike, bounds: Any = None) -> Path:
    """Write a FeatureCollection QuPath imports, streaming feature by feature, atomically.

    ``bounds`` is the level-0 ``(width, height)`` of the slide or a shapely geometry (e.g. the
    heatmap's coverage box): every geometry is clipped to it (silently: the caller asked) and
    objects left empty are dropped (with a warning).
    Objects with empty geometries are dropped, empty rings removed, colours clipped to 0-255 and
    non-finite extra numbers written as null; one AnnotationWarning says what was changed. A path
    ending in ``.gz`` is gzip-compressed. Raises AnnotationError naming the file and the object
    for what cannot be written (non-finite coordinates, a class name that is not a string...).
    """
    path = Path(path)
    notes = Notes()
    counts: dict[str, int] = {}
    items = annotations if bounds is None else clip_annotations(annotations, bounds, counts)
    opener = gzip.open if path.suffix == ".gz" else open
    n = 0
    with atomic_path(path) as tmp:
        with opener(tmp, "wt", encoding="utf-8") as f:
            f.write('{"type": "FeatureCollection", "features": [')
            for i, ann in enumerate(items):
                where = f"object {i} (id {getattr(ann, 'id', None)})"
                try:
                    feature = feature_out(ann, notes, where)
                    if feature is None:
                        continue
                    text = json.dumps(feature, separators=(",", ":"), allow_nan=False)
                except (ValueError, TypeError) as e:
                    msg = str(e) if str(e).startswith(where) else f"{where}: {e}"
                    raise AnnotationError(f"cannot write {msg}", path) from None
                f.write(",\n" if n else "\n")
                f.write(text)
                n += 1
            f.write("\n]}\n")
    # Clipping to ``bounds`` is what the caller asked for (edge tiles always overhang a slide), so it
    # is not warned about; an object dropped whole lay entirely outside, which is worth a word.
    if counts.get("dropped"):
        b = shapely.bounds(clip_region(bounds))
        notes.add(f"{counts['dropped']} objects entirely outside the bounds dropped ({counts['clipped']} clipped)",
                  f"x {b[0]:g}..{b[2]:g}, y {b[1]:g}..{b[3]:g}")
    notes.warn(path)
    return path


def clip_region(bounds: Any) -> BaseGeometry:
    """The clip region of ``write_geojson(bounds=...)``."""
    return bounds_geometry(bounds)


# ---------------------------------------------------------------------------------------------
# Reading


def read_annotations(path: str | os.PathLike, max_bytes: int | None = None) -> list[Annotation]:
    """Read QuPath GeoJSON (``.geojson``/``.json``, optionally ``.gz``) or ASAP/ImageScope XML.

    The format is sniffed from the content, not the suffix. Raises AnnotationError naming the
    file, and where it can the feature, for anything malformed; files larger than ``max_bytes``
    (default ``MAX_ANNOTATION_BYTES``) after decompression are refused. Repairs (empty rings,
    colours clipped to 0-255, regions without vertices dropped) are reported in one
    AnnotationWarning.
    """
    path = Path(path)
    limit = MAX_ANNOTATION_BYTES if max_bytes is None else int(max_bytes)
    if not path.exists():
        raise AnnotationError("annotation file not found", path)
    if path.is_dir():
        raise AnnotationError("is a directory, not an annotation file", path)
    too_big = (f"larger than {limit / 2**20:.0f} MiB once decompressed (the limit; raise "
               "slidekit.annotations.formats.MAX_ANNOTATION_BYTES or pass max_bytes to read it)")
    try:
        with path.open("rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        if gz:  # read at most limit + 1 bytes: a gzip bomb never inflates in memory
            with gzip.open(path, "rb") as f:
                raw = f.read(limit + 1)
        else:
            if path.stat().st_size > limit:
                raise AnnotationError(too_big.replace(" once decompressed", ""), path)
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error, MemoryError) as e:
        raise AnnotationError(f"cannot read file ({type(e).__name__}: {e})", path) from None
    if len(raw) > limit:
        raise AnnotationError(too_big, path)
    text = raw.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not text:
        raise AnnotationError("file is empty", path)
    notes = Notes()
    if text[:1] == b"<":
        out = _read_xml(text, path, notes)
    elif text[:1] in (b"{", b"["):
        try:
            data = json.loads(text)
        except RecursionError:
            raise AnnotationError("JSON nested too deeply to be GeoJSON", path) from None
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, or a 5000-digit number
            raise AnnotationError(f"not valid JSON ({_one_line(e)})", path) from None
        if _nested_deeper(data, MAX_JSON_NESTING):
            # json reads ~1000 levels, but copying, pickling (cohort workers) and writing the
            # properties back recurse per level and die with RecursionError far sooner.
            raise AnnotationError(f"JSON nested more than {MAX_JSON_NESTING} levels deep (GeoJSON needs "
                                  "about 6; properties that deep are not annotations)", path)
        out = _read_geojson(data, path, notes)
    else:
        raise AnnotationError("neither GeoJSON nor ASAP/ImageScope XML", path)
    notes.warn(path)
    return out


MAX_JSON_NESTING = 64


def _nested_deeper(data: Any, limit: int) -> bool:
    """Whether lists/objects in ``data`` nest more than ``limit`` levels (walked without recursion)."""
    stack = [(data, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (list, dict)):
            if depth > limit:
                return True
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _type(obj: Any) -> str | None:
    """A GeoJSON object's ``type`` when it is a string (a list or object there is malformed)."""
    t = obj.get("type") if isinstance(obj, dict) else None
    return t if isinstance(t, str) else None


def _read_geojson(data: Any, path: Path, notes: Notes) -> list[Annotation]:
    if isinstance(data, dict) and _type(data) == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise AnnotationError("FeatureCollection without a 'features' list", path)
    elif isinstance(data, dict) and _type(data) == "Feature":
        features = [data]
    elif isinstance(data, dict) and _type(data) in _GEOMETRY_TYPES:
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    elif isinstance(data, list):
        features = [{"type": "Feature", "geometry": f, "properties": {}}
                    if isinstance(f, dict) and _type(f) in _GEOMETRY_TYPES else f for f in data]
    else:
        kind = data.get("type") if isinstance(data, dict) else type(data).__name__
        raise AnnotationError(f"not GeoJSON: expected a FeatureCollection, Feature, list or geometry, "
                              f"got {str(kind)[:60]!r}", path)
    out = []
    for i, f in enumerate(features):
        where = f"feature {i}"
        if isinstance(f, dict) and isinstance(f.get("id"), str) and f["id"] not in _LEGACY_IDS:
            where += f" (id {f['id'][:40]})"
        try:
            ann = _feature(f, where, notes)
        except RecursionError:
            raise AnnotationError(f"{where}: nested too deeply", path) from None
        except AnnotationError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever shapely or a coercion raises, one line naming the feature
            msg = _one_line(e)
            raise AnnotationError(msg if msg.startswith(where) else f"{where}: {msg}", path) from None
        if ann is not None:
            out.append(ann)
    return out


def _feature(f: Any, where: str, notes: Notes) -> Annotation | None:
    """One Feature; ValueError (with ``where``) for malformed ones, None for dropped ones."""
    if not isinstance(f, dict) or f.get("type") != "Feature":
        raise ValueError(f"{where} is not a GeoJSON Feature")
    geom = f.get("geometry")
    if not isinstance(geom, dict):
        raise ValueError(f"{where} has no geometry")
    try:
        with warnings.catch_warnings():  # NaN coordinates: refused just below, with the feature named
            warnings.simplefilter("ignore", RuntimeWarning)
            geometry = shape(geom)
    except RecursionError:
        raise
    except Exception as e:  # shapely raises GeometryTypeError, ValueError, IndexError...
        raise ValueError(f"{where} has a malformed {str(geom.get('type'))[:40]!r} geometry ({_one_line(e)})") from None
    geometry = clean_geometry(geometry, where, notes)
    if geometry is None:
        return None
    props = f.get("properties") or {}
    if not isinstance(props, dict):
        raise ValueError(f"{where}: 'properties' is not an object")
    fid = f.get("id")
    legacy_kind = _LEGACY_IDS.get(fid) if isinstance(fid, str) else None
    legacy = legacy_kind is not None
    kind = props.get("objectType")
    if kind is None and legacy:
        kind = legacy_kind
    if kind is None and props.get("type") in KINDS:  # some non-QuPath writers
        kind = props["type"]
    kind = kind if isinstance(kind, str) and kind in KINDS else "annotation"
    label, color = _classification(props.get("classification"), where, notes)
    if label is None and props.get("color") is not None:
        color = parse_rgb(props["color"], where, notes)
    extra = {k: v for k, v in props.items() if k not in _CORE_PROPS and not (k == "type" and v in KINDS)}
    if "nucleusGeometry" in f:
        extra["nucleusGeometry"] = f["nucleusGeometry"]
    name = props.get("name")
    return Annotation(geometry=geometry, label=label, kind=kind, color=color,
                      measurements=_measurements(props.get("measurements"), where),
                      name=None if name is None else as_text(name, "name", where),
                      id=_feature_id(fid, legacy, where), extra=extra)


def _feature_id(fid: Any, legacy: bool, where: str) -> str:
    """QuPath ids are UUID strings; GeoJSON also allows numbers. Anything else is malformed."""
    if fid is None or legacy:
        return str(uuid.uuid4())
    if isinstance(fid, str):
        return fid
    if isinstance(fid, int) and not isinstance(fid, bool):
        return str(fid)
    if isinstance(fid, float) and math.isfinite(fid):
        return str(int(fid)) if fid.is_integer() else str(fid)
    raise ValueError(f"{where}: 'id' must be a string or a number, not {type(fid).__name__} {fid!r:.60}")


def _classification(c: Any, where: str, notes: Notes) -> tuple[str | None, tuple[int, int, int] | None]:
    if c is None:
        return None, None
    if isinstance(c, str):
        return c, None
    if not isinstance(c, dict):
        raise ValueError(f"{where}: classification must be a name or an object")
    name = c.get("name")
    if name is None and isinstance(c.get("names"), list):
        # QuPath derived class, e.g. "Tumor: Positive"
        name = ": ".join(as_text(n, "classification name", where) for n in c["names"])
    color = None
    if c.get("color") is not None:
        color = parse_rgb(c["color"], where, notes)
    elif c.get("colorRGB") is not None:
        color = parse_rgb(c["colorRGB"], where, notes)
    return (None if name is None else as_text(name, "classification name", where)), color


def _measurements(m: Any, where: str) -> dict[str, float]:
    if m is None:
        return {}
    items: Iterable
    if isinstance(m, dict):
        items = m.items()
    elif isinstance(m, list):  # QuPath 0.2: [{"name": ..., "value": ...}]
        try:
            items = [(e["name"], e.get("value")) for e in m]
        except (TypeError, KeyError, AttributeError):
            raise ValueError(f"{where}: measurements list entries need 'name'") from None
    else:
        raise ValueError(f"{where}: measurements must be a name -> number map")
    out = {}
    for k, v in items:
        key = as_text(k, "measurement name", where)
        try:
            if isinstance(v, (bool, list, dict)):
                raise TypeError
            out[key] = float("nan") if v is None else float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: measurement {key!r} is not a number ({v!r:.60})") from None
    return out


def _read_xml(text: bytes, path: Path, notes: Notes) -> list[Annotation]:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise AnnotationError(f"malformed XML ({e})", path) from None
    try:
        if root.tag == "ASAP_Annotations":
            return _read_asap(root, notes)
        if root.tag == "Annotations" and root.find(".//Region") is not None:
            return _read_imagescope(root, notes)
    except RecursionError:
        raise AnnotationError("XML nested too deeply", path) from None
    except AnnotationError:
        raise
    except Exception as e:  # noqa: BLE001 - one line naming the file and the annotation
        raise AnnotationError(_one_line(e), path) from None
    raise AnnotationError(f"XML root <{root.tag[:40]}> is neither ASAP (<ASAP_Annotations>) nor "
                          "Aperio ImageScope (<Annotations>) annotations", path)


def _read_asap(root: ET.Element, notes: Notes) -> list[Annotation]:
    """ASAP: <Annotation Type="Polygon|Spline|Rectangle|PointSet|Dot" PartOfGroup=...>.

    The group is kept as the label (``None`` for ``PartOfGroup="None"``); callers map release-
    specific names (``Tumor``, ``metastasis``, ``_0``/``_1``/``_2``, ``negative``). Splines are
    read as polygons through their control points, as CAMELYON's own tools do.
    """
    group_colors = {g.get("Name"): g.get("Color") for g in root.iter("Group")}
    out = []
    for i, a in enumerate(root.iter("Annotation")):
        where = f"annotation {i} ({a.get('Name')})"
        kind = (a.get("Type") or "Polygon")
        coords: list[tuple[float, float, float]] = []
        for c in a.iter("Coordinate"):
            try:  # a missing X/Y is "": ValueError
                coords.append((float(c.get("Order", len(coords))), float(c.get("X", "")), float(c.get("Y", ""))))
            except (TypeError, ValueError):
                raise ValueError(f"{where}: coordinate without numeric X/Y") from None
        coords.sort(key=lambda t: t[0])
        pts = _finite([(x, y) for _, x, y in coords], where)
        geometry = clean_geometry(_asap_geometry(kind, pts, where), where, notes)
        if geometry is None:
            continue
        group = a.get("PartOfGroup")
        label = None if group in (None, "", "None") else group
        hexcol = a.get("Color") or group_colors.get(group)
        color = None
        if hexcol and hexcol.startswith("#") and len(hexcol) == 7:
            try:
                color = parse_hex(hexcol)
            except ValueError:
                notes.add("unreadable colours ignored", where)
        out.append(Annotation(geometry, label=label, kind="annotation", color=color, name=a.get("Name"),
                              extra={"asapType": kind}))
    return out


def _finite(pts: list[tuple[float, float]], where: str) -> list[tuple[float, float]]:
    """XML vertices parse "nan" and "inf" as numbers; they are no place on a slide."""
    if not all(math.isfinite(x) and math.isfinite(y) for x, y in pts):
        raise ValueError(f"{where}: non-finite vertex coordinate (NaN or infinity)")
    return pts


def _asap_geometry(kind: str, pts: list[tuple[float, float]], where: str) -> BaseGeometry:
    if kind in ("Dot",) or (kind == "PointSet" and len(pts) == 1):
        if not pts:
            raise ValueError(f"{where}: point without coordinates")
        return Point(pts[0]) if kind == "Dot" else MultiPoint(pts)
    if kind == "PointSet":
        if not pts:
            raise ValueError(f"{where}: empty point set")
        return MultiPoint(pts)
    if kind in ("Polygon", "Spline", "Rectangle"):
        if len(pts) < 3:
            if len(pts) == 2:
                return LineString(pts)
            raise ValueError(f"{where}: {kind} with {len(pts)} vertices")
        return Polygon(pts)
    raise ValueError(f"{where}: unsupported ASAP type {kind[:40]!r}")


def _read_imagescope(root: ET.Element, notes: Notes) -> list[Annotation]:
    """Aperio ImageScope XML (as in MoNuSeg): <Region><Vertices><Vertex X Y/>; one label per layer."""
    out = []
    for layer in root.iter("Annotation"):
        label = layer.get("Name") or None
        for region in layer.iter("Region"):
            where = f"region {region.get('Id')}"
            try:
                pts = [(float(v.get("X", "")), float(v.get("Y", ""))) for v in region.iter("Vertex")]
            except (TypeError, ValueError):
                raise ValueError(f"{where}: vertex without numeric X/Y") from None
            pts = _finite(pts, where)
            if len(pts) >= 3:
                geometry: BaseGeometry = Polygon(pts)
            elif len(pts) == 2:
                geometry = LineString(pts)
            elif len(pts) == 1:
                geometry = Point(pts[0])
            else:
                notes.add("ImageScope regions without vertices dropped", where)
                continue
            geometry = clean_geometry(geometry, where, notes)
            if geometry is not None:
                out.append(Annotation(geometry, label=label, name=region.get("Id")))
    return out
