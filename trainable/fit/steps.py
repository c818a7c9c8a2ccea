"""The training step, an epoch and evaluation: plain functions of a model (eager or compiled), batches and the
out-of-memory controller. ``trainable.fit.train`` puts them together into a trial.

Compiled models (``--compile``) see fixed shapes: every batch is padded to the configured batch size (the padding
carries no loss and no gradient, and evaluation cuts it off before scoring), so an epoch's last short batch compiles
nothing new; the switch to eval mode and each halving of the micro-batch compile once.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .augment import soft_cross_entropy_sum
from .oom import MicroBatch, OomRehearsal, OptimizerOutOfMemory, free_cuda, with_oom_fallback

IGNORE = -100  # label of padding samples (cross_entropy's ignore_index)


def compile_model(model, mode: str):
    """The model to call: itself, or ``torch.compile`` of it in ``mode`` (shapes fixed; the weights are shared, so
    checkpoints are saved from ``model``)."""
    if mode == "off":
        return model
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


def forward(model, x: torch.Tensor, rehearsal: OomRehearsal = OomRehearsal()) -> torch.Tensor:
    """Logits for a batch of features [B, T, 128]."""
    rehearsal.check_forward(x.shape[0])
    return model(input_values=x).logits


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def pad_batch(x: torch.Tensor, y: torch.Tensor | None, size: int | None):
    """(x, y) grown to ``size`` samples with zero features labelled IGNORE (no loss, no gradient): a compiled model
    then sees one shape, and the last short batch of an epoch compiles nothing new."""
    n = x.shape[0]
    if not size or n >= size:
        return x, y
    x = torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))])
    if y is not None and y.is_floating_point():  # soft targets (mixup): all-zero rows count nothing
        return x, torch.cat([y, y.new_zeros((size - n, *y.shape[1:]))])
    return x, (None if y is None else torch.cat([y, y.new_full((size - n,), IGNORE)]))


def train_step(model, x, y, optimizer, scaler, device, dtype, micro: MicroBatch, pad_to: int | None = None) -> float:
    """One optimizer step over the batch (x, y), cut into micro-batches whose gradients are accumulated.

    ``y`` holds class indices, or soft targets [B, C] (mixup). Each micro-batch's loss is its summed cross-entropy divided by the whole batch size, so the accumulated
    gradient equals the full batch's. With ``pad_to`` a short batch is padded (``pad_batch``) and the padding counts
    for nothing. Returns the batch's mean loss.
    """
    optimizer.zero_grad(set_to_none=True)
    n = x.shape[0]
    x, y = pad_batch(x, y, pad_to)
    total = torch.zeros((), device=device)
    for xs, ys in zip(x.split(micro.size), y.split(micro.size)):
        xs = xs.to(device, non_blocking=True)
        ys = ys.to(device, non_blocking=True)
        with _autocast(device, dtype):
            logits = forward(model, xs, micro.rehearsal)
        loss = soft_cross_entropy_sum(logits.float(), ys, IGNORE) / n
        scaler.scale(loss).backward()
        total += loss.detach()
    optimizer_step(optimizer, scaler)
    return total.item()  # one device sync per optimizer step


def optimizer_step(optimizer, scaler) -> None:
    """``scaler.step`` + ``update``. An OOM here is not retried with a smaller micro-batch: the scaler has already
    unscaled the gradients (a retry would step with scaled ones) and the memory it wanted is the optimizer's."""
    try:
        scaler.step(optimizer)
    except torch.cuda.OutOfMemoryError as exc:
        failure = OptimizerOutOfMemory(
            f"CUDA out of memory in the optimizer step ({str(exc).splitlines()[0]}): AdamW allocates its state, twice "
            f"the model's size, on the first step, and a smaller micro-batch cannot help there. Give the trial more "
            f"GPU memory: one trial per GPU (--gpus-per-trial 1), a smaller --num-frames, or a larger GPU."
        )
    else:
        scaler.update()
        return
    optimizer.zero_grad(set_to_none=True)
    free_cuda()
    raise failure


@dataclass
class EpochWatch:
    """What happens inside an epoch, for TensorBoard and the console: each optimizer step's loss and learning rate to
    ``on_step`` (the trial's live curves, ``trainable.fit.curves``), and ``on_progress`` every ``every_s`` seconds."""

    epoch: int
    steps: int  # optimizer steps in the epoch
    first_step: int  # the trial's global step number of the epoch's first optimizer step
    on_progress: Callable[[dict[str, Any]], None] | None = None
    every_s: float = 20.0
    on_step: Callable[[int, float, float], None] | None = None  # (global step, loss, learning rate)
    first_step_s: float | None = None  # the epoch's first optimizer step (data loading workers, warm-up, compiling)
    _last: float = field(default_factory=time.perf_counter)

    def step(self, i: int, loss: float, lr: float, seen: int, seconds: float) -> None:
        if i == 1:
            self.first_step_s = seconds
        if self.on_step is not None:
            self.on_step(self.first_step + i - 1, loss, lr)
        self.news(phase="training", step=i, steps=self.steps, samples_per_s=seen / max(seconds, 1e-9))

    def news(self, **message: Any) -> None:
        """Tell ``on_progress`` (at most every ``every_s``): where the epoch is (training, or an evaluation)."""
        now = time.perf_counter()
        if self.on_progress is not None and now - self._last >= self.every_s:
            self._last = now
            self.on_progress({"epoch": self.epoch, "time": time.time(), **message})


def train_one_epoch(model, loader, optimizer, scaler, device, dtype, micro: MicroBatch,
                    watch: EpochWatch | None = None, max_steps: int = 0, pad_to: int | None = None,
                    augment=None, scheduler=None) -> tuple[float, int, float]:
    """Train over ``loader`` once (``max_steps`` optimizer steps at most, when > 0; short batches padded to ``pad_to``).
    ``augment(x, y) -> (x, targets)`` transforms each training batch (``trainable.fit.augment.Augment``); ``scheduler``
    steps after each optimizer step (``watch`` records the lr the step used). Returns (mean training loss, samples
    seen, seconds)."""
    model.train()
    start, loss_sum, seen = time.perf_counter(), 0.0, 0
    for i, (x, y) in enumerate(loader, 1):
        if max_steps and i > max_steps:
            break
        lr = optimizer.param_groups[0]["lr"]
        if augment is not None:
            x, y = augment(x, y)
        loss = with_oom_fallback(
            lambda: train_step(model, x, y, optimizer, scaler, device, dtype, micro, pad_to),
            micro,
            on_oom=lambda: optimizer.zero_grad(set_to_none=True),
        )
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss * x.shape[0]
        seen += x.shape[0]
        if watch is not None:
            watch.step(i, loss, lr, seen, time.perf_counter() - start)
    return loss_sum / max(seen, 1), seen, time.perf_counter() - start


@torch.no_grad()
def evaluate(model, loader, device, dtype, micro: MicroBatch, num_classes: int, pad_to: int | None = None,
             watch: EpochWatch | None = None, phase: str = "evaluation") -> tuple[float, float, np.ndarray]:
    """Mean loss, accuracy and confusion matrix [true, predicted] over ``loader`` (every clip counted: a short batch
    padded to ``pad_to`` is cut back before scoring); ``watch`` hears where it is (``phase``)."""
    model.eval()
    loss_sum, confusion = 0.0, np.zeros((num_classes, num_classes), dtype=np.int64)

    def batch_logits(x):
        return torch.cat([forward(model, xs.to(device, non_blocking=True), micro.rehearsal).float()
                          for xs in x.split(micro.size)])

    start = time.perf_counter()
    for i, (x, y) in enumerate(loader, 1):
        n = x.shape[0]
        x, _ = pad_batch(x, None, pad_to)
        with _autocast(device, dtype):
            logits = with_oom_fallback(lambda: batch_logits(x), micro)[:n]
        y = y.to(device)
        loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        np.add.at(confusion, (y.cpu().numpy(), logits.argmax(-1).cpu().numpy()), 1)
        if watch is not None:
            watch.news(phase=phase, step=i, steps=len(loader),
                       samples_per_s=int(confusion.sum()) / max(time.perf_counter() - start, 1e-9))
    n = int(confusion.sum())
    return loss_sum / max(n, 1), float(np.trace(confusion)) / max(n, 1), confusion
