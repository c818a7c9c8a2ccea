"""The grid's ETA from measured times only. Ray-free: ``trainable.run.progress`` feeds it what the Tune callback saw.

What a trial costs is measured on the driver's clock, per trial: its start-up (its start to its first result, less
that epoch), its epochs (the time between its consecutive results: training, evaluation, the checkpoint and its
upload), and the hand-over (from a trial's last result to the next trial's start in its place). Start-ups differ:
the first trial on each slot pays for a new worker process (Python, torch, Ray; reported as ``worker_s`` and
``imports_s``), the next ones reuse it. The remaining trials are then packed onto the slots in order, the running
ones first (``eta_seconds``).

Where the old estimate went wrong (demo timelines in tests/data/timelines, BENCHMARKS.md): every pending trial was
charged the first trial's start-up (a new worker's) although Ray reuses the workers; once a trial had finished, the
"overhead" was the slots' whole wall time less the reported epochs, which counted the other trials' running epochs
as start-up too, so the ETA jumped up at each finish; and the remaining work was divided by the slots, as if the
last trials could be split.
"""

from __future__ import annotations

import heapq
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

DONE = ("TERMINATED", "ERROR")
RISE_LIMIT = 0.10  # the ETA shown rises by at most this much between two lines, unless a trial failed
KEEP = 50  # measurements kept (the latest)


@dataclass(frozen=True)
class TrialView:
    """One trial as the progress lines see it."""

    name: str
    status: str  # PENDING, RUNNING, TERMINATED (finished), ERROR, PAUSED
    epochs_done: int
    last_result: Mapping[str, Any] = field(default_factory=dict)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class Estimate:
    """Measured times the ETA is made of (seconds)."""

    epoch_s: list[float] = field(default_factory=list)  # epochs after a trial's first (in this session), the latest KEEP
    first_epoch_s: list[float] = field(default_factory=list)  # a trial's first epoch in its process (warm-up)
    first_step_s: list[float] = field(default_factory=list)  # the first optimizer step of those (reported)
    startup_s: list[float] = field(default_factory=list)  # start-ups of trials on a worker that ran a trial before
    cold_startup_s: list[float] = field(default_factory=list)  # start-ups of trials on a new worker
    setup_s: list[float] = field(default_factory=list)  # set-up reported by trials (known after a resume)
    handover_s: list[float] = field(default_factory=list)  # a trial's last result to the next one's start
    worker_s: list[float] = field(default_factory=list)  # a new worker's start before its trial starts (reported)

    @staticmethod
    def _add(values: list[float], seconds: float) -> None:
        values.append(max(float(seconds), 0.0))
        del values[:-KEEP]

    def add_epoch(self, seconds: float) -> None:
        self._add(self.epoch_s, seconds)

    def add_first_epoch(self, seconds: float, startup: Mapping[str, Any]) -> None:
        """A trial's first epoch in its process, and its first step (``startup``'s ``first_step_s``: data loading
        workers, warm-up, compiling), which the later epochs do not pay."""
        self._add(self.first_epoch_s, seconds)
        self._add(self.first_step_s, float(startup.get("first_step_s") or 0.0))

    def add_startup(self, seconds: float, startup: Mapping[str, Any]) -> None:
        """A measured start-up; ``startup`` is what the trial reported of it (``reused_worker``, ``worker_s``,
        ``imports_s``): a new worker's start-up also gives a reused one's, without the process and the imports."""
        if startup.get("reused_worker", True):
            self._add(self.startup_s, seconds)
            return
        self._add(self.cold_startup_s, seconds)
        self._add(self.worker_s, float(startup.get("worker_s") or 0))
        self._add(self.startup_s, seconds - float(startup.get("worker_s") or 0) - float(startup.get("imports_s") or 0))

    def add_handover(self, seconds: float) -> None:
        self._add(self.handover_s, seconds)

    @property
    def epoch(self) -> float | None:
        """A later epoch: measured, else a first epoch less its first step."""
        later = _median(self.epoch_s)
        if later is not None or not self.first_epoch_s:
            return later
        return max(_median(self.first_epoch_s) - (_median(self.first_step_s) or 0.0), 0.0)

    @property
    def first_epoch(self) -> float | None:
        first = _median(self.first_epoch_s)
        return first if first is not None else self.epoch

    @property
    def startup(self) -> float:
        """A trial's start-up on a reused worker (a pending trial's), else the reported set-up."""
        for values in (self.startup_s, self.setup_s):
            if values:
                return _median(values)
        return 0.0

    @property
    def cold_startup(self) -> float:
        return _median(self.cold_startup_s) if self.cold_startup_s else self.startup

    @property
    def handover(self) -> float:
        return _median(self.handover_s) if self.handover_s else 0.0

    @property
    def new_worker(self) -> float:
        """What a trial on a new worker (after a failure killed one) costs beyond one on a reused worker."""
        worker = _median(self.worker_s) if self.worker_s else 0.0
        return worker + max(self.cold_startup - self.startup, 0.0)

    def trial_work(self, epochs_left: int) -> float:
        """A trial's epochs in a new process: the first one with its warm-up."""
        return 0.0 if epochs_left <= 0 else self.first_epoch + (epochs_left - 1) * self.epoch


def epochs_of(epochs: int | Mapping[str, int], name: str) -> int:
    """A trial's epochs: ``epochs`` itself, or its value for the trial (a grid with an ``epochs`` axis)."""
    return epochs if isinstance(epochs, int) else int(epochs[name])


def eta_seconds(trials: Iterable[TrialView], epochs: int | Mapping[str, int], slots: int, est: Estimate,
                since_result: Mapping[str, float] | None = None,
                since_start: Mapping[str, float] | None = None, cold: Iterable[str] = (),
                new_workers: int = 0) -> float | None:
    """Seconds until every trial is done. Each running trial's rest: its epochs left less what passed since its last
    result (or, before its first result in this session, since its start, plus a start-up: a new worker's for the
    trials in ``cold``); then the trials not running are packed in order onto the first free of ``slots``, each with
    a hand-over, a start-up and its epochs; ``new_workers`` free slots first start a new worker (a failed trial's
    was lost). None before any epoch is measured."""
    if est.epoch is None:
        return None
    since_result, since_start, cold = since_result or {}, since_start or {}, set(cold)
    busy: list[float] = []
    queue: list[float] = []
    for t in trials:
        if t.status in DONE:
            continue
        left = max(epochs_of(epochs, t.name) - t.epochs_done, 0)
        if left == 0:
            continue  # its last result is in, Ray is ending it
        if t.status != "RUNNING":
            queue.append(est.handover + est.startup + est.trial_work(left))
        elif t.name in since_result:
            busy.append(max(left * est.epoch - since_result[t.name], 0.0))
        else:
            startup = est.cold_startup if t.name in cold else est.startup
            busy.append(max(startup + est.trial_work(left) - since_start.get(t.name, 0.0), 0.0))
    idle = max(slots - len(busy), 0)
    free = busy + [est.new_worker] * min(new_workers, idle) + [0.0] * max(idle - new_workers, 0)
    heapq.heapify(free)
    for cost in queue:
        heapq.heapreplace(free, free[0] + cost)
    return max(free, default=0.0)


def damped(eta: float, shown: float | None, reason: str | None) -> tuple[float, str]:
    """(the ETA to show, a note): never more than RISE_LIMIT above the ETA shown on the previous line, unless a
    trial failed (``reason``), which the note then says."""
    if shown is None or eta <= shown * (1 + RISE_LIMIT):
        return eta, ""
    if reason:
        return eta, f" (ETA up: {reason})"
    return shown * (1 + RISE_LIMIT), ""
