"""One orchestrator per experiment folder: a lock file that its holder refreshes, taken over when it goes stale.

The lock file records pid, host, start time, command and ``refreshed`` (the holder rewrites it every
``REFRESH_S``). A lock is stale when it was not refreshed for ``STALE_S`` (on any host: a Colab VM that disconnected
never comes back, and its successor has another hostname), or at once when its pid is dead on this host. An empty or
garbled lock (a write cut short) follows the same rule, by the file's modification time. A stale lock is taken over
with a warning naming the old holder.

Taking over is race-free: every change of the lock file (create, take over, refresh, release) happens under an
exclusive ``flock`` of a guard file beside it, which the kernel drops when a process dies, and the new lock is
created with O_EXCL. Two processes never both hold the lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from ..errors import AstCvError

log = logging.getLogger(__name__)

LOCK = ".astcv.lock"
GUARD = ".astcv.lock.guard"
REFRESH_S = 30.0
STALE_S = 120.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def _guard(folder: Path) -> Iterator[None]:
    """Exclusive flock of the guard file (where the filesystem has no flock, O_EXCL alone protects the create)."""
    import fcntl

    fd = os.open(folder / GUARD, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # e.g. ENOLCK on some network filesystems
            log.debug("no flock on %s (%s)", folder, exc)
        yield
    finally:
        os.close(fd)  # releases the flock


def describe(held: dict[str, Any]) -> str:
    command = " ".join(map(str, held.get("command", [])))
    command = command if len(command) <= 160 else command[:157] + "..."
    return f"pid {held.get('pid')} on host {held.get('host')}, started {held.get('started', '?')}: {command}"


class ExperimentLock:
    """``with ExperimentLock(exp_dir):`` holds the experiment folder for one orchestrator and refreshes the hold."""

    def __init__(self, exp_dir: str | Path, command: list[str] | None = None, refresh_s: float = REFRESH_S,
                 stale_s: float = STALE_S):
        self.folder = Path(exp_dir)
        self.path = self.folder / LOCK
        self.refresh_s, self.stale_s = refresh_s, stale_s
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                       "command": command or sys.argv, "refreshed": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    # ---------------------------------------------------------------- reading
    def _read(self) -> tuple[dict[str, Any] | None, float]:
        """(the lock's record, or None if it is empty or garbled; when it was last refreshed)."""
        try:
            text, mtime = self.path.read_text(), self.path.stat().st_mtime
        except FileNotFoundError:
            return {}, 0.0
        try:
            held = json.loads(text)
            if not isinstance(held, dict):
                raise ValueError
        except ValueError:
            return None, mtime
        return held, float(held.get("refreshed", mtime))

    def _stale(self, held: dict[str, Any] | None, refreshed: float) -> str | None:
        """Why the lock may be taken over, or None if its holder may still run."""
        age = time.time() - refreshed
        if held is None:
            return (f"the lock file is empty or garbled (a write cut short) and was last changed {age:.0f} s ago"
                    if age > self.stale_s else None)
        pid, host = held.get("pid"), held.get("host")
        if host == self.record["host"] and isinstance(pid, int) and not _alive(pid):
            return f"its process ({describe(held)}) no longer runs"
        if age > self.stale_s:
            return f"its holder ({describe(held)}) has not refreshed it for {age:.0f} s (a machine that went away)"
        return None

    def _write(self, exclusive: bool) -> None:
        self.record["refreshed"] = time.time()
        data = json.dumps(self.record)
        if exclusive:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as fh:
                fh.write(data)
            return
        tmp = self.path.with_name(f"{LOCK}.{os.getpid()}.tmp")
        tmp.write_text(data)
        os.replace(tmp, self.path)

    # ---------------------------------------------------------------- taking
    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with _guard(self.folder):
            held, refreshed = self._read()
            if held == {}:  # no lock
                self._write(exclusive=True)
                return
            why = self._stale(held, refreshed)
            if why is None:
                self._refuse(held, refreshed)
            log.warning("taking over the lock %s: %s", self.path, why)
            self.path.unlink(missing_ok=True)
            self._write(exclusive=True)

    def _refuse(self, held: dict[str, Any] | None, refreshed: float) -> None:
        age = time.time() - refreshed
        wait = max(self.stale_s - age, 0)
        if held is None:
            raise AstCvError(
                f"Experiment {self.folder} has a lock file that is empty or garbled, changed {age:.0f} s ago: another "
                f"orchestrator may be starting. If none is, run the same command again in {wait:.0f} s (a lock not "
                f"refreshed for {self.stale_s:.0f} s is taken over), or pass --name NEW.")
        same_host = held.get("host") == self.record["host"]
        raise AstCvError(
            f"Experiment {self.folder} is being run by another orchestrator ({describe(held)}; refreshed {age:.0f} s "
            f"ago). Wait for it to finish, or pass --name NEW for a separate experiment."
            + ("" if same_host else f" If that machine is gone (a disconnected Colab VM), run the same command again in "
                                    f"{wait:.0f} s: a lock not refreshed for {self.stale_s:.0f} s is taken over."))

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                with _guard(self.folder):
                    held, _ = self._read()
                    if not held or held.get("pid") != self.record["pid"] or held.get("host") != self.record["host"]:
                        self.lost = True
                        log.error("lost the lock %s to %s: another orchestrator took this experiment over",
                                  self.path, describe(held) if held else "nobody")
                        return
                    self._write(exclusive=False)
            except OSError as exc:  # a full disk or a flaky mount: try again next time
                log.debug("could not refresh %s: %s", self.path, exc)

    def __enter__(self) -> "ExperimentLock":
        self.acquire()
        self._thread = threading.Thread(target=self._refresh_loop, name="astcv-lock", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with _guard(self.folder):
                held, _ = self._read()
                if held and held.get("pid") == self.record["pid"] and held.get("host") == self.record["host"]:
                    self.path.unlink()
        except OSError:
            pass
