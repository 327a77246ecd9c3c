"""`slidekit view` in a real headless browser: Debian's Chromium (/usr/bin/chromium) driven by
Playwright's Python package (never `playwright install`: no browser download). Skipped, with the
reason, where either is missing; `.ci/run` installs Chromium where apt-get can.

Checks: the page loads without script errors, tile requests reach the server (its counter and the
browser's network events), the heatmap overlay's opacity follows the slider and the checkbox (and
the rendered pixels change with it), GeoJSON objects load, the screenshot is not blank, and a
cohort's table links through to a slide.
"""
from __future__ import annotations

import io
import json
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"no system Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does where it can)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python package) is not installed "
                               "(pip install -e .[dev])")
pytest.importorskip("starlette", reason="starlette is not installed")

import test_view  # noqa: E402

outputs = test_view.outputs  # the fixture of the module-scoped slide, heatmap OUT and cohort OUT

from slidekit.view import make_server  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]


class Live:
    """A viewer server on a free port in a thread."""

    def __init__(self, path: Path) -> None:
        self.server, self.sock, self.url = make_server(path, port=0)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            self.thread.join(0.05)

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "api/stats", timeout=10) as r:
            return json.load(r)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        except Exception as e:  # a Chromium that cannot start here (missing libraries, ...)
            pytest.skip(f"{CHROMIUM} does not start under Playwright: {str(e).splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1000, "height": 700})
    pg = ctx.new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.tile_responses = []
    pg.on("response", lambda r: pg.tile_responses.append(r.status) if "_files/" in r.url else None)
    pg.on("response", lambda r: pg.errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    yield pg
    ctx.close()


def _pixels(page, selector: str = "#osd") -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.locator(selector).screenshot())).convert("RGB"), np.float32)


def _opacity(page) -> float:
    return page.evaluate("window.slidekitView.overlay.getOpacity()")


def test_slide_page_tiles_overlay_objects_and_screenshot(outputs, page):
    live = Live(outputs["out"])
    try:
        page.goto(live.url)
        page.wait_for_function("window.slidekitView && window.slidekitView.ready && "
                               "window.slidekitView.tilesLoaded > 0", timeout=30000)
        page.wait_for_function("window.slidekitView.viewer.world.getItemAt(0).getFullyLoaded()", timeout=30000)
        assert page.locator("#slide-name").inner_text() == "s.tif"
        # tiles arrived: the server counted them, the browser saw them answered
        served = live.stats()["tiles"]
        assert served > 0 and page.tile_responses and set(page.tile_responses) == {200}
        assert served >= len(page.tile_responses) * 0.5  # (the browser may cache a few)
        # the overlay: opacity follows the slider, the checkbox hides it, and the pixels change
        assert page.evaluate("window.slidekitView.viewer.world.getItemCount()") == 2
        assert _opacity(page) == pytest.approx(0.5)
        page.locator("#opacity").fill("1")
        assert _opacity(page) == pytest.approx(1.0)
        page.wait_for_timeout(500)
        shown = _pixels(page)
        page.locator("#overlay-on").uncheck()
        assert _opacity(page) == 0
        page.wait_for_timeout(500)
        hidden = _pixels(page)
        assert np.abs(shown - hidden).mean() > 0.5, "hiding the heatmap changed nothing on screen"
        page.locator("#overlay-on").check()
        assert _opacity(page) == pytest.approx(1.0)
        # the legend shows the colour bar
        assert page.locator("#legend .ramp").count() == 1
        # GeoJSON objects: the gzipped cells load and are drawn
        page.locator('input[data-name="cells.geojson.gz"]').check()
        page.wait_for_function("(window.slidekitView.layers['cells.geojson.gz'] || {shapes: []}).shapes.length == 5",
                               timeout=15000)
        # not blank: the screenshot varies (slide, tissue, heatmap)
        full = _pixels(page, "body")
        assert full.std() > 10, f"blank screenshot (std {full.std():.1f})"
        assert not page.errors, page.errors
    finally:
        live.stop()


def test_cohort_table_links_to_a_slide(outputs, page):
    live = Live(outputs["cohort"])
    try:
        page.goto(live.url)
        page.wait_for_function("window.slidekitView && window.slidekitView.ready", timeout=30000)
        rows = page.locator("#table tbody tr")
        assert rows.count() == 3
        assert page.locator("#table tr.failed td.status").inner_text() == "failed"
        page.wait_for_function("[...document.querySelectorAll('#table img')].every(i => i.complete && "
                               "i.naturalWidth > 0)", timeout=30000)
        assert page.locator("#table img").count() == 2  # the failed slide has no thumbnail
        page.locator("#table a", has_text="b").click()
        page.wait_for_function("window.slidekitView.ready && window.slidekitView.tilesLoaded > 0", timeout=30000)
        assert page.url.endswith("#/item/COH/b") and page.locator("#slide-name").inner_text() == "b.tif"
        assert not page.locator("#back").is_hidden()
        page.locator("#back a").click()
        page.wait_for_function("window.slidekitView.ready && !document.getElementById('cohort').hidden")
        assert not page.errors, page.errors
    finally:
        live.stop()
