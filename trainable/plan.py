"""From orchestrate.py's arguments to a Plan: small steps, each a function of what it is given, that fail early (before
Ray starts) on anything a user can fix. The Plan holds one frozen TrainConfig that every trial starts from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import TrainConfig
from .errors import AstCvError

GRID_KEYS = ("test_fold", "lr", "batch_size")
DEFAULT_NAME = "ast-cv"
DEMO_DIR = "demo"
# Settings that may differ when an experiment is continued: this machine's resources, and the grid (compared apart).
FREE_ON_RESUME = (*GRID_KEYS, "val_fold", "torch_threads", "num_workers", "device", "feature_cache", "skip_clips")


@dataclass(frozen=True)
class Resources:
    """What each trial asks Ray for, and what a local Ray start offers (``num_gpus`` None: join ``address``)."""

    cpus_per_trial: float
    gpus_per_trial: float
    num_gpus: float | None
    address: str | None

    def as_ray(self) -> dict[str, float]:
        return {"cpu": self.cpus_per_trial, "gpu": self.gpus_per_trial}


@dataclass(frozen=True)
class Plan:
    """Everything the Tuner and the reducer need, resolved from the command line (or the manifest on resume)."""

    config: TrainConfig  # every trial's settings; its test_fold, lr and batch_size are the grid's first values
    grid: dict[str, list]
    exp_dir: str
    storage_path: str
    name: str
    resources: Resources
    classes: list[str]
    restore: bool
    fold_sizes: dict[int, int] = field(default_factory=dict)  # usable clips per fold
    skipped: dict[str, str] = field(default_factory=dict)  # clip id -> why it is left out
    fsids_in_several_folds: dict[int, list[int]] = field(default_factory=dict)

    @property
    def trial_base(self) -> dict[str, Any]:
        """The fixed settings each trial gets from Ray (the grid adds test_fold, lr and batch_size)."""
        return {k: v for k, v in self.config.to_dict().items() if k not in (*GRID_KEYS, "val_fold")}

    @property
    def trials(self) -> int:
        return len(self.grid["test_fold"]) * len(self.grid["lr"]) * len(self.grid["batch_size"])


def is_uri(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    """Local paths become absolute (trials run in their own folders); hub ids and URIs stay as they are."""
    if not path or is_uri(path):
        return path
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() or path.startswith((".", "/", "~")) else path


def with_demo_defaults(args: argparse.Namespace) -> tuple[argparse.Namespace, dict[str, Any]]:
    """For --demo: (a copy of the arguments with the demo's defaults, config values of its data and tiny model)."""
    if not args.demo:
        return args, {}
    from .demo import DEMO_FOLDS, DEMO_NUM_FRAMES, ensure_demo_assets

    print(f"Demo: preparing generated data and a tiny AST under ./{DEMO_DIR}/ (first run only) ...", flush=True)
    data_root, model_dir = ensure_demo_assets(DEMO_DIR)
    demo = argparse.Namespace(**{**vars(args), "space": args.space or "demo", "folds": args.folds or list(DEMO_FOLDS),
                                 "name": args.name or "demo", "gpus": 0 if args.gpus is None else args.gpus})
    return demo, {"data_root": str(data_root), "model": str(model_dir), "epochs": 3, "num_frames": DEMO_NUM_FRAMES,
                  "num_workers": 0}


def experiment_location(storage_path: str, name: str | None) -> tuple[str, str, str]:
    """(storage, name, experiment folder); local storage made absolute."""
    name = name or DEFAULT_NAME
    storage = storage_path if is_uri(storage_path) else str(Path(storage_path).expanduser().resolve())
    return storage, name, f"{storage.rstrip('/')}/{name}"


def build_grid(space: Mapping[str, Any], args: argparse.Namespace) -> tuple[dict[str, list], dict[str, Any], list[int]]:
    """(grid over GRID_KEYS, the space's fixed settings, folds in use) from the search space and the flags."""
    fixed = {k: v for k, v in space.items() if not isinstance(v, dict)}
    grid = {k: list(v["grid_search"]) for k, v in space.items() if isinstance(v, dict)}
    unknown = [k for k in grid if k not in GRID_KEYS]
    if unknown:
        raise AstCvError(f"search space dimension {unknown[0]!r} is not supported; grid over {GRID_KEYS}.")
    folds = sorted(set(args.folds)) if args.folds else sorted(grid["test_fold"])
    grid["test_fold"] = sorted(set(args.test_folds)) if args.test_folds else folds
    if not set(grid["test_fold"]) <= set(folds):
        raise AstCvError(f"--test-folds {grid['test_fold']} must be among --folds {folds}.")
    if args.lrs:
        grid["lr"] = list(args.lrs)
    if args.batch_sizes:
        grid["batch_size"] = list(args.batch_sizes)
    return grid, fixed, folds


def config_values(fixed: Mapping[str, Any], demo: Mapping[str, Any], args: argparse.Namespace,
                  folds: Sequence[int]) -> dict[str, Any]:
    """Config values from the space's fixed settings, the demo's, then the flags given (in that order of priority)."""
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and k not in GRID_KEYS}
    values = {**fixed, **demo, **given, "folds": list(folds)}
    values["data_root"] = absolute(values.get("data_root", ""))
    values["model"] = absolute(values.get("model", TrainConfig.model))
    if not values["data_root"]:
        raise AstCvError("--data-root is required: the UrbanSound8K folder (holding audio/ and metadata/), or use --demo.")
    return values


def check_against_manifest(manifest: Mapping[str, Any], config: TrainConfig, grid: Mapping[str, list], exp_dir: str) -> None:
    """An existing experiment may only be continued with its own settings (resources aside)."""
    old = {k: v for k, v in manifest["base_config"].items() if k not in FREE_ON_RESUME}
    new = {k: v for k, v in config.to_dict().items() if k not in FREE_ON_RESUME}
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if manifest["grid"] != grid:
        changed.append("grid")
    if changed:
        raise AstCvError(
            f"Experiment {exp_dir} exists with other settings ({', '.join(changed)}). Pass --resume to continue it with "
            f"its own settings, or --name NEW for a new experiment."
        )


def plan_resources(args: argparse.Namespace, torch_gpus: int, cpu_count: int | None = None) -> Resources:
    """Per-trial CPUs/GPUs and the local Ray start's GPUs from the flags and the GPUs torch sees."""
    if args.address is None:
        if args.gpus is not None and args.gpus < 0:
            raise AstCvError("--gpus must be >= 0.")
        if args.gpus is not None and args.gpus > torch_gpus:
            raise AstCvError(
                f"--gpus {args.gpus:g} asks for {args.gpus:g} GPU(s) but torch sees {torch_gpus} CUDA device(s). On Colab: "
                f"Runtime > Change runtime type > T4 GPU, then restart. To run on CPU pass --gpus 0; to use a cluster's "
                f"GPUs pass --address."
            )
        num_gpus = float(torch_gpus) if args.gpus is None else float(args.gpus)
    else:
        num_gpus = None
    use_gpu = (num_gpus or 0) > 0 or (args.address is not None and (args.gpus_per_trial or 0) > 0)
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else (1.0 if use_gpu else 0.0)
    if gpus < 0 or (num_gpus is not None and gpus > max(num_gpus, 0) and gpus > 0):
        raise AstCvError(f"--gpus-per-trial {gpus:g} does not fit in --gpus {num_gpus:g}.")
    cpus = args.cpus_per_trial if args.cpus_per_trial is not None else (2.0 if gpus > 0 else 1.0)
    if args.address is None:
        cpus = min(cpus, float(cpu_count or os.cpu_count() or 1))
    if cpus <= 0:
        raise AstCvError("--cpus-per-trial must be > 0.")
    return Resources(cpus, gpus, num_gpus, args.address)


def cache_dir(args: argparse.Namespace, storage: str) -> str:
    """Where the feature cache lives ('' with --no-cache): beside the experiments, or in ~/.cache for URI storage."""
    if args.no_cache:
        return ""
    default = str(Path("~/.cache/ast-cv/features").expanduser()) if is_uri(storage) else f"{storage}/feature-cache"
    return str(Path(args.cache_dir or default).expanduser().resolve())


def first_config(values: Mapping[str, Any], grid: Mapping[str, list], resources: Resources) -> TrainConfig:
    """The one validated config (the grid's first point); every grid value is checked through it."""
    config = TrainConfig.from_dict({**values, "test_fold": grid["test_fold"][0], "lr": grid["lr"][0],
                                    "batch_size": grid["batch_size"][0], "torch_threads": max(1, int(resources.cpus_per_trial)),
                                    "device": "auto"})
    for key in ("lr", "batch_size"):
        for v in grid[key]:
            TrainConfig.from_dict({**config.to_dict(), key: v})
    return config


def finish(config: TrainConfig, skipped: Mapping[str, str]) -> TrainConfig:
    """The config with the clips the pre-run check left out."""
    return dataclasses.replace(config, skip_clips=tuple(sorted(skipped)))
