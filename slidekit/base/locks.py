"""Per-output locks: one process at a time works on an output folder (a slide's results).

A lock is a small JSON file (host, pid, token, created) made with ``O_CREAT | O_EXCL``, which is
atomic on local disks and on NFS v3+ and Lustre, so any number of processes — Slurm shards, two
people starting the same run, several hosts on one shared filesystem — agree on who holds a slide.
While held, a daemon thread touches the file (its mtime is the heartbeat). A lock is stale when
its owner process is dead on this host, or when its heartbeat is older than ``stale_after``
seconds (an owner on another host cannot be asked directly); a stale lock is taken over.
Locks are re-entrant within a process, so a cohort worker can hold a slide's folder while the
single-slide job it calls takes the same lock again.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from slidekit.base.errors import LockedError

LOCK_NAME = ".slidekit.lock"
HEARTBEAT_SECONDS = 15.0
STALE_AFTER_SECONDS = 300.0

_held: dict[str, list] = {}  # "pid:resolved lock path" -> [count, token]
_held_guard = threading.Lock()
_beat_thread: threading.Thread | None = None


def pid_alive(pid: object) -> bool:
    """Whether a process of this id exists on this host (False for anything that is not a pid)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False  # kill(0 or -n, 0) would ask about a whole process group, not a process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(path: str | os.PathLike) -> dict | None:
    """The lock file's record (host, pid, token, created, heartbeat age), or None when absent."""
    path = Path(path)
    try:
        text = path.read_text()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise LockedError(f"{path.name} is a directory, not a lock file; remove it to process this slide",
                          path.parent) from None
    try:
        rec = json.loads(text)
    except ValueError:  # a half-written lock of a crashed creator: judged by its age alone
        rec = {}
    if not isinstance(rec, dict):  # valid JSON of another shape: not a lock record, judged by its age
        rec = {}
    rec["heartbeat_age"] = age
    return rec


def is_stale(rec: dict, stale_after: float = STALE_AFTER_SECONDS) -> bool:
    """Whether a lock record's owner is gone: dead pid on this host, or an old heartbeat."""
    pid = rec.get("pid")
    if isinstance(pid, int) and not isinstance(pid, bool) and pid <= 0:
        return True  # no process has such an id: a damaged or forged lock
    if rec.get("host") == socket.gethostname() and isinstance(pid, int):
        if rec["pid"] == os.getpid():
            return False
        return not pid_alive(rec["pid"])
    return rec.get("heartbeat_age", 0.0) > stale_after


def describe(rec: dict) -> str:
    """'host:pid (heartbeat 3 s ago)' for messages."""
    return f"{rec.get('host', '?')}:{rec.get('pid', '?')} (heartbeat {rec.get('heartbeat_age', 0):.0f} s ago)"


class OutputLock:
    """``with OutputLock(folder):`` — hold ``folder/.slidekit.lock`` or raise ``LockedError``.

    ``stale_after``: seconds without a heartbeat after which another host's lock is taken over;
    ``name``: another lock file name, for outputs that share a folder (e.g. one zarr store).
    """

    def __init__(self, folder: str | os.PathLike, stale_after: float = STALE_AFTER_SECONDS,
                 name: str = LOCK_NAME) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.stale_after = stale_after
        self.took_over: dict | None = None  # the stale record this lock replaced, if any

    def acquire(self) -> "OutputLock":
        key = self._key()
        with _held_guard:
            if key in _held:
                _held[key][0] += 1
                return self
        self.folder.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        for _ in range(5):
            if self._create(token):
                break
            rec = read_lock(self.path)
            if rec is None:
                continue  # released between our attempt and the read: try again
            if not is_stale(rec, self.stale_after):
                raise LockedError(f"in use by {describe(rec)}; another slidekit process is writing here",
                                  self.folder)
            if self._take_over(rec):
                self.took_over = rec
        else:
            raise LockedError("could not take the lock (contended); try again", self.folder)
        with _held_guard:
            _held[key] = [1, token]
        _start_heartbeat()
        return self

    def _key(self) -> str:
        # The pid keeps a forked child from believing it holds its parent's locks.
        return f"{os.getpid()}:{self.path.resolve()}"

    def _create(self, token: str) -> bool:
        rec = {"host": socket.gethostname(), "pid": os.getpid(), "token": token, "created": time.time()}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(rec))
        return True

    def _take_over(self, stale: dict) -> bool:
        """Move a stale lock aside (rename is atomic: of two contenders exactly one succeeds)."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = read_lock(aside) or {}
        if moved.get("token") != stale.get("token"):
            # We moved a fresh lock that replaced the stale one meanwhile: put it back.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        key = self._key()
        with _held_guard:
            entry = _held.get(key)
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] > 0:
                return
            del _held[key]
            token = entry[1]
        rec = read_lock(self.path)
        if rec is not None and rec.get("token") == token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _beat() -> None:
    while True:
        time.sleep(HEARTBEAT_SECONDS)
        with _held_guard:
            paths = [k.split(":", 1)[1] for k in _held if k.startswith(f"{os.getpid()}:")]
        for p in paths:
            try:
                os.utime(p)
            except OSError:
                pass


def _start_heartbeat() -> None:
    """One heartbeat thread per process (a forked child's copy of its parent's thread is not alive)."""
    global _beat_thread
    with _held_guard:
        if _beat_thread is None or not _beat_thread.is_alive():
            _beat_thread = threading.Thread(target=_beat, name="slidekit-lock-heartbeat", daemon=True)
            _beat_thread.start()
