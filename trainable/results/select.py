"""Model selection over finished trials, as pure functions of their per-epoch histories (no files).

Honest by construction: every choice (epoch, config) is made on validation accuracy through one ranking
(``experiment.row_score``); the test fold is only read off at the chosen point. The "optimistic" pick (config chosen
on mean test accuracy, as many papers and the original notebook do) is computed apart and labelled as such.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..data.metadata import default_val_fold
from ..store.experiment import EPOCH, TEST_ACCURACY, TEST_CONFUSION, VAL_ACCURACY, row_score
from .stats import ci95, corrected_paired_ttest, mean_std

ALPHA = 0.05  # significance level of the config comparisons
Extra = tuple[tuple[str, str], ...]  # (axis, value text) by axis name: one config is (lr, batch size, extra)


def extra_label(extra: Extra | Mapping[str, str] | None) -> str:
    """', specaug on, mixup 0.5' for a config's extra axis values ('' without any)."""
    items = extra.items() if isinstance(extra, Mapping) else (extra or ())
    return "".join(f", {k} {v}" for k, v in items)


@dataclass(frozen=True)
class TrialHistory:
    """One fold x config: its epoch rows (one per epoch, in order)."""

    name: str
    test_fold: int
    lr: float
    batch_size: int
    epochs_planned: int
    rows: tuple[Mapping[str, Any], ...] = ()
    extra: Extra = ()  # the extra grid axes' values (--grid), as in its folder name

    @property
    def config_key(self) -> tuple[float, int, Extra]:
        return (self.lr, self.batch_size, self.extra)

    @property
    def finished(self) -> bool:
        return bool(self.rows) and self.rows[-1][EPOCH] >= self.epochs_planned

    @property
    def best(self) -> Mapping[str, Any]:
        """The epoch with the highest selection score (validation accuracy; the earlier epoch on ties)."""
        return max(self.rows, key=row_score)


@dataclass
class ConfigResult:
    """One (lr, batch size, extra axis values) over the folds it finished: test accuracy at each fold's best-validation
    epoch."""

    lr: float
    batch_size: int
    extra: Extra = ()
    test_accuracy: dict[int, float] = field(default_factory=dict)
    val_accuracy: dict[int, float] = field(default_factory=dict)
    best_epoch: dict[int, int] = field(default_factory=dict)

    @property
    def folds(self) -> list[int]:
        return sorted(self.test_accuracy)

    @property
    def mean(self) -> float | None:
        return mean_std(list(self.test_accuracy.values()))[0]

    @property
    def std(self) -> float | None:
        return mean_std(list(self.test_accuracy.values()))[1]

    @property
    def mean_val_accuracy(self) -> float | None:
        return mean_std(list(self.val_accuracy.values()))[0]


@dataclass(frozen=True)
class FoldPick:
    """Nested selection on one test fold: the config and epoch with the best validation accuracy."""

    fold: int
    lr: float
    batch_size: int
    epoch: int
    val_accuracy: float
    test_accuracy: float
    trial: str
    extra: Extra = ()


@dataclass
class Selection:
    per_fold: list[FoldPick]
    configs: list[ConfigResult]
    best_config: ConfigResult | None  # by mean validation accuracy over the most folds
    optimistic: ConfigResult | None  # by mean TEST accuracy: biased upwards
    comparisons: list[dict[str, Any]]  # every other config vs the best one, corrected resampled t-test
    export: tuple[str, int] | None  # (trial, epoch) whose model is exported: the best config's best trial
    confusion: np.ndarray | None  # summed over the nested picks
    test_train_ratio: float = 0.0  # mean n_test / n_train over the test folds (the interval's correction)

    @property
    def test_accuracies(self) -> list[float]:
        return [p.test_accuracy for p in self.per_fold]

    @property
    def mean(self) -> float | None:
        return mean_std(self.test_accuracies)[0]

    @property
    def std(self) -> float | None:
        return mean_std(self.test_accuracies)[1]

    @property
    def ci95(self) -> tuple[float, float] | None:
        """Corrected for the folds' overlapping training sets (Nadeau & Bengio)."""
        return ci95(self.test_accuracies, self.test_train_ratio)

    @property
    def ci95_plain(self) -> tuple[float, float] | None:
        """The plain t-interval over folds, too narrow here: for comparison only."""
        return ci95(self.test_accuracies)


def config_results(finished: Sequence[TrialHistory]) -> list[ConfigResult]:
    configs: dict[tuple[float, int, Extra], ConfigResult] = {}
    for t in finished:
        c = configs.setdefault(t.config_key, ConfigResult(t.lr, t.batch_size, t.extra))
        best = t.best
        c.test_accuracy[t.test_fold] = best[TEST_ACCURACY]
        c.val_accuracy[t.test_fold] = best[VAL_ACCURACY]
        c.best_epoch[t.test_fold] = best[EPOCH]
    return [configs[k] for k in sorted(configs)]


def nested_picks(finished: Sequence[TrialHistory]) -> list[tuple[FoldPick, TrialHistory]]:
    """On each test fold, the trial and epoch with the best validation accuracy (ties: smaller lr, then batch)."""
    picks = []
    for fold in sorted({t.test_fold for t in finished}):
        winner = max((t for t in finished if t.test_fold == fold), key=lambda t: (t.best[VAL_ACCURACY], -t.lr, -t.batch_size))
        b = winner.best
        picks.append((FoldPick(fold, winner.lr, winner.batch_size, b[EPOCH], b[VAL_ACCURACY], b[TEST_ACCURACY],
                               winner.name, winner.extra), winner))
    return picks


def pick_config(configs: Sequence[ConfigResult], score: str) -> ConfigResult | None:
    """The config with the highest ``score`` among those that finished the most folds (compared on equal terms)."""
    if not configs:
        return None
    most = max(len(c.folds) for c in configs)
    return max((c for c in configs if len(c.folds) == most), key=lambda c: getattr(c, score))


def holdout_ratio(folds: Sequence[int], test_folds: Sequence[int], fold_sizes: Mapping[int, int] | None) -> float:
    """Mean n_test / n_train over ``test_folds`` (train = the folds in use but the test and validation folds).

    Without the fold sizes, folds are taken as equal: 1 / (number of folds - 2).
    """
    folds = sorted(folds)
    if len(folds) < 3:
        return float("nan")
    if not fold_sizes or any(f not in fold_sizes for f in folds):
        return 1 / (len(folds) - 2)
    total = sum(fold_sizes[f] for f in folds)
    ratios = []
    for f in test_folds:
        n_train = total - fold_sizes[f] - fold_sizes[default_val_fold(f, folds)]
        ratios.append(fold_sizes[f] / n_train if n_train > 0 else float("nan"))
    return float(np.mean(ratios))


def compare_configs(configs: Sequence[ConfigResult], best: ConfigResult | None, folds: Sequence[int],
                    fold_sizes: Mapping[int, int] | None) -> list[dict[str, Any]]:
    """Every other config vs ``best``, paired over their common folds (corrected resampled t-test)."""
    if best is None:
        return []
    out = []
    for c in configs:
        if c is best:
            continue
        common = sorted(set(c.folds) & set(best.folds))
        ratio = holdout_ratio(folds, common, fold_sizes)
        result = corrected_paired_ttest([c.test_accuracy[f] for f in common], [best.test_accuracy[f] for f in common], ratio)
        p = result["p_value"]
        out.append({"lr": c.lr, "batch_size": c.batch_size, **({"extra": dict(c.extra)} if c.extra else {}), **result, "test_train_ratio": ratio,
                    "significant": None if p is None else bool(p < ALPHA)})
    return out


def summed_confusion(trials: Sequence[TrialHistory]) -> np.ndarray | None:
    total = None
    for t in trials:
        if TEST_CONFUSION in t.best:
            m = np.asarray(json.loads(t.best[TEST_CONFUSION]), dtype=np.int64)
            total = m if total is None else total + m
    return total


def select(trials: Sequence[TrialHistory], folds: Sequence[int], fold_sizes: Mapping[int, int] | None = None) -> Selection:
    """Everything the report states, from the trials' histories: nested picks, configs, best config, comparisons."""
    finished = [t for t in trials if t.finished]
    configs = config_results(finished)
    picks = nested_picks(finished)
    best = pick_config(configs, "mean_val_accuracy")
    export = None
    if best is not None:
        own = [t for t in finished if t.config_key == (best.lr, best.batch_size, best.extra)]
        chosen = max(own, key=lambda t: (t.best[VAL_ACCURACY], -t.test_fold))
        export = (chosen.name, int(chosen.best[EPOCH]))
    return Selection(per_fold=[p for p, _ in picks], configs=configs, best_config=best,
                     optimistic=pick_config(configs, "mean"),
                     comparisons=compare_configs(configs, best, folds, fold_sizes),
                     export=export, confusion=summed_confusion([t for _, t in picks]),
                     test_train_ratio=holdout_ratio(folds, [p.fold for p, _ in picks], fold_sizes) if picks else 0.0)
