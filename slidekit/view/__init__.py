"""The local web viewer, ``slidekit view PATH``: a slide with its heatmap overlay and GeoJSON
objects, or a cohort's table of slides, in the browser (OpenSeadragon, shipped in ``static/``).

Modules: ``paths`` (what PATH is; every requested path resolved and kept under PATH), ``tiles``
(DeepZoom tiles from ``Slide``, an LRU of open slides), ``overlay`` (the heatmap as a transparent
PNG with its legend, GeoJSON files), ``index`` (items and the cohort table), ``app`` (the Starlette
app, ``build_app``, and its uvicorn server, ``serve``).

Imports: every slidekit layer below it (``base``, ``slides``, ``infer``, ...), never the public API
or the CLI; starlette and uvicorn at module top, so nothing below imports this package and the CLI
imports it only inside ``slidekit view``.
"""
from slidekit.view.app import build_app, make_server, serve
from slidekit.view.paths import Refused, ServedRoot
from slidekit.view.tiles import DeepZoom, SlideCache

__all__ = ["build_app", "make_server", "serve", "ServedRoot", "Refused", "DeepZoom", "SlideCache"]
