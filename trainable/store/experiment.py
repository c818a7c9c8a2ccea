"""The names an experiment folder's writers and readers share (files, metric keys, trial folders), its manifest and
its lock. Torch- and Ray-free: the reducer reads a finished or partial experiment anywhere with this alone.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..errors import AstCvError
from .storage import Store, join

log = logging.getLogger(__name__)

# Files of an experiment folder (STORAGE/NAME/).
MANIFEST = "astcv_run.json"
EXPERIMENT_STARTED = "experiment_started"  # in the manifest: False until the first trial starts (see binding_manifest)
RAY_SNAPSHOT_PREFIX = "experiment_state"  # Ray Tune's experiment snapshots: experiment_state-<time>.json
SUMMARY = "summary.json"
PER_TRIAL_CSV = "per_trial.csv"
REPORT = "report.md"
BEST_MODEL = "best_model"
FINAL_MODEL = "final_model"
FINISHED_EARLIER = "finished_earlier"  # the one result of a trial that found its last epoch's checkpoint in its folder
SOURCE = "astcv_source.json"  # in best_model/: which trial and epoch it is
# Files of a checkpoint folder (a Hugging Face model folder plus the training state).
TRAINER_STATE = "trainer_state.json"
TRAINING_STATE = "training_state.pt"
WEIGHTS = "model.safetensors"
HF_FILES = ("config.json", WEIGHTS, "preprocessor_config.json")
BEST_DIR = "best"  # in a checkpoint: the best-validation epoch's weights so far (float16)
BEST_INFO = "best_epoch.json"  # in BEST_DIR: which epoch they are

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
EPOCH_SECONDS = "epoch_seconds"  # wall time of the epoch: training, evaluation and the checkpoint
SETUP_SECONDS = "setup_seconds"  # from the trial's start to its first step (model load, data, restore)
STARTUP = "startup"  # the start's pieces: worker_s, data_s, model_s, restore_s, loaders_s, first_step_s (seconds)
STARTUP_FIRST_STEP = "first_step_s"
BEST_EPOCH = "best_epoch"
BEST_VAL_ACCURACY = "best_val_accuracy"
BEST_TEST_ACCURACY = "best_test_accuracy"
TEST_CONFUSION = "test_confusion"  # JSON string: confusion[true][predicted] counts on the test fold
OOM_FALLBACKS = "oom_fallbacks"
SELECTION_SCORE = "selection_score"  # what checkpoints are ranked by and epochs are chosen by (see selection_score)
NODE_ID = "node_id"  # Ray node that ran the trial (trials only)
CUDA_VISIBLE_DEVICES = "cuda_visible_devices"  # GPUs Ray gave the trial (trials only)

# TensorBoard tags, grouped by their first part; TensorBoard sorts the groups by name, so accuracy and loss come before
# lr and perf. Per optimizer step (x axis: the trial's step) the training loss and learning rate; per epoch (x axis:
# the epoch) the rest.
TB_TRAIN_LOSS = "loss/train"
TB_TRAIN_LR = "lr/train"
TENSORBOARD_EPOCH_TAGS = {VAL_ACCURACY: "accuracy/val", TEST_ACCURACY: "accuracy/test",
                          BEST_VAL_ACCURACY: "accuracy/best_val", BEST_TEST_ACCURACY: "accuracy/test_at_best_val",
                          TRAIN_LOSS: "loss/train_epoch", VAL_LOSS: "loss/val", TEST_LOSS: "loss/test",
                          SAMPLES_PER_SECOND: "perf/samples_per_second", EPOCH_SECONDS: "perf/epoch_seconds",
                          MICRO_BATCH_SIZE: "perf/micro_batch_size"}
# The HParams view: one row per trial, its grid point and these tags' latest values.
HPARAM_KEYS = ("lr", "batch_size", "test_fold", "val_fold")
HPARAM_METRICS = ("accuracy/best_val", "accuracy/test_at_best_val", "accuracy/val", "accuracy/test")


def tensorboard_scalars(metrics: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """(tag, value, epoch) of one epoch's metrics."""
    return [(tag, float(metrics[key]), int(metrics[EPOCH])) for key, tag in TENSORBOARD_EPOCH_TAGS.items()
            if isinstance(metrics.get(key), (int, float)) and not isinstance(metrics.get(key), bool)]


_EPOCH_TIE_BREAK = 1e-9  # far below one clip of validation accuracy (1 / 10,000 clips), for up to 10^4 epochs


def selection_score(val_accuracy: float, epoch: int) -> float:
    """The one ranking of a trial's epochs: validation accuracy, the earlier epoch on ties.

    Trials report it with every checkpoint and Ray keeps the checkpoints ranked by it, while the reducer picks the
    epoch with the highest score: the chosen epoch's checkpoint is kept by construction.
    """
    return float(val_accuracy) - _EPOCH_TIE_BREAK * int(epoch)


def row_score(row: Mapping[str, Any]) -> float:
    """The selection score of a reported epoch (computed for rows written before the score was reported)."""
    return selection_score(row[VAL_ACCURACY], row[EPOCH])


def format_lr(lr: float) -> str:
    """Short exact learning-rate text for folder names: 5e-05, 1e-03, 2.5e-05."""
    mantissa, exponent = f"{lr:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{exponent}"


AXIS_SEP = "__"  # between a trial folder's grid point and each extra axis: fold01_lr1e-05_bs8__specaug-on
_AXIS_TEXT = re.compile(r"^[A-Za-z0-9.+-]+$")


def axis_text(value: Any) -> str:
    """An extra grid axis value as it reads in trial folder names, summaries and tables: on, 0.5, adam, true."""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def extra_suffix(extra: Mapping[str, Any] | None) -> str:
    """``__name-value`` per extra axis, by name ('' without any)."""
    return "".join(f"{AXIS_SEP}{k}-{axis_text(v)}" for k, v in sorted((extra or {}).items()))


def trial_dirname(test_fold: int, lr: float, batch_size: int, extra: Mapping[str, Any] | None = None) -> str:
    """Readable trial folder name, e.g. ``fold03_lr5e-05_bs16`` (``fold03_lr5e-05_bs16__specaug-on`` on a grid with
    extra axes)."""
    return f"fold{int(test_fold):02d}_lr{format_lr(float(lr))}_bs{int(batch_size)}" + extra_suffix(extra)


_TRIAL_DIR = re.compile(r"^fold(\d{2})_lr([0-9.]+e[-+]\d+)_bs(\d+)((?:__[a-z][a-z0-9_]*-[A-Za-z0-9.+-]+)*)$")


def parse_trial_dirname(name: str) -> dict[str, Any] | None:
    """The grid point a trial folder's name holds (``trial_dirname`` read back), or None for another folder. Extra axes
    come back under "extra" as their text (``axis_text``), only when the name has any."""
    m = _TRIAL_DIR.match(name)
    if not m:
        return None
    point: dict[str, Any] = {"test_fold": int(m[1]), "lr": float(m[2]), "batch_size": int(m[3])}
    if m[4]:
        point["extra"] = dict(part.split("-", 1) for part in m[4].split(AXIS_SEP)[1:])
    return point


def extra_axes(grid: Mapping[str, Any]) -> dict[str, list]:
    """The grid's axes beyond test fold, lr and batch size (``--grid NAME=V1,V2``), in their recorded order."""
    return {k: list(v) for k, v in grid.items() if k not in ("test_fold", "lr", "batch_size")}


def extra_points(grid: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the extra axes' values ([{}] without any)."""
    points: list[dict[str, Any]] = [{}]
    for key, values in extra_axes(grid).items():
        points = [{**p, key: v} for p in points for v in values]
    return points


def trial_extra(name: str) -> tuple[tuple[str, str], ...]:
    """A trial's extra axis values as (axis, text) pairs by axis name, read off its folder name (() without any)."""
    point = parse_trial_dirname(name) or {}
    return tuple(sorted(point.get("extra", {}).items()))


def grid_points(grid: Mapping[str, Any]) -> Iterator[tuple[str, int, float, int, dict[str, Any]]]:
    """(trial folder name, test fold, lr, batch size, extra axes' values) of every point of the grid."""
    for f in grid["test_fold"]:
        for lr in grid["lr"]:
            for bs in grid["batch_size"]:
                for e in extra_points(grid):
                    yield trial_dirname(f, lr, bs, e), int(f), float(lr), int(bs), e


def expected_trials(grid: Mapping[str, Any]) -> dict[str, tuple[int, float, int]]:
    """Trial folder name -> (test fold, lr, batch size) of every point of the grid (extra axes: in the name)."""
    return {name: (f, lr, bs) for name, f, lr, bs, _ in grid_points(grid)}


def expected_epochs(grid: Mapping[str, Any], epochs: int) -> dict[str, int]:
    """Trial folder name -> its epochs: an ``epochs`` axis's value (``--grid epochs=2,3``), else ``epochs``."""
    return {name: int(e.get("epochs", epochs)) for name, *_, e in grid_points(grid)}


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "torchaudio", "transformers", "ray", "ast-cv"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit(path: Path | None = None) -> str | None:
    """The project's git commit (with '-dirty' if changed), or None outside a checkout."""
    here = path or Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_manifest(exp: Store | str | Path, **fields: Any) -> None:
    """Record how the experiment was started (command, config, grid, classes, fold sizes, versions, commit), in the
    experiment folder, local or behind a URI; written whole or not at all."""
    manifest = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": package_versions(), "git_commit": git_commit()}
    manifest.update(fields)
    Store.of(exp).write_text(MANIFEST, json.dumps(manifest, indent=1))


def update_manifest(exp: Store | str | Path, **fields: Any) -> None:
    """Change recorded fields (the grid grows when --test-folds adds folds)."""
    store = Store.of(exp)
    manifest = read_manifest(store) or {}
    manifest.update(fields)
    store.write_text(MANIFEST, json.dumps(manifest, indent=1))


def read_manifest(exp: Store | str | Path) -> dict[str, Any] | None:
    """The experiment's manifest, None when there is none (not an experiment yet)."""
    store = Store.of(exp)
    text = store.read_text(MANIFEST)
    if text is None:
        return None
    try:
        manifest = json.loads(text)
        manifest["base_config"], manifest["grid"]  # noqa: B018 (both are required)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise AstCvError(f"{join(store.location, MANIFEST)} is damaged ({type(exc).__name__}: {exc}); it records how the "
                         f"experiment was started. Restore it from a copy, or pass --name NEW for a new experiment.") from None
    return manifest


def binding_manifest(exp: Store | str | Path) -> dict[str, Any] | None:
    """The manifest when it binds a re-run to its settings: once the experiment started (its first trial started, or
    Ray has a snapshot of it; manifests written before the flag existed bind). A run that failed before any trial
    (at import, at the Ray start) leaves one that does not: the next run starts the experiment as if new."""
    store = Store.of(exp)
    manifest = read_manifest(store)
    if manifest is None or manifest.get(EXPERIMENT_STARTED, True):
        return manifest
    if any(name.startswith(RAY_SNAPSHOT_PREFIX) for name in store.list_files()):
        return manifest
    return None


def parse_rows(text: str | None) -> list[dict[str, Any]]:
    """A trial's epoch rows from its result.json, one per epoch (a retried epoch keeps its last report; a line cut
    short by a kill or a full disk is skipped)."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in (text or "").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and EPOCH in row and VAL_ACCURACY in row:
            by_epoch[int(row[EPOCH])] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def rows_from_checkpoint(store: Store, trial: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with the epochs only the trial's newest checkpoint records (its trainer_state history). Ray writes an
    epoch's result.json line through a buffer: a driver killed right after the epoch's checkpoint was stored loses the
    line, and the trial, restored from that checkpoint, does not report the epoch again."""
    have = {int(r[EPOCH]) for r in rows}
    for ckpt in reversed([d for d in store.list_dirs(trial) if d.startswith("checkpoint_")]):
        try:
            history = json.loads(store.read_text(f"{trial}/{ckpt}/{TRAINER_STATE}") or "null")["history"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # cut short by a kill: an older checkpoint's history
        extra = [h for h in history if isinstance(h, dict) and EPOCH in h and VAL_ACCURACY in h and int(h[EPOCH]) not in have]
        return sorted([*rows, *extra], key=lambda r: int(r[EPOCH]))
    return rows


def trial_params(store: Store, name: str, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A trial's grid point: its params.json, else the config its results carry, else its folder's name (Ray's last
    sync before a full disk can leave params.json empty). None for a folder that is not a trial."""
    for source in (lambda: json.loads(store.read_text(f"{name}/params.json") or "null"),
                   lambda: rows[-1].get("config") if rows else None,
                   lambda: parse_trial_dirname(name)):
        try:
            params = source()
        except (json.JSONDecodeError, OSError):
            continue
        if isinstance(params, dict) and all(k in params for k in ("test_fold", "lr", "batch_size")):
            return params
    return None
