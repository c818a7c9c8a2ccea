#!/usr/bin/env python
"""Run UrbanSound8K's 10-fold cross-validation of AST as Ray Tune trials (one per fold x config), then reduce.

    python orchestrate.py --demo                                  # generated data + tiny AST, CPU, a few minutes
    python orchestrate.py --gpus 1 --data-root /path/UrbanSound8K  # the design card's 40 trials on one GPU
    python orchestrate.py --report-only runs/ast-cv                # (re)write the report of a finished or partial run

The command line only: planning is trainable.run.plan, running trainable.run.tuner, reducing trainable.results.reduce.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

from search_spaces import SPACES
from trainable.cli import run_cli
from trainable.config import add_config_arguments, auto_or, set_by_orchestrator
from trainable.errors import AstCvError
from trainable.faults import kill_point, mark_driver
from trainable.store.experiment import (EXPERIMENT_STARTED, FINAL_MODEL, REPORT, SUMMARY, expected_trials, format_lr,
                                        update_manifest, write_manifest)
from trainable.store.lock import STALE_S, ExperimentLock
from trainable.run.axes import ALIAS_HELP, grid_overrides
from trainable.run.plan import CHANGEABLE_FLAGS, DEFAULT_CACHE, DEFAULT_NAME, DEMO_DIR
from trainable.run.prepare import warn
from trainable.store.storage import is_uri, join, remote_storage_error

EPILOG = """\
Results go to STORAGE/NAME/ (a folder or a URI): one folder per trial (fold03_lr5e-05_bs16/ with its checkpoint,
result.json and TensorBoard events), then summary.json, report.md, per_trial.csv, plots/ and best_model/ (Hugging
Face format). Before the first trial the run prints the disk it needs and refuses when it is not free.
Watch training with:  tensorboard --logdir STORAGE/NAME
Re-running the same command (or --resume with --storage-path and --name only) continues an interrupted experiment:
finished trials are not rerun, running ones continue from their last epoch checkpoint; on a finished experiment it
only rewrites the report. One orchestrator at a time per experiment folder (a lock that a new run watches unchanged
for 2 minutes is taken over, --wait-for-lock waits for that; the run that lost it stops with exit status 2). Exit
status: 0 done, 1 trials failed or unfinished, 2 a mistake to fix (one line says what), 130 interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="orchestrate.py",
        description="Fine-tune AST on UrbanSound8K with the dataset's folds: every fold x (lr, batch size) is one "
        "Ray Tune trial; a reducer then reports per-fold accuracy, mean ± std and exports the best model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _what_to_run(p.add_argument_group("what to run"))
    add_config_arguments(p.add_argument_group("training settings (every trial)"), exclude=set_by_orchestrator(),
                         only_if_given=True)
    _cache_and_resources(p.add_argument_group("feature cache"), p.add_argument_group("resources"))
    _results(p.add_argument_group("results"))
    return p


def _what_to_run(run) -> None:
    run.add_argument("--demo", action="store_true",
                     help=f"run the built-in demo: generate an UrbanSound8K-shaped dataset and a tiny AST under ./{DEMO_DIR}/ "
                     "(once), then the whole pipeline on CPU in a few minutes")
    run.add_argument("--space", choices=sorted(SPACES), default=None,
                     help="named search space from search_spaces.py: card = 10 folds x lr {1e-5, 5e-5} x batch {8, 16} "
                     "(the default); smoke = test fold 1 only, 2 epochs of 50 steps, to check a setup end to end in "
                     "minutes; demo (with --demo)")
    run.add_argument("--folds", type=int, nargs="+", default=None,
                     help="folds in use; each is a test fold once (default: 1..10; at least 3)")
    run.add_argument("--test-folds", type=int, nargs="+", default=None,
                     help="run only these test folds now (default: every fold in --folds); the rest trains them as usual. "
                     "A later run under the same --name may add folds")
    run.add_argument("--lrs", type=float, nargs="+", default=None, help="learning rates to try (overrides the space)")
    run.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="batch sizes to try (overrides the space)")
    run.add_argument("--grid", action="append", default=None, metavar="NAME=V1,V2",
                     help="one more grid axis (repeatable): a training setting's values, each its own config in the nested "
                     f"selection, e.g. --grid mixup=0,0.5 --grid optimizer=adam,adamw; alias: {ALIAS_HELP}. Trial "
                     "folders get a suffix (fold01_lr1e-05_bs8__specaug-on)")


def _cache_and_resources(cache, res) -> None:
    cache.add_argument("--cache-dir", default=None,
                       help="where the feature cache lives: each clip's features computed once (before trials start), "
                       f"shared by all trials (default: {DEFAULT_CACHE}, this machine's disk; on a cluster each node that "
                       "runs trials builds its own there before the first trial, with its CPUs: a folder every node "
                       "sees builds it once)")
    cache.add_argument("--no-cache", action="store_true",
                       help="decode and featurize every clip in every epoch instead (the original recipe; slower)")
    res.add_argument("--gpus", type=float, default=None,
                     help="GPUs for a local Ray start (default: as many as torch sees; 0 = CPU only). Asking for GPUs "
                     "torch cannot see is an error")
    res.add_argument("--gpus-per-trial", type=auto_or(float, "a number"), default=None,
                     help="GPUs per trial: a number (fractions such as 0.5 pack trials on one card; 0 = CPU) or auto "
                     "(the default): 0.5 on cards of 40 GB or more, where two packed trials measured 1.9-2x the "
                     "trials per hour, else 1; 0 without GPUs. With --address it is settled from the cluster's nodes "
                     "after connecting (1 per trial, 0.5 when every GPU node's accelerator_type is such a card), and a "
                     "request no single node fits is refused before any trial")
    res.add_argument("--cpus-per-trial", type=float, default=None,
                     help="CPUs per trial, also torch's thread count (default: 2 with a GPU, else 1)")
    res.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or None,
                     help="join an existing Ray cluster instead of starting one (e.g. 'auto' after 'ray start --head'; "
                     "default: $RAY_ADDRESS, which 'ray job submit' sets, else a Ray of this run's own on this machine, "
                     "even where another Ray runs). The code is shipped to the nodes; each needs the data and a local "
                     "--model at the same path. Recorded in the experiment: continuing a cluster experiment needs "
                     "--address again (refused without it, not run here)")


def _results(out) -> None:
    out.add_argument("--storage-path", default="runs",
                     help="where experiments live: a local path (made absolute) or a URI such as s3://bucket/runs shared "
                     "by all nodes (default: ./runs)")
    out.add_argument("--name", default=None, help=f"experiment name, the folder under --storage-path (default: {DEFAULT_NAME}; demo with --demo)")
    out.add_argument("--resume", action="store_true",
                     help="continue the experiment NAME with its recorded data, model, grid and settings; only "
                     f"--storage-path and --name are needed (re-running the same command does this too). Changeable when "
                     f"continuing: {CHANGEABLE_FLAGS}")
    out.add_argument("--wait-for-lock", type=float, nargs="?", const=WAIT_FOR_LOCK_S, default=0.0, metavar="SECONDS",
                     help="when another orchestrator holds the experiment's lock and keeps refreshing it, wait for it with "
                     f"a countdown, up to SECONDS (without a value {WAIT_FOR_LOCK_S:.0f}), and take it over once it stops "
                     "changing, instead of stopping at once (default: do not wait; a lock that does not change is taken "
                     "over after the watch either way)")
    out.add_argument("--no-space-check", action="store_true",
                     help="start even when the estimated disk need (printed before the first trial) exceeds the free space")
    out.add_argument("--max-failures", type=int, default=2,
                     help="times a failed trial is restarted from its last checkpoint (default: 2)")
    out.add_argument("--refit", action="store_true",
                     help="after cross-validation, train one model on all folds in use with the best config for the median "
                     "best epoch and export it as final_model/ (runs on this machine)")
    out.add_argument("--report-only", metavar="EXPERIMENT", default=None,
                     help="only (re)write summary.json, report.md, plots and best_model/ of an existing experiment (a "
                     "folder or a URI); exit status 1 when no model could be exported")
    out.add_argument("--debug", action="store_true", help="show full tracebacks and Ray's own output")


WAIT_FOR_LOCK_S = 2.5 * STALE_S
LOCK_POLL_S = 10.0


def hold_lock(stack: ExitStack, folder: Path, wait_s: float) -> None:
    """Hold the experiment's lock for ``stack``'s block. Refused (another orchestrator holds it) and ``wait_s`` > 0:
    try again every LOCK_POLL_S with a countdown line until the lock is free or taken over, at most ``wait_s``."""
    lock = ExperimentLock(folder)  # one instance: it may remember what it saw of the lock between tries
    poll = min(LOCK_POLL_S, lock.stale_s / 4)
    deadline, first = time.monotonic() + wait_s, True
    while True:
        try:
            stack.enter_context(lock)
            return
        except AstCvError as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            if first:
                print(f"Waiting for the lock (--wait-for-lock): {re.split(r' [(]|[.:] ', str(exc))[0]}.", flush=True)
                first = False
            print(f"  still held; giving up in {left:.0f} s", flush=True)
            time.sleep(min(poll, left))


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


def record(plan, args) -> None:
    """Write the manifest of a new experiment, or record the grid's added test folds in an existing one."""
    if not plan.restore:
        write_manifest(plan.store, command=[sys.executable, *sys.argv], base_config=plan.trial_base, grid=plan.grid,
                       classes=plan.classes, resources=plan.resources.requested(), address=plan.resources.address,
                       skipped_clips=plan.skipped,
                       fold_sizes=plan.fold_sizes,
                       fsids_in_several_folds={str(k): v for k, v in plan.fsids_in_several_folds.items()},
                       **{EXPERIMENT_STARTED: False})  # binding once the first trial starts (trainable.run.resume)
        kill_point("manifest")
    elif plan.new_test_folds:
        print(f"Adding test fold(s) {', '.join(map(str, plan.new_test_folds))} to {plan.exp_dir}", flush=True)
        update_manifest(plan.store, grid=plan.grid, fold_sizes=plan.fold_sizes)
        kill_point("manifest")


def refit(summary: dict[str, Any], plan) -> str | None:
    """Train the final model on all folds with the best config for the median best epoch; export final_model/."""
    import numpy as np

    from trainable.results.reduce import write_summary
    from trainable.results.select import extra_label
    from trainable.fit.train import train_on_all_folds

    best = summary["best_config"]
    if best is None:
        print("--refit: no finished trials to choose a config from; skipped.")
        return None
    key = (best["lr"], best["batch_size"], best.get("extra"))
    cfg = next(c for c in summary["configs"] if (c["lr"], c["batch_size"], c.get("extra")) == key)
    epochs = int(np.ceil(np.median(list(cfg["best_epoch"].values()))))
    config = dataclasses.replace(plan.config, lr=best["lr"], batch_size=best["batch_size"],
                                 **grid_overrides(best.get("extra"), plan.grid, plan.config.to_dict()))
    print(f"Refit: lr {format_lr(best['lr'])}, batch {best['batch_size']}{extra_label(best.get('extra'))}, {epochs} epochs on all folds {list(config.folds)}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="astcv-refit-") as tmp:
        plan.store.put_dir(train_on_all_folds(config, epochs, Path(tmp) / FINAL_MODEL), FINAL_MODEL)
    summary["final_model_dir"] = join(plan.exp_dir, FINAL_MODEL)
    summary["refit"] = {"lr": best["lr"], "batch_size": best["batch_size"], **({"extra": best["extra"]} if best.get("extra") else {}),
                        "epochs": epochs, "folds": list(config.folds)}
    write_summary(plan.store, summary)
    return summary["final_model_dir"]


def print_summary(summary: dict[str, Any], exp_dir: str) -> None:
    from trainable.results.report import comparison_verdict, fmt_ci
    from trainable.results.select import extra_label

    n = len(summary["per_fold"])
    if summary["mean"] is None:
        print("No trial has finished yet; nothing to summarize.")
        return
    std = f" ± {100 * summary['std']:.2f}" if summary["std"] is not None else ""
    print(f"\nTest accuracy (nested CV over {n} folds): {100 * summary['mean']:.2f}{std} % ({fmt_ci(summary.get('ci95'))})")
    for p in summary["per_fold"]:
        print(f"  fold {p['fold']:2d}: {100 * p['test_accuracy']:6.2f} %  (lr {format_lr(p['lr'])}, batch {p['batch_size']}"
              f"{extra_label(p.get('extra'))}, epoch {p['epoch']})")
    b = summary["best_config"]
    if b:
        print(f"Best config on validation: lr {format_lr(b['lr'])}, batch {b['batch_size']}{extra_label(b.get('extra'))}")
    verdict = comparison_verdict(summary)
    if verdict:
        print(f"{verdict} (Corrected resampled t-test: see the report.)")
    if not summary["complete"]:
        print(f"Partial: {summary['trials_finished']}/{summary['trials_expected']} trials finished; "
              f"re-run the same command (or --resume) to finish.")
    print(f"Report: {join(exp_dir, REPORT)}\nSummary: {join(exp_dir, SUMMARY)}")
    if summary["best_model_dir"]:
        print(f"Best model: {summary['best_model_dir']}")
    elif summary.get("export_problem"):
        warn(f"no model exported: {summary['export_problem']}")
    if summary.get("final_model_dir"):
        print(f"Final model (refit on all folds): {summary['final_model_dir']}")
    print(f"TensorBoard: tensorboard --logdir {exp_dir}")


INTERRUPTED = ("Interrupted: finished trials and epoch checkpoints are kept. Run the same command again to continue "
               "(or add --resume).")


def report_only(location: str) -> int:
    """Rewrite summary.json, report.md, plots and best_model/ of an experiment folder or URI; exit 1 if no model."""
    from trainable.results.reduce import summarize

    exp = location if is_uri(location) else str(Path(location).expanduser().resolve())
    if is_uri(exp):
        from trainable.store.storage import Store

        Store.open(exp).check_bucket()  # a missing bucket, wrong credentials, no endpoint: one line each
    summary = summarize(exp)
    print_summary(summary, exp)
    return 1 if summary["best_model_dir"] is None and summary["mean"] is not None else 0


def is_complete(plan) -> bool:
    """Has every trial of a continued experiment's grid reported its last epoch (nothing left to train)?"""
    from trainable.run.prepare import trials_finished

    return plan.restore and not plan.new_test_folds and trials_finished(plan) >= set(expected_trials(plan.grid))


def summarize_tidied(plan) -> dict:
    """The reducer's summary (and export), once each finished trial's checkpoints that interrupted runs left behind are
    removed (``--keep-checkpoints best``): before it, so the export never names a folder this run then deletes."""
    from trainable.results.reduce import summarize
    from trainable.run.resume import drop_superseded_checkpoints

    if plan.config.keep_checkpoints == "best":
        drop_superseded_checkpoints(plan.store, plan.config.epochs)
    return summarize(plan.store)


def train(plan, meta, headers, args):
    """Check the disk (and on a cluster each node), build the cache, record the plan and run the trials: (outcome,
    summary), summary None when interrupted. On a cluster all of it runs joined to it, the plan settled on its nodes."""
    from trainable.run.prepare import preflight, prepare_inputs
    from trainable.run.tuner import cluster_session, run_experiment

    with cluster_session(plan, args.debug) as plan:
        plan = preflight(plan, meta, args.refit, args.no_space_check)
        plan = prepare_inputs(plan, meta, headers)
        record(plan, args)
        outcome = run_experiment(plan, args.debug, args.max_failures)
    if outcome.interrupted and not outcome.failed:
        return outcome, None
    summary = summarize_tidied(plan)
    if args.refit:
        refit(summary, plan)
    return outcome, summary


def run(args: argparse.Namespace) -> int:
    mark_driver()
    if args.report_only:
        return report_only(args.report_only)
    import torch

    from trainable.run.prepare import make_plan

    gpus = torch.cuda.device_count()
    memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(gpus)) / 2**30 if gpus else None
    plan, meta, headers = make_plan(args, SPACES, gpus, memory)
    local = plan.store.local_path
    if local is not None:
        ensure_writable(local)
    else:
        plan.store.check_writable()  # a bucket that is missing or refuses us: one line now
    failed = 0
    with ExitStack() as held:
        if local is not None:
            hold_lock(held, local, args.wait_for_lock)
        if is_complete(plan) and not args.refit:  # no Ray, no cache: the report only
            print(f"Experiment {plan.exp_dir} is complete ({plan.trials} of {plan.trials} trials finished); "
                  f"rewriting its report.", flush=True)
            summary = summarize_tidied(plan)
        else:
            outcome, summary = train(plan, meta, headers, args)
            if summary is None:
                print(f"\n{INTERRUPTED}", file=sys.stderr, flush=True)
                return 130
            failed = outcome.failed
    print_summary(summary, plan.exp_dir)
    if failed:
        print(f"{failed} trial(s) failed; see error.txt in their folders. Re-run the same command to retry them.",
              file=sys.stderr)
        return 1
    if summary.get("export_problem"):
        return 1
    return 0 if summary["complete"] else 1


def run_with_storage_errors(args: argparse.Namespace) -> int:
    """``run``, with a failure of object storage (missing bucket, wrong credentials, unreachable endpoint) as one
    line instead of pyarrow's traceback."""
    try:
        return run(args)
    except OSError as exc:
        problem = remote_storage_error(exc)
        if problem is None or args.debug:
            raise
        raise problem from exc


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("trainable").setLevel(logging.INFO)
    try:
        return run_cli(lambda: run_with_storage_errors(args), args.debug)
    except KeyboardInterrupt:
        print(f"\n{INTERRUPTED}", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
