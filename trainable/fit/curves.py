"""A trial's TensorBoard events, written by the trial itself while it trains: each optimizer step's training loss and
learning rate (on disk at least every ASTCV_LIVE_EVERY_S seconds, so the curves move during an epoch), each epoch's
metrics, and the HParams view's record of the trial (its grid point, and which accuracy tags to compare).

One writer per trial folder: TensorBoard reads a run's event files one after the other, so a second writer in the same
folder at the same time would hide one of them. Written synchronously (no queue thread): ``flush`` means on disk.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

from ..store.experiment import HPARAM_KEYS, HPARAM_METRICS, TB_TRAIN_LOSS, TB_TRAIN_LR, tensorboard_scalars

LIVE_EVERY_ENV = "ASTCV_LIVE_EVERY_S"
LIVE_EVERY_S = 20.0  # TensorBoard's own reload interval is 30 s: a step curve at most about a minute old


def live_every_s() -> float:
    """Seconds between flushes inside an epoch: ASTCV_LIVE_EVERY_S, else LIVE_EVERY_S."""
    try:
        return max(float(os.environ.get(LIVE_EVERY_ENV, LIVE_EVERY_S)), 0.0)
    except ValueError:
        return LIVE_EVERY_S


def hparams_of(config) -> dict[str, Any]:
    """A trial's row in the HParams view: its grid point (a TrainConfig's lr, batch size, test and validation fold)."""
    return {key: getattr(config, key) for key in HPARAM_KEYS if getattr(config, key, None) is not None}


class LiveCurves:
    """Per-step and per-epoch scalars and the HParams record of one trial, in ``logdir``."""

    def __init__(self, logdir: str | Path, hparams: Mapping[str, Any] | None = None, every_s: float | None = None):
        from tensorboardX.event_file_writer import EventsWriter

        Path(logdir).mkdir(parents=True, exist_ok=True)
        self.logdir = Path(logdir)
        self.every_s = live_every_s() if every_s is None else every_s
        self._writer = EventsWriter(str(self.logdir / "events"))
        self._flushed = time.monotonic()
        self._hparams = dict(hparams or {})
        self.finished = False  # the trial ran all its epochs (the HParams view's session status, at close)
        if self._hparams:
            from tensorboardX.summary import hparams as hparams_summaries

            experiment, start, _ = hparams_summaries(self._hparams, {tag: 0.0 for tag in HPARAM_METRICS})
            self._summary(experiment, 0)
            self._summary(start, 0)
            self.flush()

    def _summary(self, summary, step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self._writer.write_event(Event(wall_time=time.time(), step=int(step), summary=summary))

    def scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.summary import scalar

        self._summary(scalar(tag, float(value)), step)

    def step(self, step: int, loss: float, lr: float) -> None:
        """One optimizer step (``step`` counts the trial's steps from 1); on disk within ``every_s``."""
        self.scalar(TB_TRAIN_LOSS, loss, step)
        self.scalar(TB_TRAIN_LR, lr, step)
        if time.monotonic() - self._flushed >= self.every_s:
            self.flush()

    def epoch(self, metrics: Mapping[str, Any]) -> None:
        """An epoch's metrics (x axis: the epoch), on disk before the epoch is reported."""
        for tag, value, step in tensorboard_scalars(metrics):
            self.scalar(tag, value, step)
        self.flush()

    def flush(self) -> None:
        self._writer.flush()
        self._flushed = time.monotonic()

    def close(self, finished: bool | None = None) -> None:
        """Flush and close; ``finished`` (else the attribute): the trial ran all its epochs."""
        if (self.finished if finished is None else finished) and self._hparams:
            from tensorboardX.summary import hparams as hparams_summaries

            self._summary(hparams_summaries(self._hparams, {})[2], 0)
        self._writer.close()
