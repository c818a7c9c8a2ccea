"""Deterministic fault injection for the kill-point sweep (tests/test_killpoints.py): ``kill_point(name)`` SIGKILLs
the orchestrator (the driver) right after a named moment, and does nothing unless a test asked for it.

    ASTCV_KILL_AT=<name>[:<nth>]   kill at the nth time (default 1st) this process reaches ``name``
    ASTCV_KILL_MARK=<file>         created when the kill fires; while it exists the point is off (a kill fires once)
    ASTCV_KILL_PID=<pid>           the driver's pid (set by the driver, passed to Ray's workers): a point reached in a
                                   trial kills the driver, not only the worker

Torch- and Ray-free: every floor may call it.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

KILL_AT_ENV = "ASTCV_KILL_AT"
KILL_MARK_ENV = "ASTCV_KILL_MARK"
KILL_PID_ENV = "ASTCV_KILL_PID"
FAULT_ENVS = (KILL_AT_ENV, KILL_MARK_ENV, KILL_PID_ENV)  # what the driver passes on to the trials

_seen: dict[str, int] = {}


def armed() -> bool:
    return bool(os.environ.get(KILL_AT_ENV))


def mark_driver() -> None:
    """Record this process as the driver the kill points kill (called by orchestrate.py when a kill is armed)."""
    if armed() and KILL_PID_ENV not in os.environ:
        os.environ[KILL_PID_ENV] = str(os.getpid())


def kill_point(name: str) -> None:
    """SIGKILL the driver (and this process) if ``name`` is the armed moment, its nth visit, and it has not fired."""
    wanted = os.environ.get(KILL_AT_ENV, "")
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] != int(nth or 1):
        return
    mark = os.environ.get(KILL_MARK_ENV)
    if mark:
        try:
            fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # the first process to get here fires
        except FileExistsError:
            return
        os.write(fd, f"{name} {os.getpid()}\n".encode())
        os.close(fd)
    driver = int(os.environ.get(KILL_PID_ENV) or os.getpid())
    try:
        os.kill(driver, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if driver != os.getpid():
        os.kill(os.getpid(), signal.SIGKILL)


def fired(mark: str | Path) -> str | None:
    """The point a kill fired at (from its mark file), or None."""
    try:
        return Path(mark).read_text().split()[0]
    except (OSError, IndexError):
        return None
