"""The cohort table: ``OUT/cohort.csv``, one row per slide of the whole manifest, and the run's
one-line summary. Rows come from this run's results and, for slides another shard or run handled,
from the ledger; each row is joined with the manifest's extra columns."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Sequence

from slidekit.base.io import write_text_atomic
from slidekit.cohort.ledger import FINAL, INTERRUPTED, Ledger
from slidekit.cohort.manifest import CohortSlide

FIRST_COLUMNS = ["id", "slide", "status", "error", "seconds", "attempts", "worker", "note"]
CSV_NAME = "cohort.csv"


class CohortTable(list):
    """This run's rows (a list of dicts) with the run's figures: ``counts``, ``wall_seconds``, ``csv``."""

    counts: dict[str, int]
    wall_seconds: float
    csv: Path

    @property
    def failed(self) -> int:
        return self.counts.get("failed", 0)

    def summary(self) -> str:
        """'12 slides: 11 done, 1 failed, 0 skipped in 3 min 2 s (217 slides/h) -> OUT/cohort.csv'."""
        c = self.counts
        worked = c.get("done", 0) + c.get("failed", 0) - c.get("failed_earlier", 0)
        rate = worked / self.wall_seconds * 3600 if self.wall_seconds > 0 else 0.0
        notes = [f"{c[k]} {k.replace('_', ' ')}" for k in ("done_earlier", "interrupted", "not_started") if c.get(k)]
        earlier = f" ({', '.join(notes)})" if notes else ""
        m, s = divmod(round(self.wall_seconds), 60)
        wall = f"{m} min {s} s" if m else f"{self.wall_seconds:.1f} s"
        return (f"{len(self)} slides: {c.get('done', 0)} done, {c.get('failed', 0)} failed, "
                f"{c.get('skipped', 0)} skipped{earlier} in {wall} ({rate:.0f} slides/h) -> {self.csv}")


def row_from_ledger(s: CohortSlide, rec: dict | None, key: str) -> dict:
    """A slide's table row from its last ledger record (None: never processed)."""
    if rec is None:
        return {"id": s.id, "slide": str(s.slide), "status": "skipped", "error": "", "note": "not processed yet"}
    status = rec["status"]
    row = {"id": s.id, "slide": str(s.slide), "error": rec.get("error", ""), "seconds": rec.get("seconds"),
           "attempts": rec.get("attempts"), "worker": f"{rec.get('host')}:{rec.get('pid')}",
           **(rec.get("figures") or {})}
    if status == "running":
        return {**row, "status": "skipped", "error": "", "note": f"in progress or interrupted ({row['worker']})"}
    if status == INTERRUPTED:
        return {**row, "status": "skipped", "error": "",
                "note": f"interrupted ({row['worker']}, the run was stopped); a rerun resumes it"}
    if rec.get("config") != key:
        return {**row, "status": "skipped", "error": "", "note": f"last {status} with another configuration"}
    return {**row, "status": status}


def finish_table(out: str | os.PathLike, everyone: Sequence[CohortSlide], rows: list[dict], key: str,
                 wall: float, started: float | None = None) -> CohortTable:
    """Write ``OUT/cohort.csv`` (whole manifest) atomically and return this run's table. ``started``:
    when this run began; a slide it found held by another runner and that runner finished since
    shows its final record from the ledger."""
    out = Path(out)
    state = Ledger(out).state()
    mine = {r["id"]: r for r in rows}
    table_rows, result = [], CohortTable()
    for s in everyone:
        row = dict(mine[s.id]) if s.id in mine else row_from_ledger(s, state.get(s.id), key)
        if s.id in mine and str(row.get("note", "")).startswith("being processed") \
                and state.get(s.id, {}).get("status") in FINAL and started is not None \
                and float(state[s.id].get("time", 0)) >= started:
            # Another runner held the slide when we looked and has finished it since: the file shows
            # the ledger's final state (this run's own result still says it skipped the slide).
            row = {**row_from_ledger(s, state[s.id], key), "note": "done by another runner"
                   if state[s.id]["status"] == "done" else "handled by another runner"}
        if row.get("attempts") is None:
            row["attempts"] = state.get(s.id, {}).get("attempts", 0)
        if row.get("seconds") in (None, "") and row.get("note") == "done earlier" \
                and state.get(s.id, {}).get("status") == "done":
            row["seconds"] = state[s.id].get("seconds")  # the slide's own time, from its done record
        row = {**row, **{k: v for k, v in s.extra.items() if k not in row}}
        if s.id in mine:
            result.append(dict(row))  # what this run did (a slide done earlier: skipped)
        if row.get("status") == "skipped" and row.get("note") == "done earlier":
            row["status"] = "done"  # the file shows each slide's state; `note` says it was not redone
        table_rows.append(row)
    columns = list(FIRST_COLUMNS)
    for r in table_rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(table_rows)
    path = write_text_atomic(out / CSV_NAME, buf.getvalue())
    result.counts = {}
    for r in result:
        result.counts[r["status"]] = result.counts.get(r["status"], 0) + 1
        for tag in ("failed earlier", "done earlier", "interrupted", "not started"):
            if str(r.get("note", "")).startswith(tag):
                name = tag.replace(" ", "_")
                result.counts[name] = result.counts.get(name, 0) + 1
    result.wall_seconds, result.csv = wall, path
    return result


_row_from_ledger = row_from_ledger  # the earlier private name
