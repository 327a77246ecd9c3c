"""Annotations: QuPath GeoJSON in every form, ASAP XML, round trips, rasterising, bad input."""
from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import LineString, Point, Polygon, box

import slidekit as sk
from slidekit.annotations.formats import read_annotations, write_geojson
from slidekit.annotations.geometry import rasterize
from slidekit.annotations.objects import Annotation


def _same_measurements(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k]) for k in a)


QUPATH_FILES = ["03012023_JN.geojson", "Single_cells.geojson", "TD_01_verysmall_mIF.geojson",
                "objects.geojson", "qupath_test_polygon.geojson"]


@pytest.mark.parametrize("name", QUPATH_FILES)
def test_qupath_round_trip(shared_data: Path, tmp_path: Path, name: str) -> None:
    src = shared_data / "qupath_geojson" / name
    first = read_annotations(src)
    out = write_geojson(first, tmp_path / "rt.geojson")
    second = read_annotations(out)
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):
        assert (a.kind, a.label, a.color, a.name, a.id) == (b.kind, b.label, b.color, b.name, b.id)
        assert _same_measurements(a.measurements, b.measurements)
        assert a.geometry.equals_exact(b.geometry, 1e-9)
        assert a.extra == b.extra
    # What QuPath exported keeps its ids, classes and colours on the way in.
    raw = json.loads(src.read_text())
    if raw.get("type") == "FeatureCollection":
        for f, a in zip(raw["features"], first):
            assert a.id == f["id"]
            c = f["properties"].get("classification")
            assert a.label == (c["name"] if c else None)
            if c:
                assert a.color == tuple(c["color"])


def test_written_geojson_follows_qupath_rules(shared_data: Path, tmp_path: Path) -> None:
    anns = read_annotations(shared_data / "qupath_geojson" / "Single_cells.geojson")
    anns.append(Annotation(box(0, 0, 10, 10), label="Tumor", kind="tile", measurements={"p": float("nan")}))
    data = json.loads(write_geojson(anns, tmp_path / "q.geojson").read_text())
    assert data["type"] == "FeatureCollection"
    kinds = set()
    for f in data["features"]:
        assert "objectType" not in f and "type" not in f["properties"]
        kinds.add(f["properties"]["objectType"])
        uuid.UUID(f["id"])
        c = f["properties"].get("classification")
        if c is not None:
            assert set(c) == {"name", "color"} and len(c["color"]) == 3
        m = f["properties"].get("measurements", {})
        assert isinstance(m, dict) and all(v is None or isinstance(v, float) for v in m.values())
    assert kinds == {"annotation", "cell", "tile"}
    cells = [a for a in read_annotations(tmp_path / "q.geojson") if a.kind == "cell"]
    assert len(cells) == 121 and "Cell: Area" in cells[0].measurements


def test_geojson_forms_and_legacy_properties(tmp_path: Path) -> None:
    poly = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
    feat = {"type": "Feature", "id": "PathCellObject", "geometry": poly,
            "properties": {"classification": {"name": "Tumor", "colorRGB": -65536}, "isLocked": True,
                           "measurements": [{"name": "Area", "value": 100.0}, {"name": "X", "value": None}]}}
    cases = {
        "fc.geojson": {"type": "FeatureCollection", "features": [feat]},
        "feature.json": feat,
        "list.geojson": [feat, poly],
        "bare.geojson": poly,
        "string_class.geojson": {"type": "Feature", "geometry": poly,
                                 "properties": {"objectType": "detection", "classification": "Stroma"}},
        "derived.geojson": {"type": "Feature", "geometry": poly, "properties": {
            "objectType": "cell", "classification": {"names": ["Tumor", "Positive"], "color": [1, 2, 3]}}},
    }
    for name, data in cases.items():
        (tmp_path / name).write_text(json.dumps(data))
    a = read_annotations(tmp_path / "fc.geojson")[0]
    assert (a.kind, a.label, a.color) == ("cell", "Tumor", (255, 0, 0))
    assert a.measurements["Area"] == 100.0 and math.isnan(a.measurements["X"])
    assert a.extra == {"isLocked": True}
    uuid.UUID(a.id)  # the legacy type-in-id is not kept as an id
    assert read_annotations(tmp_path / "feature.json")[0].label == "Tumor"
    both = read_annotations(tmp_path / "list.geojson")
    assert [x.kind for x in both] == ["cell", "annotation"] and both[1].label is None
    bare = read_annotations(tmp_path / "bare.geojson")
    assert len(bare) == 1 and bare[0].geometry.area == 100
    s = read_annotations(tmp_path / "string_class.geojson")[0]
    assert (s.kind, s.label, s.color) == ("detection", "Stroma", None)
    d = read_annotations(tmp_path / "derived.geojson")[0]
    assert (d.label, d.color) == ("Tumor: Positive", (1, 2, 3))
    # Gzip both ways.
    gz = write_geojson(both, tmp_path / "out.geojson.gz")
    assert gzip.open(gz).read(1) == b"{"
    assert [x.id for x in read_annotations(gz)] == [x.id for x in both]


def test_asap_tumor_036_groups(shared_data: Path) -> None:
    anns = read_annotations(shared_data / "camelyon" / "asap_xml" / "tumor_036.xml")
    assert len(anns) == 105
    labels = [a.label for a in anns]
    assert labels.count("metastasis") == 103 and labels.count("negative") == 2
    assert all(a.geometry.geom_type == "Polygon" and a.kind == "annotation" for a in anns)
    # Level-0 pixels of a CAMELYON16 slide (about 100k px wide).
    assert 0 < min(a.geometry.bounds[0] for a in anns) and max(a.geometry.bounds[2] for a in anns) < 200_000


def test_asap_tumor_076_polygons_and_spline(shared_data: Path, tmp_path: Path) -> None:
    anns = read_annotations(shared_data / "camelyon" / "asap_xml" / "tumor_076.xml")
    assert len(anns) == 39 and {a.label for a in anns} == {"metastasis"}
    types = [a.extra["asapType"] for a in anns]
    assert types.count("Spline") == 1 and types.count("Polygon") == 38
    assert all(a.geometry.geom_type == "Polygon" and a.geometry.area > 0 for a in anns)
    back = read_annotations(write_geojson(anns, tmp_path / "t76.geojson"))
    assert [(a.label, a.color, a.name) for a in back] == [(a.label, a.color, a.name) for a in anns]


def test_asap_point_sets_and_cli_convert(tmp_path: Path) -> None:
    xml = """<?xml version="1.0"?><ASAP_Annotations><Annotations>
    <Annotation Name="a" Type="Polygon" PartOfGroup="_0" Color="#F4FA58"><Coordinates>
      <Coordinate Order="2" X="10" Y="10"/><Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="10" Y="0"/>
    </Coordinates></Annotation>
    <Annotation Name="p" Type="PointSet" PartOfGroup="None" Color="#00ff00"><Coordinates>
      <Coordinate Order="0" X="1" Y="2"/><Coordinate Order="1" X="3" Y="4"/></Coordinates></Annotation>
    <Annotation Name="d" Type="Dot" PartOfGroup="_2"><Coordinates><Coordinate Order="0" X="5" Y="6"/>
    </Coordinates></Annotation></Annotations>
    <AnnotationGroups><Group Name="_2" PartOfGroup="None" Color="#0000ff"/></AnnotationGroups></ASAP_Annotations>"""
    src = tmp_path / "a.xml"
    src.write_text(xml)
    a, p, d = read_annotations(src)
    assert list(a.geometry.exterior.coords)[:3] == [(0, 0), (10, 0), (10, 10)]  # sorted by Order
    assert (a.label, a.color) == ("_0", (0xF4, 0xFA, 0x58))
    assert p.geometry.geom_type == "MultiPoint" and p.label is None
    assert d.geometry.equals(Point(5, 6)) and d.color == (0, 0, 255)  # colour from its group
    out = tmp_path / "a.geojson"
    r = subprocess.run([sys.executable, "-m", "slidekit", "convert", str(src), "--out", str(out),
                        "--rename", "_0=Tumor", "--rename", "_2=Exclusion"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [x.label for x in read_annotations(out)] == ["Tumor", None, "Exclusion"]


BAD = {
    "empty.geojson": "",
    "broken.geojson": '{"type": "FeatureCollection", "features": [',
    "wrongtype.geojson": '{"type": "Topology"}',
    "nogeom.geojson": '{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}}]}',
    "badgeom.geojson": '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[1]]}}',
    "badmeas.geojson": '{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, '
                       '"properties": {"measurements": {"a": "x"}}}',
    "badcolor.geojson": '{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, '
                        '"properties": {"classification": {"name": "T", "color": "red"}}}',
    "broken.xml": "<ASAP_Annotations><Annotations>",
    "other.xml": "<svg></svg>",
    "noxy.xml": '<ASAP_Annotations><Annotations><Annotation Type="Polygon"><Coordinates>'
                '<Coordinate Order="0" X="a"/></Coordinates></Annotation></Annotations></ASAP_Annotations>',
    "text.geojson": "hello",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_files_raise_annotation_error(tmp_path: Path, name: str) -> None:
    assert name in _read_error(tmp_path, name, BAD[name])


def _read_error(tmp_path: Path, name: str, text: str) -> str:
    """The message of the AnnotationError that reading ``text`` as file ``name`` raises."""
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(sk.AnnotationError) as e:
        read_annotations(p)
    return str(e.value)


def test_missing_file_and_cli_bad_input(tmp_path: Path) -> None:
    with pytest.raises(sk.AnnotationError, match="not found"):
        read_annotations(tmp_path / "nope.geojson")
    bad = tmp_path / "bad.xml"
    bad.write_text("<ASAP_Annotations><Annotations>")
    out = tmp_path / "out.geojson"
    r = subprocess.run([sys.executable, "-m", "slidekit", "convert", str(bad), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "bad.xml" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


# -- rasterising ---------------------------------------------------------------------------------


def test_rasterize_polygon_with_hole_at_mpp() -> None:
    shell = [(100, 100), (300, 100), (300, 300), (100, 300)]
    hole = [(150, 150), (250, 150), (250, 250), (150, 250)]
    ann = Annotation(Polygon(shell, [hole]), label="Tumor")
    m = rasterize([ann], box=(0, 0, 400, 400), mpp=1.0, slide_mpp=0.25, labels={"Tumor": 2})
    assert m.shape == (100, 100) and m.dtype == np.uint8
    assert set(np.unique(m)) == {0, 2}
    assert (m == 2).sum() == 50 * 50 - 25 * 25  # 4 level-0 px per output px
    assert m[25:75, 25:75][12:37, 12:37].max() == 0  # the hole is empty
    # An offset box sees the same object shifted.
    m2 = rasterize([ann], box=(100, 100, 200, 200), mpp=1.0, slide_mpp=0.25, labels={"Tumor": 2})
    assert np.array_equal(m2, m[25:75, 25:75])


def test_rasterize_label_order_fill_and_exclusions() -> None:
    lesion = Annotation(box(0, 0, 100, 100), label="metastasis")
    excl = Annotation(box(20, 20, 40, 40), label="negative")
    other = Annotation(box(50, 50, 60, 60), label="ignored-class")
    m = rasterize([excl, lesion, other], box=(0, 0, 120, 120), mpp=0.5, labels={"metastasis": 1, "negative": 0},
                  fill=255)
    assert m[10, 10] == 1 and m[30, 30] == 0 and m[110, 110] == 255 and m[55, 55] == 1
    assert (m == 0).sum() == 400
    binary = rasterize([lesion], box=(0, 0, 120, 120), mpp=0.5)
    assert binary.sum() == 100 * 100


def test_rasterize_scribble_lines_and_points() -> None:
    line = Annotation(LineString([(10, 50), (90, 50)]), label="fg")
    dot = Annotation(Point(50, 10), label="bg")
    m = rasterize([line, dot], box=(0, 0, 100, 100), mpp=0.5, slide_mpp=0.5, labels={"fg": 1, "bg": 2},
                  fill=255, line_width_um=3.0)
    rows = np.flatnonzero((m == 1).any(axis=1))
    assert len(rows) in (5, 6, 7)  # ~6 px wide (3 µm at 0.5 µm/px)
    assert abs(rows.mean() - 50) <= 1
    assert (m == 1).any(axis=0)[10:91].all()
    assert m[10, 50] == 2 and (m == 2).sum() > 4
    # Even a line thinner than a pixel shows up at a coarse MPP.
    coarse = rasterize([line], box=(0, 0, 100, 100), mpp=8.0, slide_mpp=0.5, labels={"fg": 1}, line_width_um=0.5)
    assert coarse.sum() >= 4


def test_imagescope_xml_monuseg_matches_its_masks(shared_data: Path) -> None:
    import csv

    import cv2

    root = shared_data / "nuclei_monuseg"
    row = next(csv.DictReader((root / "index.csv").open()))
    anns = read_annotations(root / row["annotation_xml_gz"])  # gzip, sniffed from the content
    assert len(anns) == int(row["n_nuclei"]) + int(row["xml_regions_skipped"])
    mask = cv2.imread(str(root / row["mask_instance"]), cv2.IMREAD_UNCHANGED) > 0
    ours = rasterize(anns, box=(0, 0, mask.shape[1], mask.shape[0]), mpp=float(row["mpp_from_xml"])) > 0
    # The reference masks put pixel centres on integer coordinates; slidekit on half-integers (QuPath).
    assert (ours & mask).sum() / (ours | mask).sum() > 0.85


# -- strict reading, repairs with a warning, every error naming the file (issue 13) -------------

_POLY = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}


def _feature_with(**props) -> dict:
    return {"type": "Feature", "id": "f-1", "geometry": json.loads(json.dumps(_POLY)), "properties": props}


REFUSED = {
    "deep.geojson": "[" * 100_000 + "]" * 100_000,  # RecursionError before
    # 500 levels parse, but copying, pickling and writing them back gave RecursionError (issue 19 item 10)
    "deepprops.geojson": json.dumps(_feature_with(x=json.loads("[" * 500 + "]" * 500))),
    "listid.geojson": json.dumps({**_feature_with(), "id": [1, 2]}),  # TypeError: unhashable
    "dictid.geojson": json.dumps({**_feature_with(), "id": {"a": 1}}),
    "classobj.geojson": json.dumps(_feature_with(classification={"name": {"x": 1}, "color": [1, 2, 3]})),
    "classnames.geojson": json.dumps(_feature_with(classification={"names": [{"x": 1}], "color": [1, 2, 3]})),
    "nanvertex.geojson": '{"type": "Polygon", "coordinates": [[[0, 0], [NaN, 0], [10, 10], [0, 0]]]}',
    "infpoint.geojson": '{"type": "Point", "coordinates": [Infinity, 1]}',
    "typelist.geojson": json.dumps({"type": ["Feature"], "geometry": _POLY}),
    "bigint.geojson": '{"type": "Point", "coordinates": [' + "9" * 5000 + ", 1]}",
    "nan.xml": '<Annotations><Annotation Name="L"><Regions><Region Id="7"><Vertices><Vertex X="nan" Y="1"/>'
               '<Vertex X="5" Y="1"/><Vertex X="5" Y="5"/></Vertices></Region></Regions></Annotation></Annotations>',
    "nan_asap.xml": '<ASAP_Annotations><Annotations><Annotation Name="a" Type="Polygon"><Coordinates>'
                    '<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="inf" Y="0"/>'
                    '<Coordinate Order="2" X="1" Y="1"/></Coordinates></Annotation></Annotations></ASAP_Annotations>',
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_malformed_input_is_one_line_naming_file_and_feature(tmp_path: Path, name: str) -> None:
    msg = _read_error(tmp_path, name, REFUSED[name])
    assert name in msg and "\n" not in msg
    if name.endswith(".geojson") and name not in ("deep.geojson", "deepprops.geojson", "bigint.geojson",
                                                                 "typelist.geojson"):
        assert "feature 0" in msg
    if name.endswith(".xml"):
        assert "region 7" in msg or "annotation 0" in msg


def test_every_malformed_property_names_the_file(tmp_path: Path) -> None:
    # A probe over feature members x odd values: whatever is refused is an AnnotationError whose
    # one line names the file; whatever is read can be written back and read again.
    odd = [None, True, -1, 1.5, float("nan"), float("inf"), "x", "", [], {}, [1], {"x": 1}, [[]], [None, None]]
    members = [("id",), ("geometry",), ("geometry", "type"), ("geometry", "coordinates"), ("properties",),
               ("properties", "objectType"), ("properties", "classification"),
               ("properties", "classification", "name"), ("properties", "classification", "color"),
               ("properties", "measurements"), ("properties", "measurements", "a"), ("properties", "name"),
               ("properties", "color"), ("properties", "isLocked"), ("nucleusGeometry",), ("type",)]
    n = 0
    for path in members:
        for v in odd:
            f = _feature_with(classification={"name": "T", "color": [1, 2, 3]}, measurements={"a": 1.0})
            o = f
            for k in path[:-1]:
                o = o[k]
            o[path[-1]] = v
            n += 1
            src = tmp_path / f"case{n}.geojson"
            src.write_text(json.dumps(f))  # NaN / Infinity as Python's json writes them
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", sk.AnnotationWarning)
                try:
                    anns = read_annotations(src)
                except sk.AnnotationError as e:
                    assert src.name in str(e) and "\n" not in str(e), (path, v, str(e))
                    continue
                out = write_geojson(anns, tmp_path / f"out{n}.geojson")
                assert len(read_annotations(out)) == len(anns)
    assert n == len(members) * len(odd)


def test_gzip_bomb_stops_at_the_limit(tmp_path: Path, monkeypatch) -> None:
    import slidekit.annotations.formats as A

    bomb = tmp_path / "bomb.geojson.gz"
    bomb.write_bytes(gzip.compress(b"[" + b" " * (8 << 20) + b"]"))  # 8 MiB inflating from ~8 KiB
    assert bomb.stat().st_size < 100_000
    monkeypatch.setattr(A, "MAX_ANNOTATION_BYTES", 1 << 20)
    with pytest.raises(sk.AnnotationError, match=r"bomb\.geojson\.gz: larger than 1 MiB once decompressed"):
        read_annotations(bomb)
    assert read_annotations(bomb, max_bytes=16 << 20) == []  # a deliberate, larger limit reads it


def test_repairs_are_made_and_said(tmp_path: Path) -> None:
    p = tmp_path / "fix.geojson"
    hole_empty = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]], []]}
    p.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": hole_empty, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": []}, "properties": {}},
        {"type": "Feature", "geometry": _POLY, "properties": {"classification": {"name": "T", "color": [300, -5, 7]}}},
    ]}))
    with pytest.warns(sk.AnnotationWarning) as rec:
        anns = read_annotations(p)
    msg = " ".join(str(w.message) for w in rec)
    assert "fix.geojson" in msg and "empty rings" in msg and "empty geometry dropped (feature 1)" in msg
    assert "colours outside 0-255 clipped (feature 2)" in msg
    assert len(anns) == 2 and anns[1].color == (255, 0, 7)
    text = write_geojson(anns, tmp_path / "out.geojson").read_text()
    assert "[]" not in text  # no empty ring written for QuPath to choke on
    # ImageScope regions without vertices are dropped, with a word.
    xml = tmp_path / "scope.xml"
    xml.write_text('<Annotations><Annotation Name="Nuclei"><Regions><Region Id="1"><Vertices/></Region>'
                   '<Region Id="2"><Vertices><Vertex X="0" Y="0"/><Vertex X="4" Y="0"/><Vertex X="4" Y="4"/>'
                   '</Vertices></Region></Regions></Annotation></Annotations>')
    with pytest.warns(sk.AnnotationWarning,
                      match=r"scope\.xml: ImageScope regions without vertices dropped \(region 1\)"):
        assert [a.name for a in read_annotations(xml)] == ["2"]


def test_writing_refuses_or_repairs_and_names_the_file(tmp_path: Path) -> None:
    out = tmp_path / "w.geojson"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        nan_poly = Polygon([(0, 0), (float("nan"), 0), (10, 10)])
    for bad, what in [(Annotation(nan_poly), "non-finite"), (Annotation(box(0, 0, 1, 1), label={"x": 1}), "class name"),
                      (Annotation(box(0, 0, 1, 1), measurements={"a": "x"}), "measurement")]:
        with pytest.raises(sk.AnnotationError) as e:
            write_geojson([Annotation(box(0, 0, 1, 1)), bad], out)
        assert "w.geojson" in str(e.value) and "object 1" in str(e.value) and what in str(e.value)
        assert not out.exists()
    odd = Annotation(box(0, 0, 1, 1), color=(256, 12, -1), extra={"score": float("nan"), "n": np.int64(3)})
    with pytest.warns(sk.AnnotationWarning, match="w.geojson: .*colours outside 0-255 clipped.*non-finite"):
        write_geojson([odd, Annotation(Polygon())], out)
    (f,) = json.loads(out.read_text())["features"]
    assert f["properties"]["color"] == [255, 12, 0] and f["properties"]["score"] is None and f["properties"]["n"] == 3
