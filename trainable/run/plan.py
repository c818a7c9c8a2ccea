"""From orchestrate.py's arguments to a Plan: small steps, each a function of what it is given, that fail early (before
Ray starts) on anything a user can fix. The Plan holds one frozen TrainConfig that every trial starts from.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import socket
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..config import TrainConfig
from ..errors import AstCvError
from ..store.experiment import axis_text, extra_axes, extra_points, format_lr
from ..store.footprint import Footprint
from ..store.storage import Store, is_uri, join
from .axes import expand_axes, parse_axes

GRID_KEYS = ("test_fold", "lr", "batch_size")
DEFAULT_NAME = "ast-cv"
SPACE_NAMES = {"smoke": "smoke"}  # a space's own experiment by default: a smoke run's trials never join the grid's
DEMO_DIR = "demo"
DEFAULT_CACHE = "~/.cache/ast-cv/features"  # local disk: fast, and never the (maybe slow, small or remote) storage
# Config fields a continued experiment may change (with the resources and --test-folds, which may grow); the others
# are the experiment's own and are read from its manifest.
CHANGEABLE_ON_RESUME = ("num_workers", "feature_cache")
CHANGEABLE_FLAGS = ("--gpus, --gpus-per-trial, --cpus-per-trial, --address, --num-workers, --cache-dir, --no-cache, "
                    "--max-failures, --refit, --no-space-check, and --test-folds to add folds")


@dataclass(frozen=True)
class Resources:
    """What each trial asks Ray for, and what a local Ray start offers (``num_gpus`` None: join ``address``)."""

    cpus_per_trial: float
    gpus_per_trial: float
    num_gpus: float | None
    address: str | None
    auto_gpus: bool = False  # --gpus-per-trial auto (or left out); on a cluster settled from its nodes (run.cluster)
    auto_cpus: bool = False  # --cpus-per-trial left at its default
    cluster_slots: int | None = None  # trials the cluster's alive nodes run at once, once settled on them

    def as_ray(self) -> dict[str, float]:
        return {"cpu": self.cpus_per_trial, "gpu": self.gpus_per_trial}

    def requested(self) -> dict[str, float | str]:
        """What the flags asked for ("auto" where left to the machine or the cluster), as the manifest records it:
        a continued run settles them again on the machine or cluster it runs on."""
        return {"cpu": "auto" if self.auto_cpus else self.cpus_per_trial,
                "gpu": "auto" if self.auto_gpus else self.gpus_per_trial}

    def slots(self, cpu_count: int | None = None) -> int | None:
        """How many trials run at once: on a local Ray start from this machine's CPUs and GPUs, on a cluster from its
        alive nodes once settled (None before)."""
        if self.address is not None:
            return self.cluster_slots
        limits = [math.floor((cpu_count or os.cpu_count() or 1) / self.cpus_per_trial + 1e-9)]
        if self.gpus_per_trial > 0:
            limits.append(math.floor((self.num_gpus or 0) / self.gpus_per_trial + 1e-9))
        return max(1, min(limits))


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
    restore: bool  # continue the recorded Ray experiment
    new_test_folds: tuple[int, ...] = ()  # test folds whose trials a new Ray run starts (all of them when not restoring)
    fold_sizes: dict[int, int] = field(default_factory=dict)  # usable clips per fold
    skipped: dict[str, str] = field(default_factory=dict)  # clip id -> why it is left out
    fsids_in_several_folds: dict[int, list[int]] = field(default_factory=dict)
    footprint: Footprint | None = None  # disk needs, from the preflight
    model_dir: str = ""  # the model's files on this machine (a hub id resolved into the Hugging Face cache)
    finished: frozenset[str] = frozenset()  # trials that finished in earlier runs of the experiment

    @cached_property
    def store(self) -> Store:
        return Store.open(self.exp_dir)

    @property
    def trial_base(self) -> dict[str, Any]:
        """The fixed settings each trial gets from Ray (the grid adds test_fold, lr and batch_size)."""
        return {k: v for k, v in self.config.to_dict().items() if k not in (*GRID_KEYS, "val_fold")}

    @property
    def trials(self) -> int:
        return len(self.grid["test_fold"]) * len(self.grid["lr"]) * len(self.grid["batch_size"]) * len(extra_points(self.grid))


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


def experiment_location(storage_path: str, name: str | None, space: str | None = None) -> tuple[str, str, str]:
    """(storage, name, experiment folder); local storage made absolute. Without a name: the space's own (SPACE_NAMES),
    else DEFAULT_NAME."""
    name = name or SPACE_NAMES.get(space or "", DEFAULT_NAME)
    if "/" in name or name in (".", ".."):
        raise AstCvError(f"--name {name!r} must be a plain folder name (no '/').")
    storage = storage_path if is_uri(storage_path) else str(Path(storage_path).expanduser().resolve())
    return storage, name, join(storage, name)


def split_space(space: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, list]]:
    """(fixed settings, grid dimensions) of a search space."""
    fixed = {k: v for k, v in space.items() if not isinstance(v, dict)}
    return fixed, {k: list(v["grid_search"]) for k, v in space.items() if isinstance(v, dict)}


def build_grid(space: Mapping[str, Any], args: argparse.Namespace) -> tuple[dict[str, list], dict[str, Any], list[int]]:
    """(grid over GRID_KEYS, the space's fixed settings, folds in use) from the search space and the flags."""
    fixed, grid = split_space(space)
    unknown = [k for k in grid if k not in GRID_KEYS]
    if unknown:
        raise AstCvError(f"search space dimension {unknown[0]!r} is not supported; grid over {GRID_KEYS}.")
    space_folds = fixed.pop("folds", None)  # a space that trains on these folds but tests on its own few
    folds = sorted(set(args.folds or space_folds or grid["test_fold"]))
    if args.test_folds:
        grid["test_fold"] = sorted(set(args.test_folds))
    elif space_folds:
        grid["test_fold"] = [f for f in grid["test_fold"] if f in folds] or folds[:1]
    else:
        grid["test_fold"] = folds
    if not set(grid["test_fold"]) <= set(folds):
        raise AstCvError(f"--test-folds {grid['test_fold']} must be among --folds {folds}.")
    if args.lrs:
        grid["lr"] = list(args.lrs)
    if args.batch_sizes:
        grid["batch_size"] = list(args.batch_sizes)
    grid["lr"], grid["batch_size"] = distinct_lrs(grid["lr"]), sorted(set(int(b) for b in grid["batch_size"]))
    grid.update(parse_axes(getattr(args, "grid", None)))  # --grid NAME=V1,V2: extra axes after the three
    return grid, fixed, folds


def distinct_lrs(lrs: Sequence[float]) -> list[float]:
    """The learning rates once each (sorted), refused when not finite or when two would share a trial folder name."""
    bad = [v for v in lrs if not math.isfinite(float(v)) or float(v) <= 0]
    if bad:
        raise AstCvError(f"--lrs must be finite numbers > 0 (got {bad[0]}).")
    out = sorted(set(float(v) for v in lrs))
    names: dict[str, float] = {}
    for v in out:
        if format_lr(v) in names:
            raise AstCvError(f"--lrs {names[format_lr(v)]!r} and {v!r} are too close: both would be trials named "
                             f"...lr{format_lr(v)}... Give learning rates that differ in their first 7 significant digits.")
        names[format_lr(v)] = v
    return out


def requested(fixed: Mapping[str, Any], demo: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Config values asked for: the space's fixed settings, the demo's, then the flags given (in that order of
    priority), local paths made absolute. Only what was asked: defaults are the config's."""
    given = {k: v for k, v in vars(args).items()
             if k in TrainConfig.__dataclass_fields__ and k not in (*GRID_KEYS, "folds") and v is not None}
    values = {**fixed, **demo, **given}
    for key in ("data_root", "model"):
        if key in values:
            values[key] = absolute(values[key])
    if getattr(args, "no_cache", False) or getattr(args, "cache_dir", None):
        values["feature_cache"] = cache_dir(args)
    return values


def config_values(fixed: Mapping[str, Any], demo: Mapping[str, Any], args: argparse.Namespace,
                  folds: Sequence[int]) -> dict[str, Any]:
    """The config values of a new experiment: what was asked, the folds, the default model and cache."""
    values = {"model": TrainConfig.model, "num_frames": "auto", "feature_cache": cache_dir(args),
              **requested(fixed, demo, args), "folds": list(folds)}
    if not values.get("data_root"):
        raise AstCvError("--data-root is required: the UrbanSound8K folder (holding audio/ and metadata/), or use --demo.")
    return values


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _axis_set(axes: Mapping[str, list]) -> dict[str, set[str]]:
    """Extra axes compared as sets of value texts (the order they were given in does not matter)."""
    return {k: {axis_text(v) for v in vals} for k, vals in axes.items()}


def continued_values(manifest: Mapping[str, Any], asked: Mapping[str, Any], args: argparse.Namespace,
                     space_grid: Mapping[str, list] | None, exp_dir: str) -> tuple[dict[str, Any], dict[str, list], list[int]]:
    """(config values, grid, test folds added) of an experiment continued from its manifest.

    Its data, model, grid and training settings are the recorded ones; of what was ``asked``, the changeable settings
    are applied and --test-folds may add folds; anything else that differs is refused in one line naming it.
    """
    values, grid = dict(manifest["base_config"]), {k: list(v) for k, v in manifest["grid"].items()}
    changed = []
    for key, value in asked.items():
        if key in CHANGEABLE_ON_RESUME:
            values[key] = value
        elif not (key == "num_frames" and value == "auto") and key in values and values[key] != value:
            changed.append(f"{_flag(key)} (recorded {values[key]!r}, now {value!r})")
    if args.folds and sorted(set(args.folds)) != sorted(values.get("folds") or []):
        changed.append(f"--folds (recorded {values.get('folds')})")
    wanted = {"lr": args.lrs or (space_grid or {}).get("lr"), "batch_size": args.batch_sizes or (space_grid or {}).get("batch_size")}
    for key, flag in (("lr", "--lrs"), ("batch_size", "--batch-sizes")):
        if wanted[key] and sorted(set(map(float, wanted[key]))) != sorted(set(map(float, grid[key]))):
            changed.append(f"{flag} (recorded {grid[key]})")
    axes = parse_axes(getattr(args, "grid", None))
    if axes and _axis_set(axes) != _axis_set(extra_axes(grid)):
        changed.append(f"--grid (recorded {extra_axes(grid) or 'none'})")
    added = []
    if args.test_folds:
        folds = sorted(set(args.test_folds))
        if not set(grid["test_fold"]) <= set(folds) or not set(folds) <= set(values.get("folds") or []):
            changed.append(f"--test-folds (recorded {grid['test_fold']}: it may only add folds among {values.get('folds')})")
        else:
            added = sorted(set(folds) - set(grid["test_fold"]))
            grid["test_fold"] = folds
    if changed:
        raise AstCvError(
            f"Experiment {exp_dir} was started with other settings: {'; '.join(changed)}. Leave them out to continue it "
            f"as recorded (--resume needs no other flag), or pass --name NEW for a new experiment. Changeable when "
            f"continuing: {CHANGEABLE_FLAGS}."
        )
    return values, grid, added


ADDRESS_TIMEOUT_S = 5.0


def probe_address(address: str, timeout: float = ADDRESS_TIMEOUT_S) -> None:
    """Fail in seconds, not after minutes of Ray's retries, when --address HOST:PORT does not answer ('auto' is
    looked up by Ray itself, which fails at once when no cluster runs here)."""
    target = address.split("://", 1)[-1]
    if address == "auto" or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise AstCvError(f"Cannot reach the Ray cluster at --address {address} within {timeout:g} s ({exc}). Check the "
                         f"head node's address ('ray start --head' prints it; the port is 6379 by default), or leave "
                         f"--address out to start Ray on this machine.") from None


PACK_MIN_GIB = 40.0  # --gpus-per-trial auto packs two trials per card from this much memory (A100-40GB, H100, H200)


def auto_gpus_per_trial(gpu_memory_gib: float | None) -> float:
    """Two trials per card on big cards, one elsewhere. Measured on an H200 (BENCHMARKS.md): two packed trials
    finished 1.9-2.0x as many trials per hour, at 9.0 GB of the card for both (fp16); a T4 (16 GB) is compute-bound
    already, so it keeps one."""
    return 0.5 if gpu_memory_gib is not None and gpu_memory_gib >= PACK_MIN_GIB else 1.0


def plan_resources(args: argparse.Namespace, torch_gpus: int, cpu_count: int | None = None,
                   gpu_memory_gib: float | None = None) -> Resources:
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
        probe_address(args.address)
        num_gpus = None
    asked = args.gpus_per_trial
    use_gpu = (num_gpus or 0) > 0 or (args.address is not None and asked not in (None, "auto") and asked > 0)
    if asked is None or asked == "auto":
        gpus = auto_gpus_per_trial(gpu_memory_gib if args.address is None else None) if use_gpu else 0.0
    else:
        gpus = float(asked)
    if gpus < 0 or (num_gpus is not None and gpus > max(num_gpus, 0) and gpus > 0):
        raise AstCvError(f"--gpus-per-trial {gpus:g} does not fit in --gpus {num_gpus:g}.")
    cpus = args.cpus_per_trial if args.cpus_per_trial is not None else (2.0 if gpus > 0 else 1.0)
    if args.address is None:
        cpus = min(cpus, float(cpu_count or os.cpu_count() or 1))
    if cpus <= 0:
        raise AstCvError("--cpus-per-trial must be > 0.")
    return Resources(cpus, gpus, num_gpus, args.address, auto_gpus=asked in (None, "auto"),
                     auto_cpus=args.cpus_per_trial is None)


def cache_dir(args: argparse.Namespace) -> str:
    """Where the feature cache lives ('' with --no-cache): --cache-dir, else this machine's ~/.cache."""
    if args.no_cache:
        return ""
    return str(Path(args.cache_dir or DEFAULT_CACHE).expanduser().resolve())


def first_config(values: Mapping[str, Any], grid: Mapping[str, list], resources: Resources) -> TrainConfig:
    """The one validated config (the grid's first point); every grid value is checked through it."""
    config = TrainConfig.from_dict({**values, "test_fold": grid["test_fold"][0], "lr": grid["lr"][0],
                                    "batch_size": grid["batch_size"][0], "torch_threads": max(1, int(resources.cpus_per_trial)),
                                    "device": "auto"})
    for key in ("lr", "batch_size"):
        for v in grid[key]:
            TrainConfig.from_dict({**config.to_dict(), key: v})
    for key, values in extra_axes(grid).items():
        for v in values:
            try:
                TrainConfig.from_dict(expand_axes({**config.to_dict(), key: v}))
            except (AstCvError, ValueError) as exc:
                raise AstCvError(f"--grid {key}={v}: {exc}") from None
    return config


def finish(config: TrainConfig, skipped: Mapping[str, str]) -> TrainConfig:
    """The config with the clips the pre-run check left out."""
    return dataclasses.replace(config, skip_clips=tuple(sorted(skipped)))
