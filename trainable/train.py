"""Fine-tune AST on one fold with one configuration: plain train/evaluate functions, the epoch loop, and the
Ray Tune trial entry point (the only function here that touches Ray).

Without Ray (debug one fold):
    python -m trainable.train --data-root DIR --model M --folds 1 2 10 --test-fold 1 --epochs 2 --output OUT
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .checkpoint import (
    TrainerState,
    load_checkpoint,
    older_checkpoints,
    pick_restore_point,
    read_trainer_state,
    save_checkpoint,
)
from .config import TrainConfig, add_config_arguments, config_from_args
from .data import ClipDataset, class_names, drop_clips, load_metadata, split_folds
from .errors import AstCvError

log = logging.getLogger(__name__)

# Metric names reported every epoch (Ray Tune, metrics.jsonl, TensorBoard).
EPOCH = "epoch"
TRAIN_LOSS = "train_loss"
VAL_LOSS = "val_loss"
VAL_ACCURACY = "val_accuracy"
TEST_LOSS = "test_loss"
TEST_ACCURACY = "test_accuracy"
MICRO_BATCH_SIZE = "micro_batch_size"
GRAD_ACCUM_STEPS = "grad_accum_steps"
SAMPLES_PER_SECOND = "samples_per_second"
BEST_EPOCH = "best_epoch"
BEST_VAL_ACCURACY = "best_val_accuracy"
BEST_TEST_ACCURACY = "best_test_accuracy"
TEST_CONFUSION = "test_confusion"  # JSON string: confusion[true][predicted] counts on the test fold
OOM_FALLBACKS = "oom_fallbacks"
NODE_ID = "node_id"  # Ray node that ran the trial (trials only)
CUDA_VISIBLE_DEVICES = "cuda_visible_devices"  # GPUs Ray gave the trial (trials only)

SIMULATE_OOM_ENV = "ASTCV_SIMULATE_OOM_ABOVE"


class OutOfMemoryAtOne(RuntimeError):
    """CUDA ran out of memory even with one sample per forward pass."""


@dataclass
class MicroBatch:
    """How an effective batch is cut into forward passes; halves on CUDA out-of-memory."""

    size: int
    batch_size: int
    fallbacks: int = 0

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


def simulated_oom_limit() -> int | None:
    """The ASTCV_SIMULATE_OOM_ABOVE limit (forward passes above it raise CUDA OOM), or None."""
    value = os.environ.get(SIMULATE_OOM_ENV, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise AstCvError(f"{SIMULATE_OOM_ENV} must be a whole number of samples, got {value!r}.") from None


def forward(model, x: torch.Tensor) -> torch.Tensor:
    """Logits for a batch of features [B, T, 128]; honours ASTCV_SIMULATE_OOM_ABOVE (also on CPU)."""
    limit = simulated_oom_limit()
    if limit is not None and x.shape[0] > limit:
        raise torch.cuda.OutOfMemoryError(f"simulated: forward pass of {x.shape[0]} samples > {SIMULATE_OOM_ENV}={limit}")
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


def _free_cuda() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
            logits = forward(model, xs)
        loss = torch.nn.functional.cross_entropy(logits.float(), ys, reduction="sum") / n
        scaler.scale(loss).backward()
        total += loss.detach()
    scaler.step(optimizer)
    scaler.update()
    return total.item()  # one device sync per optimizer step


def _with_oom_fallback(fn: Callable[[], Any], micro: MicroBatch, on_oom: Callable[[], None] = lambda: None) -> Any:
    """Run ``fn``; on CUDA out-of-memory free memory, halve the micro-batch and run it again."""
    while True:
        try:
            return fn()
        except torch.cuda.OutOfMemoryError as exc:
            error = exc
        # Outside the except block, so the traceback's references to activations are dropped first.
        on_oom()
        _free_cuda()
        micro.halve(error)


def train_one_epoch(model, loader, optimizer, scaler, device, dtype, micro: MicroBatch) -> tuple[float, int, float]:
    """Train over ``loader`` once. Returns (mean training loss, samples seen, seconds)."""
    model.train()
    start, loss_sum, seen = time.perf_counter(), 0.0, 0
    for x, y in loader:
        loss = _with_oom_fallback(
            lambda: train_step(model, x, y, optimizer, scaler, device, dtype, micro),
            micro,
            on_oom=lambda: optimizer.zero_grad(set_to_none=True),
        )
        loss_sum += loss * x.shape[0]
        seen += x.shape[0]
    return loss_sum / max(seen, 1), seen, time.perf_counter() - start


@torch.no_grad()
def evaluate(model, loader, device, dtype, micro: MicroBatch, num_classes: int) -> tuple[float, float, np.ndarray]:
    """Mean loss, accuracy and confusion matrix [true, predicted] over ``loader``."""
    model.eval()
    loss_sum, confusion = 0.0, np.zeros((num_classes, num_classes), dtype=np.int64)

    def batch_logits(x):
        return torch.cat([forward(model, xs.to(device, non_blocking=True)).float() for xs in x.split(micro.size)])

    for x, y in loader:
        with _autocast(device, dtype):
            logits = _with_oom_fallback(lambda: batch_logits(x), micro)
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
    meta = drop_clips(full, config.skip_clips)
    if config.feature_cache:
        from .cache import CachedDataset, FeatureCache

        cache = FeatureCache.open(config.feature_cache, config.data_root, config.num_frames, config.folds, meta=full)
        meta = drop_clips(meta, cache.excluded)
        return meta, classes, lambda rows: CachedDataset(cache, rows, classes)
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


def fit(config: TrainConfig, report: Reporter, restore_dir: str | Path | None = None) -> TrainerState:
    """Train for ``config.epochs`` epochs, calling ``report(metrics, checkpoint_dir)`` after each.

    ``checkpoint_dir`` is a temporary folder holding the full checkpoint of that epoch; the reporter must copy
    what it keeps before returning. With ``restore_dir``, training resumes exactly after that checkpoint's epoch.
    """
    prepare_process(config)
    data = build_datasets(config)
    device, dtype, model, optimizer, scaler = training_objects(config, data.classes)
    state = TrainerState(micro_batch_size=config.batch_size, config=config.to_dict())
    if restore_dir is not None:
        state = load_checkpoint(restore_dir, model, optimizer, scaler)
        log.info("resumed after epoch %d from %s", state.epoch, restore_dir)
    micro = MicroBatch(size=state.micro_batch_size or config.batch_size, batch_size=config.batch_size)
    log.info(
        "fold %d (val %s): %d train / %d val / %d test clips on %s%s",
        config.test_fold, config.val_fold or "auto", len(data.train), len(data.val), len(data.test), device,
        f" with {dtype} autocast" if dtype else "",
    )
    generator = torch.Generator()
    train_loader = make_loader(config, data.train, device, shuffle=True, generator=generator)
    val_loader, test_loader = make_loader(config, data.val, device), make_loader(config, data.test, device)

    for epoch in range(state.epoch + 1, config.epochs + 1):
        generator.manual_seed(trial_seed(config) * 100 + epoch)  # same shuffle whether resumed or not
        train_loss, seen, seconds = train_one_epoch(model, train_loader, optimizer, scaler, device, dtype, micro)
        val_loss, val_acc, _ = evaluate(model, val_loader, device, dtype, micro, len(data.classes))
        test_loss, test_acc, confusion = evaluate(model, test_loader, device, dtype, micro, len(data.classes))
        if val_acc > state.best_val_accuracy:
            state.best_epoch, state.best_val_accuracy, state.best_test_accuracy = epoch, val_acc, test_acc
        metrics = {
            EPOCH: epoch,
            TRAIN_LOSS: train_loss,
            VAL_LOSS: val_loss,
            VAL_ACCURACY: val_acc,
            TEST_LOSS: test_loss,
            TEST_ACCURACY: test_acc,
            MICRO_BATCH_SIZE: micro.size,
            GRAD_ACCUM_STEPS: micro.accum_steps,
            SAMPLES_PER_SECOND: seen / max(seconds, 1e-9),
            BEST_EPOCH: state.best_epoch,
            BEST_VAL_ACCURACY: state.best_val_accuracy,
            BEST_TEST_ACCURACY: state.best_test_accuracy,
            OOM_FALLBACKS: micro.fallbacks,
            TEST_CONFUSION: json.dumps(confusion.tolist()),
        }
        state.epoch, state.micro_batch_size = epoch, micro.size
        state.history.append(metrics)
        log.info(
            "epoch %d/%d: train_loss %.4f val_acc %.4f test_acc %.4f (%.1f samples/s, micro-batch %d x %d)",
            epoch, config.epochs, train_loss, val_acc, test_acc, metrics[SAMPLES_PER_SECOND], micro.size, micro.accum_steps,
        )
        with tempfile.TemporaryDirectory(prefix="astcv-ckpt-") as tmp:
            save_checkpoint(tmp, model, optimizer, scaler, state, config.num_frames)
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
    micro = MicroBatch(size=config.batch_size, batch_size=config.batch_size)
    generator = torch.Generator()
    loader = make_loader(config, dataset, device, shuffle=True, generator=generator)
    for epoch in range(1, epochs + 1):
        generator.manual_seed(trial_seed(config) * 100 + epoch)
        loss, seen, seconds = train_one_epoch(model, loader, optimizer, scaler, device, dtype, micro)
        log.info("refit epoch %d/%d on all %d clips: train_loss %.4f (%.1f samples/s)", epoch, epochs, seen, loss, seen / max(seconds, 1e-9))
    return export_model(model.cpu(), out_dir, config.num_frames)


def tune_trial(trial_config: dict[str, Any], base: Mapping[str, Any]) -> None:
    """Ray Tune entry point: one fold x config. ``base`` holds the fixed settings, ``trial_config`` the grid.

    Resumes from the trial's latest checkpoint; if that one is damaged (a kill during a write), from the newest
    older one that is intact, else from scratch, with a warning each time.
    """
    import ray
    from ray import tune

    config = TrainConfig.from_dict({**base, **trial_config})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    placement = {NODE_ID: ray.get_runtime_context().get_node_id(),
                 CUDA_VISIBLE_DEVICES: os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    if placement[CUDA_VISIBLE_DEVICES] and not torch.cuda.is_available():
        log.warning("Ray assigned GPU(s) %s but torch sees no CUDA device: training on CPU", placement[CUDA_VISIBLE_DEVICES])

    def report(metrics: dict[str, Any], ckpt_dir: Path) -> None:
        tune.report({**metrics, **placement}, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        fit(config, report)
        return
    with checkpoint.as_directory() as restored:
        local = Path(tempfile.mkdtemp(prefix="astcv-restore-"))
        shutil.copytree(restored, local / "latest", dirs_exist_ok=True)
    try:
        stored = Path(checkpoint.path)
        candidates = [local / "latest"] + (older_checkpoints(stored) if stored.is_dir() else [])
        chosen, warnings = pick_restore_point(candidates)
        for w in warnings:
            log.warning(w)
        if chosen is None:
            log.warning("no usable checkpoint for this trial: restarting it from scratch")
        fit(config, report, restore_dir=chosen)
    finally:
        shutil.rmtree(local, ignore_errors=True)


class LocalRun:
    """Reporter for runs without Ray: ``metrics.jsonl``, ``last/`` (resume point), ``best/`` and ``tensorboard/`` under ``out``."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)

    @property
    def last(self) -> Path:
        return self.out / "last"

    @property
    def best(self) -> Path:
        return self.out / "best"

    def resume_point(self) -> Path | None:
        return self.last if (self.last / "trainer_state.json").is_file() else None

    def __call__(self, metrics: dict[str, Any], ckpt_dir: Path) -> None:
        _replace_dir(ckpt_dir, self.last)
        if metrics[BEST_EPOCH] == metrics[EPOCH]:
            _replace_dir(ckpt_dir, self.best)
        # Metrics last: a line in metrics.jsonl means its checkpoint is on disk.
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        from tensorboardX import SummaryWriter

        with SummaryWriter(str(self.out / "tensorboard")) as tb:  # tensorboard --logdir OUT/tensorboard
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    tb.add_scalar(key, value, metrics[EPOCH])

    def rewrite_metrics(self, history: list[dict[str, Any]]) -> None:
        """Make metrics.jsonl hold exactly the epochs of the checkpoint being resumed."""
        (self.out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))


def _replace_dir(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` so that ``dst`` is always either the old or the new complete copy."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainable.train",
        description="Fine-tune AST on one fold with one configuration, without Ray (the code path every trial runs).",
    )
    add_config_arguments(parser)
    parser.add_argument("--output", required=True, help="folder for metrics.jsonl, last/ (resume point) and best/ (best epoch, HF format)")
    parser.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --output and start over")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if not args.data_root:
            raise AstCvError("--data-root is required: the UrbanSound8K folder (or one made by python -m trainable.synth).")
        if args.num_frames == "auto":
            from .data import auto_num_frames

            args.num_frames = auto_num_frames(args.data_root, load_metadata(args.data_root, args.folds))
            log.info("--num-frames auto: %d frames", args.num_frames)
        config = config_from_args(args)
        run = LocalRun(args.output)
        restore = None if args.fresh else run.resume_point()
        if args.fresh:
            for p in (run.last, run.best, run.out / "metrics.jsonl"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        if restore is not None:
            previous = read_trainer_state(restore)
            if previous.config != config.to_dict():
                raise AstCvError(
                    f"{args.output} holds a run with a different config; pass --fresh to start over or another --output."
                )
            run.rewrite_metrics(previous.history)
        state = fit(config, run, restore_dir=restore)
    except (AstCvError, OutOfMemoryAtOne) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"best epoch {state.best_epoch}: val_accuracy {state.best_val_accuracy:.4f}, test_accuracy "
        f"{state.best_test_accuracy:.4f}; model in {run.best}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
