"""`slidekit view`: the viewer's web app on a synthetic slide with a real heatmap output and a real
cohort OUT (made with heatmap_slide / run_cohort), through starlette's TestClient and a live server."""
from __future__ import annotations

import http.client
import io
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import synthetic_slide
from PIL import Image

pytest.importorskip("starlette", reason="starlette is not installed (pip install -e .[dev])")
pytest.importorskip("httpx", reason="httpx (starlette's TestClient) is not installed (pip install -e .[dev])")
from starlette.testclient import TestClient  # noqa: E402

from slidekit.base.errors import ConfigError, OutputError, SlideError  # noqa: E402
from slidekit.cli import main  # noqa: E402
from slidekit.infer.heatmap import Heatmap, value_alpha  # noqa: E402
from slidekit.slides.slide import open_slide  # noqa: E402
from slidekit.view import build_app, make_server  # noqa: E402
from slidekit.view.paths import Refused, ServedRoot  # noqa: E402
from slidekit.view.tiles import DeepZoom, SlideCache  # noqa: E402

W, H = 2048, 1536  # the synthetic slide (tissue box 512, 256, 1024 x 768)


def heatmap_out(slide: Path, out: Path) -> Path:
    from slidekit.infer.predictor import heatmap_slide

    heatmap_slide(slide, out, model="hematoxylin", workers=0, progress=False, min_tissue=0.1, device="cpu")
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict:
    """A slide, its heatmap OUT (plus a gzipped GeoJSON of 'cells'), a cohort OUT and a secret file beside them."""
    from shapely.geometry import Point, box

    from slidekit.annotations.formats import write_geojson
    from slidekit.annotations.objects import Annotation
    from slidekit.cohort.run import run_cohort

    root = tmp_path_factory.mktemp("view")
    slide = synthetic_slide(root / "s.tif", width=W, height=H)
    out = heatmap_out(slide, root / "OUT")
    cells = [Annotation(Point(600 + 40 * i, 400).buffer(8), label="Nucleus", kind="detection") for i in range(5)]
    write_geojson(cells, out / "cells.geojson.gz")
    write_geojson([Annotation(box(0, 0, 10, 10), label="x")], root / "secret.geojson")
    (root / "secret.txt").write_text("not yours")
    b = synthetic_slide(root / "b.tif", width=1024, height=768, tissue_box=(256, 128, 512, 384), seed=1)
    (root / "bad.tif").write_bytes(b"junk")
    run_cohort("heatmap", [str(slide), str(b), str(root / "bad.tif")], root / "COH", progress=False,
               model="hematoxylin", workers=0, device="cpu")
    return {"root": root, "slide": slide, "out": out, "cohort": root / "COH"}


@pytest.fixture
def shared_data_or_none():
    from slidekit.base.datapaths import data_dir, data_missing_reason

    return None if data_missing_reason() is not None else data_dir()


@pytest.fixture(scope="module")
def client(outputs) -> TestClient:
    return TestClient(build_app(outputs["out"]), base_url="http://127.0.0.1")


def test_info_and_item_of_a_heatmap_output(client, outputs):
    assert client.get("/api/info").json() == {"mode": "output", "name": "OUT", "item": "OUT"}
    item = client.get("/api/item/OUT").json()
    assert (item["width"], item["height"]) == (W, H) and item["mpp"] == [0.5, 0.5]
    assert item["slide_name"] == "s.tif" and item["heatmap"] == "heatmap.zarr"
    assert item["dzi"] == "/dzi/OUT.dzi" and item["overlay"] == "/overlay/OUT.png"
    assert [g["name"] for g in item["geojson"]] == ["cells.geojson.gz", "predictions.geojson"]
    assert item["summary"]["classes"] == ["Hematoxylin"]
    assert "_slide" not in item and str(outputs["root"]) not in json.dumps(item)  # no server paths
    # the legend is legend_info's: a colour bar for one class, with its CSS ramp
    legend = item["overlay_meta"]["legend"]
    assert legend["kind"] == "colorbar" and legend["range"] == [0.0, 1.0] and len(legend["ramp"]) == 11
    assert legend["ramp"][0] != legend["ramp"][-1]


def test_dzi_descriptor(client):
    r = client.get("/dzi/OUT.dzi")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
    assert 'TileSize="254"' in r.text and 'Overlap="1"' in r.text and f'<Size Width="{W}" Height="{H}"/>' in r.text


@pytest.mark.parametrize("level,col,row,size", [(11, 0, 0, (255, 255)), (11, 2, 1, (256, 256)),
                                                (11, 8, 6, (W - 8 * 254 + 1, H - 6 * 254 + 1)),
                                                (10, 0, 0, (255, 255)), (0, 0, 0, (1, 1)), (3, 0, 0, (8, 6))])
def test_a_tile_is_a_jpeg_of_the_right_size(client, level, col, row, size):
    r = client.get(f"/dzi/OUT_files/{level}/{col}_{row}.jpeg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "JPEG" and im.size == size


def test_tiles_show_the_slide_pixels(client, outputs):
    r = client.get("/dzi/OUT_files/11/2_1.jpeg")  # level 0: x 507..763, y 253..509 (overlap included)
    tile = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), np.float32)
    with open_slide(outputs["slide"]) as s:
        ref = s.read_region((507, 253), 0, (256, 256)).astype(np.float32)
    assert np.abs(tile - ref).mean() < 6  # JPEG, twice
    # a coarse tile (whole slide, 128 x 96) comes from the overview: glass white, tissue pink
    coarse = np.asarray(Image.open(io.BytesIO(client.get("/dzi/OUT_files/7/0_0.jpeg").content)))
    assert coarse.shape == (96, 128, 3)
    assert coarse[5, 5].min() > 230 and coarse[48, 64, 1] < 150


def test_missing_tiles_are_404(client):
    assert client.get("/dzi/OUT_files/12/0_0.jpeg").status_code == 404
    assert client.get("/dzi/OUT_files/11/9_0.jpeg").status_code == 404


def test_overlay_png_is_placed_on_the_heatmap(client, outputs):
    item = client.get("/api/item/OUT").json()
    place = item["overlay_meta"]["place"]
    hm = Heatmap(outputs["out"] / "heatmap.zarr")
    (sx, sy), (ox, oy) = hm.scale, hm.origin
    assert (place["x"], place["y"]) == (ox, oy) and place["factor"] == 1
    assert place["width"] == hm.shape[1] * sx and place["height"] == hm.shape[0] * sy
    r = client.get("/overlay/OUT.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    png = np.asarray(Image.open(io.BytesIO(r.content)))
    assert png.shape == (*hm.shape, 4)
    cov = np.asarray(hm.coverage[:]).astype(bool)
    assert (png[~cov, 3] == 0).all()  # transparent where nothing was predicted
    # the strength is in alpha, faded in as overlay.png fades it (value_alpha; the page's slider blends the rest)
    p = np.asarray(hm.prob[0])
    expected = np.rint(value_alpha(p) * 255)
    assert np.abs(png[cov, 3] - expected[cov]).max() <= 1 and np.ptp(png[cov, 3]) > 50


def test_geojson_endpoint_plain_and_gzipped(client):
    r = client.get("/geojson/OUT/predictions.geojson")
    assert r.status_code == 200 and r.json()["type"] == "FeatureCollection"
    assert r.json() == json.loads((client.app.state.viewer.index.root.path / "predictions.geojson").read_text())
    r = client.get("/geojson/OUT/cells.geojson.gz")
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    feats = r.json()["features"]
    assert len(feats) == 5 and feats[0]["properties"]["objectType"] == "detection"
    assert client.get("/geojson/OUT/summary.json").status_code == 404  # only GeoJSON files


@pytest.fixture(scope="module")
def evil(outputs) -> Path:
    """Links in OUT that point out of it, and one that stays inside."""
    out = outputs["out"]
    for name, target in [("out.geojson", outputs["root"] / "secret.geojson"), ("up", outputs["root"]),
                         ("inside.geojson", out / "predictions.geojson")]:
        if not (out / name).is_symlink():
            (out / name).symlink_to(target)
    return out


@pytest.mark.parametrize("url,status", [
    ("/geojson/OUT/%2e%2e/secret.geojson", 403),          # URL-encoded ..
    ("/geojson/OUT/%2E%2E/secret.geojson", 403),
    ("/geojson/OUT/..%2fsecret.geojson", 403),            # encoded slash
    ("/geojson//tmp/../etc/passwd", 403),                 # absolute
    ("/geojson/%2fetc%2fpasswd", 403),
    ("/geojson/OUT/out.geojson", 403),                    # a link out of PATH
    ("/geojson/OUT/up/secret.geojson", 403),              # a folder link out of PATH
    ("/dzi/OUT/up/s.tif.dzi", 403),
    ("/dzi/%2e%2e/s.tif.dzi", 403),
    ("/api/item/OUT/%2e%2e/COH", 403),
    ("/thumb/OUT/up/s.tif.jpg", 403),
    ("/overlay/OUT/%2e%2e/COH/a.png", 403),
    ("/geojson/COH/a/predictions.geojson", 403),           # a sibling folder
    ("/geojson/OUT/missing.geojson", 404),
    ("/geojson/OUT/inside.geojson", 200),                 # a link that stays inside is fine
    ("/static/%2e%2e/app.py", 404),                        # the page's own files: StaticFiles' check
])
def test_traversal_is_refused(client, evil, url, status):
    r = client.get(url)
    assert r.status_code == status, (url, r.status_code, r.text[:200])
    if status != 200:
        assert "not yours" not in r.text and "Feature" not in r.text


def test_only_loopback_host_names_are_answered(outputs):
    c = TestClient(build_app(outputs["out"]), base_url="http://evil.example")  # DNS rebinding
    assert c.get("/api/info").status_code == 400


def test_served_root_resolves_under_path_only(tmp_path):
    (tmp_path / "OUT" / "a").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    root = ServedRoot((tmp_path / "OUT").resolve())
    assert root.resolve("OUT/a") == (tmp_path / "OUT" / "a").resolve()
    assert root.resolve("OUT") == root.path
    for rel, status in [("OUT/../other", 403), ("OUT/a/../../other", 403), ("other", 403),
                        (str(tmp_path / "other"), 403), ("/etc/passwd", 403), ("", 403),
                        ("OUT/nope", 404), ("OUT/a\x00b", 404)]:
        with pytest.raises(Refused) as e:
            root.resolve(rel)
        assert e.value.status == status, rel


@pytest.fixture(scope="module")
def live(outputs, evil):
    """A real uvicorn server on a free port (raw paths go through as sent)."""
    server, sock, address = make_server(outputs["out"], port=0)
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    while not server.started:
        t.join(0.05)
    yield sock.getsockname()[1]
    server.should_exit = True
    t.join(10)


@pytest.mark.parametrize("raw", ["/geojson/OUT/../secret.geojson", "/geojson/OUT/up/../../secret.geojson",
                                 "/geojson/../secret.geojson", "/static/../paths.py",
                                 "/static/../../view/paths.py"])
def test_literal_dot_dot_over_http_is_refused(live, raw):
    conn = http.client.HTTPConnection("127.0.0.1", live, timeout=10)
    conn.request("GET", raw)  # sent as written: no client-side normalisation
    r = conn.getresponse()
    body = r.read().decode(errors="replace")
    assert r.status in (403, 404), (raw, r.status)
    assert "Feature" not in body and "import" not in body


def test_live_server_serves_tiles(live):
    conn = http.client.HTTPConnection("127.0.0.1", live, timeout=10)
    conn.request("GET", "/dzi/OUT_files/11/1_1.jpeg")
    r = conn.getresponse()
    assert r.status == 200 and r.read()[:2] == b"\xff\xd8"


def test_cohort_table_and_its_slides(outputs):
    c = TestClient(build_app(outputs["cohort"]), base_url="http://127.0.0.1")
    assert c.get("/api/info").json()["mode"] == "cohort"
    table = c.get("/api/cohort").json()
    assert table["columns"][:3] == ["id", "slide", "status"] and "tiles" in table["columns"]
    rows = {r["id"]: r for r in table["rows"]}
    assert set(rows) == {"s", "b", "bad"} and table["counts"] == {"done": 2, "failed": 1}
    assert rows["s"]["status"] == "done" and rows["s"]["_item"] == "COH/s" and int(rows["s"]["tiles"]) > 0
    assert rows["bad"]["status"] == "failed" and rows["bad"]["_item"] is None and rows["bad"]["error"]
    thumb = Image.open(io.BytesIO(c.get(rows["s"]["_thumb"]).content))
    assert thumb.format == "JPEG" and max(thumb.size) == 192
    assert len(c.app.state.viewer.slides) == 0  # thumbnails do not push viewed slides out of the LRU
    item = c.get("/api/item/COH/b").json()
    assert item["cohort"] == "COH" and (item["width"], item["height"]) == (1024, 768)
    assert c.get("/dzi/COH/b_files/10/0_0.jpeg").status_code == 200
    assert c.get("/api/item/COH/bad").status_code == 404  # no folder: never processed
    assert c.get("/api/item/COH").status_code == 422  # the cohort folder is not a slide
    assert TestClient(build_app(outputs["out"]), base_url="http://127.0.0.1").get("/api/cohort").status_code == 422


def test_a_slide_file_alone(outputs):
    c = TestClient(build_app(outputs["slide"]), base_url="http://127.0.0.1")
    info = c.get("/api/info").json()
    assert info == {"mode": "slide", "name": "s.tif", "item": "s.tif"}
    item = c.get("/api/item/s.tif").json()
    assert item["heatmap"] is None and item["overlay"] is None and item["geojson"] == []
    assert c.get("/dzi/s.tif.dzi").status_code == 200
    assert c.get("/dzi/b.tif.dzi").status_code == 403  # beside PATH is outside it


@pytest.mark.parametrize("real", [False, True])
def test_openslide_and_tiffslide_tiles_agree(outputs, shared_data_or_none, real):
    slide = outputs["slide"]
    if real:
        if shared_data_or_none is None:
            pytest.skip("real data not found")
        slide = shared_data_or_none / "wsi" / "CMU-1-Small-Region.svs"
    tiles = {}
    for backend in ("openslide", "tiffslide"):
        c = TestClient(build_app(slide, backend=backend), base_url="http://127.0.0.1")
        item = c.get(f"/api/item/{slide.name}").json()
        top = c.get(f"/dzi/{slide.name}.dzi").text
        assert f'Width="{item["width"]}"' in top
        level = max(0, int(np.ceil(np.log2(max(item["width"], item["height"])))) - 1)  # a 2x-down level
        got = [np.asarray(Image.open(io.BytesIO(c.get(f"/dzi/{slide.name}_files/{lv}/1_1.jpeg").content)), np.float32)
               for lv in (level, level + 1)]
        with c.app.state.viewer.slides.use(slide) as dz:
            assert dz.slide.backend == backend
        tiles[backend] = got
    for a, b in zip(tiles["openslide"], tiles["tiffslide"]):
        assert a.shape == b.shape and np.abs(a - b).mean() < 3


def test_recorded_slide_is_found_by_fingerprint(outputs, tmp_path, monkeypatch):
    # the marker's path is relative to where heatmap ran; from elsewhere it is found beside the folder
    marker = json.loads((outputs["out"] / ".slidekit.json").read_text())
    moved = tmp_path / "OUT"
    moved.mkdir()
    (moved / ".slidekit.json").write_text(json.dumps({**marker, "slide": "s.tif"}))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.tif").write_bytes(b"another file with the same name")
    r = TestClient(build_app(moved), base_url="http://127.0.0.1").get("/api/item/OUT")
    assert r.status_code == 422 and "records slide s.tif, which is not found" in r.json()["error"]
    (tmp_path / "s.tif").unlink()
    (tmp_path / "s.tif").symlink_to(outputs["slide"])
    item = TestClient(build_app(moved), base_url="http://127.0.0.1").get("/api/item/OUT").json()
    assert item["width"] == W


def test_a_folder_with_only_a_heatmap_store_and_slide_given(outputs, tmp_path):
    """mil-attention writes attention.zarr, attention.png and tiles.geojson and no marker: the store
    names its slide (file name, fingerprint); --slide gives it where that is not enough."""
    from slidekit.infer.heatmap import HeatmapWriter
    from slidekit.regions.tiling import TileGrid

    with open_slide(outputs["slide"]) as s:
        grid = TileGrid.from_slide(s, mpp=2.0, size=64, min_tissue=0)
    att = outputs["root"] / "ATT"
    w = HeatmapWriter(att / "attention.zarr", grid, "classification", ["attention"])
    w.add(np.arange(len(grid)), np.linspace(0, 1, len(grid), dtype=np.float32)[:, None])
    w.finish()
    item = TestClient(build_app(att), base_url="http://127.0.0.1").get("/api/item/ATT").json()
    assert item["heatmap"] == "attention.zarr" and item["slide_name"] == "s.tif" and item["width"] == W
    assert item["overlay_meta"]["legend"]["label"] == "attention"
    # moved away from its slide: the page says so and names --slide; --slide shows it
    moved = tmp_path / "ATT"
    import shutil
    shutil.copytree(att, moved)
    r = TestClient(build_app(moved), base_url="http://127.0.0.1").get("/api/item/ATT")
    assert r.status_code == 422 and "give it with --slide" in r.json()["error"]
    c = TestClient(build_app(moved, slide=outputs["slide"]), base_url="http://127.0.0.1")
    assert c.get("/api/item/ATT").json()["width"] == W
    with pytest.warns(UserWarning, match="not the slide"):
        TestClient(build_app(moved, slide=outputs["root"] / "b.tif"), base_url="http://127.0.0.1").get("/api/item/ATT")
    with pytest.raises(ConfigError, match="--slide is for one slide's output folder"):
        build_app(outputs["cohort"], slide=outputs["slide"])


def test_slide_lru_closes_the_least_recent_after_its_last_reader(outputs):
    a, b = outputs["slide"], outputs["root"] / "b.tif"
    cache = SlideCache(size=1)
    with cache.use(a) as dza:
        with cache.use(b):
            assert len(cache) == 1 and dza.slide._handle is not None  # evicted but still being read
        dza.tile_jpeg(11, 0, 0)
    assert dza.slide._handle is None  # closed once its reader finished
    with cache.use(a), cache.use(a):
        pass
    assert cache.opened == 3  # a, b, a again; the second use of a reused it
    cache.close()


def test_deepzoom_levels():
    class Fake:
        dimensions = (1000, 300)
        level_downsamples = (1.0,)
        backend = "openslide"

    dz = DeepZoom(Fake())
    assert dz.max_level == 10 and dz.level_size(10) == (1000, 300) and dz.level_size(0) == (1, 1)
    assert dz.level_size(9) == (500, 150) and dz.tile_count(10) == (4, 2)
    assert dz.tile_box(10, 1, 1) == (253, 253, 509, 300)
    with pytest.raises(IndexError):
        dz.tile_box(10, 4, 0)


def _run(*args: str):
    return CliRunner().invoke(main, ["view", *args], catch_exceptions=False)


def test_cli_bad_input_is_one_line(outputs, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.tif").write_bytes(b"junk")
    for path, words in [(tmp_path / "missing", "not found"), (tmp_path / "empty", "neither a slide nor"),
                        (tmp_path / "junk.tif", "junk.tif")]:
        r = _run(str(path), "--port", "0")
        assert r.exit_code != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("slidekit: error:") and words in lines[0], r.stderr


def test_cli_port_in_use_is_one_line(outputs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = _run(str(outputs["out"]), "--port", str(port))
    assert r.exit_code != 0
    assert r.stderr.strip() == f"slidekit: error: port {port} on 127.0.0.1 is in use (choose another with --port)"


def test_api_errors_are_typed(tmp_path):
    with pytest.raises(SlideError, match="not found"):
        build_app(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OutputError, match="neither a slide nor a slidekit output folder"):
        build_app(tmp_path / "empty")


def test_the_cli_does_not_load_the_server_at_start():
    code = ("import sys, slidekit.cli; "
            "print(sorted(m for m in ('starlette', 'uvicorn', 'slidekit.view') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_page_and_openseadragon_ship_with_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and "/static/openseadragon/openseadragon.min.js" in page.text
    assert "//cdn" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
    osd = client.get("/static/openseadragon/openseadragon.min.js")
    assert osd.status_code == 200 and "openseadragon 5.0.1" in osd.text[:200]
    assert client.get("/static/openseadragon/images/home_rest.png").status_code == 200
    lic = Path(__file__).resolve().parents[1] / "slidekit/view/static/openseadragon/LICENSE.txt"
    assert "Redistribution and use in source and binary forms" in lic.read_text()


def test_another_address_than_loopback_is_warned_about(outputs):
    from slidekit.base.errors import SlidekitWarning

    with pytest.warns(SlidekitWarning, match="anyone who can reach this machine can see these slides"):
        server, sock, address = make_server(outputs["out"], host="0.0.0.0", port=0)
    sock.close()
    assert address.startswith("http://0.0.0.0:")
    _, sock, address = make_server(outputs["out"], port=0)  # the default: loopback, no warning
    sock.close()
    assert address.startswith("http://127.0.0.1:") and sock.family == socket.AF_INET


def test_cli_serves_until_ctrl_c(outputs):
    import signal
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "slidekit", "view", str(outputs["out"]), "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline().strip()  # printed once the port is bound
        assert line.startswith("slidekit view: http://127.0.0.1:") and line.endswith("(Ctrl-C to stop)"), line
        url = line.split()[2]
        with urllib.request.urlopen(url + "api/info", timeout=30) as r:
            assert json.load(r)["mode"] == "output"
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(30) == 0 and "Traceback" not in rest and rest.strip() == "", rest
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_damaged_or_unfinished_heatmap_is_said_not_hidden(outputs, tmp_path):
    import shutil

    out = tmp_path / "OUT"
    shutil.copytree(outputs["out"], out, symlinks=True)
    (out / "heatmap.zarr" / "zarr.json").write_text("{ damaged")
    c = TestClient(build_app(out, slide=outputs["slide"]), base_url="http://127.0.0.1")
    item = c.get("/api/item/OUT").json()
    assert item["width"] == W and item["overlay"] is None  # the slide still shows
    assert len(item["notes"]) == 1
    assert item["notes"][0].startswith("no overlay: ") and "heatmap.zarr" in item["notes"][0]
    assert c.get("/overlay/OUT.png").status_code == 422
    shutil.rmtree(out / "heatmap.zarr")
    (out / "heatmap.zarr.part").mkdir()
    item = TestClient(build_app(out, slide=outputs["slide"]), base_url="http://127.0.0.1").get("/api/item/OUT").json()
    assert item["heatmap"] is None and item["notes"] == ["heatmap.zarr is unfinished (an interrupted run?); not shown"]


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_tiles_read_from_many_threads_are_the_serial_ones(outputs, backend):
    from concurrent.futures import ThreadPoolExecutor

    cache = SlideCache(opener=lambda p: open_slide(p, backend=backend))
    keys = [(lv, c, r) for lv in (10, 11) for c in range(3) for r in range(3)] + [(7, 0, 0), (9, 1, 1)]
    with cache.use(outputs["slide"]) as dz:
        serial = {k: dz.tile_rgb(*k) for k in keys}
        with ThreadPoolExecutor(8) as pool:
            parallel = dict(zip(keys * 3, pool.map(lambda k: dz.tile_rgb(*k), keys * 3)))
    cache.close()
    for k in keys:
        np.testing.assert_array_equal(parallel[k], serial[k])
