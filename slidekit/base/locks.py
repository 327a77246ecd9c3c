"""Per-output locks: one process at a time works on an output folder (a slide's results).

A lock is a small JSON file (host, pid, token, created) made with ``O_CREAT | O_EXCL``, which is
atomic on local disks and on NFS v3+ and Lustre, so any number of processes — Slurm shards, two
people starting the same run, several hosts on one shared filesystem — agree on who holds a slide.
While held, a daemon thread touches the file (its mtime is the heartbeat). A lock is stale when
its owner process is dead on this host, or when its heartbeat is older than ``stale_after``
seconds (an owner on another host cannot be asked directly); a stale lock is taken over.

Hand-edited or foreign lock files are bounded outcomes: at most ``MAX_LOCK_BYTES`` are read (a
larger file is judged by its age, like a half-written one); a lock path that is a symbolic link
(to ``/dev/zero``, to another folder's lock) or not a regular file is refused with one line, never
followed; a pid no process can have here (beyond ``MAX_PID``) is not alive; a heartbeat more than
``stale_after`` seconds in the future (clock skew between hosts) is stale, and the takeover says so.
Locks are re-entrant within a process, so a cohort worker can hold a slide's folder while the
single-slide job it calls takes the same lock again.
"""
from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
import uuid
import warnings
from pathlib import Path

from slidekit.base.errors import LockedError, SlidekitWarning

LOCK_NAME = ".slidekit.lock"
HEARTBEAT_SECONDS = 15.0
STALE_AFTER_SECONDS = 300.0
MAX_LOCK_BYTES = 4096  # a lock record is ~150 bytes
MAX_PID = 1 << 22  # Linux's PID_MAX_LIMIT; larger ids belong to no process on any supported host

_held: dict[str, list] = {}  # "pid:resolved lock path" -> [count, token]
_held_guard = threading.Lock()
_beat_thread: threading.Thread | None = None


def pid_alive(pid: object) -> bool:
    """Whether a process of this id exists on this host (False for anything that is not a pid)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False  # kill(0 or -n, 0) would ask about a whole process group, not a process
    if pid > MAX_PID:
        return False  # no process has such an id (os.kill would overflow)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(path: str | os.PathLike) -> dict | None:
    """The lock file's record (host, pid, token, created, heartbeat age), or None when absent."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise LockedError(f"{path.name} is a symbolic link, not a lock file; refusing to follow it (remove it "
                          "to process this slide)", path.parent)
    if stat.S_ISDIR(st.st_mode):
        raise LockedError(f"{path.name} is a directory, not a lock file; remove it to process this slide",
                          path.parent)
    if not stat.S_ISREG(st.st_mode):
        raise LockedError(f"{path.name} is not a regular file (a device, pipe or socket), not a lock file; "
                          "remove it to process this slide", path.parent)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    except OSError as e:  # swapped for a link or a FIFO between the check and the open
        raise LockedError(f"{path.name} cannot be read as a lock file ({e.strerror}); remove it to process "
                          "this slide", path.parent) from None
    with os.fdopen(fd, "rb") as f:
        fst = os.fstat(f.fileno())
        if not stat.S_ISREG(fst.st_mode):
            raise LockedError(f"{path.name} is not a regular file, not a lock file; remove it to process this "
                              "slide", path.parent)
        data = f.read(MAX_LOCK_BYTES + 1)
        age = time.time() - fst.st_mtime
    try:
        if len(data) > MAX_LOCK_BYTES:
            raise ValueError("too long for a lock record")
        rec = json.loads(data.decode("utf-8"))
    except ValueError:  # a half-written lock of a crashed creator (or junk): judged by its age alone
        rec = {}
    if not isinstance(rec, dict):  # valid JSON of another shape: not a lock record, judged by its age
        rec = {}
    rec["heartbeat_age"] = age
    return rec


def stale_reason(rec: dict, stale_after: float = STALE_AFTER_SECONDS) -> str | None:
    """Why a lock record's owner is gone (None while it may be alive): a pid no process can have, a
    dead pid on this host, a heartbeat older than ``stale_after`` or more than that in the future."""
    pid = rec.get("pid")
    if isinstance(pid, int) and not isinstance(pid, bool) and not 0 < pid <= MAX_PID:
        return f"pid {pid} names no process"  # a damaged or forged lock
    if rec.get("host") == socket.gethostname() and isinstance(pid, int) and not isinstance(pid, bool):
        if pid == os.getpid():
            return None
        return None if pid_alive(pid) else f"its process {pid} is not running on this host"
    age = rec.get("heartbeat_age", 0.0)
    if age > stale_after:
        return f"its heartbeat is {age:.0f} s old"
    if age < -stale_after:
        return f"its heartbeat is {-age:.0f} s in the future (clock skew between hosts?)"
    return None


def is_stale(rec: dict, stale_after: float = STALE_AFTER_SECONDS) -> bool:
    """Whether a lock record's owner is gone (``stale_reason`` says why)."""
    return stale_reason(rec, stale_after) is not None


def describe(rec: dict) -> str:
    """'host:pid (heartbeat 3 s ago)' for messages."""
    age = rec.get("heartbeat_age", 0)
    when = f"{age:.0f} s ago" if age >= -1 else f"{-age:.0f} s in the future"
    return f"{rec.get('host', '?')}:{rec.get('pid', '?')} (heartbeat {when})"


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
            why = stale_reason(rec, self.stale_after)
            if why is None:
                raise LockedError(f"in use by {describe(rec)}; another slidekit process is writing here",
                                  self.folder)
            if self._take_over(rec):
                self.took_over = {**rec, "stale_reason": why}
                if "future" in why:  # not a crash: say so, the clocks of the hosts disagree
                    warnings.warn(SlidekitWarning(f"{self.path}: took over the lock of {rec.get('host', '?')}:"
                                                  f"{rec.get('pid', '?')}: {why}"),
                                  stacklevel=2)
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
