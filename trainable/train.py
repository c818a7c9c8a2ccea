"""Fine-tune AST on one fold with one configuration: the training step with its out-of-memory fallback, the epoch
loop (``train_one_epoch``, ``evaluate``, ``fit``) and the refit on all folds. Ray-free; the Ray trial is
``trainable.trial`` and the one-fold command line is ``trainable.local`` (``python -m trainable.train`` runs it).
"""

from __future__ import annotations

import json
import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .checkpoint import TrainerState, load_best_weights, load_checkpoint, save_checkpoint, snapshot_weights
from .config import TrainConfig
from .data import class_names, drop_clips, load_metadata, split_folds
from .errors import AstCvError
from .experiment import (
    BEST_EPOCH,
    BEST_TEST_ACCURACY,
    BEST_VAL_ACCURACY,
    EPOCH,
    EPOCH_SECONDS,
    GRAD_ACCUM_STEPS,
    MICRO_BATCH_SIZE,
    OOM_FALLBACKS,
    SAMPLES_PER_SECOND,
    SELECTION_SCORE,
    SETUP_SECONDS,
    TEST_ACCURACY,
    TEST_CONFUSION,
    TEST_LOSS,
    TRAIN_LOSS,
    TRAIN_STEPS,
    VAL_ACCURACY,
    VAL_LOSS,
    selection_score,
)
from .oom import (
    MicroBatch,
    OomRehearsal,
    OptimizerOutOfMemory,
    free_cuda,
    with_oom_fallback,
)
from .storage import temp_dir

log = logging.getLogger(__name__)

def forward(model, x: torch.Tensor, rehearsal: OomRehearsal = OomRehearsal()) -> torch.Tensor:
    """Logits for a batch of features [B, T, 128]."""
    rehearsal.check_forward(x.shape[0])
    return model(input_values=x).logits


def resolve_device(config: TrainConfig) -> torch.device:
    if config.device == "cpu":
        return torch.device("cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise AstCvError("device 'cuda' was asked for but torch sees no CUDA GPU. Use --device auto or cpu.")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 where the GPU supports it, fp16 (with GradScaler) otherwise; None on CPU/off."""
    if config.amp == "off" or device.type != "cuda":
        return None
    if config.amp == "bf16":
        return torch.bfloat16
    if config.amp == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def train_step(model, x, y, optimizer, scaler, device, dtype, micro: MicroBatch) -> float:
    """One optimizer step over the batch (x, y), cut into micro-batches whose gradients are accumulated.

    Each micro-batch's loss is its summed cross-entropy divided by the whole batch size, so the accumulated
    gradient equals the full batch's. Returns the batch's mean loss.
    """
    optimizer.zero_grad(set_to_none=True)
    n = x.shape[0]
    total = torch.zeros((), device=device)
    for xs, ys in zip(x.split(micro.size), y.split(micro.size)):
        xs = xs.to(device, non_blocking=True)
        ys = ys.to(device, non_blocking=True)
        with _autocast(device, dtype):
            logits = forward(model, xs, micro.rehearsal)
        loss = torch.nn.functional.cross_entropy(logits.float(), ys, reduction="sum") / n
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
    """What happens inside an epoch, for TensorBoard and the console: each optimizer step's loss and learning rate
    (averaged over windows, so an epoch keeps at most MAX_POINTS), and ``on_progress`` every ``every_s`` seconds."""

    MAX_POINTS = 200
    epoch: int
    steps: int  # optimizer steps in the epoch
    first_step: int  # the trial's global step number of the epoch's first optimizer step
    on_progress: Callable[[dict[str, Any]], None] | None = None
    every_s: float = 20.0
    points: list[list[float]] = field(default_factory=list)  # [global step, loss, lr]
    _window: list[float] = field(default_factory=list)
    _last: float = field(default_factory=time.perf_counter)

    def step(self, i: int, loss: float, lr: float, seen: int, seconds: float) -> None:
        self._window.append(loss)
        stride = max(1, -(-self.steps // self.MAX_POINTS))
        if len(self._window) >= stride or i == self.steps:
            self.points.append([self.first_step + i - 1, sum(self._window) / len(self._window), lr])
            self._window.clear()
        now = time.perf_counter()
        if self.on_progress is not None and now - self._last >= self.every_s:
            self._last = now
            self.on_progress({"epoch": self.epoch, "step": i, "steps": self.steps,
                              "samples_per_s": seen / max(seconds, 1e-9), "time": time.time()})


def train_one_epoch(model, loader, optimizer, scaler, device, dtype, micro: MicroBatch,
                    watch: EpochWatch | None = None, max_steps: int = 0) -> tuple[float, int, float]:
    """Train over ``loader`` once (``max_steps`` optimizer steps at most, when > 0). Returns (mean training loss,
    samples seen, seconds)."""
    model.train()
    start, loss_sum, seen = time.perf_counter(), 0.0, 0
    for i, (x, y) in enumerate(loader, 1):
        if max_steps and i > max_steps:
            break
        loss = with_oom_fallback(
            lambda: train_step(model, x, y, optimizer, scaler, device, dtype, micro),
            micro,
            on_oom=lambda: optimizer.zero_grad(set_to_none=True),
        )
        loss_sum += loss * x.shape[0]
        seen += x.shape[0]
        if watch is not None:
            watch.step(i, loss, optimizer.param_groups[0]["lr"], seen, time.perf_counter() - start)
    return loss_sum / max(seen, 1), seen, time.perf_counter() - start


@torch.no_grad()
def evaluate(model, loader, device, dtype, micro: MicroBatch, num_classes: int) -> tuple[float, float, np.ndarray]:
    """Mean loss, accuracy and confusion matrix [true, predicted] over ``loader``."""
    model.eval()
    loss_sum, confusion = 0.0, np.zeros((num_classes, num_classes), dtype=np.int64)

    def batch_logits(x):
        return torch.cat([forward(model, xs.to(device, non_blocking=True), micro.rehearsal).float()
                          for xs in x.split(micro.size)])

    for x, y in loader:
        with _autocast(device, dtype):
            logits = with_oom_fallback(lambda: batch_logits(x), micro)
        y = y.to(device)
        loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        np.add.at(confusion, (y.cpu().numpy(), logits.argmax(-1).cpu().numpy()), 1)
    n = int(confusion.sum())
    return loss_sum / max(n, 1), float(np.trace(confusion)) / max(n, 1), confusion


def trial_seed(config: TrainConfig) -> int:
    """Each trial's seed: a function of (seed, test fold), so folds differ and reruns repeat."""
    return config.seed * 1000 + config.test_fold


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrialData:
    """The datasets of one cross-validation round and the class names (label index order)."""

    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]


def dataset_source(config: TrainConfig):
    """(usable metadata rows, class names, rows -> Dataset) for the folds in use, cached features when configured.

    Clips in ``config.skip_clips``, and clips the feature cache could not decode, are left out.
    """
    full = load_metadata(config.data_root, config.folds)
    classes = class_names(full)
    if config.feature_cache:
        from .cache import CachedDataset, FeatureCache

        cache = FeatureCache.open(config, full, workers=config.torch_threads or None)  # a trial's CPUs at most
        meta = drop_clips(full, {*config.skip_clips, *cache.excluded})
        return meta, classes, lambda rows: CachedDataset(cache, rows, classes)
    from .audio import ClipDataset

    meta = drop_clips(full, config.skip_clips)
    return meta, classes, lambda rows: ClipDataset(config.data_root, rows, classes, config.num_frames)


def build_datasets(config: TrainConfig) -> TrialData:
    """Load and split the metadata and wrap each split in a Dataset."""
    meta, classes, make = dataset_source(config)
    splits = split_folds(meta, config.test_fold, config.val_fold)
    return TrialData(make(splits.train), make(splits.val), make(splits.test), classes)


def prepare_process(config: TrainConfig) -> None:
    """Thread count and seeds, first thing in a run."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    seed_everything(trial_seed(config))


def training_objects(config: TrainConfig, classes: Sequence[str]):
    """(device, autocast dtype, model on the device, AdamW, GradScaler) for a run."""
    from .model import load_model

    device = resolve_device(config)
    dtype = amp_dtype(config, device)
    model = load_model(config.model, classes, config.num_frames).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    return device, dtype, model, optimizer, scaler


def make_loader(config: TrainConfig, dataset: Dataset, device: torch.device, **kw) -> DataLoader:
    """Batches of the configured (effective) size; pinned memory when training on a GPU."""
    return DataLoader(dataset, batch_size=config.batch_size, num_workers=config.num_workers,
                      pin_memory=device.type == "cuda", **kw)


Reporter = Callable[[dict[str, Any], Path], None]


def restore(restore_dir: str | Path, model, optimizer, scaler) -> tuple[TrainerState, dict[str, torch.Tensor] | None]:
    """(trainer state, best weights so far) from a checkpoint, the model, optimizer and scaler restored in place."""
    state = load_checkpoint(restore_dir, model, optimizer, scaler)
    best = load_best_weights(restore_dir, model)
    if best is None and state.best_epoch == state.epoch and not state.finished:  # a checkpoint without best/
        best = snapshot_weights(model)
    log.info("resumed after epoch %d from %s", state.epoch, restore_dir)
    return state, best


def epoch_metrics(epoch: int, train_loss: float, val, test, samples_per_second: float, micro: MicroBatch,
                  state: TrainerState, watch: EpochWatch) -> dict[str, Any]:
    """What an epoch reports (``val``, ``test``: evaluate's (loss, accuracy, confusion))."""
    return {
        EPOCH: epoch,
        TRAIN_LOSS: train_loss,
        VAL_LOSS: val[0],
        VAL_ACCURACY: val[1],
        SELECTION_SCORE: selection_score(val[1], epoch),
        TEST_LOSS: test[0],
        TEST_ACCURACY: test[1],
        MICRO_BATCH_SIZE: micro.size,
        GRAD_ACCUM_STEPS: micro.accum_steps,
        SAMPLES_PER_SECOND: samples_per_second,
        BEST_EPOCH: state.best_epoch,
        BEST_VAL_ACCURACY: state.best_val_accuracy,
        BEST_TEST_ACCURACY: state.best_test_accuracy,
        OOM_FALLBACKS: micro.fallbacks,
        TEST_CONFUSION: json.dumps(test[2].tolist()),
        TRAIN_STEPS: watch.points,
    }


def fit(config: TrainConfig, report: Reporter, restore_dir: str | Path | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None) -> TrainerState:
    """Train for ``config.epochs`` epochs, calling ``report(metrics, checkpoint_dir)`` after each.

    ``checkpoint_dir`` is a temporary folder holding that epoch's checkpoint (``trainable.checkpoint``: the resume
    point, except after the last epoch unless ``keep_checkpoints`` is "all", and the best epoch's weights); the
    reporter must copy what it keeps before returning. With ``restore_dir``, training resumes exactly after that
    checkpoint's epoch (a finished trial's checkpoint: nothing is left to do). ``on_progress`` hears from inside
    each epoch every 20 s (step, samples/s).
    """
    started = time.perf_counter()
    prepare_process(config)
    data = build_datasets(config)
    device, dtype, model, optimizer, scaler = training_objects(config, data.classes)
    state = TrainerState(micro_batch_size=config.batch_size, config=config.to_dict())
    best = None  # the best epoch's weights so far (float16, CPU)
    if restore_dir is not None:
        state, best = restore(restore_dir, model, optimizer, scaler)
    micro = MicroBatch.start(config.batch_size, optimizer, state.micro_batch_size)
    log.info(
        "fold %d (val %s): %d train / %d val / %d test clips on %s%s",
        config.test_fold, config.val_fold or "auto", len(data.train), len(data.val), len(data.test), device,
        f" with {dtype} autocast" if dtype else "",
    )
    generator = torch.Generator()
    train_loader = make_loader(config, data.train, device, shuffle=True, generator=generator)
    val_loader, test_loader = make_loader(config, data.val, device), make_loader(config, data.test, device)
    setup_seconds = time.perf_counter() - started

    for epoch in range(state.epoch + 1, config.epochs + 1):
        epoch_start = time.perf_counter()
        generator.manual_seed(trial_seed(config) * 100 + epoch)  # same shuffle whether resumed or not
        steps = min(len(train_loader), config.max_steps_per_epoch or len(train_loader))
        watch = EpochWatch(epoch, steps, (epoch - 1) * steps + 1, on_progress)
        train_loss, seen, seconds = train_one_epoch(model, train_loader, optimizer, scaler, device, dtype, micro, watch,
                                                    config.max_steps_per_epoch)
        val = evaluate(model, val_loader, device, dtype, micro, len(data.classes))
        test = evaluate(model, test_loader, device, dtype, micro, len(data.classes))
        if selection_score(val[1], epoch) > selection_score(state.best_val_accuracy, state.best_epoch):
            state.best_epoch, state.best_val_accuracy, state.best_test_accuracy = epoch, val[1], test[1]
            best = snapshot_weights(model)
        metrics = epoch_metrics(epoch, train_loss, val, test, seen / max(seconds, 1e-9), micro, state, watch)
        state.epoch, state.micro_batch_size = epoch, micro.size
        state.history.append(metrics)
        log.info(
            "epoch %d/%d: train_loss %.4f val_acc %.4f test_acc %.4f (%.1f samples/s, micro-batch %d x %d)",
            epoch, config.epochs, train_loss, val[1], test[1], metrics[SAMPLES_PER_SECOND], micro.size, micro.accum_steps,
        )
        resumable = epoch < config.epochs or config.keep_checkpoints == "all"
        with temp_dir("ckpt") as tmp:
            save_checkpoint(tmp, model, optimizer, scaler, state, config.num_frames, best, resumable)
            metrics.update({EPOCH_SECONDS: time.perf_counter() - epoch_start, SETUP_SECONDS: setup_seconds})
            report(metrics, Path(tmp))
    return state


def train_on_all_folds(config: TrainConfig, epochs: int, out_dir: str | Path) -> Path:
    """Train one model on every fold in use (no held-out data) for ``epochs`` epochs and export it (HF format).

    The refit step after cross-validation: the config and epoch count come from the CV results.
    """
    from .model import export_model

    prepare_process(config)
    meta, classes, make = dataset_source(config)
    dataset = make(meta)
    device, dtype, model, optimizer, scaler = training_objects(config, classes)
    micro = MicroBatch.start(config.batch_size, optimizer)
    generator = torch.Generator()
    loader = make_loader(config, dataset, device, shuffle=True, generator=generator)
    for epoch in range(1, epochs + 1):
        generator.manual_seed(trial_seed(config) * 100 + epoch)
        loss, seen, seconds = train_one_epoch(model, loader, optimizer, scaler, device, dtype, micro)
        log.info("refit epoch %d/%d on all %d clips: train_loss %.4f (%.1f samples/s)", epoch, epochs, seen, loss, seen / max(seconds, 1e-9))
    return export_model(model.cpu(), out_dir, config.num_frames)


if __name__ == "__main__":  # python -m trainable.train: the one-fold command line
    from .local import main

    raise SystemExit(main())
