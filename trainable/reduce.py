"""The reducer: from an experiment folder (finished or partial) to summary.json, per_trial.csv, report.md and
best_model/. Ray-free: it reads the files Ray Tune wrote (params.json, result.json, checkpoint_*/).

Selection is honest by construction: every choice (epoch, config) is made on validation accuracy; the test fold
is only read off at the chosen point. The "optimistic" numbers (config chosen on test accuracy, as many papers
and the original notebook do) are reported separately and labelled as such.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from .checkpoint import TRAINER_STATE
from .errors import AstCvError
from .experiment import BEST_MODEL, PER_TRIAL_CSV, REPORT, SUMMARY, read_manifest, trial_dirname
from .train import BEST_EPOCH, EPOCH, TEST_ACCURACY, TEST_CONFUSION, VAL_ACCURACY

log = logging.getLogger(__name__)

HF_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


@dataclass
class Trial:
    """One fold x config: its per-epoch rows and where its checkpoints are."""

    path: Path
    test_fold: int
    lr: float
    batch_size: int
    epochs_planned: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_key(self) -> tuple[float, int]:
        return (self.lr, self.batch_size)

    @property
    def finished(self) -> bool:
        return bool(self.rows) and self.rows[-1][EPOCH] >= self.epochs_planned

    @property
    def best(self) -> dict[str, Any] | None:
        """The row of the epoch with the highest validation accuracy (earliest on ties)."""
        return max(self.rows, key=lambda r: (r[VAL_ACCURACY], -r[EPOCH])) if self.rows else None


def read_trials(exp_dir: Path, epochs_planned: int) -> list[Trial]:
    """Every trial folder of the experiment with its de-duplicated epoch rows (a retried epoch keeps its last report)."""
    trials = []
    for params_path in sorted(Path(exp_dir).glob("*/params.json")):
        params = json.loads(params_path.read_text())
        trial = Trial(params_path.parent, int(params["test_fold"]), float(params["lr"]), int(params["batch_size"]),
                      int(params.get("epochs", epochs_planned)))
        by_epoch: dict[int, dict[str, Any]] = {}
        result = params_path.parent / "result.json"
        if result.is_file():
            for line in result.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if EPOCH in row and VAL_ACCURACY in row:
                    by_epoch[int(row[EPOCH])] = row
        trial.rows = [by_epoch[e] for e in sorted(by_epoch)]
        trials.append(trial)
    return trials


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return mean, std


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if std is not None else f"{100 * mean:.2f}"


def find_checkpoint(trial: Trial, epoch: int) -> Path | None:
    """The trial's checkpoint folder of ``epoch``, if Ray kept it."""
    for ckpt in sorted(trial.path.glob("checkpoint_*")):
        state = ckpt / TRAINER_STATE
        try:
            if json.loads(state.read_text())["epoch"] == epoch:
                return ckpt
        except (OSError, json.JSONDecodeError, KeyError):
            continue
    return None


def summarize(exp_dir: str | Path, export: bool = True) -> dict[str, Any]:
    """Reduce the experiment in ``exp_dir``; write summary.json, per_trial.csv, report.md and best_model/."""
    exp_dir = Path(exp_dir).expanduser().resolve()
    manifest = read_manifest(exp_dir)
    if manifest is None:
        raise AstCvError(
            f"{exp_dir} is not an ast-cv experiment (no astcv_run.json). Pass the folder orchestrate.py wrote, "
            f"e.g. runs/<name>."
        )
    base = manifest["base_config"]
    grid = manifest["grid"]
    classes = manifest.get("classes", [])
    trials = read_trials(exp_dir, int(base["epochs"]))
    expected = {
        trial_dirname(f, lr, bs): (f, lr, bs) for f in grid["test_fold"] for lr in grid["lr"] for bs in grid["batch_size"]
    }
    by_name = {t.name: t for t in trials}
    finished = [t for t in trials if t.finished]
    unfinished = [
        {"trial": name, "test_fold": f, "lr": lr, "batch_size": bs,
         "epochs_done": len(by_name[name].rows) if name in by_name else 0}
        for name, (f, lr, bs) in sorted(expected.items())
        if name not in by_name or not by_name[name].finished
    ]

    # Per config: the test accuracy at the best-validation epoch of each fold.
    configs: dict[tuple[float, int], dict[str, Any]] = {}
    for t in finished:
        c = configs.setdefault(t.config_key, {"lr": t.lr, "batch_size": t.batch_size, "test_accuracy": {}, "val_accuracy": {}, "epoch": {}})
        best = t.best
        c["test_accuracy"][t.test_fold] = best[TEST_ACCURACY]
        c["val_accuracy"][t.test_fold] = best[VAL_ACCURACY]
        c["epoch"][t.test_fold] = best[EPOCH]
    for c in configs.values():
        c["mean"], c["std"] = _mean_std(list(c["test_accuracy"].values()))
        c["mean_val_accuracy"], _ = _mean_std(list(c["val_accuracy"].values()))
        c["folds"] = sorted(c["test_accuracy"])

    # Nested CV: on each fold, the config (and epoch) with the best validation accuracy.
    per_fold = []
    selected: list[Trial] = []
    for fold in sorted({t.test_fold for t in finished}):
        candidates = [t for t in finished if t.test_fold == fold]
        winner = max(candidates, key=lambda t: (t.best[VAL_ACCURACY], -t.lr, -t.batch_size))
        b = winner.best
        selected.append(winner)
        per_fold.append({"fold": fold, "lr": winner.lr, "batch_size": winner.batch_size, "epoch": b[EPOCH],
                         "val_accuracy": b[VAL_ACCURACY], "test_accuracy": b[TEST_ACCURACY], "trial": winner.name})
    mean, std = _mean_std([p["test_accuracy"] for p in per_fold])

    def pick(score: str) -> dict[str, Any] | None:
        if not configs:
            return None
        most_folds = max(len(c["folds"]) for c in configs.values())  # compare configs over the same folds
        full = [c for c in configs.values() if len(c["folds"]) == most_folds]
        c = max(full, key=lambda c: c[score])
        return {"lr": c["lr"], "batch_size": c["batch_size"], "mean": c["mean"], "std": c["std"],
                "mean_val_accuracy": c["mean_val_accuracy"], "folds": c["folds"]}

    best_config = pick("mean_val_accuracy")
    optimistic = pick("mean")
    if optimistic is not None:
        optimistic["note"] = ("optimistic: the config is chosen on mean TEST accuracy, so this number is biased upwards; "
                              "the nested per_fold mean is the unbiased estimate")

    confusion = None
    for t in selected:
        m = np.asarray(json.loads(t.best[TEST_CONFUSION]), dtype=np.int64) if TEST_CONFUSION in t.best else None
        if m is not None:
            confusion = m if confusion is None else confusion + m
    per_class = None
    if confusion is not None:
        totals = confusion.sum(axis=1)
        per_class = {
            (classes[i] if i < len(classes) else str(i)): (float(confusion[i, i] / totals[i]) if totals[i] else None)
            for i in range(len(confusion))
        }

    best_model_dir = None
    if export and best_config is not None:
        best_model_dir = _export_best(exp_dir, [t for t in finished if t.config_key == (best_config["lr"], best_config["batch_size"])])

    summary = {
        "experiment": str(exp_dir),
        "metric": "accuracy",
        "per_fold": per_fold,
        "mean": mean,
        "std": std,
        "std_ddof": 1,
        "configs": [
            {"lr": c["lr"], "batch_size": c["batch_size"],
             "test_accuracy": {str(f): a for f, a in sorted(c["test_accuracy"].items())},
             "best_epoch": {str(f): e for f, e in sorted(c["epoch"].items())},
             "mean": c["mean"], "std": c["std"], "mean_val_accuracy": c["mean_val_accuracy"]}
            for _, c in sorted(configs.items())
        ],
        "best_config": best_config,
        "optimistic": optimistic,
        "best_model_dir": str(best_model_dir) if best_model_dir else None,
        "classes": classes,
        "confusion_matrix": confusion.tolist() if confusion is not None else None,
        "per_class_accuracy": per_class,
        "skipped_clips": manifest.get("skipped_clips") or {},
        "trials_expected": len(expected),
        "trials_finished": len(finished),
        "unfinished": unfinished,
        "complete": not unfinished,
        "command": manifest.get("command"),
        "config": base,
        "grid": grid,
        "seed": base.get("seed"),
        "versions": manifest.get("versions"),
        "git_commit": manifest.get("git_commit"),
    }
    from .plots import make_all

    summary["plots"] = make_all(summary, {t.name: t.rows for t in trials},
                                {t.name: (t.test_fold, t.lr, t.batch_size) for t in trials}, exp_dir)
    (exp_dir / SUMMARY).write_text(json.dumps(summary, indent=1))
    _write_per_trial(exp_dir / PER_TRIAL_CSV, trials)
    (exp_dir / REPORT).write_text(render_report(summary))
    return summary


def _export_best(exp_dir: Path, trials: list[Trial]) -> Path | None:
    """Copy the best-validation checkpoint of the best config's best trial to ``best_model/`` (HF format)."""
    for t in sorted(trials, key=lambda t: (-t.best[VAL_ACCURACY], t.test_fold)):
        ckpt = find_checkpoint(t, t.best[EPOCH])
        if ckpt is None:
            log.warning("checkpoint of %s epoch %d was not kept; trying the next trial", t.name, t.best[EPOCH])
            continue
        out = exp_dir / BEST_MODEL
        tmp = exp_dir / (BEST_MODEL + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in HF_FILES:
            shutil.copy2(ckpt / name, tmp / name)
        (tmp / "astcv_source.json").write_text(json.dumps(
            {"trial": t.name, "epoch": t.best[EPOCH], "val_accuracy": t.best[VAL_ACCURACY],
             "test_accuracy": t.best[TEST_ACCURACY], "checkpoint": str(ckpt)}, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return out
    return None


def _write_per_trial(path: Path, trials: Iterable[Trial]) -> None:
    records = []
    for t in trials:
        for r in t.rows:
            rec = {"trial": t.name, "test_fold": t.test_fold, "lr": t.lr, "batch_size": t.batch_size}
            rec.update({k: v for k, v in r.items() if isinstance(v, (int, float, str)) and k != TEST_CONFUSION
                        and not isinstance(v, bool) and k not in ("config", "trial_id", "date", "hostname", "node_ip", "pid")})
            records.append(rec)
    pd.DataFrame(records).to_csv(path, index=False)


def render_report(s: dict[str, Any]) -> str:
    """A Markdown report a researcher can paste: headline, per-fold choices, config x fold table, classes."""
    lines = ["# ast-cv cross-validation report", ""]
    n = len(s["per_fold"])
    lines.append(f"**Nested cross-validation test accuracy: {_fmt(s['mean'], s['std'])} %** "
                 f"(mean ± sample std over {n} fold{'s' if n != 1 else ''}; on each fold the config and epoch were "
                 f"chosen on that fold's validation fold, never on its test fold).")
    lines.append("")
    if not s["complete"]:
        lines += [f"⚠ Partial experiment: {s['trials_finished']} of {s['trials_expected']} trials finished. "
                  f"Missing or unfinished: " + ", ".join(f"{u['trial']} ({u['epochs_done']} epochs)" for u in s["unfinished"]), ""]
    if s.get("skipped_clips"):
        lines += [f"⚠ {len(s['skipped_clips'])} clip(s) could not be read and were left out of every trial: "
                  + "; ".join(f"{c} ({r})" for c, r in sorted(s["skipped_clips"].items())), ""]
    lines += ["## Per fold (nested selection)", "", "| test fold | lr | batch | epoch | val acc % | test acc % |", "|---|---|---|---|---|---|"]
    for p in s["per_fold"]:
        lines.append(f"| {p['fold']} | {p['lr']:g} | {p['batch_size']} | {p['epoch']} | {100 * p['val_accuracy']:.2f} | {100 * p['test_accuracy']:.2f} |")
    folds = sorted({int(f) for c in s["configs"] for f in c["test_accuracy"]})
    lines += ["", "## Every config (test accuracy % at each fold's best-validation epoch)", "",
              "| lr | batch | " + " | ".join(f"fold {f}" for f in folds) + " | mean ± std | mean val % |",
              "|---|---|" + "---|" * len(folds) + "---|---|"]
    for c in s["configs"]:
        cells = [f"{100 * c['test_accuracy'][str(f)]:.2f}" if str(f) in c["test_accuracy"] else "–" for f in folds]
        mv = f"{100 * c['mean_val_accuracy']:.2f}" if c["mean_val_accuracy"] is not None else "n/a"
        lines.append(f"| {c['lr']:g} | {c['batch_size']} | " + " | ".join(cells) + f" | {_fmt(c['mean'], c['std'])} | {mv} |")
    lines.append("")
    if s["best_config"]:
        b = s["best_config"]
        lines.append(f"Best config by mean **validation** accuracy: lr {b['lr']:g}, batch {b['batch_size']} "
                     f"(test {_fmt(b['mean'], b['std'])} %). Exported model: `{s['best_model_dir']}`.")
    if s["optimistic"]:
        o = s["optimistic"]
        lines.append(f"Optimistic (config chosen on mean **test** accuracy, as many papers do; biased upwards): "
                     f"lr {o['lr']:g}, batch {o['batch_size']}: {_fmt(o['mean'], o['std'])} %.")
    if s.get("plots"):
        titles = {"fold_accuracy": "Test accuracy per fold and config", "learning_curves": "Learning curves",
                  "confusion_matrix": "Confusion matrix", "per_class_accuracy": "Per-class accuracy"}
        lines += ["", "## Figures", ""]
        for key, rel in s["plots"].items():
            lines += [f"### {titles.get(key, key)}", "", f"![{titles.get(key, key)}]({rel})", ""]
    if s["per_class_accuracy"]:
        lines += ["", "## Per class (nested selection, summed over folds)", "", "| class | accuracy % |", "|---|---|"]
        for name, acc in s["per_class_accuracy"].items():
            lines.append(f"| {name} | {'n/a' if acc is None else f'{100 * acc:.2f}'} |")
    if s["confusion_matrix"]:
        names = s["classes"] or [str(i) for i in range(len(s["confusion_matrix"]))]
        lines += ["", "## Confusion matrix (rows: true class, columns: predicted; summed over folds)", "",
                  "| true \\ predicted | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for name, row in zip(names, s["confusion_matrix"]):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    v = s.get("versions") or {}
    lines += ["", "## Reproduce", "", f"- command: `{' '.join(s['command'] or [])}`",
              f"- seed {s['seed']}, commit {s['git_commit']}, " + ", ".join(f"{k} {val}" for k, val in v.items()), ""]
    return "\n".join(lines)
