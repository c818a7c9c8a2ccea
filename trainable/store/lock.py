"""One orchestrator per experiment folder: a lock file that its holder refreshes, taken over when it goes stale.

The lock file records the holder (pid, host, the process's start time, a token), its command, and a refresh counter
that the holder bumps every ``REFRESH_S``. Staleness is judged on the reader's own clock only: a lock is stale when
its content has not changed for ``STALE_S`` while the reader watched it (a monotonic clock), never by comparing the
holder's timestamps with the reader's clock (the two machines' clocks may disagree by minutes). On this host a lock
whose process is gone (or whose pid now belongs to another process) is stale at once, and one of a live process
that refreshes it is the user's own earlier command. Any unreadable lock (empty, cut short, not UTF-8, fields of the wrong type) is garbled:
stale after the same watch, never a crash.

Every change of the lock file (create, take over, refresh, release) happens under a mutex: an exclusive ``flock``
of a guard file beside it, or, where the filesystem has no ``flock`` (ENOLCK on some network filesystems), an
O_EXCL marker file. Two processes never both hold the lock.

A holder that finds the lock is no longer its own (it was paused for longer than ``STALE_S`` and another run took
over) stops at once, before its next write: one line, its child processes killed, exit status 2. The refresh
thread checks at every refresh, and the writers (the Tune callbacks, the reducer) call ``check_held()`` first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from ..errors import AstCvError
from .mutex import gone, identity, kill_descendants, mutex, stopped

log = logging.getLogger(__name__)

LOCK = ".astcv.lock"
REFRESH_ENV, STALE_ENV = "ASTCV_LOCK_REFRESH_S", "ASTCV_LOCK_STALE_S"  # rehearsals and tests: shorter times
REFRESH_S = float(os.environ.get(REFRESH_ENV, 10.0))
STALE_S = float(os.environ.get(STALE_ENV, 120.0))
LOST_EXIT = 2
_active: "ExperimentLock | None" = None  # the lock this process holds, for check_held()


def stop_process(message: str) -> None:
    """What a holder that lost its lock does: one line on stderr, its child processes killed, exit at once."""
    os.write(2, f"error: {message}\n".encode())
    kill_descendants()
    os._exit(LOST_EXIT)


# A record's fields and their types: one that parses but holds another type (a hand edit, another tool's file) is
# garbled like a cut-short one. The pid must be one a holder can have: not 0 or 1 (init), not negative (``kill -1``
# would signal every process), below Linux's ceiling (PID_MAX_LIMIT, 2**22).
_REQUIRED = {"pid": int, "host": str}
_OPTIONAL = {"refreshed": (int, float), "count": int, "token": str, "started": str, "command": list,
             "proc_start": (str, type(None)), "boot_id": (str, type(None))}
PID_LIMIT = 2 ** 22


def _valid(held: dict[str, Any]) -> bool:
    if any(isinstance(held.get(k), bool) for k in ("pid", "count", "refreshed")):
        return False
    if not all(isinstance(held.get(k), t) for k, t in _REQUIRED.items()):
        return False
    if not all(isinstance(held[k], t) for k, t in _OPTIONAL.items() if k in held):
        return False
    try:
        finite = math.isfinite(held.get("refreshed", 0.0))
    except OverflowError:  # an int too large for a float
        return False
    return finite and 1 < held["pid"] < PID_LIMIT


def _parse(raw: bytes) -> dict[str, Any] | None:
    """The lock's record, or None when it is garbled (empty, cut short, not UTF-8, not a JSON object, a field of the
    wrong type or a pid no holder can have)."""
    try:
        held = json.loads(raw.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return held if isinstance(held, dict) and _valid(held) else None


def describe(held: dict[str, Any]) -> str:
    command = " ".join(map(str, held.get("command", [])))
    command = command if len(command) <= 160 else command[:157] + "..."
    return f"pid {held.get('pid')} on host {held.get('host')}, started {held.get('started', '?')}: {command}"


class LockLost(AstCvError):
    """This process no longer holds the experiment's lock: another orchestrator took it over."""


class ExperimentLock:
    """``with ExperimentLock(exp_dir):`` holds the experiment folder for one orchestrator and refreshes the hold.

    ``on_lost(message)`` is called when the hold is found lost; the default stops the process (``stop_process``).
    """

    def __init__(self, exp_dir: str | Path, command: list[str] | None = None, refresh_s: float | None = None,
                 stale_s: float | None = None, on_lost: Callable[[str], None] = stop_process):
        self.folder = Path(exp_dir)
        self.path = self.folder / LOCK
        # the variables as they are when the lock is made (a test may set them after this module was imported)
        self.refresh_s = float(os.environ.get(REFRESH_ENV, REFRESH_S)) if refresh_s is None else refresh_s
        self.stale_s = float(os.environ.get(STALE_ENV, STALE_S)) if stale_s is None else stale_s
        self.record = {**identity(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "token": uuid.uuid4().hex,
                       "command": command or sys.argv, "refreshed": time.time(), "count": 0}
        self.on_lost = on_lost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._losing = threading.Lock()
        self._previous_sigcont: Any = None
        self.lost = False

    # ---------------------------------------------------------------- files
    def _read(self) -> bytes | None:
        """The lock file's bytes, None when there is no lock file."""
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def _ours(self, held: dict[str, Any] | None) -> bool:
        return bool(held) and held.get("token") == self.record["token"]

    def _write(self, create: bool) -> bool:
        """Write our record (a whole file at once); ``create``: only if there is no lock file (False if there is)."""
        self.record["refreshed"], self.record["count"] = time.time(), self.record["count"] + 1
        tmp = self.path.with_name(f"{LOCK}.{self.record['token']}.tmp")
        tmp.write_text(json.dumps(self.record))
        try:
            if not create:
                os.replace(tmp, self.path)
                return True
            try:
                os.link(tmp, self.path)  # atomic and exclusive: a reader never sees a half-written lock
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links
                if self.path.exists():
                    return False
                os.replace(tmp, self.path)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _mutex(self):
        return mutex(self.folder, self.stale_s)

    # ---------------------------------------------------------------- judging
    def _dead(self, held: dict[str, Any] | None) -> str | None:
        """Why the holder surely no longer runs (on this host only), else None."""
        why = gone(held)
        return f"its process ({describe(held)}) {why}" if why and held else None

    def _fresh_here(self, held: dict[str, Any] | None) -> bool:
        """A live process of this host, not stopped, that refreshed the lock within ``stale_s`` (one clock here)."""
        if not held or held.get("host") != self.record["host"]:
            return False
        if isinstance(held.get("pid"), int) and stopped(held["pid"]):
            return False
        try:
            changed = max(float(held.get("refreshed", 0)), self.path.stat().st_mtime)
        except (OSError, TypeError, ValueError):
            return False
        return time.time() - changed < self.stale_s

    def _watch(self, raw: bytes) -> tuple[bytes | None, bool]:
        """Watch the lock for ``stale_s`` on this process's monotonic clock: (its content now, whether it changed)."""
        deadline = time.monotonic() + self.stale_s
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, max(self.stale_s / 20, 0.05), 1.0))
            now = self._read()
            if now != raw:
                return now, True
        return raw, False

    # ---------------------------------------------------------------- taking
    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            raw = self._read()
            if raw is None:
                with self._mutex():
                    if self._write(create=True):
                        return
                continue
            held = _parse(raw)
            why = self._dead(held)
            if why is None:
                if self._fresh_here(held):
                    self._refuse(held, watched=False)
                log.warning("%s is locked by %s; watching the lock for %.0f s: it is taken over if it does not "
                            "change", self.folder, describe(held) if held else "an unreadable lock file", self.stale_s)
                now, changed = self._watch(raw)
                if changed:
                    if now is None:  # released meanwhile: take it
                        continue
                    self._refuse(_parse(now), watched=True)
                why = (f"its holder ({describe(held)}) did not refresh it" if held else "it is empty or garbled (a "
                       "write cut short)") + f" for {self.stale_s:.0f} s watched on this machine's clock"
            if self._take_over(raw, why):
                return

    def _take_over(self, raw: bytes, why: str) -> bool:
        with self._mutex():
            if self._read() != raw:  # another run was quicker, or the holder came back
                return False
            log.warning("taking over the lock %s: %s", self.path, why)
            return self._write(create=False)

    def _refuse(self, held: dict[str, Any] | None, watched: bool) -> None:
        if not held:
            raise AstCvError(f"Experiment {self.folder} has a lock file that another process keeps rewriting: another "
                             f"orchestrator is starting. Wait for it, or pass --name NEW for a separate experiment.")
        pid = held.get("pid")
        if held.get("host") == self.record["host"] and not self._dead(held):
            raise AstCvError(f"{self.folder} is being run by your earlier command (pid {pid} on this machine, "
                             f"{held.get('host')}, started {held.get('started', '?')}): stop it with `kill {pid}` or "
                             f"wait for it to finish (or pass --name NEW for a separate experiment).")
        seen = f"its lock changed while this run watched it for up to {self.stale_s:.0f} s" if watched else "it runs"
        raise AstCvError(f"Experiment {self.folder} is being run by another orchestrator ({describe(held)}): {seen}. "
                         f"Wait for it to finish, or pass --name NEW for a separate experiment.")

    # ---------------------------------------------------------------- holding
    def holds(self) -> bool:
        """Whether the lock file still names this holder (True when it cannot be read at the moment)."""
        try:
            raw = self._read()
        except OSError:
            return True
        held = _parse(raw) if raw is not None else {}
        return held is None or self._ours(held)

    def check(self) -> None:
        """Stop (``on_lost``) if the lock is no longer ours; call before each write into the experiment."""
        if not self.lost and self.holds():
            return
        raw = self._read()
        self._lose(_parse(raw) if raw is not None else None)

    def _lose(self, held: dict[str, Any] | None) -> None:
        with self._losing:
            self.lost = True
            who = f"pid {held.get('pid')} on {held.get('host')}" if held else "another run (the lock file is gone)"
            message = f"lost the lock of {self.folder} to {who}: stopping, nothing more is written"
            log.debug(message)
            self.on_lost(message)
            raise LockLost(message)

    def _refresh_once(self) -> dict[str, Any] | None | bool:
        """Refresh our lock; True if done, else the record that replaced ours (None: no lock file)."""
        with self._mutex():
            raw = self._read()
            held = _parse(raw) if raw is not None else None
            if raw is None or (held is not None and not self._ours(held)):
                return held
            self._write(create=False)  # ours, or garbled under our hold (nobody else writes it): rewrite
            return True

    def _refresh_loop(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.refresh_s):
            if time.monotonic() - last > self.refresh_s + max(self.refresh_s, 2.0):
                log.info("the lock's refresh was paused for %.0f s (a suspended machine or process)",
                            time.monotonic() - last)
            try:
                state = self._refresh_once()
            except Exception as exc:  # a full disk, a flaky mount: never die silently, try again next time
                log.warning("could not refresh the lock %s (%s); trying again in %.0f s", self.path, exc,
                            self.refresh_s)
                continue
            last = time.monotonic()
            if state is not True:
                with contextlib.suppress(LockLost):
                    self._lose(state)
                return

    def _on_continue(self, signum, frame) -> None:
        """SIGCONT (a stopped process continued): check the hold before the main thread runs on to its next write."""
        if _active is self:
            with contextlib.suppress(LockLost):
                self.check()

    def __enter__(self) -> "ExperimentLock":
        global _active
        self.acquire()
        _active = self
        self._thread = threading.Thread(target=self._refresh_loop, name="astcv-lock", daemon=True)
        self._thread.start()
        if threading.current_thread() is threading.main_thread():
            self._previous_sigcont = signal.signal(signal.SIGCONT, self._on_continue) or signal.SIG_DFL
        return self

    def __exit__(self, *exc) -> None:
        global _active
        if _active is self:
            _active = None
        if self._previous_sigcont is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGCONT, self._previous_sigcont)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError), self._mutex():
            raw = self._read()
            if raw is not None and self._ours(_parse(raw)):
                self.path.unlink()


def check_held() -> None:
    """Before a write into the experiment: stop if this process held its lock and lost it (no-op without a lock)."""
    if _active is not None:
        _active.check()


