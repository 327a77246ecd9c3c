"""What slide QC adds to the rest of the pipeline: the per-tile artefact fractions behind
``--exclude-qc`` (``TileQc.filter`` on the grid of a 40,960² slide) and the cohort's ``qc.csv``
(``write_qc_table`` over a manifest of N slides: the first write reads every ``qc.json``, later ones
while slides finish reuse the rows of unchanged files).

    python benchmarks/qc_pipeline.py [--json benchmarks/qc_pipeline.json] [--slides 2000]

Synthetic inputs (no slide is read): a QC label map of a 40,960² px slide at 0.5 µm/px (2,560² label
pixels at 8 µm/px) with blobs of every artefact class, its 256 px grid at 0.5 µm/px (25,600 tiles); N
slide folders with a ``qc.json`` each and a ledger recording them done.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slidekit.base.io import write_text_atomic  # noqa: E402
from slidekit.base.resources import peak_rss_mb  # noqa: E402
from slidekit.cohort.ledger import Ledger  # noqa: E402
from slidekit.cohort.manifest import CohortSlide  # noqa: E402
from slidekit.cohort.qc_table import write_qc_table  # noqa: E402
from slidekit.regions.qc import ARTEFACTS, LABELS  # noqa: E402
from slidekit.regions.qc_tiles import qc_max_of, tile_fractions  # noqa: E402
from slidekit.regions.tiling import TileGrid  # noqa: E402


def fractions_figures() -> dict:
    rng = np.random.default_rng(0)
    side, slide_mpp, label_mpp = 40_960, 0.5, 8.0
    n = int(side * slide_mpp / label_mpp)
    labels = np.full((n, n), LABELS["Tissue"], np.uint8)
    for name in ARTEFACTS:
        for _ in range(40):
            cv2.circle(labels, (int(rng.integers(0, n)), int(rng.integers(0, n))), int(rng.integers(5, 60)),
                       LABELS[name], -1)
    xs = np.arange(0, side, 256)
    coords = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2)
    grid = TileGrid(coords, slide_mpp, 256, 0, (side, side), (slide_mpp, slide_mpp))
    t0 = time.perf_counter()
    frac = tile_fractions(labels, label_mpp, (slide_mpp, slide_mpp), grid)
    seconds = time.perf_counter() - t0
    limits = np.array([qc_max_of(0.5)[c] for c in ARTEFACTS])
    return {"tiles": len(grid), "label_pixels": int(labels.size), "fractions_seconds": round(seconds, 3),
            "tiles_over_0.5": int((frac > limits).any(axis=1).sum())}


def table_figures(slides: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        everyone, ledger = [], Ledger(out)
        report = {"verdict": "pass", "reasons": [], "tissue_area_um2": 1e7, "not_measured": [],
                  "classes": {c: {"fraction_of_tissue": 0.01, "area_um2": 1e5} for c in ARTEFACTS}}
        for i in range(slides):
            sid = f"s{i:05d}"
            write_text_atomic(out / sid / "qc.json", json.dumps(report))
            everyone.append(CohortSlide(id=sid, slide=Path(f"{sid}.svs")))
            ledger.append(id=sid, status="done", config="K", figures={})
        t0 = time.perf_counter()
        write_qc_table(out, everyone, "K")
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_qc_table(out, everyone, "K")
        again = time.perf_counter() - t0
        rows = (out / "qc.csv").read_text().count("\n") - 1
    return {"slides": slides, "rows": rows, "first_write_seconds": round(first, 3),
            "rewrite_seconds": round(again, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(Path(__file__).with_suffix(".json")))
    ap.add_argument("--slides", type=int, default=2000)
    a = ap.parse_args()
    result = {"tile_fractions": fractions_figures(), "qc_csv": table_figures(a.slides),
              "peak_rss_mb": round(peak_rss_mb(), 1)}
    print(json.dumps(result, indent=2))
    Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
