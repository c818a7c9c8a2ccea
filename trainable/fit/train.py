"""Fine-tune AST on one fold with one configuration: a trial's set-up, its epoch loop (``fit``, over the steps of
``trainable.fit.steps``) and the refit on all folds. Ray-free; the Ray trial is
``trainable.run.trial`` and the one-fold command line is ``trainable.fit.local`` (``python -m trainable.fit`` runs it).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .checkpoint import TrainerState, load_best_weights, load_checkpoint, save_checkpoint, snapshot_weights
from ..config import TrainConfig
from ..data.metadata import class_names, drop_clips, load_metadata, split_folds
from ..errors import AstCvError
from ..store.experiment import (
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
    STARTUP,
    STARTUP_FIRST_STEP,
    TEST_ACCURACY,
    TEST_CONFUSION,
    TEST_LOSS,
    TRAIN_LOSS,
    VAL_ACCURACY,
    VAL_LOSS,
    selection_score,
)
from .oom import MicroBatch
from .recipe import TrialRecipe, make_optimizer
from .rng import EpochShuffle, start_epoch, worker_generator
from .steps import EpochWatch, compile_model, evaluate, train_one_epoch
from ..store.storage import temp_dir

log = logging.getLogger(__name__)

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
        from ..data.cache import CachedDataset, FeatureCache

        cache = FeatureCache.open(config, full, workers=config.torch_threads or None)  # a trial's CPUs at most
        meta = drop_clips(full, {*config.skip_clips, *cache.excluded})
        return meta, classes, lambda rows: CachedDataset(cache, rows, classes)
    from ..data.audio import ClipDataset

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
    """(device, autocast dtype, model on the device, the model to call (compiled or not), AdamW, GradScaler).

    AdamW is fused on CUDA (one kernel for all parameters instead of several per tensor: measured 1.37x the step at
    batch 16 on an H200, BENCHMARKS.md); torch's default (foreach) elsewhere.
    """
    from .model import load_model

    device = resolve_device(config)
    dtype = amp_dtype(config, device)
    model = load_model(config.model, classes, config.num_frames).to(device)
    optimizer = make_optimizer(config, model.parameters(), fused=True if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    return device, dtype, model, compile_model(model, config.compile), optimizer, scaler


def pad_to(config: TrainConfig) -> int | None:
    """Compiled models see one batch shape (``trainable.fit.steps.pad_batch``); eager ones the batches as they come."""
    return config.batch_size if config.compile != "off" else None


def make_loader(config: TrainConfig, dataset: Dataset, device: torch.device, **kw) -> DataLoader:
    """Batches of the configured (effective) size; pinned memory when training on a GPU; worker processes started
    once per trial, not at every epoch of every loader (on CPU-2: the first batch 40 ms respawned, 5 ms kept). From the
    feature cache one worker reads 12,000 clips/s (BENCHMARKS.md), 20x an H200's training step, so the default
    prefetch keeps up. Each loader has its own generator (``trainable.fit.rng.worker_generator``): iterating one
    never draws from the global RNG."""
    workers = dict(persistent_workers=True) if config.num_workers > 0 else {}
    return DataLoader(dataset, batch_size=config.batch_size, num_workers=config.num_workers,
                      pin_memory=device.type == "cuda", generator=worker_generator(trial_seed(config)), **workers, **kw)


Reporter = Callable[[dict[str, Any], Path], None]


def restore(restore_dir: str | Path, model, optimizer, scaler,
            recipe: TrialRecipe | None = None) -> tuple[TrainerState, dict[str, torch.Tensor] | None]:
    """(trainer state, best weights so far) from a checkpoint, the model, optimizer, scaler and recipe restored in place."""
    state = load_checkpoint(restore_dir, model, optimizer, scaler, recipe)
    best = load_best_weights(restore_dir, model)
    if best is None and state.best_epoch == state.epoch and not state.finished:  # a checkpoint without best/
        best = snapshot_weights(model)
    log.info("resumed after epoch %d from %s", state.epoch, restore_dir)
    return state, best


def epoch_metrics(epoch: int, train_loss: float, val, test, samples_per_second: float, micro: MicroBatch,
                  state: TrainerState) -> dict[str, Any]:
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
    }


class Laps:
    """Named durations of a trial's start (data, model, restore, loaders, first step), reported as STARTUP."""

    def __init__(self, **known: Any):
        self.times: dict[str, Any] = dict(known)
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[f"{name}_s"] = round(now - self._last, 4)
        self._last = now


def evaluate_splits(net, loaders, device, dtype, micro: MicroBatch, num_classes: int, pad, watch):
    """(validation, test) results of ``evaluate`` over the two loaders."""
    return tuple(evaluate(net, loader, device, dtype, micro, num_classes, pad, watch, phase)
                 for loader, phase in zip(loaders, ("validation", "test")))


def trial_loaders(config: TrainConfig, data, device):
    """(the train order, then the train, validation and test loaders) of one trial."""
    order = EpochShuffle(len(data.train), trial_seed(config))
    return (order, make_loader(config, data.train, device, sampler=order), make_loader(config, data.val, device),
            make_loader(config, data.test, device))


def fit(config: TrainConfig, report: Reporter, restore_dir: str | Path | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None, startup: dict[str, Any] | None = None,
        on_step: Callable[[int, float, float], None] | None = None) -> TrainerState:
    """Train for ``config.epochs`` epochs, calling ``report(metrics, checkpoint_dir)`` after each.

    ``checkpoint_dir`` is a temporary folder holding that epoch's checkpoint (``trainable.fit.checkpoint``: the resume
    point, except after the last epoch unless ``keep_checkpoints`` is "all", and the best epoch's weights); the
    reporter must copy what it keeps before returning. With ``restore_dir``, training resumes exactly after that
    checkpoint's epoch (a finished trial's checkpoint: nothing is left to do). ``on_progress`` hears from inside
    each epoch every 20 s (step, samples/s), ``on_step`` each optimizer step (global step, loss, learning rate: the
    live curves, ``trainable.fit.curves``). ``startup``: what the caller measured of the trial's start, reported too.
    """
    started = time.perf_counter()
    laps = Laps(**(startup or {}))
    prepare_process(config)
    data = build_datasets(config)
    laps.lap("data")
    device, dtype, model, net, optimizer, scaler = training_objects(config, data.classes)
    laps.lap("model")
    state = TrainerState(micro_batch_size=config.batch_size, config=config.to_dict())
    best, recipe = None, TrialRecipe(config, optimizer, len(data.train), len(data.classes), trial_seed(config))  # best epoch's weights (float16, CPU)
    if restore_dir is not None:
        state, best = restore(restore_dir, model, optimizer, scaler, recipe)
        laps.lap("restore")
    micro = MicroBatch.start(config.batch_size, optimizer, state.micro_batch_size)
    micro.fallbacks = state.oom_fallbacks
    log.info("fold %d (val %s): %d train / %d val / %d test clips on %s%s", config.test_fold, config.val_fold or "auto",
             len(data.train), len(data.val), len(data.test), device, f" with {dtype} autocast" if dtype else "")
    order, train_loader, val_loader, test_loader = trial_loaders(config, data, device)
    laps.lap("loaders")
    setup_seconds, pad = time.perf_counter() - started, pad_to(config)

    for epoch in range(state.epoch + 1, config.epochs + 1):
        epoch_start = time.perf_counter()
        start_epoch(trial_seed(config), epoch, order)  # data order and RNGs: the same whether resumed or not
        steps = min(len(train_loader), config.max_steps_per_epoch or len(train_loader))
        watch = EpochWatch(epoch, steps, (epoch - 1) * steps + 1, on_progress, on_step=on_step)
        train_loss, seen, seconds = train_one_epoch(net, train_loader, optimizer, scaler, device, dtype, micro, watch,
                                                    config.max_steps_per_epoch, pad, recipe.augment(epoch), recipe.scheduler)
        if STARTUP_FIRST_STEP not in laps.times and watch.first_step_s is not None:
            laps.times[STARTUP_FIRST_STEP] = round(watch.first_step_s, 4)
        evaluate_both = partial(evaluate_splits, net, (val_loader, test_loader), device, dtype, micro, len(data.classes), pad, watch)
        val, test = evaluate_both()
        if selection_score(val[1], epoch) > selection_score(state.best_val_accuracy, state.best_epoch):
            state.best_epoch, state.best_val_accuracy, state.best_test_accuracy = epoch, val[1], test[1]
            best = snapshot_weights(model)
        metrics = epoch_metrics(epoch, train_loss, val, test, seen / max(seconds, 1e-9), micro, state)
        metrics.update(recipe.end_epoch(epoch, model, evaluate_both))  # weight averaging (trainable.fit.recipe)
        state.epoch, state.micro_batch_size, state.oom_fallbacks = epoch, micro.size, micro.fallbacks
        state.history.append(metrics)
        log.info("epoch %d/%d: train_loss %.4f val_acc %.4f test_acc %.4f (%.1f samples/s, micro-batch %d x %d)", epoch,
                 config.epochs, train_loss, val[1], test[1], metrics[SAMPLES_PER_SECOND], micro.size, micro.accum_steps)
        resumable = epoch < config.epochs or config.keep_checkpoints == "all"
        with temp_dir("ckpt") as tmp:
            save_checkpoint(tmp, model, optimizer, scaler, state, config.num_frames, best, resumable, recipe)
            metrics.update({EPOCH_SECONDS: time.perf_counter() - epoch_start, SETUP_SECONDS: setup_seconds,
                            STARTUP: laps.times})
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
    device, dtype, model, net, optimizer, scaler = training_objects(config, classes)
    micro = MicroBatch.start(config.batch_size, optimizer)
    order = EpochShuffle(len(dataset), trial_seed(config))
    loader = make_loader(config, dataset, device, sampler=order)
    recipe = TrialRecipe(config, optimizer, len(dataset), len(classes), trial_seed(config))
    for epoch in range(1, epochs + 1):
        start_epoch(trial_seed(config), epoch, order)
        loss, seen, seconds = train_one_epoch(net, loader, optimizer, scaler, device, dtype, micro, pad_to=pad_to(config),
                                              augment=recipe.augment(epoch), scheduler=recipe.scheduler)
        log.info("refit epoch %d/%d on all %d clips: train_loss %.4f (%.1f samples/s)", epoch, epochs, seen, loss, seen / max(seconds, 1e-9))
    return export_model(model.cpu(), out_dir, config.num_frames)

