"""What the console says while the grid runs: one line per epoch result and per finished or failed trial, each with
the grid's ETA (``trainable.run.eta``), a line from inside long epochs, and the grid's time as soon as one epoch is
measured. Ray-free: the Tune callback in ``trainable.run.tuner`` feeds it plain values, and ``now`` is its clock
(tests and ``benchmarks/eta.py`` replay recorded timelines through it).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Iterable, Mapping, Sequence

from ..store.experiment import (BEST_VAL_ACCURACY, EPOCH, EPOCH_SECONDS, SAMPLES_PER_SECOND, SETUP_SECONDS, STARTUP,
                                TEST_ACCURACY, VAL_ACCURACY)
from .eta import DONE, Estimate, TrialView, damped, epochs_of, eta_seconds

__all__ = ["Estimate", "Progress", "TrialView", "console", "duration", "eta_seconds"]

STEP_LINE_EVERY_S = 60.0  # at least one line a minute from inside an epoch
WARNING = "warning"  # a trial's message that the console shows at once (a damaged checkpoint passed over)
# What a recorded timeline keeps of a result (and of Ray's last result of each trial).
RECORDED = (EPOCH, EPOCH_SECONDS, SETUP_SECONDS, STARTUP, VAL_ACCURACY, TEST_ACCURACY, BEST_VAL_ACCURACY,
            SAMPLES_PER_SECOND)


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


def console(*args: Any, **kwargs: Any) -> None:
    """``print``, looked up at each call. Ray replaces ``builtins.print`` in the driver (its tqdm support, once a
    worker's output is shown) while the Tuner pickles the callbacks that hold a Progress: a reference to the original
    print no longer pickles then ("not the same object as builtins.print"), a module function always does."""
    print(*args, **kwargs)


class Progress:
    """Console lines of one orchestrator session (``out`` is print-like, ``now`` a clock; tests pass their own)."""

    def __init__(self, expected: Sequence[str], finished_before: Iterable[str], epochs: int | Mapping[str, int],
                 slots: int | None, out=console, now=time.time):
        """``epochs``: every trial's, or each trial's by name (a grid with an ``epochs`` axis)."""
        self.expected, self.epochs, self.slots_known, self.out, self.now = list(expected), epochs, slots, out, now
        self.total = len(self.expected)
        self.timeline: list[dict[str, Any]] | None = None  # the calls, recorded when a list (benchmarks/eta.py)
        self.est = Estimate()
        self.t0 = self.last_line = now()
        self.best = (-1.0, "")
        self.started_at: dict[str, float] = {}  # trial -> when it (re)started in this session
        self.last_report_at: dict[str, float] = {}  # trial -> time of its last result in this session
        self.starts = 0  # trial starts in this session
        self.cold: set[str] = set()
        self.lost_workers = 0  # workers lost to failures whose slots have not started a trial since  # trials started on a new worker in this session (the first one of each slot)
        self.handovers: deque[float] = deque()  # when trials ended, waiting for the next start in their place
        self.failures: set[str] = set()
        self.finished_before = set(finished_before)
        self.finished: set[str] = set(finished_before)
        self.max_running = 1
        self.announced = False
        self.shown: float | None = None  # the ETA on the latest line
        self.rise: dict[str, str] = {}  # trial -> why the ETA may rise (it failed), until its next result
        self.news: dict[str, Any] = {}  # the latest in-epoch message, not shown yet
        self.trials: list[TrialView] = []

    # ------------------------------------------------------------- recording
    def _record(self, kind: str, name: str | None = None, trials: list[TrialView] | None = None, **data: Any) -> None:
        """Keep the call (its time, the trial, Ray's view of the trials) when recording a timeline."""
        if self.timeline is None:
            return
        event: dict[str, Any] = {"t": round(self.now(), 3), "kind": kind, **({"trial": name} if name else {}), **data}
        if trials is not None:
            event["views"] = [[t.name, t.status, t.epochs_done, {k: t.last_result[k] for k in RECORDED if k in t.last_result}]
                              for t in trials]
        self.timeline.append(event)

    def timeline_json(self) -> dict[str, Any]:
        return {"expected": self.expected, "finished_before": sorted(self.finished_before), "epochs": self.epochs,
                "slots": self.slots_known, "events": self.timeline or []}

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
        self._record("start")
        self.t0 = self.now()

    def seed(self, ray_trials: list[TrialView]) -> None:
        """Take the trials as they stand (after a resume their last results carry measured epoch times and accuracies);
        trials Ray does not know yet are pending, those finished in an earlier run are done."""
        known = {t.name: t for t in ray_trials}
        for t in ray_trials:
            if t.status == "TERMINATED":
                self.finished.add(t.name)
            accuracy = max((float(t.last_result[k]) for k in (VAL_ACCURACY, BEST_VAL_ACCURACY) if k in t.last_result),
                           default=-1.0)
            if accuracy > self.best[0]:
                self.best = (accuracy, t.name)
        self.trials = [self._view(n, known.get(n)) for n in self.expected]
        self.max_running = max(self.max_running, sum(t.status == "RUNNING" for t in ray_trials))
        if self.est.epoch is None:
            for t in ray_trials:
                if EPOCH_SECONDS in t.last_result:
                    self.est.add_epoch(t.last_result[EPOCH_SECONDS])
                if SETUP_SECONDS in t.last_result:
                    self.est.setup_s.append(float(t.last_result[SETUP_SECONDS]))

    def _view(self, name: str, ray: TrialView | None) -> TrialView:
        """A trial as this session knows it: finished or failed for good as soon as the callback said so (Ray's view
        lags by a step), pending while Ray does not know it."""
        if name in self.finished:
            return TrialView(name, "TERMINATED", epochs_of(self.epochs, name), ray.last_result if ray else {})
        if name in self.failures:
            return TrialView(name, "ERROR", ray.epochs_done if ray else 0, ray.last_result if ray else {})
        return ray or TrialView(name, "PENDING", 0)

    # ------------------------------------------------------------- lines
    def _counts(self) -> str:
        states = [t.status for t in self.trials]
        failed = f", {states.count('ERROR')} failed" if "ERROR" in states else ""
        return (f"{states.count('TERMINATED')}/{self.total} done, {states.count('RUNNING')} running, "
                f"{states.count('PENDING')} pending{failed}")

    def eta(self) -> float | None:
        """The grid's remaining seconds as measured now (not damped)."""
        now = self.now()
        since_result = {n: now - t for n, t in self.last_report_at.items()}
        since_start = {n: now - t for n, t in self.started_at.items()}
        return eta_seconds(self.trials, self.epochs, self.slots, self.est, since_result, since_start, self.cold,
                           self.lost_workers)

    def _eta(self) -> str:
        eta = self.eta()
        if eta is None:
            return "ETA: after the first epoch"
        reason = "; ".join(self.rise.values()) or None
        self.shown, note = damped(eta, self.shown, reason)
        return f"ETA {duration(self.shown)}{note}"

    def _line(self, text: str) -> None:
        self.last_line = self.now()
        self.out(f"[{clock(self.now() - self.t0)}] {text} | {self._counts()} | {self._eta()}", flush=True)

    def trial_started(self, name: str, trials: list[TrialView]) -> None:
        self._record("trial_started", name, trials)
        self.seed(trials)
        now = self.now()
        if self.starts < self.slots or self.lost_workers:
            self.cold.add(name)  # one of the first trials of this session, or after a failure: a new worker
            self.lost_workers = max(self.lost_workers - 1, 0)
        self.starts += 1
        if self.handovers:
            self.est.add_handover(now - self.handovers.popleft())
        self.started_at[name] = now
        self.last_report_at.pop(name, None)

    def result(self, name: str, result: Mapping[str, Any], trials: list[TrialView]) -> None:
        self._record("result", name, trials, result={k: result[k] for k in RECORDED if k in result})
        self.seed(trials)
        if VAL_ACCURACY not in result:
            return
        self._measure(name, result)
        self.rise.pop(name, None)
        self.trials = [TrialView(t.name, t.status, max(t.epochs_done, int(result[EPOCH])), t.last_result)
                       if t.name == name else t for t in self.trials]  # Ray's view may lag by this very result
        if result[VAL_ACCURACY] > self.best[0]:
            self.best = (result[VAL_ACCURACY], name)
        self._line(f"{name} epoch {result[EPOCH]}/{epochs_of(self.epochs, name)}: val_acc {result[VAL_ACCURACY]:.3f} "
                   f"test_acc {result[TEST_ACCURACY]:.3f} ({result.get(SAMPLES_PER_SECOND, 0):.0f} samples/s, "
                   f"{duration(float(result.get(EPOCH_SECONDS, 0.0)))}) | best val_acc {self.best[0]:.3f} ({self.best[1]})")
        if not self.announced:
            self.announce()

    def _measure(self, name: str, result: Mapping[str, Any]) -> None:
        """The epoch's time on this clock (since the trial's previous result), or, for a trial's first result in this
        session, the epoch's reported time and the start-up before it."""
        now = self.now()
        epoch_s = float(result.get(EPOCH_SECONDS, 0.0))
        if name in self.last_report_at:
            self.est.add_epoch(now - self.last_report_at[name])
        elif epoch_s:
            self.est.add_first_epoch(epoch_s, result.get(STARTUP) or {})
            if name in self.started_at:
                self.est.add_startup(now - self.started_at[name] - epoch_s, result.get(STARTUP) or {})
        if SETUP_SECONDS in result and not self.est.setup_s:
            self.est.setup_s.append(float(result[SETUP_SECONDS]))
        self.last_report_at[name] = now

    def _epochs_each(self) -> str:
        counts = sorted({self.epochs} if isinstance(self.epochs, int) else set(self.epochs.values()))
        return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"

    def announce(self) -> None:
        """The grid's expected time, once per session, as soon as an epoch is measured: the ETA of the line just shown,
        and the counts of what is left."""
        if self.shown is None:
            return
        self.announced = True
        left = sum(t.status not in DONE for t in self.trials)
        earlier = f", {len(self.finished_before)} finished earlier" if self.finished_before else ""
        self.out(f"Estimate: the grid needs about {duration(self.shown)} more ({left} of {self.total} trials left"
                 f"{earlier}; {self._epochs_each()} epochs each, {duration(self.est.epoch)} per epoch, "
                 f"{duration(self.est.cold_startup)} to start a trial on a new worker, {duration(self.est.startup)} on a "
                 f"reused one, {self.slots} at a time). The ETA on each line is refined as epochs finish.", flush=True)

    def trial_finished(self, name: str, trials: list[TrialView]) -> None:
        self._record("trial_finished", name, trials)
        self.finished.add(name)
        self.handovers.append(self.last_report_at.get(name, self.now()))
        self.started_at.pop(name, None)
        self.last_report_at.pop(name, None)
        self.seed(trials)
        self._line(f"{name} finished")

    def trial_failed(self, name: str, error: str, where: str, trials: list[TrialView], final: bool) -> None:
        self._record("trial_failed", name, trials, error=error, where=where, final=final)
        self.seed(trials)
        self.started_at.pop(name, None)
        self.last_report_at.pop(name, None)
        self.lost_workers += 1
        if final:
            self.failures.add(name)
            self.seed(trials)
            self._line(f"{name} FAILED for good: {error} (full traceback: {where})")
        else:
            self.rise[name] = f"{name} failed and is retried"
            self._line(f"{name} failed: {error}; retrying from its last checkpoint (full traceback: {where})")

    def poll(self, ray_trials: list[TrialView], messages: Iterable[tuple[str, Mapping[str, Any]]] = ()) -> None:
        """Called every few seconds by the Tune loop: keep the latest news from inside running epochs, and show it
        when no line came for STEP_LINE_EVERY_S."""
        messages = list(messages)
        if messages:
            self._record("poll", None, ray_trials, messages=messages)
        for name, message in messages:
            if WARNING in message:
                self._line(f"{name}: warning: {message[WARNING]}")
            elif message.get("time", 0) >= self.news.get("time", 0):
                self.news = {**message, "trial": name}
        if self.news and self.now() - self.last_line >= STEP_LINE_EVERY_S:
            self.seed(ray_trials)
            self.step(self.news.pop("trial"), self.news)
            self.news = {}

    def step(self, name: str, message: Mapping[str, Any]) -> None:
        """A trial's news from inside an epoch: where it is (training, validation, test), at what pace."""
        phase = message.get("phase", "training")
        self._line(f"{name} epoch {message['epoch']}/{epochs_of(self.epochs, name)}, {phase}: "
                   f"batch {message['step']}/{message['steps']} "
                   f"({message['samples_per_s']:.0f} samples/s)")
