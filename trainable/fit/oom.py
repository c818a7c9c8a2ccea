"""Surviving CUDA out-of-memory: a batch cut into micro-batches whose gradients are accumulated (the effective batch
is kept), halved on each OOM; the errors where halving cannot help; and a rehearsal of OOMs on any machine.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..errors import AstCvError

log = logging.getLogger(__name__)

SIMULATE_OOM_ENV = "ASTCV_SIMULATE_OOM_ABOVE"
SIMULATE_OOM_STEP_ENV = "ASTCV_SIMULATE_OOM_IN_STEP"


class TrainingOutOfMemory(AstCvError):
    """CUDA ran out of memory where the micro-batch fallback cannot help; the message says what to try."""


class OutOfMemoryAtOne(TrainingOutOfMemory):
    """CUDA ran out of memory even with one sample per forward pass."""


class OptimizerOutOfMemory(TrainingOutOfMemory):
    """CUDA ran out of memory inside the optimizer step (AdamW allocating its state), after the gradients were made."""


@dataclass(frozen=True)
class OomRehearsal:
    """Out-of-memory errors on purpose, on any machine, to rehearse the fallback (read once per run):
    ``ASTCV_SIMULATE_OOM_ABOVE=N`` fails forward passes of more than N samples, ``ASTCV_SIMULATE_OOM_IN_STEP=1``
    fails the first optimizer step."""

    above: int | None = None
    in_step: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "OomRehearsal":
        value = env.get(SIMULATE_OOM_ENV, "").strip()
        try:
            above = int(value) if value else None
        except ValueError:
            raise AstCvError(f"{SIMULATE_OOM_ENV} must be a whole number of samples, got {value!r}.") from None
        return cls(above, env.get(SIMULATE_OOM_STEP_ENV, "").strip() not in ("", "0"))

    def check_forward(self, n: int) -> None:
        if self.above is not None and n > self.above:
            raise torch.cuda.OutOfMemoryError(f"simulated: forward pass of {n} samples > {SIMULATE_OOM_ENV}={self.above}")

    def arm(self, optimizer: torch.optim.Optimizer) -> None:
        """With ``in_step``: the optimizer's first step raises CUDA OOM, as AdamW allocating its state can."""
        if not self.in_step:
            return
        fired = []

        def fail_once(opt, args, kwargs):
            if not fired:
                fired.append(True)
                raise torch.cuda.OutOfMemoryError(f"simulated: optimizer step ({SIMULATE_OOM_STEP_ENV})")

        optimizer.register_step_pre_hook(fail_once)


@dataclass
class MicroBatch:
    """How an effective batch is cut into forward passes; halves on CUDA out-of-memory."""

    size: int
    batch_size: int
    fallbacks: int = 0
    rehearsal: OomRehearsal = field(default_factory=OomRehearsal)

    @classmethod
    def start(cls, batch_size: int, optimizer: torch.optim.Optimizer, size: int | None = None) -> "MicroBatch":
        """The controller of a run: micro-batch ``size`` (default: the whole batch), the OOM rehearsal read from the
        environment once and armed on ``optimizer``."""
        rehearsal = OomRehearsal.from_env()
        rehearsal.arm(optimizer)
        return cls(size=size or batch_size, batch_size=batch_size, rehearsal=rehearsal)

    @property
    def accum_steps(self) -> int:
        return math.ceil(self.batch_size / self.size)

    def halve(self, reason: BaseException) -> None:
        if self.size <= 1:
            raise OutOfMemoryAtOne(
                f"CUDA out of memory even with micro-batch 1 ({reason}). Use a smaller --num-frames, a GPU with "
                f"more memory, or fewer trials per GPU (--gpus-per-trial 1)."
            ) from reason
        old = self.size
        self.size = max(1, self.size // 2)
        self.fallbacks += 1
        log.warning(
            "CUDA out of memory at micro-batch %d: retrying the batch as %d x %d (effective batch %d kept)",
            old, self.size, self.accum_steps, self.batch_size,
        )


def free_cuda() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def with_oom_fallback(fn: Callable[[], Any], micro: MicroBatch, on_oom: Callable[[], None] = lambda: None) -> Any:
    """Run ``fn``; on CUDA out-of-memory free memory, halve the micro-batch and run it again."""
    while True:
        try:
            return fn()
        except torch.cuda.OutOfMemoryError as exc:
            error = exc
        # Outside the except block, so the traceback's references to activations are dropped first.
        on_oom()
        free_cuda()
        micro.halve(error)
