"""The cohort ledger: ``OUT/cohort.jsonl``, one JSON record per slide and attempt event.

Every worker appends its own records (``running`` when it starts a slide, then ``done``,
``failed``, ``skipped``, or ``interrupted`` when the run was stopped by SIGINT/SIGTERM while the
slide ran: its unfinished outputs stay resumable and a rerun takes the slide again) with a single
``write`` on a file opened ``O_APPEND``: on a local disk and on the parallel filesystems clusters
use, a record lands whole or not at all, and no writer rewrites what another wrote, so a crashed
driver or worker cannot corrupt earlier records. A torn last line (a writer killed in the middle of
its write) is skipped with a warning when read, and the next writer starts on a fresh line. The
ledger is a log: the state of a slide is its last record; ``attempts`` counts its ``running``
records over every run into the same OUT.
"""
from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from slidekit.base.errors import OutputError, SlidekitWarning

LEDGER_NAME = "cohort.jsonl"
INTERRUPTED = "interrupted"
FINAL = ("done", "failed", "skipped", INTERRUPTED)


class Ledger:
    """Append-only JSON-lines log of slide attempts in ``OUT/cohort.jsonl``."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.path = Path(out) / LEDGER_NAME

    def append(self, **record: Any) -> dict:
        """Add one record (time, host and pid are filled in); returns it."""
        rec = {"time": round(time.time(), 3), "host": socket.gethostname(), "pid": os.getpid(), **record}
        line = (json.dumps(rec, default=str, ensure_ascii=False) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if _ends_torn(fd):
                line = b"\n" + line
            os.write(fd, line)
        finally:
            os.close(fd)
        return rec

    def records(self, only: str | None = None) -> list[dict]:
        """Every whole record, in order; torn or foreign lines are skipped with a warning.
        ``only``: just the records of that slide id (lines of other slides are not parsed)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except IsADirectoryError:
            raise OutputError("is a directory, not a cohort ledger; move it away to run a cohort into this "
                              "folder", self.path) from None
        # Records are written by json.dumps with its default separators, so a slide's lines hold this.
        needle = json.dumps({"id": only}, ensure_ascii=False)[1:-1].encode() if only is not None else b""
        out, bad = [], 0
        for raw in data.splitlines():
            if not raw.strip() or needle not in raw:
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                bad += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("id"), str) and isinstance(rec.get("status"), str) \
                    and isinstance(rec.get("figures", {}), dict):
                if only is None or rec["id"] == only:
                    out.append(rec)
            else:
                bad += 1
        if bad:
            warnings.warn(f"{self.path}: skipped {bad} unreadable or malformed line(s) (a writer was "
                          "interrupted, or the file was edited); those slides are retaken",
                          SlidekitWarning, stacklevel=2)
        return out

    def state(self, only: str | None = None) -> dict[str, dict]:
        """Per slide id: its last record, with ``attempts`` (running records over all runs).
        ``only``: the state of that slide alone (what a worker reads for each slide it takes)."""
        latest: dict[str, dict] = {}
        attempts: dict[str, int] = {}
        for rec in self.records(only):
            if rec["status"] == "running":
                attempts[rec["id"]] = attempts.get(rec["id"], 0) + 1
            latest[rec["id"]] = rec
        return {k: {**v, "attempts": attempts.get(k, 0)} for k, v in latest.items()}


def _ends_torn(fd: int) -> bool:
    """Whether the file's last byte is not a newline (a record cut short by a crash)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return False
    return os.pread(fd, 1, size - 1) != b"\n"
