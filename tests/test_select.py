"""Model selection on hand-made histories: no files, no training."""

import json

import pytest

from trainable.store.experiment import row_score, selection_score
from trainable.results.select import TrialHistory, holdout_ratio, select


def trial(fold, lr, vals, tests, epochs=None, bs=8):
    rows = tuple({"epoch": e, "val_accuracy": v, "test_accuracy": t, "test_confusion": json.dumps([[1, 0], [0, 1]])}
                 for e, (v, t) in enumerate(zip(vals, tests), start=1))
    return TrialHistory(f"f{fold}-{lr}", fold, lr, bs, epochs or len(vals), rows)


def test_ties_pick_the_earliest_epoch_and_the_score_ranks_the_same_way():
    t = trial(1, 1e-3, [0.5, 0.7, 0.7, 0.6], [0.1, 0.2, 0.9, 0.3])
    assert t.best["epoch"] == 2  # the tie at 0.7 goes to the earlier epoch, whatever the test accuracy
    ranked = sorted(t.rows, key=row_score, reverse=True)
    assert [r["epoch"] for r in ranked[:2]] == [2, 3]  # what Ray keeps (top 2 by the reported score)
    assert selection_score(0.7, 2) > selection_score(0.7, 3) > selection_score(0.6999, 1)


def test_nested_best_config_optimistic_and_export():
    trials = [
        trial(1, 1e-3, [0.6, 0.8], [0.5, 0.7]), trial(1, 1e-4, [0.7, 0.7], [0.9, 0.9]),
        trial(2, 1e-3, [0.9, 0.5], [0.6, 0.5]), trial(2, 1e-4, [0.6, 0.6], [0.8, 0.8]),
        trial(3, 1e-3, [0.5], [0.1], epochs=2),  # unfinished: left out everywhere
    ]
    sel = select(trials, folds=[1, 2, 3])
    assert [(p.fold, p.lr, p.epoch, p.test_accuracy) for p in sel.per_fold] == [(1, 1e-3, 2, 0.7), (2, 1e-3, 1, 0.6)]
    assert sel.mean == pytest.approx(0.65)
    assert (sel.best_config.lr, sel.best_config.mean_val_accuracy) == (1e-3, pytest.approx(0.85))
    assert sel.optimistic.lr == 1e-4 and sel.optimistic.mean == pytest.approx(0.85)  # chosen on test: biased
    assert sel.export == ("f2-0.001", 1)  # the best config's trial with the best validation accuracy
    [comp] = sel.comparisons
    assert comp["lr"] == 1e-4 and comp["mean_difference"] == pytest.approx(0.2) and comp["folds"] == 2
    assert sel.confusion.tolist() == [[2, 0], [0, 2]]


def test_holdout_ratio_uses_fold_sizes_or_assumes_equal_folds():
    assert holdout_ratio([1, 2, 3, 4], [1], None) == pytest.approx(1 / 2)
    sizes = {1: 100, 2: 200, 3: 300, 4: 400}
    # test fold 1, validation fold 4 (the one before, cyclically), training folds 2 and 3
    assert holdout_ratio([1, 2, 3, 4], [1], sizes) == pytest.approx(100 / 500)
