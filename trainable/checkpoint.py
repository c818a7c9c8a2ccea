"""Self-describing training checkpoints, saved without pickle for weights and read back safely.

A checkpoint folder is a Hugging Face model folder (config.json, model.safetensors, preprocessor_config.json:
loadable by ``from_pretrained`` and ``pipeline``) plus ``training_state.pt`` (optimizer, scaler and RNG
tensors, read with ``weights_only=True``) and ``trainer_state.json`` (epoch, best-so-far, micro-batch,
config, metric history).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .experiment import TRAINER_STATE, TRAINING_STATE, WEIGHTS
from .model import export_model

log = logging.getLogger(__name__)


@dataclass
class TrainerState:
    """Progress of one trial: what the next epoch needs and what has been achieved so far."""

    epoch: int = 0  # epochs completed
    micro_batch_size: int = 0  # samples per forward pass (shrinks on CUDA out-of-memory)
    best_epoch: int = 0
    best_val_accuracy: float = -1.0
    best_test_accuracy: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(out_dir: str | Path, model, optimizer, scaler, state: TrainerState, num_frames: int) -> Path:
    """Write model weights (safetensors), optimizer/scaler/RNG state and trainer state into ``out_dir``."""
    out = export_model(model, out_dir, num_frames)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        out / TRAINING_STATE,
    )
    (out / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=1))
    return out


def read_trainer_state(ckpt_dir: str | Path) -> TrainerState:
    """The trainer state of a checkpoint folder (no tensors loaded)."""
    return TrainerState(**json.loads((Path(ckpt_dir) / TRAINER_STATE).read_text()))


def load_checkpoint(ckpt_dir: str | Path, model, optimizer, scaler) -> TrainerState:
    """Restore model, optimizer, scaler and RNG states from ``ckpt_dir``; return its trainer state.

    Weights come from safetensors (no pickle); the rest through ``torch.load(weights_only=True)``, so a checkpoint
    cannot run code when loaded.
    """
    ckpt = Path(ckpt_dir)
    state = read_trainer_state(ckpt)
    # Through from_pretrained: transformers maps the on-disk (legacy) weight names to the module's names.
    saved = type(model).from_pretrained(ckpt)
    model.load_state_dict(saved.state_dict())
    del saved
    extra = torch.load(ckpt / TRAINING_STATE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scaler.load_state_dict(extra["scaler"])
    torch.set_rng_state(extra["rng_cpu"])
    if extra["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["rng_cuda"])
    return state


def checkpoint_problem(ckpt_dir: str | Path) -> str | None:
    """Why ``ckpt_dir`` cannot be resumed from (missing or damaged files), or None if it looks complete."""
    from safetensors import safe_open

    ckpt = Path(ckpt_dir)
    try:
        state = read_trainer_state(ckpt)
        if state.epoch < 1:
            return "trainer_state.json records no finished epoch"
        json.loads((ckpt / "config.json").read_text())
        with safe_open(str(ckpt / WEIGHTS), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
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


def older_checkpoints(latest: Path) -> list[Path]:
    """Sibling checkpoint folders of ``latest`` (Ray's checkpoint_NNNNNN), newest first."""
    if not latest.parent.is_dir():
        return []
    return sorted((p for p in latest.parent.glob("checkpoint_*") if p.is_dir() and p.name != latest.name), reverse=True)
