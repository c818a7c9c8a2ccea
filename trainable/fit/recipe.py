"""The optimizer, the learning-rate schedule and weight averaging of the official AST recipe (YuanGongND/ast,
``src/traintest.py``), as options of a trial.

- Optimizer: AdamW (ast-cv's default) or Adam, with ``betas`` and ``weight_decay`` from the config (official: Adam,
  betas (0.95, 0.999), weight decay 5e-7).
- Schedule, a factor on the lr at each optimizer step ``s`` (0-based, counted over the whole trial):
  ``constant``: 1 (after a linear warmup when ``warmup_steps`` > 0);
  ``step`` (official): a warmup, as traintest.py does it, that sets lr·(s' / W) every 50 steps (s' = s rounded down to
  a multiple of 50; so the first 50 steps run at 0), times the official MultiStepLR: ×``factor`` at the end of epochs
  start, start+step, ... (ESC-50: start 5, step 1, factor 0.85: epochs 1-5 at lr, epoch 6 at 0.85·lr, ...);
  ``cosine``: a linear warmup (s+1)/W, then a half cosine from lr to 0 over the remaining steps.
  The schedule is a ``LambdaLR`` stepped after every optimizer step; its state is saved in the checkpoint.
- Weight averaging (official ``wa``): the mean of the weights at the end of epochs ``wa_start..wa_end``, evaluated and
  saved as its own model (``averaged/`` in the checkpoint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import TrainConfig

WARMUP_EVERY = 50  # the official warmup raises the lr every 50 steps


def make_optimizer(config: TrainConfig, params, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW or Adam as configured (fused on CUDA when ``fused``)."""
    kind = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return kind(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay, fused=fused)


@dataclass
class Schedule:
    """The lr factor at optimizer step ``s`` (a picklable callable: LambdaLR saves its fields in its state)."""

    kind: str = "constant"
    steps_per_epoch: int = 1
    total_steps: int = 1
    warmup_steps: int = 0
    decay_start: int = 5
    decay_step: int = 1
    decay_factor: float = 0.85

    def __call__(self, s: int) -> float:
        if self.kind == "step":
            return self.official_warmup(s) * self.decay(s // self.steps_per_epoch + 1)
        warm = min(1.0, (s + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.kind == "cosine" and s >= self.warmup_steps:
            span = max(1, self.total_steps - self.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - self.warmup_steps) / span)))
        return warm

    def official_warmup(self, s: int) -> float:
        if not self.warmup_steps or s >= self.warmup_steps:
            return 1.0
        return (s - s % WARMUP_EVERY) / self.warmup_steps

    def decay(self, epoch: int) -> float:
        """MultiStepLR(milestones=range(start, 1000, step), gamma=factor), stepped at each epoch's end: the factor
        of epoch ``epoch`` (1-based) is factor ** (milestones <= epoch - 1)."""
        done = epoch - 1
        if done < self.decay_start:
            return 1.0
        return self.decay_factor ** ((done - self.decay_start) // self.decay_step + 1)


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> Schedule:
    return Schedule(config.lr_schedule, max(1, steps_per_epoch), max(1, steps_per_epoch * config.epochs),
                    config.warmup_steps, config.lr_decay_start, config.lr_decay_step, config.lr_decay_factor)


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """A LambdaLR over optimizer steps; the optimizer's lr is the first step's at once."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, make_schedule(config, steps_per_epoch))


class WeightAverage:
    """The running mean (float32, CPU) of the weights at the end of epochs ``start..end`` (official ``wa``)."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end
        self.count = 0
        self.mean: dict[str, torch.Tensor] = {}

    @property
    def enabled(self) -> bool:
        return self.start > 0

    def wants(self, epoch: int) -> bool:
        return self.enabled and self.start <= epoch <= self.end

    def add(self, model) -> None:
        self.count += 1
        for k, v in model.state_dict().items():
            v = v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
            if k not in self.mean or not v.is_floating_point():
                self.mean[k] = v.clone()
            else:
                self.mean[k] += (v - self.mean[k]) / self.count

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean = int(state["count"]), dict(state["mean"])


def swapped_in(model, weights: dict[str, torch.Tensor]):
    """A context manager: the model holds ``weights`` inside, its own weights again after."""
    from contextlib import contextmanager

    @contextmanager
    def swap():
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()})
        try:
            yield model
        finally:
            model.load_state_dict(own)

    return swap()


WA_VAL_ACCURACY = "wa_val_accuracy"  # the averaged weights' accuracies, reported at epoch wa_end
WA_TEST_ACCURACY = "wa_test_accuracy"
from .checkpoint import AVERAGED_DIR  # noqa: E402,F401  the averaged model in a checkpoint (beside best/)


class TrialRecipe:
    """A trial's recipe state: the lr scheduler, the weight average and each epoch's augmentation. Create it before
    restoring a checkpoint (the scheduler must not see the restored lr as its base)."""

    def __init__(self, config: TrainConfig, optimizer, train_clips: int, num_classes: int, seed: int):
        batches = -(-train_clips // config.batch_size)
        self.steps_per_epoch = min(batches, config.max_steps_per_epoch or batches)
        self.config, self.num_classes, self.seed = config, num_classes, seed
        self.scheduler = make_scheduler(config, optimizer, self.steps_per_epoch)
        self.wa = WeightAverage(config.wa_start, config.wa_end)

    def augment(self, epoch: int):
        """The epoch's augmentation (None when the recipe has none); its randomness is a function of (seed, epoch)."""
        from .augment import Augment, epoch_generator

        c = self.config
        aug = Augment(c.freqm, c.timem, c.mixup, self.num_classes, epoch_generator(self.seed, epoch))
        return aug if aug.active else None

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "wa": self.wa.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.wa.load_state_dict(state["wa"])

    @property
    def averaged(self) -> dict[str, torch.Tensor] | None:
        """The averaged weights once every chosen epoch is in, else None."""
        complete = self.wa.enabled and self.wa.count == self.wa.end - self.wa.start + 1
        return self.wa.mean if complete else None

    def end_epoch(self, epoch: int, model, evaluate) -> dict[str, float]:
        """Add the epoch's weights to the average when chosen; at the last chosen epoch, the averaged model's
        (validation, test) accuracies from ``evaluate()`` (called with the averaged weights swapped in)."""
        if not self.wa.wants(epoch):
            return {}
        self.wa.add(model)
        if epoch != self.wa.end:
            return {}
        with swapped_in(model, self.wa.mean):
            val, test = evaluate()
        return {WA_VAL_ACCURACY: val[1], WA_TEST_ACCURACY: test[1]}
