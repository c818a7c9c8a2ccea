"""One typed configuration for a training run; the CLI is built from it and every trial is validated against it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, get_args, get_origin, get_type_hints

from .errors import AstCvError

DEFAULT_MODEL = "MIT/ast-finetuned-audioset-10-10-0.4593"
AMP_MODES = ("auto", "off", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
KEEP_CHECKPOINTS = ("best", "all")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
OPTIMIZERS = ("adamw", "adam")
LR_SCHEDULES = ("constant", "step", "cosine")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with a default and the one-line help text that the CLI shows."""
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults (the config is frozen)")
    return field(default=default, metadata={"help": help, **extra})


# Smallest allowed value of each numeric setting (num_frames: one 16-frame AST patch).
_LOWER_BOUNDS = {"batch_size": 1, "epochs": 1, "weight_decay": 0, "num_frames": 16, "torch_threads": 0, "num_workers": 0,
                 "max_steps_per_epoch": 0, "freqm": 0, "timem": 0, "mixup": 0, "warmup_steps": 0, "lr_decay_start": 0,
                 "lr_decay_step": 1, "lr_decay_factor": 0, "wa_start": 0, "wa_end": 0}


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one training run (one fold x one hyperparameter configuration)."""

    data_root: str = _opt("", "UrbanSound8K folder holding audio/fold1..10 and metadata/UrbanSound8K.csv")
    model: str = _opt(DEFAULT_MODEL, "Hugging Face hub id or local folder of a pretrained AST checkpoint")
    folds: tuple[int, ...] = _opt(tuple(range(1, 11)), "folds in use (all ten for the paper protocol; at least 3)",
                                  orchestrator="its own --folds (every fold is a test fold once)")
    test_fold: int = _opt(1, "the held-out fold whose accuracy this run reports", orchestrator="a grid dimension")
    val_fold: int | None = _opt(None, "fold used to pick the best epoch (default: the fold before the test fold)",
                                orchestrator="always the fold before the test fold")
    lr: float = _opt(5e-5, "peak learning rate (small, so the pretrained weights are not destroyed)",
                     orchestrator="a grid dimension (--lrs)")
    batch_size: int = _opt(8, "effective batch size per optimizer step (kept under the OOM fallback)",
                           orchestrator="a grid dimension (--batch-sizes)")
    epochs: int = _opt(5, "training epochs; fine-tuning converges in 5-10")
    weight_decay: float = _opt(0.01, "the optimizer's weight decay (AdamW: torch's default 0.01; official AST recipe: 5e-7)")
    num_frames: int = _opt(1024, "fbank frames per clip: 'auto' fits every clip but outliers, which are cut and named (400 "
                           "for UrbanSound8K's 4 s clips, as the official AST recipe fits ESC-50's 5 s in 512); 1024 = "
                           "10.24 s, as pretrained", cli_default="auto")
    max_steps_per_epoch: int = _opt(0, "optimizer steps per epoch at most (0 = the whole training set; the smoke space "
                                     "uses 50 to check a setup in minutes)")
    seed: int = _opt(0, "random seed; each trial seeds with (seed, test fold) so reruns repeat exactly on CPU")
    amp: str = _opt("auto", "mixed precision: auto (bf16 where the GPU supports it, else fp16; off on CPU), off, fp16, bf16", choices=AMP_MODES)
    compile: str = _opt("off", "torch.compile the model: off, default, reduce-overhead (CUDA graphs) or max-autotune; "
                        "batches are padded to one shape so each mode compiles once per trial (plus once for evaluation)",
                        choices=COMPILE_MODES)
    device: str = _opt("auto", "auto (CUDA when torch sees a GPU), cpu or cuda", choices=DEVICES,
                       orchestrator="Ray places trials; --gpus and --gpus-per-trial")
    num_workers: int = _opt(2, "DataLoader worker processes per trial (0 = decode in the training process)")
    feature_cache: str = _opt("", "folder of the precomputed feature cache ('' = decode every clip on the fly)",
                              orchestrator="--cache-dir / --no-cache")
    torch_threads: int = _opt(0, "CPU threads torch may use in this run (0 = torch's default)",
                              orchestrator="--cpus-per-trial")
    keep_checkpoints: str = _opt("best", "best: a running trial keeps its latest checkpoint (to resume) and its best "
                                 "epoch's weights, a finished one only those weights in float16 (about 0.17 GB for AST-base); "
                                 "all: every epoch's full checkpoint with optimizer state (about 1 GB each for AST-base)",
                                 choices=KEEP_CHECKPOINTS)
    # The official AST fine-tuning recipe's options (trainable/fit/augment.py, trainable/fit/recipe.py).
    optimizer: str = _opt("adamw", "adamw or adam (the official AST recipe: adam, --betas 0.95 0.999, --weight-decay 5e-7)",
                          choices=OPTIMIZERS)
    betas: tuple[float, ...] = _opt((0.9, 0.999), "the optimizer's two betas (official AST recipe: 0.95 0.999)")
    lr_schedule: str = _opt("constant", "lr per optimizer step: constant; step (official: warmup, then x--lr-decay-factor "
                            "every --lr-decay-step epochs after epoch --lr-decay-start); cosine (linear warmup, then a half "
                            "cosine to 0)", choices=LR_SCHEDULES)
    warmup_steps: int = _opt(0, "optimizer steps of lr warmup (0 = none; the official AudioSet recipe: 1000, ESC-50: none)")
    lr_decay_start: int = _opt(5, "--lr-schedule step: the first decay comes at the end of this epoch (official ESC-50: 5)")
    lr_decay_step: int = _opt(1, "--lr-schedule step: decay every this many epochs (official ESC-50: 1)")
    lr_decay_factor: float = _opt(0.85, "--lr-schedule step: multiply the lr by this at each decay (official ESC-50: 0.85)")
    freqm: int = _opt(0, "SpecAugment: one frequency mask per training clip, width uniform over 0..freqm-1 bins "
                      "(0 = off; official ESC-50: 24); never at evaluation")
    timem: int = _opt(0, "SpecAugment: one time mask per training clip, width uniform over 0..timem-1 frames "
                      "(0 = off; official ESC-50: 96); never at evaluation")
    mixup: float = _opt(0.0, "probability that a training clip is mixed with another of its batch, lambda ~ Beta(10, 10), "
                        "loss on the soft targets (0 = off; official ESC-50: 0, AudioSet: 0.5)")
    wa_start: int = _opt(0, "weight averaging: first epoch whose end-of-epoch weights are averaged (0 = off); the "
                         "average is evaluated and saved as its own model (averaged/)")
    wa_end: int = _opt(0, "weight averaging: last epoch averaged (at most --epochs)")
    skip_clips: tuple[str, ...] = _opt((), "clips left out as unreadable, e.g. fold3/123-4-0-0.wav (found by the pre-run check)",
                                       orchestrator="found by the orchestrator's pre-run check")

    def __post_init__(self) -> None:
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{f.name} must be a finite number (got {value})")
        if self.lr <= 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        for name, low in _LOWER_BOUNDS.items():
            if getattr(self, name) < low:
                problems.append(f"{name} must be >= {low} (got {getattr(self, name)})")
        bad = [f for f in self.folds if f not in range(1, 11)]
        if bad:
            problems.append(f"folds must be within 1..10 (got {list(bad)})")
        if len(set(self.folds)) < 3:
            problems.append(f"at least 3 distinct folds are needed for train/validation/test (got {list(self.folds)})")
        if self.test_fold not in self.folds:
            problems.append(f"test_fold {self.test_fold} is not among the folds in use {list(self.folds)}")
        if self.val_fold is not None and (self.val_fold not in self.folds or self.val_fold == self.test_fold):
            problems.append(f"val_fold {self.val_fold} must be one of the folds in use other than the test fold")
        bad_clips = [c for c in self.skip_clips if c.count("/") != 1 or ".." in c]
        if bad_clips:
            problems.append(f"skip_clips entries must look like fold<N>/<file name> (got {bad_clips[:3]})")
        problems += self._recipe_problems()
        if self.amp not in AMP_MODES:
            problems.append(f"amp must be one of {AMP_MODES} (got {self.amp!r})")
        if self.compile not in COMPILE_MODES:
            problems.append(f"compile must be one of {COMPILE_MODES} (got {self.compile!r})")
        if self.keep_checkpoints not in KEEP_CHECKPOINTS:
            problems.append(f"keep_checkpoints must be one of {KEEP_CHECKPOINTS} (got {self.keep_checkpoints!r})")
        if self.device not in DEVICES:
            problems.append(f"device must be one of {DEVICES} (got {self.device!r})")
        if problems:
            raise AstCvError("Invalid training config: " + "; ".join(problems) + ".")

    def _recipe_problems(self) -> list[str]:
        problems = []
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS} (got {self.optimizer!r})")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule must be one of {LR_SCHEDULES} (got {self.lr_schedule!r})")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1) (got {list(self.betas)})")
        if self.mixup > 1:
            problems.append(f"mixup is a probability, at most 1 (got {self.mixup})")
        if self.wa_start and not self.wa_start <= self.wa_end <= self.epochs:
            problems.append(f"weight averaging needs wa_start <= wa_end <= epochs (got {self.wa_start}, {self.wa_end}, "
                            f"{self.epochs})")
        return problems

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Build a config from plain values (a Ray Tune trial config); unknown keys and bad types fail at once."""
        hints = get_type_hints(cls)
        unknown = sorted(set(values) - set(hints))
        if unknown:
            raise AstCvError(f"Unknown config key(s) {unknown}; valid keys: {sorted(hints)}.")
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert ``value`` to the field's type, or raise AstCvError naming the field."""
    origin, args = get_origin(hint), get_args(hint)
    try:
        if value is None and type(None) in args:
            return None
        if type(None) in args:  # Optional[X]
            hint = next(a for a in args if a is not type(None))
            origin, args = get_origin(hint), get_args(hint)
        if origin is tuple:
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise TypeError
            return tuple(_coerce(name, v, args[0]) for v in value)
        if hint is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if hint is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise TypeError
            return int(float(value))
        if hint is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise AstCvError(f"Config key {name!r} expects {getattr(hint, '__name__', hint)}, got {value!r}.")


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def set_by_orchestrator() -> tuple[str, ...]:
    """Fields orchestrate.py sets per trial or from its own flags (their metadata says how), so it has no flag for."""
    return tuple(f.name for f in config_fields() if "orchestrator" in f.metadata)


def auto_or(kind: type, what: str) -> Callable[[str], Any]:
    """An argparse type: the word 'auto', or a value of ``kind`` (``what`` names it in the error)."""

    def parse(text: str):
        if text == "auto":
            return text
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} or 'auto', got {text!r}") from None

    return parse


frames_arg = auto_or(int, "a whole number")  # --num-frames: 'auto' = the smallest count holding the clips

def add_config_arguments(parser: argparse.ArgumentParser, exclude: Sequence[str] = (), only_if_given: bool = False) -> None:
    """Add one ``--flag`` per config field (help and default from the dataclass), except ``exclude``.

    With ``only_if_given`` a flag left out sets no attribute, so callers can tell it from an explicit default.
    """
    hints = get_type_hints(TrainConfig)
    for f in config_fields():
        if f.name in exclude:
            continue
        hint = hints[f.name]
        args = get_args(hint)
        default = f.metadata.get("cli_default", f.default)
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS if only_if_given else default}
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else ("''" if default == "" else default)
        kwargs["help"] = f"{f.metadata['help']} (default: {shown})"
        if get_origin(hint) is tuple:
            kwargs.update(type=args[0], nargs="+")
        elif type(None) in args:
            kwargs["type"] = next(a for a in args if a is not type(None))
        else:
            kwargs["type"] = hint
        if f.name == "num_frames":
            kwargs["type"] = frames_arg
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """Build the config from parsed arguments (only the fields present), plus ``overrides``."""
    values = {f.name: getattr(args, f.name) for f in config_fields() if hasattr(args, f.name)}
    values.update(overrides)
    return TrainConfig.from_dict(values)


def recipe_summary(config: Mapping[str, Any]) -> str:
    """One line naming the training recipe (for the report's config table); ``config`` is a mapping."""
    get = config.get
    parts = [f"{get('optimizer', 'adamw')} wd {get('weight_decay', 0.01):g} betas {tuple(get('betas', (0.9, 0.999)))}",
             f"lr {get('lr_schedule', 'constant')}"]
    if get("lr_schedule") == "step":
        parts[-1] += f" x{get('lr_decay_factor')} every {get('lr_decay_step')} from epoch {get('lr_decay_start')}"
    if get("warmup_steps"):
        parts.append(f"warmup {get('warmup_steps')} steps")
    if get("freqm") or get("timem"):
        parts.append(f"SpecAugment freqm {get('freqm')} timem {get('timem')}")
    if get("mixup"):
        parts.append(f"mixup {get('mixup')}")
    if get("wa_start"):
        parts.append(f"weight averaging epochs {get('wa_start')}-{get('wa_end')}")
    return ", ".join(parts)
