"""For ``store.lock``: who a process is (pid, its start time, the machine's boot), whether one is gone, and a mutex
over a folder's lock file across processes: an exclusive ``flock`` of a guard file, or, where the filesystem has no
``flock`` (ENOLCK on some network filesystems), an O_EXCL marker file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

GUARD = ".astcv.lock.guard"
MARKER = ".astcv.lock.mutex"  # the O_EXCL mutex where flock is not available
NO_FLOCK_ENV = "ASTCV_LOCK_NO_FLOCK"  # "1": behave as on a filesystem without flock (ENOLCK), for tests
_NO_FLOCK_ERRNOS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}
_warned_no_flock: set[str] = set()


# ---------------------------------------------------------------- processes
def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def proc_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot) from /proc, which tells a reused pid apart; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP, Ctrl-Z): it refreshes nothing until it is continued."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def identity() -> dict[str, Any]:
    """This process as a lock records it."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "proc_start": proc_start(pid), "boot_id": boot_id()}


def gone(held: dict[str, Any] | None) -> str | None:
    """Why the process ``held`` names surely no longer runs (known on this host only), else None."""
    if not held or held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return None
    pid, boot = held["pid"], boot_id()
    if held.get("boot_id") and boot and held["boot_id"] != boot:
        return "ran before this machine restarted"
    if not alive(pid):
        return "no longer runs"
    now = proc_start(pid)
    if held.get("proc_start") and now and now != held["proc_start"]:
        return f"no longer runs (pid {pid} is another process now)"
    return None


def descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (Ray's raylet and its trial workers), read from /proc; [] where there is none."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(entry.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.parent.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def kill_descendants() -> None:
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- the mutex
@contextlib.contextmanager
def mutex(folder: Path, stale_s: float) -> Iterator[None]:
    """Exclusive access to ``folder``'s lock file: flock of the guard file, else the O_EXCL marker."""
    import fcntl

    fd = os.open(folder / GUARD, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            if os.environ.get(NO_FLOCK_ENV) == "1":
                raise OSError(errno.ENOLCK, "flock disabled by " + NO_FLOCK_ENV)
            fcntl.flock(fd, fcntl.LOCK_EX)
            flocked = True
        except OSError as exc:
            if exc.errno not in _NO_FLOCK_ERRNOS:
                raise
            _warn_no_flock(folder, exc, stale_s)
            flocked = False
        with contextlib.nullcontext() if flocked else marker(folder, stale_s):
            yield
    finally:
        os.close(fd)  # releases the flock


def _warn_no_flock(folder: Path, exc: OSError, stale_s: float) -> None:
    if str(folder) in _warned_no_flock:
        return
    _warned_no_flock.add(str(folder))
    log.warning("file locks (flock) are not available in %s (%s): the experiment's lock relies on O_EXCL marker files "
                "instead, which a process killed while changing the lock leaves behind for %.0f s; do not start two "
                "orchestrators on this experiment at the same moment by hand", folder, exc.strerror or exc, stale_s)


@contextlib.contextmanager
def marker(folder: Path, stale_s: float) -> Iterator[None]:
    """A mutex from an O_EXCL file. One left by a dead process (this host) or unchanged for ``stale_s`` is broken."""
    path = folder / MARKER
    me = json.dumps({**identity(), "nonce": uuid.uuid4().hex}).encode()
    seen, since = None, time.monotonic()
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raw = _read_or_none(path)
            if raw is not None and raw != seen:
                seen, since = raw, time.monotonic()
            elif raw is not None and (gone(_parse(raw)) or time.monotonic() - since > stale_s):
                _break(path, raw)
            time.sleep(0.002 + 0.01 * random.random())
            continue
        with os.fdopen(fd, "wb") as fh:
            fh.write(me)
        break
    try:
        yield
    finally:
        if _read_or_none(path) == me:
            path.unlink(missing_ok=True)


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        held = json.loads(raw.decode("utf-8"))
    except ValueError:
        return None
    return held if isinstance(held, dict) else None


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _break(path: Path, raw: bytes) -> None:
    """Remove a stale marker whose content is ``raw``, and only that one (a rename grabs it atomically)."""
    grabbed = path.with_name(f"{MARKER}.broken.{uuid.uuid4().hex}")
    try:
        os.rename(path, grabbed)
    except FileNotFoundError:
        return
    if grabbed.read_bytes() != raw:  # another process's fresh marker: put it back
        with contextlib.suppress(OSError):
            os.link(grabbed, path)
    else:
        log.warning("removed a stale lock marker %s (its process died while changing the lock)", path)
    grabbed.unlink(missing_ok=True)
