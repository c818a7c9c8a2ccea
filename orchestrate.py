#!/usr/bin/env python
"""Run UrbanSound8K's 10-fold cross-validation of AST as Ray Tune trials (one per fold x config), then reduce.

    python orchestrate.py --demo                                  # generated data + tiny AST, CPU, a few minutes
    python orchestrate.py --gpus 1 --data-root /path/UrbanSound8K  # the design card's 40 trials on one GPU
    python orchestrate.py --report-only runs/ast-cv                # (re)write the report of a finished or partial run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from search_spaces import SPACES
from trainable.config import TrainConfig, add_config_arguments, config_from_args
from trainable.errors import AstCvError
from trainable.experiment import (
    BEST_MODEL,
    FINAL_MODEL,
    REPORT,
    SUMMARY,
    format_lr,
    read_manifest,
    trial_dirname,
    write_manifest,
)

log = logging.getLogger("ast-cv")

GRID_KEYS = ("test_fold", "lr", "batch_size")
DEFAULT_NAME = "ast-cv"
DEMO_DIR = "demo"

EPILOG = """\
Results go to STORAGE/NAME/: one folder per trial (fold03_lr5e-05_bs16/ with checkpoints, result.json and
TensorBoard events), then summary.json, report.md, per_trial.csv and best_model/ (Hugging Face format).
Watch training with:  tensorboard --logdir STORAGE/NAME
Re-running the same command (or --resume) continues an interrupted experiment: finished trials are not rerun,
running ones continue from their last epoch checkpoint.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="orchestrate.py",
        description="Fine-tune AST on UrbanSound8K with the dataset's folds: every fold x (lr, batch size) is one "
        "Ray Tune trial; a reducer then reports per-fold accuracy, mean ± std and exports the best model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run = p.add_argument_group("what to run")
    run.add_argument("--demo", action="store_true",
                     help=f"run the built-in demo: generate an UrbanSound8K-shaped dataset and a tiny AST under ./{DEMO_DIR}/ "
                     "(once), then the whole pipeline on CPU in a few minutes")
    run.add_argument("--space", choices=sorted(SPACES), default=None,
                     help="named search space from search_spaces.py (default: card = 10 folds x lr {1e-5, 5e-5} x batch {8, 16}; demo with --demo)")
    run.add_argument("--folds", type=int, nargs="+", default=None,
                     help="folds in use; each is a test fold once (default: 1..10; at least 3)")
    run.add_argument("--test-folds", type=int, nargs="+", default=None,
                     help="run only these test folds now (default: every fold in --folds); the rest trains them as usual")
    run.add_argument("--lrs", type=float, nargs="+", default=None, help="learning rates to try (overrides the space)")
    run.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="batch sizes to try (overrides the space)")
    add_config_arguments(p.add_argument_group("training settings (every trial)"),
                         exclude=("lr", "batch_size", "test_fold", "val_fold", "folds", "device", "torch_threads", "feature_cache",
                                  "skip_clips"),
                         only_if_given=True)
    cache = p.add_argument_group("feature cache")
    cache.add_argument("--cache-dir", default=None,
                       help="where the feature cache lives: each clip's features computed once, shared by all trials "
                       "(default: STORAGE/feature-cache; ~/.cache/ast-cv/features for URI storage)")
    cache.add_argument("--no-cache", action="store_true",
                       help="decode and featurize every clip in every epoch instead (the original recipe; slower)")
    res = p.add_argument_group("resources")
    res.add_argument("--gpus", type=float, default=None,
                     help="GPUs for a local Ray start (default: as many as torch sees; 0 = CPU only). Asking for GPUs "
                     "torch cannot see is an error")
    res.add_argument("--gpus-per-trial", type=float, default=None,
                     help="GPUs per trial (default: 1 when GPUs are used, else 0); fractions such as 0.5 pack trials on one card")
    res.add_argument("--cpus-per-trial", type=float, default=None,
                     help="CPUs per trial, also torch's thread count (default: 2 with a GPU, else 1)")
    res.add_argument("--address", default=None,
                     help="join an existing Ray cluster instead of starting one (e.g. 'auto' after 'ray start --head')")
    out = p.add_argument_group("results")
    out.add_argument("--storage-path", default="runs",
                     help="where experiments live: a local path (made absolute) or a URI such as s3://bucket/runs shared "
                     "by all nodes (default: ./runs)")
    out.add_argument("--name", default=None, help=f"experiment name, the folder under --storage-path (default: {DEFAULT_NAME}; demo with --demo)")
    out.add_argument("--resume", action="store_true",
                     help="continue the experiment NAME with its recorded settings (re-running the same command does this too)")
    out.add_argument("--max-failures", type=int, default=2,
                     help="times a failed trial is restarted from its last checkpoint (default: 2)")
    out.add_argument("--refit", action="store_true",
                     help="after cross-validation, train one model on all folds in use with the best config for the median "
                     "best epoch and export it as final_model/ (runs on this machine)")
    out.add_argument("--report-only", metavar="EXPERIMENT_DIR", default=None,
                     help="only (re)write summary.json, report.md and best_model/ for an existing experiment folder")
    out.add_argument("--debug", action="store_true", help="show full tracebacks and Ray's own output")
    return p


@dataclass
class Plan:
    """Everything the Tuner needs, resolved from the command line (or the manifest on resume)."""

    base: dict[str, Any]
    grid: dict[str, list]
    exp_dir: str
    storage_path: str
    name: str
    resources: dict[str, float]
    num_gpus: float | None
    classes: list[str]
    restore: bool
    metadata: Any  # validated rows of the folds in use (pandas.DataFrame), read once here


def _is_uri(path: str) -> bool:
    return "://" in path


def _absolute(path: str) -> str:
    """Local paths become absolute (trials run in their own folders); hub ids and URIs stay as they are."""
    if not path or _is_uri(path):
        return path
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() or path.startswith((".", "/", "~")) else path


def resolve_plan(args: argparse.Namespace, torch_gpus: int) -> Plan:
    """Turn arguments into a validated plan; fail early (before Ray starts) on anything a user can fix."""
    from trainable.data import auto_num_frames, class_names, load_metadata

    given = {k: getattr(args, k) for k in vars(args)}
    overrides: dict[str, Any] = {}
    if args.demo:
        from trainable.demo import DEMO_FOLDS, DEMO_NUM_FRAMES, ensure_demo_assets

        print(f"Demo: preparing generated data and a tiny AST under ./{DEMO_DIR}/ (first run only) ...", flush=True)
        data_root, model_dir = ensure_demo_assets(DEMO_DIR)
        overrides = {"data_root": str(data_root), "model": str(model_dir), "epochs": 3, "num_frames": DEMO_NUM_FRAMES,
                     "num_workers": 0}
        args.space = args.space or "demo"
        args.folds = args.folds or list(DEMO_FOLDS)
        args.name = args.name or "demo"
        if args.gpus is None:
            args.gpus = 0
    name = args.name or DEFAULT_NAME
    storage = args.storage_path if _is_uri(args.storage_path) else str(Path(args.storage_path).expanduser().resolve())
    exp_dir = f"{storage.rstrip('/')}/{name}"

    manifest = None if _is_uri(storage) else read_manifest(Path(exp_dir))
    space = dict(SPACES[args.space or "card"])
    fixed = {k: v for k, v in space.items() if not isinstance(v, dict)}
    grid = {k: list(v["grid_search"]) for k, v in space.items() if isinstance(v, dict)}
    folds = sorted(set(args.folds)) if args.folds else sorted(grid["test_fold"])
    grid["test_fold"] = sorted(set(args.test_folds)) if args.test_folds else folds
    if not set(grid["test_fold"]) <= set(folds):
        raise AstCvError(f"--test-folds {grid['test_fold']} must be among --folds {folds}.")
    if args.lrs:
        grid["lr"] = list(args.lrs)
    if args.batch_sizes:
        grid["batch_size"] = list(args.batch_sizes)
    for key in grid:
        if key not in GRID_KEYS:
            raise AstCvError(f"search space dimension {key!r} is not supported; grid over {GRID_KEYS}.")
    values = {**fixed, **overrides}
    values.update({k: given[k] for k in given if k in TrainConfig.__dataclass_fields__ and k not in GRID_KEYS})
    values["folds"] = folds
    values["data_root"] = _absolute(values.get("data_root", ""))
    values["model"] = _absolute(values.get("model", TrainConfig.model))
    if manifest is None and args.resume:
        raise AstCvError(f"--resume: no experiment to resume at {exp_dir}. Check --storage-path and --name.")
    if manifest is not None and args.resume:
        values, grid = dict(manifest["base_config"]), manifest["grid"]

    if not values.get("data_root"):
        raise AstCvError("--data-root is required: the UrbanSound8K folder (holding audio/ and metadata/), or use --demo.")
    meta = load_metadata(values["data_root"], values["folds"])
    classes = class_names(meta)
    if values.get("num_frames") == "auto":
        values["num_frames"] = auto_num_frames(values["data_root"], meta)
        print(f"--num-frames auto: {values['num_frames']} frames hold the longest clip", flush=True)
    values["test_fold"] = grid["test_fold"][0]
    for key in ("lr", "batch_size"):  # validate every grid value through the config
        for v in grid[key]:
            TrainConfig.from_dict({**values, key: v})
    if args.no_cache:
        values["feature_cache"] = ""
    elif not (args.resume and manifest is not None):
        cache_dir = args.cache_dir or (str(Path("~/.cache/ast-cv/features").expanduser()) if _is_uri(storage)
                                       else f"{storage}/feature-cache")
        values["feature_cache"] = str(Path(cache_dir).expanduser().resolve())

    if manifest is not None and not args.resume:
        # Settings that may differ on a resume: per-machine resources, and the grid keys (compared as the grid).
        free = (*GRID_KEYS, "val_fold", "torch_threads", "num_workers", "device", "feature_cache")
        old = {k: v for k, v in manifest["base_config"].items() if k not in free}
        new = {k: v for k, v in TrainConfig.from_dict(values).to_dict().items() if k not in free}
        if old != new or manifest["grid"] != grid:
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if manifest["grid"] != grid:
                changed.append("grid")
            raise AstCvError(
                f"Experiment {exp_dir} exists with other settings ({', '.join(changed)}). Pass --resume to continue "
                f"it with its own settings, or --name NEW for a new experiment."
            )
    restore = manifest is not None
    from trainable.model import check_model_source

    check_model_source(values["model"])

    # Resources.
    if args.address is None:
        num_gpus = float(torch_gpus) if args.gpus is None else float(args.gpus)
        if args.gpus is not None and args.gpus > torch_gpus:
            raise AstCvError(
                f"--gpus {args.gpus:g} asks for {args.gpus:g} GPU(s) but torch sees {torch_gpus} CUDA device(s). On Colab: "
                f"Runtime > Change runtime type > T4 GPU, then restart. To run on CPU pass --gpus 0; to use a cluster's "
                f"GPUs pass --address."
            )
        if args.gpus is not None and args.gpus < 0:
            raise AstCvError("--gpus must be >= 0.")
    else:
        num_gpus = None
    use_gpu = (num_gpus or 0) > 0 or (args.address is not None and (args.gpus_per_trial or 0) > 0)
    gpus_per_trial = args.gpus_per_trial if args.gpus_per_trial is not None else (1.0 if use_gpu else 0.0)
    if gpus_per_trial < 0 or (num_gpus is not None and gpus_per_trial > max(num_gpus, 0) and gpus_per_trial > 0):
        raise AstCvError(f"--gpus-per-trial {gpus_per_trial:g} does not fit in --gpus {num_gpus:g}.")
    cpus = args.cpus_per_trial if args.cpus_per_trial is not None else (2.0 if gpus_per_trial > 0 else 1.0)
    cpus = min(cpus, float(os.cpu_count() or 1)) if args.address is None else cpus
    if cpus <= 0:
        raise AstCvError("--cpus-per-trial must be > 0.")
    values["torch_threads"] = max(1, int(cpus))
    values["device"] = "auto"
    base = TrainConfig.from_dict(values).to_dict()
    for key in GRID_KEYS:
        base.pop(key, None)
    base.pop("val_fold", None)
    return Plan(base=base, grid=grid, exp_dir=exp_dir, storage_path=storage, name=name,
                resources={"cpu": cpus, "gpu": gpus_per_trial}, num_gpus=num_gpus, classes=classes, restore=restore,
                metadata=meta)


def ensure_writable(exp_dir: Path) -> None:
    """Fail now, not after hours, if the experiment folder cannot be written."""
    try:
        exp_dir.mkdir(parents=True, exist_ok=True)
        probe = exp_dir / ".astcv-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise AstCvError(
            f"Cannot write to {exp_dir} ({exc.strerror or exc}). Pass --storage-path with a folder you can write to."
        ) from exc


def prepare_inputs(plan: Plan) -> dict[str, str]:
    """Build the feature cache (or check every file's header without it) before any trial starts.

    Clips that cannot be used (empty, corrupt, NaN/inf samples) are left out of every trial, listed here and in
    the report. Returns {clip: reason}.
    """
    from trainable.data import screen_headers

    if plan.base["feature_cache"]:
        from trainable.cache import FeatureCache

        cache = FeatureCache.open(plan.base["feature_cache"], plan.base["data_root"], plan.base["num_frames"],
                                  plan.base["folds"], meta=plan.metadata)
        print(f"Feature cache: {cache.path} ({len(cache.index)} clips, {plan.base['num_frames']} frames)", flush=True)
        bad = dict(cache.excluded)
    else:
        bad = screen_headers(plan.base["data_root"], plan.metadata)
    if not plan.restore:
        plan.base["skip_clips"] = sorted(bad)
    if bad:
        print(f"warning: {len(bad)} clip(s) cannot be used and are left out of every trial (listed in the report):",
              file=sys.stderr)
        for clip, reason in sorted(bad.items())[:5]:
            print(f"  {clip}: {reason}", file=sys.stderr)
    return bad


def _trial_name(trial) -> str:
    c = trial.config
    return trial_dirname(c["test_fold"], c["lr"], c["batch_size"])


def make_progress_callback(total: int, epochs: int):
    """A Tune callback printing one line per epoch result and per finished/failed trial, instead of Ray's tables."""
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self):
            self.start = time.time()
            self.best = (-1.0, "")
            self.completed: set[str] = set()  # trial ids whose completion was reported (status may lag)

        def setup(self, **info):
            self.start = time.time()

        def _counts(self, trials) -> str:
            states = ["TERMINATED" if t.trial_id in self.completed else t.status for t in trials]
            done = states.count("TERMINATED")
            return (f"{done}/{total} done, {states.count('RUNNING')} running, {states.count('PENDING')} pending"
                    + (f", {states.count('ERROR')} failed" if "ERROR" in states else ""))

        def _stamp(self) -> str:
            s = int(time.time() - self.start)
            return f"[{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}]"

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "val_accuracy" not in result:
                return
            name = _trial_name(trial)
            if result["val_accuracy"] > self.best[0]:
                self.best = (result["val_accuracy"], name)
            print(f"{self._stamp()} {name} epoch {result['epoch']}/{epochs}: val_acc {result['val_accuracy']:.3f} "
                  f"test_acc {result['test_accuracy']:.3f} ({result['samples_per_second']:.0f} samples/s) | "
                  f"{self._counts(trials)} | best val_acc {self.best[0]:.3f} ({self.best[1]})", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.completed.add(trial.trial_id)
            print(f"{self._stamp()} {_trial_name(trial)} finished | {self._counts(trials)}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"{self._stamp()} {_trial_name(trial)} FAILED (see {trial.local_path}/error.txt) | "
                  f"{self._counts(trials)}", flush=True)

    return Progress()


def run_experiment(plan: Plan, args: argparse.Namespace) -> int:
    """Start or join Ray, run (or restore) the Tuner, then reduce. Returns the number of failed trials."""
    import ray
    from ray import tune

    from trainable.train import VAL_ACCURACY, tune_trial

    project_root = str(Path(__file__).resolve().parent)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [project_root, os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false"}
    for key in ("HF_HUB_OFFLINE", "HF_HOME", "ASTCV_SIMULATE_OOM_ABOVE"):
        if key in os.environ:
            env[key] = os.environ[key]
    init: dict[str, Any] = dict(log_to_driver=args.debug, runtime_env={"env_vars": env},
                                logging_level=logging.INFO if args.debug else logging.WARNING)
    if args.address:
        init["address"] = args.address
    else:  # a local start: no dashboard (nothing listens beyond Ray's own ports), a modest object store (Colab's /dev/shm)
        init.update(num_gpus=plan.num_gpus, include_dashboard=False, object_store_memory=256 * 1024**2)
    ray.init(**init)
    try:
        trainable = tune.with_resources(tune.with_parameters(tune_trial, base=plan.base), plan.resources)
        total = len(plan.grid["test_fold"]) * len(plan.grid["lr"]) * len(plan.grid["batch_size"])
        if plan.restore and tune.Tuner.can_restore(plan.exp_dir):
            print(f"Resuming {plan.exp_dir}: finished trials are kept, the others continue from their last checkpoint.", flush=True)
            tuner = tune.Tuner.restore(plan.exp_dir, trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={k: tune.grid_search(v) for k, v in plan.grid.items()},
                tune_config=tune.TuneConfig(trial_dirname_creator=_trial_name, trial_name_creator=_trial_name),
                run_config=tune.RunConfig(
                    name=plan.name,
                    storage_path=plan.storage_path,
                    verbose=1 if args.debug else 0,
                    callbacks=[make_progress_callback(total, plan.base["epochs"])],
                    checkpoint_config=tune.CheckpointConfig(
                        num_to_keep=2, checkpoint_score_attribute=VAL_ACCURACY, checkpoint_score_order="max"),
                    failure_config=tune.FailureConfig(max_failures=args.max_failures),
                ),
            )
        n_f, n_lr, n_bs = (len(plan.grid[k]) for k in GRID_KEYS)
        print(f"Running {total} trials ({n_f} fold{'s' * (n_f != 1)} x {n_lr} learning rate{'s' * (n_lr != 1)} x "
              f"{n_bs} batch size{'s' * (n_bs != 1)}), {plan.resources['cpu']:g} CPU + {plan.resources['gpu']:g} GPU each, "
              f"into {plan.exp_dir}", flush=True)
        results = tuner.fit()
        return results.num_errors
    finally:
        ray.shutdown()


def refit(summary: dict[str, Any], plan: Plan) -> Path | None:
    """Train the final model on all folds with the best config for the median best epoch; export final_model/."""
    import numpy as np

    from trainable.train import train_on_all_folds

    best = summary["best_config"]
    if best is None:
        print("--refit: no finished trials to choose a config from; skipped.")
        return None
    cfg = next(c for c in summary["configs"] if (c["lr"], c["batch_size"]) == (best["lr"], best["batch_size"]))
    epochs = int(np.ceil(np.median(list(cfg["best_epoch"].values()))))
    config = TrainConfig.from_dict({**plan.base, "lr": best["lr"], "batch_size": best["batch_size"],
                                    "test_fold": plan.base["folds"][0]})
    print(f"Refit: lr {format_lr(best['lr'])}, batch {best['batch_size']}, {epochs} epochs on all folds {plan.base['folds']}", flush=True)
    out = train_on_all_folds(config, epochs, Path(plan.exp_dir) / FINAL_MODEL)
    summary["final_model_dir"] = str(out)
    summary["refit"] = {"lr": best["lr"], "batch_size": best["batch_size"], "epochs": epochs, "folds": plan.base["folds"]}
    (Path(plan.exp_dir) / SUMMARY).write_text(json.dumps(summary, indent=1))
    return out


def print_summary(summary: dict[str, Any], exp_dir: str) -> None:
    n = len(summary["per_fold"])
    if summary["mean"] is None:
        print("No trial has finished yet; nothing to summarize.")
        return
    std = f" ± {100 * summary['std']:.2f}" if summary["std"] is not None else ""
    print(f"\nTest accuracy (nested CV over {n} folds): {100 * summary['mean']:.2f}{std} %")
    for p in summary["per_fold"]:
        print(f"  fold {p['fold']:2d}: {100 * p['test_accuracy']:6.2f} %  (lr {format_lr(p['lr'])}, batch {p['batch_size']}, epoch {p['epoch']})")
    b = summary["best_config"]
    if b:
        print(f"Best config on validation: lr {format_lr(b['lr'])}, batch {b['batch_size']}")
    if not summary["complete"]:
        print(f"Partial: {summary['trials_finished']}/{summary['trials_expected']} trials finished; "
              f"re-run the same command (or --resume) to finish.")
    print(f"Report: {exp_dir}/{REPORT}\nSummary: {exp_dir}/{SUMMARY}")
    if summary["best_model_dir"]:
        print(f"Best model: {exp_dir}/{BEST_MODEL}")
    if summary.get("final_model_dir"):
        print(f"Final model (refit on all folds): {summary['final_model_dir']}")
    print(f"TensorBoard: tensorboard --logdir {exp_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("trainable").setLevel(logging.INFO)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not args.debug:  # Tune's new console output prints its own boxes (and a TensorBoard path into /tmp/ray)
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from trainable.reduce import summarize

    try:
        if args.report_only:
            exp = str(Path(args.report_only).expanduser().resolve())
            print_summary(summarize(exp), exp)
            return 0
        import torch

        plan = resolve_plan(args, torch.cuda.device_count())
        if not _is_uri(plan.exp_dir):
            ensure_writable(Path(plan.exp_dir))
        skipped = prepare_inputs(plan)
        if not plan.restore and not _is_uri(plan.exp_dir):
            write_manifest(Path(plan.exp_dir), command=[sys.executable, *sys.argv], base_config=plan.base,
                           grid=plan.grid, classes=plan.classes, resources=plan.resources, skipped_clips=skipped)
        failed = run_experiment(plan, args)
        if _is_uri(plan.exp_dir):
            print(f"Results are in {plan.exp_dir}; copy the folder locally and run --report-only on it for the report.")
            return 1 if failed else 0
        summary = summarize(plan.exp_dir)
        if args.refit:
            refit(summary, plan)
        print_summary(summary, plan.exp_dir)
        if failed:
            print(f"{failed} trial(s) failed; see error.txt in their folders. Re-run the same command to retry them.",
                  file=sys.stderr)
            return 1
        return 0 if summary["complete"] else 1  # stopped early (Ctrl-C): the partial report above
    except AstCvError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nInterrupted. Finished trials and epoch checkpoints are kept: re-run the same command to continue.",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
