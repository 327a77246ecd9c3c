"""`slidekit view` tile serving: latency and throughput of DeepZoom tiles from a live server.

    python benchmarks/view_tiles.py [SLIDE] [--json OUT] [--size 16384] [--clients 4] [--tiles 400]

Starts the viewer (uvicorn, in a thread) on SLIDE, then --clients concurrent HTTP clients ask for
tiles as a browser does: ``first_view`` (every tile of the deepest level that fits a 1600 x 1000
screen: the first page load, overview cache cold), ``deep_cold`` (--tiles random level-0 tiles, each
once) and ``deep_warm`` (the same tiles again; the server keeps no tile cache, so this is the
re-read cost with the slide's handle and its decoder caches warm). Per phase: client-side latency
p50/p95/max in ms and tiles/s; the server's own mean per tile, read to JPEG (``server_ms_mean``).

Without SLIDE it builds a pyramidal TIFF (256² JPEG tiles, MPP 0.5, 2x levels) of --size² px
from the scikit-image IHC image. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def build_slide(path: Path, size: int) -> Path:
    from skimage import data

    from slidekit.slides.demo import write_pyramid

    ihc = data.immunohistochemistry()
    reps = -(-size // ihc.shape[0])
    return write_pyramid(path, np.ascontiguousarray(np.tile(ihc, (reps, reps, 1))[:size, :size]), 0.5,
                         tile=256, quality=85)


def fetch_all(port: int, urls: list[str], clients: int) -> dict:
    """Fetch ``urls`` with ``clients`` keep-alive connections; latency figures in ms."""
    local = threading.local()

    def one(url: str) -> float:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        t = time.perf_counter()
        local.conn.request("GET", url)
        r = local.conn.getresponse()
        body = r.read()
        if r.status != 200 or body[:2] != b"\xff\xd8":
            raise RuntimeError(f"{url}: HTTP {r.status}")
        return (time.perf_counter() - t) * 1000

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        ms = np.array(list(pool.map(one, urls)))
    wall = time.perf_counter() - t0
    return {"tiles": len(urls), "p50_ms": round(float(np.median(ms)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2), "max_ms": round(float(ms.max()), 2),
            "tiles_per_s": round(len(urls) / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("slide", nargs="?", help="a slide (default: a synthetic pyramid of --size² px)")
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--tiles", type=int, default=400)
    ap.add_argument("--json", default=None, help="write the figures here (default: benchmarks/view_tiles.json)")
    args = ap.parse_args()

    from slidekit.view import make_server

    with tempfile.TemporaryDirectory() as tmp:
        slide = Path(args.slide) if args.slide else build_slide(Path(tmp) / "bench.tif", args.size)
        server, sock, _ = make_server(slide, port=0)
        port = sock.getsockname()[1]
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            thread.join(0.05)
        viewer = server.config.app.state.viewer  # the app's state: its slide cache and tile timings
        rel = slide.name
        with viewer.slides.use(viewer.index.slide_path(viewer.resolve(rel))) as dz:
            top, w, h = dz.max_level, dz.width, dz.height
            # the deepest level that fits the screen, and its tiles
            fit = max(lv for lv in range(top + 1) if dz.level_size(lv)[0] <= 1600 and dz.level_size(lv)[1] <= 1000)
            view = [(fit, c, r) for c in range(dz.tile_count(fit)[0]) for r in range(dz.tile_count(fit)[1])]
            cols, rows = dz.tile_count(top)
        rng = np.random.default_rng(0)
        n = min(args.tiles, cols * rows)
        deep = [(top, int(i % cols), int(i // cols)) for i in rng.choice(cols * rows, n, replace=False)]

        def urls(tiles):
            return [f"/dzi/{rel}_files/{lv}/{c}_{r}.jpeg" for lv, c, r in tiles]

        phases = {}
        for name, tiles in [("first_view", view), ("deep_cold", deep), ("deep_warm", deep)]:
            phases[name] = fetch_all(port, urls(tiles), args.clients)
            own = list(viewer.tile_ms)[-len(tiles):]  # the server's time per tile, this phase's requests
            phases[name]["server_ms_mean"] = round(float(np.mean(own)), 2)
        server.should_exit = True
        thread.join(10)
    result = {"slide": str(args.slide or f"synthetic {args.size}x{args.size} (IHC)"), "dimensions": [w, h],
              "deepzoom_levels": top + 1, "clients": args.clients, "phases": phases}
    print(f"{result['slide']}: {w} x {h} px, {top + 1} DeepZoom levels, {args.clients} clients")
    print(f"{'phase':<12}{'tiles':>7}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'tiles/s':>9}{'server ms':>11}")
    for name, p in phases.items():
        print(f"{name:<12}{p['tiles']:>7}{p['p50_ms']:>9}{p['p95_ms']:>9}{p['max_ms']:>9}{p['tiles_per_s']:>9}"
              f"{p['server_ms_mean']:>11}")
    out = Path(args.json) if args.json else Path(__file__).with_suffix(".json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
