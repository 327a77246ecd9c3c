"""The viewer's web app (Starlette) and its server (uvicorn): ``build_app(PATH)`` and ``serve``.

Routes (every ``{rel}`` is a request path under PATH, checked by ``ServedRoot.resolve``):

- ``/``: the page (``static/index.html``); ``/static/...``: its JS/CSS and OpenSeadragon
- ``/api/info``: the mode ("cohort", "output", "slide") and the first item
- ``/api/cohort``: the cohort table (cohort.csv rows, links, thumbnails)
- ``/api/item/{rel}``: one slide's page: its DZI, overlay, legend, GeoJSON files, figures
- ``/dzi/{rel}.dzi``, ``/dzi/{rel}_files/{level}/{col}_{row}.jpeg``: DeepZoom descriptor and tiles
- ``/overlay/{rel}.png``: the heatmap as a transparent PNG; ``/thumb/{rel}.jpg``: a thumbnail
- ``/geojson/{rel}``: a GeoJSON file under PATH (``.gz`` sent gzip-encoded: the browser inflates it)
- ``/spatialdata/{store}/{element}``: the tissues or tiles of a SpatialData store under PATH as GeoJSON
- ``/api/stats``: tiles served and their latency (for tests and benchmarks)

Security: the server binds 127.0.0.1 unless told otherwise, answers only to the Host names of
that address (a web page elsewhere cannot reach it through DNS rebinding), and sends files only
from under PATH: 403 for a path that resolves outside it, 404 for one that does not exist.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading
import time
import warnings
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, AsyncIterator, Callable, cast

import numpy as np
import simplejpeg
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from slidekit.base.errors import ConfigError, SlideError, SlidekitError, SlidekitWarning
from slidekit.infer.heatmap import Heatmap
from slidekit.slidelevel.spatialdata_read import is_spatialdata_path, shape_elements, shapes_geojson
from slidekit.slides.slide import open_slide
from slidekit.view.index import Index, public
from slidekit.view.overlay import GEOJSON_SUFFIXES, QC_LABELS, render_overlay, render_qc_overlay
from slidekit.view.paths import Refused, find_heatmap
from slidekit.view.tiles import SlideCache

STATIC = Path(__file__).resolve().parent / "static"
THUMB_SIZE = 192
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class _Lru(OrderedDict):
    """A small thread-safe LRU of computed answers (overlays, thumbnails)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.lock = size, threading.Lock()

    def get_or(self, key: Any, make: Callable[[], Any]) -> Any:
        with self.lock:
            if key in self:
                self.move_to_end(key)
                return self[key]
        value = make()
        with self.lock:
            self[key] = value
            while len(self) > self.size:
                self.popitem(last=False)
        return value


class Viewer:
    """The state behind the app: PATH's index, the open slides, rendered overlays, tile statistics."""

    def __init__(self, path: str | Path, open_slides: int = 8, backend: str | None = None,
                 slide: str | Path | None = None) -> None:
        self.index = Index(path, slide)
        self._open = lambda p: open_slide(p, backend=backend, require_mpp=False)
        self.slides = SlideCache(open_slides, opener=self._open)
        self.overlays = _Lru(8)
        self.thumbs = _Lru(1024)
        self.tiles_served = 0
        self.tile_ms: deque[float] = deque(maxlen=2000)
        self._stats_lock = threading.Lock()

    def resolve(self, rel: str) -> Path:
        return self.index.root.resolve(rel)

    def public_message(self, e: SlidekitError) -> str:
        """An error's one line as the browser gets it: the file it names as its request path under
        PATH (or only its name, for a file elsewhere), never the server's absolute paths."""
        msg, root = str(e), self.index.root
        if e.path is not None and msg.startswith(f"{e.path}: "):
            p = Path(e.path)
            try:
                shown = root.rel_unresolved(p) if Path(os.path.abspath(p)).is_relative_to(root.path) else p.name
            except ValueError:
                shown = p.name
            msg = f"{shown}: {msg[len(str(e.path)) + 2:]}"
        for prefix in {str(root.path.parent), os.path.abspath(root.path.parent)}:
            if prefix not in ("/", ""):
                msg = msg.replace(prefix + os.sep, "")
        return msg

    def stats(self) -> dict:
        with self._stats_lock:
            ms = np.array(self.tile_ms, np.float64)
            n = self.tiles_served
        figures: dict[str, float] = {"tiles": n, "open_slides": len(self.slides), "slides_opened": self.slides.opened}
        if ms.size:
            figures.update(tile_ms_mean=round(float(ms.mean()), 2), tile_ms_p50=round(float(np.median(ms)), 2),
                           tile_ms_p95=round(float(np.percentile(ms, 95)), 2))
        return figures

    def tile(self, rel: str, level: int, col: int, row: int) -> bytes:
        t0 = time.perf_counter()
        slide = self.index.slide_path(self.resolve(rel))
        with self.slides.use(slide) as dz:
            data = dz.tile_jpeg(level, col, row)
        with self._stats_lock:
            self.tiles_served += 1
            self.tile_ms.append((time.perf_counter() - t0) * 1000)
        return data

    def dzi(self, rel: str) -> str:
        with self.slides.use(self.index.slide_path(self.resolve(rel))) as dz:
            return dz.dzi_xml()

    def item(self, rel: str) -> dict:
        target = self.resolve(rel)
        item = public(self.index.item(target))
        with self.slides.use(self.index.slide_path(target)) as dz:
            slide = dz.slide
            item.update(width=dz.width, height=dz.height, mpp=None if slide.mpp is None else list(slide.mpp))
        if item["heatmap"] or item.get("qc"):
            try:
                item["overlay_meta"] = self._overlay(target)[1]
            except SlidekitError as e:  # a damaged store: show the slide and say why there is no overlay
                item.update(overlay=None, notes=[*item["notes"], f"no overlay: {self.public_message(e)}"])
        return item

    def _overlay(self, target: Path) -> tuple[bytes, dict]:
        store = find_heatmap(target)
        if store is None and self.index.item(target).get("qc"):  # a QC folder: its artefact classes
            labels = target / QC_LABELS
            with self.slides.use(self.index.slide_path(target)) as dz:
                if not dz.slide.mpp:
                    raise SlideError("has no pixel size: its QC label map cannot be placed", dz.slide.path)
                slide_mpp = (float(dz.slide.mpp[0]), float(dz.slide.mpp[1]))
            key = (labels, labels.stat().st_mtime_ns)
            return self.overlays.get_or(key, lambda: render_qc_overlay(labels, slide_mpp))
        if store is None:
            raise Refused(404, "no heatmap here")
        name = self.index.item(target)["slide_name"]
        key = (store, store.stat().st_mtime_ns)
        return self.overlays.get_or(key, lambda: render_overlay(Heatmap(store), name))

    def overlay_png(self, rel: str) -> bytes:
        return self._overlay(self.resolve(rel))[0]

    def thumbnail(self, rel: str) -> bytes:
        slide = self.index.slide_path(self.resolve(rel))

        def make() -> bytes:
            # opened on its own, not through the LRU: a cohort table's hundred thumbnails would
            # otherwise push out the slides being viewed
            with self._open(slide) as s:
                rgb = s.thumbnail(THUMB_SIZE, progress=False)
            return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=80, colorspace="RGB")

        return self.thumbs.get_or(slide, make)

    def store_shapes(self, rel: str) -> bytes:
        """``STORE/ELEMENT``: a SpatialData store's tissues or tiles under PATH as GeoJSON."""
        store_rel, _, element = rel.rpartition("/")
        store = self.resolve(store_rel)
        if not is_spatialdata_path(store) or element not in shape_elements(store):
            raise Refused(404, "not the tissues or tiles of a SpatialData store")
        return shapes_geojson(store, element)

    def geojson(self, rel: str) -> Path:
        target = self.resolve(rel)
        if not (target.is_file() and target.name.endswith(GEOJSON_SUFFIXES)):
            raise Refused(404, "not a GeoJSON file")
        return target


def _answer(func: Callable[..., Response]) -> Callable[[Request], Response]:
    """A route: ``func(viewer, **path_params)``; refusals and slidekit errors as short HTTP answers."""

    def endpoint(request: Request) -> Response:
        viewer: Viewer = request.app.state.viewer
        try:
            return func(viewer, **request.path_params)
        except Refused as e:
            return PlainTextResponse(str(e), status_code=e.status, headers=HEADERS)
        except IndexError as e:  # a tile the pyramid does not have
            return PlainTextResponse(str(e), status_code=404, headers=HEADERS)
        except SlidekitError as e:  # the one line, without the server's absolute paths
            return JSONResponse({"error": viewer.public_message(e)}, status_code=422, headers=HEADERS)

    endpoint.__name__ = func.__name__
    return endpoint


def _bytes(data: bytes, media: str, cache: bool = True) -> Response:
    headers = {**HEADERS, "Cache-Control": "private, max-age=600" if cache else "no-store"}
    return Response(data, media_type=media, headers=headers)


def _index(v: Viewer) -> Response:
    return FileResponse(STATIC / "index.html", headers={**HEADERS, "Cache-Control": "no-store"})


def _geojson(v: Viewer, rel: str) -> Response:
    path = v.geojson(rel)
    headers = {**HEADERS, "Cache-Control": "no-store"}
    if path.name.endswith(".gz"):
        headers["Content-Encoding"] = "gzip"  # the browser (and httpx) inflate it; no copy in memory here
    return FileResponse(path, media_type="application/geo+json", headers=headers)


ROUTES = [
    Route("/", _answer(_index)),
    Route("/api/info", _answer(lambda v: JSONResponse(v.index.info(), headers=HEADERS))),
    Route("/api/stats", _answer(lambda v: JSONResponse(v.stats(), headers=HEADERS))),
    Route("/api/cohort", _answer(lambda v: JSONResponse(v.index.cohort(), headers=HEADERS))),
    Route("/api/item/{rel:path}", _answer(lambda v, rel: JSONResponse(v.item(rel), headers=HEADERS))),
    Route("/dzi/{rel:path}.dzi", _answer(lambda v, rel: _bytes(v.dzi(rel).encode(), "application/xml"))),
    Route("/dzi/{rel:path}_files/{level:int}/{col:int}_{row:int}.jpeg",
          _answer(lambda v, rel, level, col, row: _bytes(v.tile(rel, level, col, row), "image/jpeg"))),
    Route("/overlay/{rel:path}.png", _answer(lambda v, rel: _bytes(v.overlay_png(rel), "image/png", cache=False))),
    Route("/thumb/{rel:path}.jpg", _answer(lambda v, rel: _bytes(v.thumbnail(rel), "image/jpeg"))),
    Route("/geojson/{rel:path}", _answer(_geojson)),
    Route("/spatialdata/{rel:path}", _answer(lambda v, rel: _bytes(v.store_shapes(rel), "application/geo+json",
                                                                   cache=False))),
]


def build_app(path: str | Path, allowed_hosts: list[str] | None = None, open_slides: int = 8,
              backend: str | None = None, slide: str | Path | None = None) -> Starlette:
    """The viewer app for PATH (a slide, a per-slide output folder or a cohort OUT folder).

    Raises SlideError / OutputError (one line) when PATH is none of these. ``allowed_hosts``: the
    Host names it answers to (default: the loopback names); ``open_slides``: the LRU's size;
    ``backend``: the slide reader of tiles ("openslide", "tiffslide", "image"; default: automatic);
    ``slide``: the slide of a per-slide output folder that does not record where it is.
    """
    viewer = Viewer(path, open_slides=open_slides, backend=backend, slide=slide)
    hosts = list(allowed_hosts) if allowed_hosts is not None else list(LOOPBACK_HOSTS)
    routes = [*ROUTES, Mount("/static", app=StaticFiles(directory=STATIC), name="static")]
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        viewer.slides.close()  # the server stopped: no request reads a slide any more

    app = Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)],
                    lifespan=lifespan)
    app.state.viewer = viewer
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); ConfigError (one line) when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        why = "is in use (choose another with --port)" if e.errno in (98, 48) else f"cannot be bound ({e.strerror})"
        raise ConfigError(f"port {port} on {host} {why}") from None
    sock.listen(128)
    return sock


def make_server(path: str | Path, host: str = "127.0.0.1", port: int = 8000, open_slides: int = 8,
                backend: str | None = None,
                slide: str | Path | None = None) -> tuple[uvicorn.Server, socket.socket, str]:
    """(server, bound socket, URL) for PATH, not started: ``server.run(sockets=[sock])`` serves until
    ``server.should_exit`` (tests run it in a thread). A host other than loopback is warned about."""
    if _is_loopback(host):
        hosts = LOOPBACK_HOSTS
    else:
        warnings.warn(SlidekitWarning(f"serving on {host}: anyone who can reach this machine can see these slides"),
                      stacklevel=2)
        hosts = ["*"]
    app = build_app(path, allowed_hosts=hosts, open_slides=open_slides, backend=backend, slide=slide)
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    # lifespan off: serve() closes the slides itself, and uvicorn's lifespan task, still waiting when
    # Ctrl-C ends the loop, would log a traceback for a normal stop
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    return uvicorn.Server(config), sock, f"http://{shown}:{bound}/"


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, open_slides: int = 8,
          backend: str | None = None, slide: str | Path | None = None,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Serve the viewer of PATH until Ctrl-C (``build_app``'s options); ``on_ready(url)`` is called
    once the port is bound."""
    server, sock, address = make_server(path, host, port, open_slides, backend, slide)
    if on_ready is not None:
        on_ready(address)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn stops gracefully, then passes Ctrl-C on: the normal end here
        pass
    finally:
        sock.close()
        cast(Starlette, server.config.app).state.viewer.slides.close()  # make_server's app is build_app's
