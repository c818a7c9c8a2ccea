"""Figures for report.md, sized for a paper's column: per-fold accuracy per config, learning curves, confusion matrix,
per-class accuracy. Each is written as PNG (300 dpi) and as vector SVG and PDF, COLUMN_IN wide, with fonts of at
least FONT_PT at that size, the Okabe-Ito colour-blind-safe palette, and no title (the report's caption says what it
shows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..store.experiment import format_lr
from .select import extra_label

PLOTS_DIR = "plots"
FORMATS = ("png", "svg", "pdf")
COLUMN_IN = 3.3  # one column of a two-column paper
FONT_PT = 8
DPI = 300
# Okabe & Ito (2008), blue and vermillion first; the yellow, hard to see on white, late.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
HATCHES = ("//", "\\\\", "..", "xx", "--", "||", "++", "oo")
LINESTYLES = ("-", "--", ":", "-.")
CAPTIONS = {
    "fold_accuracy": "Test accuracy per test fold and config at each fold's best-validation epoch; with several "
                     "folds the last group is the mean over folds (error bar: ± sample std).",
    "learning_curves": "Accuracy per epoch, mean over test folds (band: ± sample std over folds); top: validation "
                       "fold, bottom: test fold.",
    "confusion_matrix": "Confusion matrix of the nested selection, summed over test folds: each cell is the % of its "
                        "true class (row) predicted as its column (the counts are in the report's table).",
    "per_class_accuracy": "Test accuracy per class (nested selection, summed over test folds); dashed: the overall "
                          "nested mean.",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": FONT_PT, "axes.labelsize": FONT_PT, "xtick.labelsize": FONT_PT,
                         "ytick.labelsize": FONT_PT, "legend.fontsize": FONT_PT, "font.family": "DejaVu Sans",
                         "svg.fonttype": "none", "pdf.fonttype": 42, "axes.spines.top": False,
                         "axes.spines.right": False, "hatch.linewidth": 0.6})
    return plt


def _figure(height_in: float, **kwargs):
    return _pyplot().subplots(figsize=(COLUMN_IN, height_in), layout="constrained", **kwargs)


def save(fig, out: Path, name: str) -> Path:
    """Write ``name``.png, .svg and .pdf into ``out`` at the figure's own size (no tight bounding box); the PNG's path."""
    for ext in FORMATS:
        fig.savefig(out / f"{name}.{ext}", dpi=DPI)
    _pyplot().close(fig)
    return out / f"{name}.png"


def config_label(lr: float, batch: int, extra=()) -> str:
    """'lr 1e-05, batch 8' (', specaug on' per extra grid axis)."""
    return f"lr {format_lr(lr)}, batch {batch}" + extra_label(extra)


def _config_of(info: tuple) -> tuple:
    """(lr, batch, extra) of a trial_info value: (fold, lr, batch) or (fold, lr, batch, extra)."""
    return (info[1], info[2], tuple(info[3]) if len(info) > 3 else ())


def fold_accuracy(summary: dict[str, Any]):
    """Grouped bars: each test fold's accuracy per config, then each config's mean ± std over its folds."""
    configs = summary["configs"]
    folds = sorted({int(f) for c in configs for f in c["test_accuracy"]})
    fig, ax = _figure(2.2 + 0.16 * len(configs))
    n = max(1, len(configs))
    width = 0.8 / n
    with_mean = any(c["std"] is not None for c in configs)  # a mean of one fold would repeat its bar
    for k, c in enumerate(configs):
        color, shift = PALETTE[k % len(PALETTE)], (k - (n - 1) / 2) * width
        xs = [folds.index(int(f)) + shift for f in c["test_accuracy"]]
        ax.bar(xs, [100 * a for a in c["test_accuracy"].values()], width=width, color=color,
               label=config_label(c["lr"], c["batch_size"], c.get("extra")))
        if with_mean and c["mean"] is not None:
            ax.bar(len(folds) + 0.5 + shift, 100 * c["mean"], width=width, color=color, yerr=100 * (c["std"] or 0.0),
                   error_kw={"ecolor": "black", "elinewidth": 0.8, "capsize": 2})
    if with_mean:
        ax.set_xticks([*range(len(folds)), len(folds) + 0.5], [str(f) for f in folds] + ["mean"])
        ax.axvline(len(folds) - 0.25, color="gray", lw=0.6)
    else:
        ax.set_xticks(range(len(folds)), [str(f) for f in folds])
    ax.set_xlabel("test fold")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2 if n > 1 else 1, frameon=False, handlelength=1.2)
    return fig


def _epoch_stats(trial_rows, trial_info, config, key: str) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(epochs, mean, std) of ``key`` over the folds of ``config`` that reached each epoch (std 0 with one fold)."""
    per_epoch: dict[int, list[float]] = {}
    for name, info in trial_info.items():
        if _config_of(info) == config:
            for r in trial_rows.get(name, []):
                per_epoch.setdefault(int(r["epoch"]), []).append(100 * r[key])
    epochs = sorted(per_epoch)
    values = [per_epoch[e] for e in epochs]
    return (epochs, np.array([np.mean(v) for v in values]),
            np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]))


def learning_curves(trial_rows: dict[str, list[dict[str, Any]]], trial_info: dict[str, tuple[int, float, int]]):
    """Validation (top) and test (bottom) accuracy per epoch, mean over folds per config, ± std as hatched bands."""
    plt = _pyplot()
    configs = sorted({_config_of(info) for info in trial_info.values()})
    fig, axes = _figure(3.6 + 0.16 * len(configs), nrows=2, sharex=True)
    for ax, key, what in zip(axes, ("val_accuracy", "test_accuracy"), ("validation", "test")):
        for k, config in enumerate(configs):
            epochs, mean, std = _epoch_stats(trial_rows, trial_info, config, key)
            if not epochs:
                continue
            color = PALETTE[k % len(PALETTE)]
            ax.fill_between(epochs, mean - std, mean + std, facecolor=color, alpha=0.12, linewidth=0)
            ax.fill_between(epochs, mean - std, mean + std, facecolor="none", edgecolor=color, alpha=0.5,
                            hatch=HATCHES[k % len(HATCHES)], linewidth=0.7, linestyle=LINESTYLES[k % len(LINESTYLES)])
            ax.plot(epochs, mean, color=color, marker="os^Dv<>p"[k % 8], ms=3, lw=1.2,
                    label=config_label(*config) if ax is axes[0] else None)
        ax.set_ylabel(f"{what} acc. (%)")
        ax.grid(alpha=0.3)
    axes[1].set_xlabel("epoch")
    axes[1].xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.legend(loc="outside lower center", ncol=2 if len(configs) > 1 else 1, frameon=False, handlelength=1.5)
    return fig


def _short(name: str) -> str:
    return name.replace("_", " ")


def confusion_matrix(summary: dict[str, Any]):
    """Row-normalized confusion matrix (% of each true class, written in each cell), summed over folds; the counts are
    in the report. Long class names take two lines so the cells stay wide enough for "100" at FONT_PT."""
    m = np.asarray(summary["confusion_matrix"], dtype=float)
    names = summary["classes"] or [str(i) for i in range(len(m))]
    pct = 100 * m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = _figure(1.25 + 0.2 * len(names))
    ax.imshow(pct, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(len(names)), [_short(n) for n in names], rotation=60, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(len(names)), [n.replace("_", "\n") if len(n) > 9 else _short(n) for n in names],
                  linespacing=0.9)
    ax.tick_params(length=0)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.spines[:].set_visible(False)
    for i in range(len(m)):
        for j in range(len(m)):
            if m[i, j]:
                ax.text(j, i, f"{pct[i, j]:.0f}", ha="center", va="center", fontsize=FONT_PT,
                        color="white" if pct[i, j] > 55 else "black")
    return fig


def per_class_accuracy(summary: dict[str, Any]):
    """Horizontal bars of per-class test accuracy (nested selection, summed over folds), the overall mean dashed."""
    items = [(k, v) for k, v in summary["per_class_accuracy"].items() if v is not None]
    fig, ax = _figure(0.7 + 0.2 * len(items))
    vals = [100 * v for _, v in items]
    ax.barh(range(len(items)), vals, color=PALETTE[0], height=0.7)
    ax.set_yticks(range(len(items)), [_short(k) for k, _ in items])
    ax.invert_yaxis()
    for i, v in enumerate(vals):
        ax.text(v + 1.5, i, f"{v:.1f}", va="center")
    ax.set_xlim(0, 115)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("test accuracy (%)")
    if summary["mean"] is not None:
        ax.axvline(100 * summary["mean"], color=PALETTE[1], ls="--", lw=1)
    return fig


def make_all(summary: dict[str, Any], trial_rows, trial_info, exp_dir: Path) -> dict[str, str]:
    """Write every figure that has data into ``exp_dir/plots`` (PNG, SVG, PDF); returns {name: PNG path relative to
    exp_dir}."""
    out = Path(exp_dir) / PLOTS_DIR
    out.mkdir(exist_ok=True)
    made = {}
    if summary["configs"]:
        made["fold_accuracy"] = save(fold_accuracy(summary), out, "fold_accuracy")
    if trial_info:
        made["learning_curves"] = save(learning_curves(trial_rows, trial_info), out, "learning_curves")
    if summary.get("confusion_matrix"):
        made["confusion_matrix"] = save(confusion_matrix(summary), out, "confusion_matrix")
    if summary.get("per_class_accuracy"):
        made["per_class_accuracy"] = save(per_class_accuracy(summary), out, "per_class_accuracy")
    return {k: str(Path(v).relative_to(exp_dir)) for k, v in made.items()}
