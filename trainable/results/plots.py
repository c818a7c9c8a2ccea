"""Figures for report.md: per-fold accuracy per config, learning curves, confusion matrix, per-class accuracy."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

PLOTS_DIR = "plots"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _config_label(lr: float, batch: int) -> str:
    return f"lr {lr:g}, batch {batch}"


def fold_accuracy(summary: dict[str, Any], out: Path) -> Path:
    """Per-fold test accuracy of every config, each config's mean (line) ± std (band)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    folds = sorted({int(f) for c in summary["configs"] for f in c["test_accuracy"]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n = max(1, len(summary["configs"]))
    width = 0.8 / n
    for k, c in enumerate(summary["configs"]):
        color = colors[k % len(colors)]
        xs = [folds.index(int(f)) + (k - (n - 1) / 2) * width for f in c["test_accuracy"]]
        ys = [100 * a for a in c["test_accuracy"].values()]
        label = _config_label(c["lr"], c["batch_size"])
        if c["mean"] is not None:
            std = 100 * (c["std"] or 0.0)
            label += f": {100 * c['mean']:.1f} ± {std:.1f} %"
            ax.axhspan(100 * c["mean"] - std, 100 * c["mean"] + std, color=color, alpha=0.08)
            ax.axhline(100 * c["mean"], color=color, lw=1, ls="--")
        ax.bar(xs, ys, width=width, color=color, label=label)
    ax.set_xticks(range(len(folds)), [str(f) for f in folds])
    ax.set_xlabel("test fold")
    ax.set_ylabel("test accuracy (%) at best-validation epoch")
    ax.set_ylim(0, 100)
    ax.set_title("Test accuracy per fold and config (dashed: mean, band: ± std)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(2, n), fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, out / "fold_accuracy.png")


def learning_curves(trial_rows: dict[str, list[dict[str, Any]]], trial_info: dict[str, tuple[int, float, int]], out: Path) -> Path:
    """Validation (solid) and test (dashed) accuracy per epoch, one panel per test fold, one colour per config."""
    plt = _pyplot()
    folds = sorted({f for f, _, _ in trial_info.values()})
    configs = sorted({(lr, bs) for _, lr, bs in trial_info.values()})
    cols = min(5, max(1, len(folds)))
    rows = math.ceil(len(folds) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows + 0.8), sharey=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax in axes.flat[len(folds):]:
        ax.set_visible(False)
    for name, rows_ in trial_info.items():
        fold, lr, bs = rows_
        ax = axes.flat[folds.index(fold)]
        data = trial_rows.get(name, [])
        if not data:
            continue
        color = colors[configs.index((lr, bs)) % len(colors)]
        epochs = [r["epoch"] for r in data]
        ax.plot(epochs, [100 * r["val_accuracy"] for r in data], color=color, marker="o", ms=3)
        ax.plot(epochs, [100 * r["test_accuracy"] for r in data], color=color, ls="--", marker="x", ms=3)
        ax.set_title(f"test fold {fold}", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for r in range(rows):
        axes[r, 0].set_ylabel("accuracy (%)", fontsize=8)
    handles = [plt.Line2D([], [], color=colors[i % len(colors)], label=_config_label(*c)) for i, c in enumerate(configs)]
    handles += [plt.Line2D([], [], color="gray", label="validation"), plt.Line2D([], [], color="gray", ls="--", label="test")]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
    fig.suptitle("Learning curves")
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    return _save(fig, out / "learning_curves.png")


def confusion_matrix(summary: dict[str, Any], out: Path) -> Path:
    """Confusion matrix summed over folds (nested selection), with counts, rows = true class."""
    plt = _pyplot()
    m = np.asarray(summary["confusion_matrix"])
    names = summary["classes"] or [str(i) for i in range(len(m))]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(names), 0.8 + 0.55 * len(names)))
    im = ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = m.max() / 2 if m.size else 0
    for i in range(len(m)):
        for j in range(len(m)):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7, color="white" if m[i, j] > threshold else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title("Confusion matrix, summed over test folds")
    fig.tight_layout()
    return _save(fig, out / "confusion_matrix.png")


def per_class_accuracy(summary: dict[str, Any], out: Path) -> Path:
    """Horizontal bars of per-class test accuracy (nested selection, summed over folds)."""
    plt = _pyplot()
    items = [(k, v) for k, v in summary["per_class_accuracy"].items() if v is not None]
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.35 * len(items)))
    names = [k for k, _ in items]
    vals = [100 * v for _, v in items]
    ax.barh(range(len(items)), vals, color="tab:blue")
    ax.set_yticks(range(len(items)), names, fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(vals):
        ax.text(v + 1, i, f"{v:.1f}", va="center", fontsize=8)
    ax.set_xlim(0, 110)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("test accuracy (%)")
    title = "Per-class accuracy"
    if summary["mean"] is not None:
        ax.axvline(100 * summary["mean"], color="gray", ls="--", lw=1)
        title += f" (dashed: overall nested mean, {100 * summary['mean']:.1f} %)"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out / "per_class_accuracy.png")


def make_all(summary: dict[str, Any], trial_rows, trial_info, exp_dir: Path) -> dict[str, str]:
    """Write every figure that has data into ``exp_dir/plots``; returns {name: path relative to exp_dir}."""
    out = Path(exp_dir) / PLOTS_DIR
    out.mkdir(exist_ok=True)
    made = {}
    if summary["configs"]:
        made["fold_accuracy"] = fold_accuracy(summary, out)
    if trial_info:
        made["learning_curves"] = learning_curves(trial_rows, trial_info, out)
    if summary.get("confusion_matrix"):
        made["confusion_matrix"] = confusion_matrix(summary, out)
    if summary.get("per_class_accuracy"):
        made["per_class_accuracy"] = per_class_accuracy(summary, out)
    return {k: str(Path(v).relative_to(exp_dir)) for k, v in made.items()}
