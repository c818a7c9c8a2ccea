#!/usr/bin/env python
"""Run UrbanSound8K's 10-fold cross-validation of AST as Ray Tune trials (one per fold x config), then reduce.

    python orchestrate.py --demo                                  # generated data + tiny AST, CPU, a few minutes
    python orchestrate.py --gpus 1 --data-root /path/UrbanSound8K  # the design card's 40 trials on one GPU
    python orchestrate.py --report-only runs/ast-cv                # (re)write the report of a finished or partial run

The command line only: planning is trainable.plan, running trainable.tuner, reducing trainable.reduce.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

from search_spaces import SPACES
from trainable.cli import run_cli
from trainable.config import add_config_arguments, set_by_orchestrator
from trainable.errors import AstCvError
from trainable.experiment import BEST_MODEL, FINAL_MODEL, REPORT, SUMMARY, ExperimentLock, format_lr, read_manifest, write_manifest
from trainable.plan import (
    DEFAULT_NAME,
    DEMO_DIR,
    Plan,
    build_grid,
    cache_dir,
    check_against_manifest,
    config_values,
    experiment_location,
    finish,
    first_config,
    is_uri,
    plan_resources,
    with_demo_defaults,
)

EPILOG = """\
Results go to STORAGE/NAME/: one folder per trial (fold03_lr5e-05_bs16/ with checkpoints, result.json and
TensorBoard events), then summary.json, report.md, per_trial.csv and best_model/ (Hugging Face format).
Watch training with:  tensorboard --logdir STORAGE/NAME
Re-running the same command (or --resume) continues an interrupted experiment: finished trials are not rerun,
running ones continue from their last epoch checkpoint. One orchestrator at a time per experiment folder.
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
    add_config_arguments(p.add_argument_group("training settings (every trial)"), exclude=set_by_orchestrator(),
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


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def make_plan(args: argparse.Namespace, torch_gpus: int):
    """(Plan without the pre-run check's results, validated metadata rows, file headers if read) from the arguments."""
    from trainable.audio import choose_num_frames, describe_cut, long_input_warning, read_headers
    from trainable.data import class_names, load_metadata
    from trainable.model import check_model_source

    args, demo = with_demo_defaults(args)
    storage, name, exp_dir = experiment_location(args.storage_path, args.name)
    manifest = None if is_uri(storage) else read_manifest(Path(exp_dir))
    if args.resume and manifest is None:
        raise AstCvError(f"--resume: no experiment to resume at {exp_dir}. Check --storage-path and --name.")
    grid, fixed, folds = build_grid(SPACES[args.space or "card"], args)
    values = config_values(fixed, demo, args, folds)
    if args.resume:
        values, grid = dict(manifest["base_config"]), manifest["grid"]
    else:
        values["feature_cache"] = cache_dir(args, storage)
    meta = load_metadata(values["data_root"], values["folds"])
    headers = None
    if values.get("num_frames") == "auto":
        headers = read_headers(values["data_root"], meta)
        choice = choose_num_frames(headers.seconds)
        values["num_frames"] = choice.frames
        print(f"--num-frames auto: {choice.frames} frames hold the clips", flush=True)
        if choice.cut:
            warn(describe_cut(choice.cut, choice.frames))
    long = long_input_warning(int(values.get("num_frames", 1024)))
    if long:
        warn(long)
    resources = plan_resources(args, torch_gpus)
    config = first_config(values, grid, resources)
    if manifest is not None and not args.resume:
        check_against_manifest(manifest, config, grid, exp_dir)
    check_model_source(config.model)
    plan = Plan(config=config, grid=grid, exp_dir=exp_dir, storage_path=storage, name=name, resources=resources,
                classes=class_names(meta), restore=manifest is not None)
    return plan, meta, headers


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


def prepare_inputs(plan: Plan, meta, headers) -> Plan:
    """Build the feature cache (or, without it, use the file headers) before any trial starts; the final Plan.

    Clips that cannot be used (empty, corrupt, NaN/inf samples) are left out of every trial, listed here and in the
    report; recordings (fsIDs) in several folds are listed too.
    """
    from trainable.data import clip_id, recordings_in_several_folds

    if plan.config.feature_cache:
        from trainable.cache import FeatureCache

        cache = FeatureCache.open(plan.config, meta)
        print(f"Feature cache: {cache.path} ({len(cache.index)} clips, {plan.config.num_frames} frames)", flush=True)
        bad = dict(cache.excluded)
    else:
        from trainable.audio import read_headers

        bad = dict((headers or read_headers(plan.config.data_root, meta)).bad)
    if bad:
        warn(f"{len(bad)} clip(s) cannot be used and are left out of every trial (listed in the report):")
        for clip, reason in sorted(bad.items())[:5]:
            print(f"  {clip}: {reason}", file=sys.stderr)
    shared = recordings_in_several_folds(meta)
    if shared:
        warn(f"{len(shared)} recording(s) have clips in several folds; the official folds are kept (results stay "
             f"comparable with published ones) and the report lists them: "
             + "; ".join(f"fsID {fs} in folds {', '.join(map(str, fl))}" for fs, fl in sorted(shared.items())))
    usable = [int(f) for f, n in zip(meta["fold"], meta["slice_file_name"]) if clip_id(f, n) not in bad]
    return dataclasses.replace(plan, config=finish(plan.config, bad), skipped=bad, fsids_in_several_folds=shared,
                               fold_sizes={f: usable.count(f) for f in sorted(set(usable))})


def refit(summary: dict[str, Any], plan: Plan) -> Path | None:
    """Train the final model on all folds with the best config for the median best epoch; export final_model/."""
    import numpy as np

    from trainable.reduce import write_summary
    from trainable.train import train_on_all_folds

    best = summary["best_config"]
    if best is None:
        print("--refit: no finished trials to choose a config from; skipped.")
        return None
    cfg = next(c for c in summary["configs"] if (c["lr"], c["batch_size"]) == (best["lr"], best["batch_size"]))
    epochs = int(np.ceil(np.median(list(cfg["best_epoch"].values()))))
    config = dataclasses.replace(plan.config, lr=best["lr"], batch_size=best["batch_size"])
    print(f"Refit: lr {format_lr(best['lr'])}, batch {best['batch_size']}, {epochs} epochs on all folds {list(config.folds)}",
          flush=True)
    out = train_on_all_folds(config, epochs, Path(plan.exp_dir) / FINAL_MODEL)
    summary["final_model_dir"] = str(out)
    summary["refit"] = {"lr": best["lr"], "batch_size": best["batch_size"], "epochs": epochs, "folds": list(config.folds)}
    write_summary(Path(plan.exp_dir), summary)
    return out


def print_summary(summary: dict[str, Any], exp_dir: str) -> None:
    from trainable.report import fmt_ci

    n = len(summary["per_fold"])
    if summary["mean"] is None:
        print("No trial has finished yet; nothing to summarize.")
        return
    std = f" ± {100 * summary['std']:.2f}" if summary["std"] is not None else ""
    print(f"\nTest accuracy (nested CV over {n} folds): {100 * summary['mean']:.2f}{std} % ({fmt_ci(summary.get('ci95'))})")
    for p in summary["per_fold"]:
        print(f"  fold {p['fold']:2d}: {100 * p['test_accuracy']:6.2f} %  (lr {format_lr(p['lr'])}, batch {p['batch_size']}, epoch {p['epoch']})")
    b = summary["best_config"]
    if b:
        print(f"Best config on validation: lr {format_lr(b['lr'])}, batch {b['batch_size']}")
    if summary.get("comparisons") and all((c["p_value"] or 1) >= 0.05 for c in summary["comparisons"]):
        print("No other config differs significantly from it (corrected resampled t-test; see the report).")
    if not summary["complete"]:
        print(f"Partial: {summary['trials_finished']}/{summary['trials_expected']} trials finished; "
              f"re-run the same command (or --resume) to finish.")
    print(f"Report: {exp_dir}/{REPORT}\nSummary: {exp_dir}/{SUMMARY}")
    if summary["best_model_dir"]:
        print(f"Best model: {exp_dir}/{BEST_MODEL}")
    elif summary.get("export_problem"):
        warn(f"no model exported: {summary['export_problem']}")
    if summary.get("final_model_dir"):
        print(f"Final model (refit on all folds): {summary['final_model_dir']}")
    print(f"TensorBoard: tensorboard --logdir {exp_dir}")


def run(args: argparse.Namespace) -> int:
    from trainable.reduce import summarize

    if args.report_only:
        exp = str(Path(args.report_only).expanduser().resolve())
        print_summary(summarize(exp), exp)
        return 0
    import torch

    plan, meta, headers = make_plan(args, torch.cuda.device_count())
    local = not is_uri(plan.exp_dir)
    if local:
        ensure_writable(Path(plan.exp_dir))
    with ExperimentLock(plan.exp_dir) if local else nullcontext():
        plan = prepare_inputs(plan, meta, headers)
        if local and not plan.restore:
            write_manifest(Path(plan.exp_dir), command=[sys.executable, *sys.argv], base_config=plan.trial_base,
                           grid=plan.grid, classes=plan.classes, resources=plan.resources.as_ray(),
                           skipped_clips=plan.skipped, fold_sizes=plan.fold_sizes,
                           fsids_in_several_folds={str(k): v for k, v in plan.fsids_in_several_folds.items()})
        from trainable.tuner import run_experiment

        failed = run_experiment(plan, args.debug, args.max_failures)
        if not local:
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
    if summary.get("export_problem"):
        return 1
    return 0 if summary["complete"] else 1  # stopped early (Ctrl-C): the partial report above


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("trainable").setLevel(logging.INFO)
    try:
        return run_cli(lambda: run(args), args.debug)
    except KeyboardInterrupt:
        print("\nInterrupted. Finished trials and epoch checkpoints are kept: re-run the same command to continue.",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
