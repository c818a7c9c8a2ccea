"""What the console says while the grid runs: one line per epoch result and per finished or failed trial, each with
the grid's ETA, a line from inside long epochs, and the grid's time as soon as one epoch is measured. Ray-free: the
Tune callback in ``trainable.run.tuner`` feeds it plain values.

The ETA comes from measured figures only: the median epoch time (each trial reports ``epoch_seconds``; after a resume
the trials' last results carry it), what a trial costs beyond its epochs (this session's wall time not spent in
epochs, per trial started; before a trial has finished, the set-up time trials report), the epochs left and how many
trials run at once.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from ..store.experiment import EPOCH, EPOCH_SECONDS, SAMPLES_PER_SECOND, SETUP_SECONDS, TEST_ACCURACY, VAL_ACCURACY

STEP_LINE_EVERY_S = 60.0  # at least one line a minute from inside an epoch


@dataclass(frozen=True)
class TrialView:
    """One trial as the progress lines see it."""

    name: str
    status: str  # PENDING, RUNNING, TERMINATED (finished), ERROR, PAUSED
    epochs_done: int
    last_result: Mapping[str, Any] = field(default_factory=dict)


def duration(seconds: float) -> str:
    """3h05m, 12m30s, 45s."""
    s = int(round(max(seconds, 0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class Estimate:
    """Measured times the ETA is made of: epochs, and what a trial costs beyond its epochs (Ray starting a worker,
    imports, loading the model and data), measured over this session's wall time once a trial has finished in it,
    else from the set-up time trials report."""

    epoch_s: list[float] = field(default_factory=list)
    setup_s: list[float] = field(default_factory=list)  # reported by trials (their own set-up only)
    session_overhead_s: float | None = None  # per trial, from this session's wall time

    def add_epoch(self, seconds: float) -> None:
        self.epoch_s = (self.epoch_s + [float(seconds)])[-200:]

    @property
    def epoch(self) -> float | None:
        return statistics.median(self.epoch_s) if self.epoch_s else None

    @property
    def startup(self) -> float:
        if self.session_overhead_s is not None:
            return self.session_overhead_s
        return statistics.median(self.setup_s) if self.setup_s else 0.0


def eta_seconds(trials: Iterable[TrialView], epochs: int, slots: int, est: Estimate,
                running_elapsed: Mapping[str, float] | None = None) -> float | None:
    """Seconds until every trial is done: the epochs left shared over ``slots`` trials at a time (but never less than
    the longest single trial's rest), plus a start-up for each trial not running (a new one, or one that continues from
    its checkpoint after a resume). None before any epoch is measured.
    """
    if est.epoch is None:
        return None
    running_elapsed = running_elapsed or {}
    left, longest = 0.0, 0.0
    for t in trials:
        if t.status in ("TERMINATED", "ERROR"):
            continue
        rest = max(epochs - t.epochs_done, 0) * est.epoch
        if t.status == "RUNNING":
            rest = max(rest - running_elapsed.get(t.name, 0.0), 0.0)  # the epoch in progress is partly done
        else:
            rest += est.startup
        left += rest
        longest = max(longest, rest)
    return max(left / max(slots, 1), longest)


def console(*args: Any, **kwargs: Any) -> None:
    """``print``, looked up at each call. Ray replaces ``builtins.print`` in the driver (its tqdm support, once a
    worker's output is shown) while the Tuner pickles the callbacks that hold a Progress: a reference to the original
    print no longer pickles then ("not the same object as builtins.print"), a module function always does."""
    print(*args, **kwargs)


class Progress:
    """Console lines of one orchestrator session (``out`` is print-like; tests pass their own)."""

    def __init__(self, expected: Sequence[str], finished_before: Iterable[str], epochs: int, slots: int | None,
                 out=console):
        self.expected, self.epochs, self.slots_known, self.out = list(expected), epochs, slots, out
        self.total = len(self.expected)
        self.est = Estimate()
        self.t0 = time.time()
        self.best = (-1.0, "")
        self.started_at: dict[str, float] = {}  # trial -> when it (re)started in this session
        self.last_report_at: dict[str, float] = {}  # trial -> time of its last result in this session
        self.session_epoch_s = 0.0  # epochs' seconds reported in this session
        self.failures: set[str] = set()
        self.finished: set[str] = set(finished_before)
        self.max_running = 1
        self.announced = False
        self.last_line = time.time()
        self.news: dict[str, Any] = {}  # the latest in-epoch message, not shown yet
        self.trials: list[TrialView] = []

    # ------------------------------------------------------------- state
    @property
    def slots(self) -> int:
        return self.slots_known or self.max_running

    @property
    def failed(self) -> int:
        return len(self.failures)

    def done(self, names: Iterable[str]) -> bool:
        """Whether each of these trials finished or failed for good."""
        return set(names) <= self.finished | self.failures

    @property
    def all_done(self) -> bool:
        return self.done(self.expected)

    def start(self) -> None:
        self.t0 = time.time()

    def seed(self, ray_trials: list[TrialView]) -> None:
        """Take the trials as they stand (after a resume their last results carry measured epoch times); trials Ray
        does not know yet are pending, those finished in an earlier run are done."""
        known = {t.name: t for t in ray_trials}
        for t in ray_trials:
            if t.status == "TERMINATED":
                self.finished.add(t.name)
        self.trials = [known.get(n) or TrialView(n, "TERMINATED" if n in self.finished else "PENDING",
                                                 self.epochs if n in self.finished else 0) for n in self.expected]
        self.max_running = max(self.max_running, sum(t.status == "RUNNING" for t in ray_trials))
        if not self.est.epoch_s:
            for t in ray_trials:
                if EPOCH_SECONDS in t.last_result:
                    self.est.add_epoch(t.last_result[EPOCH_SECONDS])
                if SETUP_SECONDS in t.last_result:
                    self.est.setup_s.append(float(t.last_result[SETUP_SECONDS]))

    # ------------------------------------------------------------- lines
    def _counts(self) -> str:
        states = [("TERMINATED" if t.name in self.finished else t.status) for t in self.trials]
        failed = f", {states.count('ERROR')} failed" if "ERROR" in states else ""
        return (f"{states.count('TERMINATED')}/{self.total} done, {states.count('RUNNING')} running, "
                f"{states.count('PENDING')} pending{failed}")

    def _eta(self) -> str:
        now = time.time()
        elapsed = {n: now - t for n, t in self.last_report_at.items()}
        elapsed.update({n: now - t for n, t in self.started_at.items() if n not in self.last_report_at})
        eta = eta_seconds(self.trials, self.epochs, self.slots, self.est, elapsed)
        return "ETA: after the first epoch" if eta is None else f"ETA {duration(eta)}"

    def _line(self, text: str) -> None:
        self.last_line = time.time()
        self.out(f"[{clock(time.time() - self.t0)}] {text} | {self._counts()} | {self._eta()}", flush=True)

    def trial_started(self, name: str, trials: list[TrialView]) -> None:
        self.seed(trials)
        self.started_at[name] = time.time()
        self.last_report_at.pop(name, None)

    def result(self, name: str, result: Mapping[str, Any], trials: list[TrialView]) -> None:
        self.seed(trials)
        if VAL_ACCURACY not in result:
            return
        now = time.time()
        epoch_s = float(result.get(EPOCH_SECONDS, 0.0))
        if epoch_s:
            self.est.add_epoch(epoch_s)
            self.session_epoch_s += epoch_s
        if SETUP_SECONDS in result and not self.est.setup_s:
            self.est.setup_s.append(float(result[SETUP_SECONDS]))
        self.last_report_at[name] = now
        self.trials = [TrialView(t.name, t.status, max(t.epochs_done, int(result[EPOCH])), t.last_result)
                       if t.name == name else t for t in self.trials]  # Ray's view may lag by this very result
        if result[VAL_ACCURACY] > self.best[0]:
            self.best = (result[VAL_ACCURACY], name)
        self._line(f"{name} epoch {result[EPOCH]}/{self.epochs}: val_acc {result[VAL_ACCURACY]:.3f} "
                   f"test_acc {result[TEST_ACCURACY]:.3f} ({result.get(SAMPLES_PER_SECOND, 0):.0f} samples/s, "
                   f"{duration(epoch_s)}) | best val_acc {self.best[0]:.3f} ({self.best[1]})")
        if not self.announced:
            self.announce()

    def announce(self) -> None:
        """The grid's expected time, once per session, as soon as an epoch is measured."""
        eta = eta_seconds(self.trials, self.epochs, self.slots, self.est)
        if eta is None:
            return
        self.announced = True
        self.out(f"Estimate: the grid needs about {duration(eta)} more ({self.total} trials x {self.epochs} epochs, "
                 f"{duration(self.est.epoch)} per epoch, {duration(self.est.startup)} to start a trial, "
                 f"{self.slots} at a time). The ETA on each line is refined as epochs finish.", flush=True)

    def trial_finished(self, name: str, trials: list[TrialView]) -> None:
        self.finished.add(name)
        self._measure_overhead()
        self.seed(trials)
        self._line(f"{name} finished")

    def _measure_overhead(self) -> None:
        """Per trial started in this session: the slots' wall time not spent in epochs."""
        started = len(self.started_at)
        if not started:
            return
        busy = (time.time() - self.t0) * min(self.slots, started)
        self.est.session_overhead_s = max(busy - self.session_epoch_s, 0.0) / started

    def trial_failed(self, name: str, error: str, where: str, trials: list[TrialView], final: bool) -> None:
        self.seed(trials)
        if final:
            self.failures.add(name)
            self._line(f"{name} FAILED for good: {error} (full traceback: {where})")
        else:
            self._line(f"{name} failed: {error}; retrying from its last checkpoint (full traceback: {where})")

    def poll(self, ray_trials: list[TrialView], messages: Iterable[tuple[str, Mapping[str, Any]]] = ()) -> None:
        """Called every few seconds by the Tune loop: keep the latest news from inside running epochs, and show it
        when no line came for STEP_LINE_EVERY_S."""
        for name, message in messages:
            if message.get("time", 0) >= self.news.get("time", 0):
                self.news = {**message, "trial": name}
        if self.news and time.time() - self.last_line >= STEP_LINE_EVERY_S:
            self.seed(ray_trials)
            self.step(self.news.pop("trial"), self.news)
            self.news = {}

    def step(self, name: str, message: Mapping[str, Any]) -> None:
        """A trial's news from inside an epoch: where it is (training, validation, test), at what pace."""
        phase = message.get("phase", "training")
        self._line(f"{name} epoch {message['epoch']}/{self.epochs}, {phase}: batch {message['step']}/{message['steps']} "
                   f"({message['samples_per_s']:.0f} samples/s)")

