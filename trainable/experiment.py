"""The names an experiment folder's writers and readers share (files, metric keys, trial folders), its manifest and
its lock. Torch- and Ray-free: the reducer reads a finished or partial experiment anywhere with this alone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from .errors import AstCvError

log = logging.getLogger(__name__)

# Files of an experiment folder (STORAGE/NAME/).
MANIFEST = "astcv_run.json"
SUMMARY = "summary.json"
PER_TRIAL_CSV = "per_trial.csv"
REPORT = "report.md"
BEST_MODEL = "best_model"
FINAL_MODEL = "final_model"
LOCK = ".astcv.lock"
SOURCE = "astcv_source.json"  # in best_model/: which trial and epoch it is
# Files of a checkpoint folder (a Hugging Face model folder plus the training state).
TRAINER_STATE = "trainer_state.json"
TRAINING_STATE = "training_state.pt"
WEIGHTS = "model.safetensors"
HF_FILES = ("config.json", WEIGHTS, "preprocessor_config.json")

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
SELECTION_SCORE = "selection_score"  # what checkpoints are ranked by and epochs are chosen by (see selection_score)
NODE_ID = "node_id"  # Ray node that ran the trial (trials only)
CUDA_VISIBLE_DEVICES = "cuda_visible_devices"  # GPUs Ray gave the trial (trials only)

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


def trial_dirname(test_fold: int, lr: float, batch_size: int) -> str:
    """Readable trial folder name, e.g. ``fold03_lr5e-05_bs16``."""
    return f"fold{int(test_fold):02d}_lr{format_lr(float(lr))}_bs{int(batch_size)}"


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
    here = path or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_manifest(exp_dir: Path, **fields: Any) -> Path:
    """Record how the experiment was started (command, config, grid, classes, fold sizes, versions, commit)."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": package_versions(), "git_commit": git_commit()}
    manifest.update(fields)
    path = exp_dir / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(path)
    return path


def read_manifest(exp_dir: Path) -> dict[str, Any] | None:
    path = Path(exp_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class ExperimentLock:
    """``with ExperimentLock(exp_dir):`` holds the experiment folder for one orchestrator.

    The lock file records pid, host, start time and command. A second orchestrator is refused with an error naming
    the running one; a lock left by a dead process on this host is taken over with a warning. A lock from another
    host cannot be checked from here: the error says how to remove it.
    """

    def __init__(self, exp_dir: str | Path, command: list[str] | None = None):
        self.path = Path(exp_dir) / LOCK
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                       "command": command or sys.argv}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(self.record, fh)
        return True

    def __enter__(self) -> "ExperimentLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # another process may take or drop the lock between our looks
            if self._create():
                return self
            try:
                held = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                held = {}
            pid, host = held.get("pid"), held.get("host")
            if host == self.record["host"] and isinstance(pid, int) and not _alive(pid):
                log.warning("taking over the stale lock %s of process %d on %s (it no longer runs)", self.path, pid, host)
                self.path.unlink(missing_ok=True)
                continue
            if not held:
                continue
            where = f"pid {pid} on host {host}, started {held.get('started', '?')}"
            command = " ".join(map(str, held.get("command", [])))
            command = command if len(command) <= 160 else command[:157] + "..."
            hint = ("" if host == self.record["host"] else
                    f" If that process is gone (it runs on another machine, so this one cannot tell), delete {self.path}.")
            raise AstCvError(
                f"Experiment {self.path.parent} is being run by another orchestrator ({where}: {command}). Wait for it "
                f"to finish, or pass --name NEW for a separate experiment.{hint}"
            )
        raise AstCvError(f"Could not take the lock {self.path}: it keeps changing. Is another orchestrator starting?")

    def __exit__(self, *exc) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == self.record["pid"]:
                self.path.unlink()
        except (OSError, json.JSONDecodeError):
            pass
