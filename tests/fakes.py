"""Experiment folders written by hand, as Ray Tune lays them out, for the reducer's tests (no training)."""

import json
from pathlib import Path

from trainable.store.experiment import trial_dirname, write_manifest


def fake_experiment(exp: Path, folds=(1, 2, 3), lrs=(1e-3,), epochs: int = 1, **manifest) -> Path:
    """An experiment's manifest over ``folds`` x ``lrs`` x batch 8 (no trials yet)."""
    write_manifest(exp, base_config={"epochs": epochs, "seed": 0, "folds": list(folds)},
                   grid={"test_fold": list(folds), "lr": list(lrs), "batch_size": [8]}, classes=["a", "b"],
                   command=["x"], **manifest)
    return exp


def fake_trial(exp: Path, fold: int, rows: list[dict], lr: float = 1e-3, params: str | None = "json") -> Path:
    """A trial folder with ``rows`` in result.json; params.json as Ray writes it (``params="json"``), empty
    (``""``: a sync cut short) or missing (None)."""
    d = exp / trial_dirname(fold, lr, 8)
    d.mkdir(parents=True)
    if params == "json":
        (d / "params.json").write_text(json.dumps({"test_fold": fold, "lr": lr, "batch_size": 8}))
    elif params is not None:
        (d / "params.json").write_text(params)
    (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d
