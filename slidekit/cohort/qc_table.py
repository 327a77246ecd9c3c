"""``OUT/qc.csv`` of a QC cohort: one row per slide of the manifest with its verdict, reasons, tissue area
and per artefact class its fraction of the tissue and its area in µm² (from the slide's ``qc.json``).

The table is rebuilt from the ledger and the slides' folders as slides finish (at most every 2 s while
they do, and at the start and end of the run; each ``qc.json`` is read once while unchanged), and written
atomically: a slide counts when its last ledger record is ``done`` with this run's configuration, so a
rerun that redoes some slides (other options, a damaged folder, ``--retry-failed``) shows each slide's
current result, and a slide not done (failed, running, not started, last done with other options) has
its status and an empty verdict.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Sequence

from slidekit.base.io import write_text_atomic
from slidekit.cohort.ledger import Ledger
from slidekit.cohort.manifest import CohortSlide
from slidekit.regions.qc import ARTEFACTS

QC_CSV = "qc.csv"


def qc_columns() -> list[str]:
    """The columns of ``qc.csv``."""
    per_class = [c for n in ARTEFACTS for c in (f"{n} fraction", f"{n} µm²")]
    return ["id", "slide", "status", "verdict", "reasons", "tissue µm²", *per_class, "not measured"]


_ROWS: dict[tuple[str, int, int], dict] = {}  # (qc.json, mtime, size) -> its columns: each file read once per run
_MAX_CACHED = 200_000


def qc_row(s: CohortSlide, folder: Path, status: str) -> dict:
    """A slide's row: from ``folder/qc.json`` when ``status`` is done, else the status alone."""
    row: dict = {"id": s.id, "slide": str(s.slide), "status": status}
    if status != "done":
        return row
    path = folder / "qc.json"
    try:
        st = path.stat()
        cache_key = (str(path), st.st_mtime_ns, st.st_size)
        if cache_key in _ROWS:
            return {**row, **_ROWS[cache_key]}
        report = json.loads(path.read_text())
        classes = report["classes"]
        row.update({"verdict": report["verdict"], "reasons": "; ".join(report["reasons"]),
                    "tissue µm²": round(float(report["tissue_area_um2"]), 1),
                    "not measured": "; ".join(report.get("not_measured") or [])})
        for n in ARTEFACTS:
            row[f"{n} fraction"] = round(float(classes[n]["fraction_of_tissue"]), 6)
            row[f"{n} µm²"] = round(float(classes[n]["area_um2"]), 1)
    except (OSError, ValueError, KeyError, TypeError):
        return {**row, "status": "qc.json unreadable"}
    if len(_ROWS) >= _MAX_CACHED:
        _ROWS.clear()
    _ROWS[cache_key] = {k: v for k, v in row.items() if k not in ("id", "slide", "status")}
    return row


def write_qc_table(out: str | os.PathLike, everyone: Sequence[CohortSlide], key: str) -> Path:
    """Write ``OUT/qc.csv`` (every slide of ``everyone``) from the ledger and the slides' ``qc.json``."""
    out = Path(out)
    state = Ledger(out).state()
    rows = []
    for s in everyone:
        rec = state.get(s.id)
        if rec is None:
            status = "not started"
        elif rec.get("config") != key and rec.get("status") != "running":
            status = f"last {rec.get('status')} with other options"
        else:
            status = str(rec.get("status"))
        rows.append(qc_row(s, out / s.id, status))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=qc_columns(), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return write_text_atomic(out / QC_CSV, buf.getvalue())
