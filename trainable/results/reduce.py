"""The reducer: an experiment folder (finished or partial) in; summary.json, per_trial.csv, report.md, plots and
best_model/ out. Reads the files Ray Tune wrote (params.json, result.json, checkpoint_*/) without torch or Ray:
read the trials -> select (``trainable.results.select``, pure) -> write.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Iterable

from ..errors import AstCvError
from ..faults import kill_point
from ..store.experiment import (
    BEST_DIR,
    BEST_INFO,
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
    WEIGHTS,
    expected_trials,
    trial_extra,
    format_lr,
    parse_rows,
    rows_from_checkpoint,
    trial_params,
    read_manifest,
)
from .report import render_report
from .select import ConfigResult, Selection, TrialHistory, select
from ..store.storage import Store, join

log = logging.getLogger(__name__)


def read_trials(exp: Store | str | Path, epochs_planned: int) -> list[TrialHistory]:
    """Every trial folder of the experiment with its epoch rows: result.json's, completed by the newest checkpoint's
    history (see ``rows_from_checkpoint``)."""
    store = Store.of(exp)
    trials = []
    for name in store.list_dirs():
        rows = parse_rows(store.read_text(f"{name}/result.json"))
        params = trial_params(store, name, rows)
        if params is None:
            continue
        trials.append(TrialHistory(name, int(params["test_fold"]), float(params["lr"]), int(params["batch_size"]),
                                   int(params.get("epochs", epochs_planned)), tuple(rows_from_checkpoint(store, name, rows)),
                                   trial_extra(name)))
    return trials


def find_checkpoint(store: Store, trial: str, epoch: int) -> tuple[str, bool] | None:
    """Where the weights of ``trial``'s ``epoch`` are: (folder relative to the experiment, whether they are float16),
    a full checkpoint of that epoch first (float32), else a checkpoint whose best/ holds that epoch."""
    found = None
    for ckpt in reversed(store.list_dirs(trial)):
        if not ckpt.startswith("checkpoint_"):
            continue
        rel = f"{trial}/{ckpt}"
        try:
            state = json.loads(store.read_text(f"{rel}/{TRAINER_STATE}") or "{}")
            best = json.loads(store.read_text(f"{rel}/{BEST_DIR}/{BEST_INFO}") or "{}")
        except json.JSONDecodeError:
            continue
        if state.get("epoch") == epoch and store.is_file(f"{rel}/{WEIGHTS}"):
            return rel, False
        if found is None and best.get("epoch") == epoch and store.is_file(f"{rel}/{BEST_DIR}/{WEIGHTS}"):
            found = (f"{rel}/{BEST_DIR}", best.get("dtype") == "float16")
    return found


class DamagedWeights(Exception):
    """A checkpoint's weights file that cannot be read (cut short by a kill or a full disk, overwritten, missing)."""


def read_weights(path: Path, upcast: bool) -> None:
    """Check that a safetensors file reads whole; with ``upcast`` rewrite its float16 tensors as float32 (numpy: the
    reducer stays torch-free). Raises DamagedWeights, in one line, when it does not read."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors' SafetensorError (not exported), OSError, ValueError
        raise DamagedWeights(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}") from exc
    if upcast:
        tensors = {k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in tensors.items()}
        save_file(tensors, str(path), metadata={"format": "pt"})


def export_model(store: Store, trial: str, epoch: int, rows: dict[str, list]) -> tuple[str | None, str | None]:
    """Copy exactly that trial's weights of that epoch to ``best_model/`` (HF format, float32); (location, problem).

    ``rows``: each trial's epoch rows, by trial name.
    """
    found = find_checkpoint(store, trial, epoch)
    if found is None:
        store.delete(BEST_MODEL)  # never leave another model under the name the report gives
        problem = (f"the checkpoint of {trial}, epoch {epoch} (the model the selection names) is not in "
                   f"{join(store.location, trial)}; no model was exported")
        log.warning(problem)
        return None, problem
    rel, half = found
    row = next(r for r in rows[trial] if r[EPOCH] == epoch)
    try:
        with tempfile.TemporaryDirectory(prefix="astcv-export-") as tmp:
            out = Path(tmp) / BEST_MODEL
            for name in HF_FILES:
                store.download(f"{rel}/{name}", out / name)
            read_weights(out / WEIGHTS, upcast=half)
            (out / SOURCE).write_text(json.dumps({"trial": trial, "epoch": epoch, "val_accuracy": row[VAL_ACCURACY],
                                                  "test_accuracy": row[TEST_ACCURACY], "checkpoint": join(store.location, rel),
                                                  "stored_as": "float16" if half else "float32"}, indent=1))
            kill_point("export")
            store.put_dir(out, BEST_MODEL)
    except (DamagedWeights, FileNotFoundError) as exc:  # a file of the checkpoint cut short or gone
        store.delete(BEST_MODEL)
        problem = (f"the weights of {trial}, epoch {epoch} in {join(store.location, rel)} are damaged ({exc}); no model "
                   f"was exported")
        log.warning(problem)
        return None, problem
    kill_point("best_model")
    return join(store.location, BEST_MODEL), None


def _extra(extra) -> dict[str, Any]:
    """{"extra": {axis: value}} for a config on a grid with extra axes; {} otherwise (summaries as before)."""
    return {"extra": dict(extra)} if extra else {}


def _config_json(c: ConfigResult | None, with_folds: bool = False) -> dict[str, Any] | None:
    if c is None:
        return None
    out = {"lr": c.lr, "batch_size": c.batch_size, **_extra(c.extra), "mean": c.mean, "std": c.std, "mean_val_accuracy": c.mean_val_accuracy}
    if with_folds:
        out["folds"] = c.folds
    return out


def summary_json(sel: Selection, manifest: dict[str, Any], trials: list[TrialHistory], exp_dir: str) -> dict[str, Any]:
    """summary.json's content: the selection plus what a reader needs to trust and reproduce it."""
    base, grid = manifest["base_config"], manifest["grid"]
    expected = expected_trials(grid)
    by_name = {t.name: t for t in trials}
    unfinished = [{"trial": name, "test_fold": f, "lr": lr, "batch_size": bs, **_extra(trial_extra(name)),
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
        "per_fold": [{**{k: v for k, v in vars(p).items() if k != "extra"}, **_extra(p.extra)} for p in sel.per_fold],
        "mean": sel.mean, "std": sel.std, "std_ddof": 1, "ci95": list(sel.ci95) if sel.ci95 else None,
        "ci95_method": "Nadeau-Bengio corrected t-interval over folds (n_test/n_train "
                       f"{sel.test_train_ratio:.3f}); ci95_plain is the plain t-interval, too narrow for overlapping "
                       "training sets", "ci95_plain": list(sel.ci95_plain) if sel.ci95_plain else None,
        "configs": [{"lr": c.lr, "batch_size": c.batch_size, **_extra(c.extra),
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


def per_trial_csv(trials: Iterable[TrialHistory]) -> str:
    import pandas as pd

    records = []
    for t in trials:
        for r in t.rows:
            rec = {"trial": t.name, "test_fold": t.test_fold, "lr": format_lr(t.lr), "batch_size": t.batch_size, **dict(t.extra)}
            rec.update({k: v for k, v in r.items() if isinstance(v, (int, float, str)) and k != TEST_CONFUSION
                        and not isinstance(v, bool) and k not in ("config", "trial_id", "date", "hostname", "node_ip", "pid")})
            records.append(rec)
    return pd.DataFrame(records).to_csv(index=False)


def strict_json(value: Any) -> Any:
    """``value`` with NaN and infinities as None: summary.json is strict JSON that any language's parser reads."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_summary(exp: Store | str | Path, summary: dict[str, Any]) -> None:
    """summary.json and report.md, which always say the same."""
    store = Store.of(exp)
    store.write_text(SUMMARY, json.dumps(strict_json(summary), indent=1, allow_nan=False))
    store.write_text(REPORT, render_report(summary))


def summarize(exp: str | Path | Store, export: bool = True) -> dict[str, Any]:
    """Reduce the experiment in ``exp`` (a folder or a URI); write summary.json, per_trial.csv, report.md, plots and
    best_model/ into it. Reads the trials' metrics and the one checkpoint it exports."""
    store = Store.of(exp)
    manifest = read_manifest(store)
    if manifest is None:
        raise AstCvError(f"{store.location} is not an ast-cv experiment (no astcv_run.json). Pass the folder "
                         f"orchestrate.py wrote, e.g. runs/<name>.")
    base = manifest["base_config"]
    expected = expected_trials(manifest["grid"])
    trials = [t for t in read_trials(store, int(base["epochs"])) if t.name in expected]
    folds = base.get("folds") or sorted({int(f) for f in manifest["grid"]["test_fold"]})
    sizes = {int(f): int(n) for f, n in (manifest.get("fold_sizes") or {}).items()}
    sel = select(trials, folds, sizes)
    kill_point("reducer")
    summary = summary_json(sel, manifest, trials, store.location)
    rows = {t.name: list(t.rows) for t in trials}
    if export and sel.export is not None:
        summary["best_model_dir"], summary["export_problem"] = export_model(store, *sel.export, rows)
    from .plots import PLOTS_DIR, make_all

    with tempfile.TemporaryDirectory(prefix="astcv-plots-") as tmp:
        summary["plots"] = make_all(summary, rows, {t.name: (t.test_fold, t.lr, t.batch_size, t.extra) for t in trials},
                                       Path(tmp))
        if summary["plots"]:
            store.put_dir(Path(tmp) / PLOTS_DIR, PLOTS_DIR)
    store.write_text(PER_TRIAL_CSV, per_trial_csv(trials))
    write_summary(store, summary)
    kill_point("summary")
    return summary
