"""Self-describing training checkpoints, saved without pickle for weights and read back safely.

A checkpoint folder holds:

- ``trainer_state.json``: epoch, best-so-far, micro-batch, config, metric history (always);
- the resume point, while the trial still has epochs to run (or with ``keep_checkpoints="all"``): a Hugging Face
  model folder (config.json, model.safetensors, preprocessor_config.json) plus ``training_state.pt`` (optimizer,
  scaler and RNG tensors, read with ``weights_only=True``);
- ``best/``: the weights of the best-validation epoch so far, in float16, as a Hugging Face model folder that
  ``from_pretrained`` and ``pipeline`` load (into float32: config.json says so), with ``best_epoch.json``.

A finished trial's last checkpoint is only ``trainer_state.json`` and ``best/``: what selection, the report and the
export need (a sixth of a full checkpoint for AST-base: no optimizer state, half-precision weights).
"""

from __future__ import annotations

import errno
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..faults import kill_point
from ..store.experiment import BEST_DIR, BEST_INFO, TRAINER_STATE, TRAINING_STATE, WEIGHTS
from .model import export_model

AVERAGED_DIR = "averaged"  # the weight-averaged model (trainable.fit.recipe), beside best/

log = logging.getLogger(__name__)

BEST_DTYPE = torch.float16  # finished trials' weights: half the bytes; the export upcasts to float32
SIMULATE_DISK_FULL_ENV = "ASTCV_SIMULATE_DISK_FULL_AT_EPOCH"


@dataclass
class TrainerState:
    """Progress of one trial: what the next epoch needs and what has been achieved so far."""

    epoch: int = 0  # epochs completed
    micro_batch_size: int = 0  # samples per forward pass (shrinks on CUDA out-of-memory)
    oom_fallbacks: int = 0  # halvings of the micro-batch so far (reported; a resumed trial counts on from here)
    best_epoch: int = 0
    best_val_accuracy: float = -1.0
    best_test_accuracy: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return bool(self.config) and self.epoch >= int(self.config.get("epochs", 0))


def snapshot_weights(model) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's weights in ``BEST_DTYPE`` (floating tensors only are cast)."""
    return {k: (v.detach().to("cpu", dtype=BEST_DTYPE) if v.is_floating_point() else v.detach().cpu()).clone()
            for k, v in model.state_dict().items()}


def save_checkpoint(out_dir: str | Path, model, optimizer, scaler, state: TrainerState, num_frames: int,
                    best: dict[str, torch.Tensor] | None, resumable: bool = True, recipe=None) -> Path:
    """Write ``state``, the resume point (when ``resumable``) and ``best/`` (from the ``best`` weights) into ``out_dir``.
    ``recipe`` (``trainable.fit.recipe.TrialRecipe``): its scheduler and weight average go into the resume point, its
    averaged model (once complete) into ``averaged/``.

    ``ASTCV_SIMULATE_DISK_FULL_AT_EPOCH=N`` makes epoch N's write fail as a full disk does (a rehearsal).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if os.environ.get(SIMULATE_DISK_FULL_ENV, "").strip() == str(state.epoch):
        raise OSError(errno.ENOSPC, f"No space left on device (simulated by {SIMULATE_DISK_FULL_ENV})", str(out))
    if resumable:
        export_model(model, out, num_frames)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                **({"recipe": recipe.state_dict()} if recipe is not None else {}),
            },
            out / TRAINING_STATE,
        )
    if best is not None:
        export_model(model, out / BEST_DIR, num_frames, state_dict=best)
        (out / BEST_DIR / BEST_INFO).write_text(json.dumps({"epoch": state.best_epoch, "dtype": str(BEST_DTYPE).split(".")[-1],
                                                            "val_accuracy": state.best_val_accuracy}))
        kill_point("best")
    averaged = recipe.averaged if recipe is not None else None
    if averaged is not None:
        export_model(model, out / AVERAGED_DIR, num_frames, state_dict=averaged)
    (out / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=1))
    return out


def read_trainer_state(ckpt_dir: str | Path) -> TrainerState:
    """The trainer state of a checkpoint folder (no tensors loaded)."""
    return TrainerState(**json.loads((Path(ckpt_dir) / TRAINER_STATE).read_text()))


def is_resumable(ckpt_dir: str | Path) -> bool:
    """Whether the folder holds a resume point (weights and optimizer state), not only the best weights."""
    return (Path(ckpt_dir) / TRAINING_STATE).is_file()


def load_best_weights(ckpt_dir: str | Path, model) -> dict[str, torch.Tensor] | None:
    """The ``best/`` weights of a checkpoint as a snapshot (see ``snapshot_weights``), or None if it has none."""
    best = Path(ckpt_dir) / BEST_DIR
    if not (best / WEIGHTS).is_file():
        return None
    # Through from_pretrained: transformers maps the on-disk (legacy) weight names to the module's names.
    return snapshot_weights(type(model).from_pretrained(best))


def load_checkpoint(ckpt_dir: str | Path, model, optimizer, scaler, recipe=None) -> TrainerState:
    """Restore model, optimizer, scaler and RNG states from ``ckpt_dir``; return its trainer state.

    Weights come from safetensors (no pickle); the rest through ``torch.load(weights_only=True)``, so a checkpoint
    cannot run code when loaded. A finished trial's checkpoint (no resume point) restores the state only.
    """
    ckpt = Path(ckpt_dir)
    state = read_trainer_state(ckpt)
    if state.finished and not is_resumable(ckpt):
        return state
    saved = type(model).from_pretrained(ckpt)
    model.load_state_dict(saved.state_dict())
    del saved
    extra = torch.load(ckpt / TRAINING_STATE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scaler.load_state_dict(extra["scaler"])
    if recipe is not None and "recipe" in extra:
        recipe.load_state_dict(extra["recipe"])
    torch.set_rng_state(extra["rng_cpu"])
    if extra["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["rng_cuda"])
    return state


def _check_weights(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            f.get_tensor(key)


def checkpoint_problem(ckpt_dir: str | Path) -> str | None:
    """Why ``ckpt_dir`` cannot be resumed from (missing or damaged files), or None if it looks complete."""
    ckpt = Path(ckpt_dir)
    try:
        state = read_trainer_state(ckpt)
        if state.epoch < 1:
            return "trainer_state.json records no finished epoch"
        if (ckpt / BEST_DIR).is_dir():
            json.loads((ckpt / BEST_DIR / "config.json").read_text())
            _check_weights(ckpt / BEST_DIR / WEIGHTS)
        if state.finished and not is_resumable(ckpt):
            return None  # a finished trial's last checkpoint: nothing left to resume
        json.loads((ckpt / "config.json").read_text())
        _check_weights(ckpt / WEIGHTS)
        torch.load(ckpt / TRAINING_STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # any damage: truncated file, bad JSON, unsafe pickle, missing file
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def pick_restore_point(candidates: list[Path]) -> tuple[Path | None, list[str]]:
    """The first usable checkpoint among ``candidates`` (newest first), and a warning for each damaged one skipped."""
    warnings = []
    for ckpt in candidates:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt, warnings
        warnings.append(f"checkpoint {ckpt} is damaged ({problem}); trying an older one")
    return None, warnings
