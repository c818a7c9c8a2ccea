"""The reducer: an experiment folder (finished or partial) in; summary.json, per_trial.csv, report.md, plots and
best_model/ out. Reads the files Ray Tune wrote (params.json, result.json, checkpoint_*/) without torch or Ray:
read the trials -> select (``trainable.select``, pure) -> write.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Iterable

from .errors import AstCvError
from .experiment import (
    BEST_MODEL,
    EPOCH,
    HF_FILES,
    PER_TRIAL_CSV,
    REPORT,
    SOURCE,
    SUMMARY,
    TEST_ACCURACY,
    TEST_CONFUSION,
    TRAINER_STATE,
    VAL_ACCURACY,
    read_manifest,
    trial_dirname,
)
from .report import render_report
from .select import ConfigResult, Selection, TrialHistory, select

log = logging.getLogger(__name__)


def read_rows(result_json: Path) -> list[dict[str, Any]]:
    """A trial's epoch rows, one per epoch (a retried epoch keeps its last report; a cut-off last line is skipped)."""
    by_epoch: dict[int, dict[str, Any]] = {}
    if result_json.is_file():
        for line in result_json.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if EPOCH in row and VAL_ACCURACY in row:
                by_epoch[int(row[EPOCH])] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def read_trials(exp_dir: Path, epochs_planned: int) -> list[TrialHistory]:
    """Every trial folder of the experiment with its epoch rows."""
    trials = []
    for params_path in sorted(Path(exp_dir).glob("*/params.json")):
        params = json.loads(params_path.read_text())
        trials.append(TrialHistory(params_path.parent.name, int(params["test_fold"]), float(params["lr"]),
                                   int(params["batch_size"]), int(params.get("epochs", epochs_planned)),
                                   tuple(read_rows(params_path.parent / "result.json"))))
    return trials


def find_checkpoint(trial_dir: Path, epoch: int) -> Path | None:
    """The trial's checkpoint folder of ``epoch``, if Ray kept it."""
    for ckpt in sorted(trial_dir.glob("checkpoint_*")):
        try:
            if json.loads((ckpt / TRAINER_STATE).read_text())["epoch"] == epoch:
                return ckpt
        except (OSError, json.JSONDecodeError, KeyError):
            continue
    return None


def export_model(exp_dir: Path, trial: str, epoch: int, rows: dict[str, list]) -> tuple[Path | None, str | None]:
    """Copy exactly that trial's checkpoint of that epoch to ``best_model/`` (HF format); (folder, problem).

    ``rows``: each trial's epoch rows, by trial name.
    """
    ckpt = find_checkpoint(exp_dir / trial, epoch)
    out = exp_dir / BEST_MODEL
    if ckpt is None:
        shutil.rmtree(out, ignore_errors=True)  # never leave another model under the name the report gives
        problem = (f"the checkpoint of {trial}, epoch {epoch} (the model the selection names) is not in {exp_dir / trial}; "
                   f"no model was exported")
        log.warning(problem)
        return None, problem
    tmp = exp_dir / (BEST_MODEL + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in HF_FILES:
        shutil.copy2(ckpt / name, tmp / name)
    row = next(r for r in rows[trial] if r[EPOCH] == epoch)
    (tmp / SOURCE).write_text(json.dumps({"trial": trial, "epoch": epoch, "val_accuracy": row[VAL_ACCURACY],
                                          "test_accuracy": row[TEST_ACCURACY], "checkpoint": str(ckpt)}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out, None


def _config_json(c: ConfigResult | None, with_folds: bool = False) -> dict[str, Any] | None:
    if c is None:
        return None
    out = {"lr": c.lr, "batch_size": c.batch_size, "mean": c.mean, "std": c.std, "mean_val_accuracy": c.mean_val_accuracy}
    if with_folds:
        out["folds"] = c.folds
    return out


def summary_json(sel: Selection, manifest: dict[str, Any], trials: list[TrialHistory], exp_dir: Path) -> dict[str, Any]:
    """summary.json's content: the selection plus what a reader needs to trust and reproduce it."""
    base, grid = manifest["base_config"], manifest["grid"]
    expected = {trial_dirname(f, lr, bs): (f, lr, bs) for f in grid["test_fold"] for lr in grid["lr"] for bs in grid["batch_size"]}
    by_name = {t.name: t for t in trials}
    unfinished = [{"trial": name, "test_fold": f, "lr": lr, "batch_size": bs,
                   "epochs_done": len(by_name[name].rows) if name in by_name else 0}
                  for name, (f, lr, bs) in sorted(expected.items()) if name not in by_name or not by_name[name].finished]
    classes = manifest.get("classes", [])
    per_class = None
    if sel.confusion is not None:
        totals = sel.confusion.sum(axis=1)
        per_class = {(classes[i] if i < len(classes) else str(i)): (float(sel.confusion[i, i] / totals[i]) if totals[i] else None)
                     for i in range(len(sel.confusion))}
    optimistic = _config_json(sel.optimistic, with_folds=True)
    if optimistic is not None:
        optimistic["note"] = ("optimistic: the config is chosen on mean TEST accuracy, so this number is biased upwards; "
                              "the nested per_fold mean is the unbiased estimate")
    return {
        "experiment": str(exp_dir), "metric": "accuracy",
        "per_fold": [vars(p) for p in sel.per_fold],
        "mean": sel.mean, "std": sel.std, "std_ddof": 1, "ci95": list(sel.ci95) if sel.ci95 else None,
        "configs": [{"lr": c.lr, "batch_size": c.batch_size,
                     "test_accuracy": {str(f): a for f, a in sorted(c.test_accuracy.items())},
                     "best_epoch": {str(f): e for f, e in sorted(c.best_epoch.items())},
                     "mean": c.mean, "std": c.std, "mean_val_accuracy": c.mean_val_accuracy} for c in sel.configs],
        "best_config": _config_json(sel.best_config, with_folds=True),
        "comparisons": sel.comparisons,
        "optimistic": optimistic,
        "best_model": {"trial": sel.export[0], "epoch": sel.export[1]} if sel.export else None,
        "best_model_dir": None, "export_problem": None,
        "classes": classes,
        "confusion_matrix": sel.confusion.tolist() if sel.confusion is not None else None,
        "per_class_accuracy": per_class,
        "skipped_clips": manifest.get("skipped_clips") or {},
        "fsids_in_several_folds": manifest.get("fsids_in_several_folds") or {},
        "trials_expected": len(expected), "trials_finished": sum(t.finished for t in trials),
        "unfinished": unfinished, "complete": not unfinished,
        "command": manifest.get("command"), "config": base, "grid": grid, "seed": base.get("seed"),
        "versions": manifest.get("versions"), "git_commit": manifest.get("git_commit"),
    }


def write_per_trial(path: Path, trials: Iterable[TrialHistory]) -> None:
    import pandas as pd

    records = []
    for t in trials:
        for r in t.rows:
            rec = {"trial": t.name, "test_fold": t.test_fold, "lr": t.lr, "batch_size": t.batch_size}
            rec.update({k: v for k, v in r.items() if isinstance(v, (int, float, str)) and k != TEST_CONFUSION
                        and not isinstance(v, bool) and k not in ("config", "trial_id", "date", "hostname", "node_ip", "pid")})
            records.append(rec)
    pd.DataFrame(records).to_csv(path, index=False)


def write_summary(exp_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json and report.md, which always say the same."""
    (exp_dir / SUMMARY).write_text(json.dumps(summary, indent=1))
    (exp_dir / REPORT).write_text(render_report(summary))


def summarize(exp_dir: str | Path, export: bool = True) -> dict[str, Any]:
    """Reduce the experiment in ``exp_dir``; write summary.json, per_trial.csv, report.md, plots and best_model/."""
    exp_dir = Path(exp_dir).expanduser().resolve()
    manifest = read_manifest(exp_dir)
    if manifest is None:
        raise AstCvError(f"{exp_dir} is not an ast-cv experiment (no astcv_run.json). Pass the folder orchestrate.py "
                         f"wrote, e.g. runs/<name>.")
    base = manifest["base_config"]
    trials = read_trials(exp_dir, int(base["epochs"]))
    folds = base.get("folds") or sorted({int(f) for f in manifest["grid"]["test_fold"]})
    sizes = {int(f): int(n) for f, n in (manifest.get("fold_sizes") or {}).items()}
    sel = select(trials, folds, sizes)
    summary = summary_json(sel, manifest, trials, exp_dir)
    rows = {t.name: list(t.rows) for t in trials}
    if export and sel.export is not None:
        out, problem = export_model(exp_dir, *sel.export, rows)
        summary["best_model_dir"], summary["export_problem"] = (str(out) if out else None), problem
    from .plots import make_all

    summary["plots"] = make_all(summary, rows,
                                {t.name: (t.test_fold, t.lr, t.batch_size) for t in trials}, exp_dir)
    write_per_trial(exp_dir / PER_TRIAL_CSV, trials)
    write_summary(exp_dir, summary)
    return summary
