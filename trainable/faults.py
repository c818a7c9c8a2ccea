"""Deterministic fault injection for the tests: ``kill_point(name)`` SIGKILLs the orchestrator (the driver) right
after a named moment (the kill-point sweep, tests/test_killpoints.py); ``hold_point(name)`` makes the process reaching
it wait there until it is killed (a worker killed at a known moment, tests/test_reliability.py). Both do nothing unless
a test asked for them.

    ASTCV_KILL_AT=<name>[:<nth>][@<where>]
                                   kill at the nth time (default 1st) this process reaches ``name``; with ``@<where>``
                                   only where the caller's ``where`` (a trial's name) contains it
    ASTCV_KILL_MARK=<file>         created ("<name> <pid>") when the kill fires; while it exists the point is off
    ASTCV_KILL_PID=<pid>           the driver's pid (set by the driver, passed to Ray's workers): a point reached in a
                                   trial kills the driver, not only the worker
    ASTCV_HOLD_AT, ASTCV_HOLD_MARK the same for a hold

Torch- and Ray-free: every floor may call it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

KILL_AT_ENV = "ASTCV_KILL_AT"
KILL_MARK_ENV = "ASTCV_KILL_MARK"
KILL_PID_ENV = "ASTCV_KILL_PID"
HOLD_AT_ENV = "ASTCV_HOLD_AT"
HOLD_MARK_ENV = "ASTCV_HOLD_MARK"
FAULT_ENVS = (KILL_AT_ENV, KILL_MARK_ENV, KILL_PID_ENV, HOLD_AT_ENV, HOLD_MARK_ENV)  # passed on to the trials

_seen: dict[tuple[str, str], int] = {}


def armed() -> bool:
    return bool(os.environ.get(KILL_AT_ENV))


def mark_driver() -> None:
    """Record this process as the driver the kill points kill (called by orchestrate.py when a kill is armed)."""
    if armed() and KILL_PID_ENV not in os.environ:
        os.environ[KILL_PID_ENV] = str(os.getpid())


def _fires(at_env: str, mark_env: str, name: str, where: str) -> bool:
    """Whether ``name`` (reached in ``where``) is the moment ``at_env`` arms, on its nth visit in this process, and
    the first to get there (the mark file, created at once, keeps every later visit, in any process, from firing)."""
    spec, _, scope = os.environ.get(at_env, "").partition("@")
    point, _, nth = spec.partition(":")
    if point != name or scope not in where:
        return False
    _seen[at_env, name] = _seen.get((at_env, name), 0) + 1
    if _seen[at_env, name] != int(nth or 1):
        return False
    mark = os.environ.get(mark_env)
    if mark:
        try:
            fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(fd, f"{name} {os.getpid()}\n".encode())
        os.close(fd)
    return True


def kill_point(name: str, where: str = "") -> None:
    """SIGKILL the driver (and this process) if ``name`` is the armed moment, its nth visit, and it has not fired."""
    if not _fires(KILL_AT_ENV, KILL_MARK_ENV, name, where):
        return
    driver = int(os.environ.get(KILL_PID_ENV) or os.getpid())
    try:
        os.kill(driver, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if driver != os.getpid():
        os.kill(os.getpid(), signal.SIGKILL)


def hold_point(name: str, where: str = "") -> None:
    """Wait here until killed if ``name`` is the held moment, its nth visit, and no process has held before."""
    if _fires(HOLD_AT_ENV, HOLD_MARK_ENV, name, where):
        while True:
            time.sleep(1)


def fired(mark: str | Path) -> str | None:
    """The point a kill fired at (from its mark file), or None."""
    try:
        return Path(mark).read_text().split()[0]
    except (OSError, IndexError):
        return None
