"""Extra grid axes (--grid NAME=V1,V2): parsing, trial names, the grid's trials, nested selection and the report over a
grid with an extra axis (fake trial histories, no Ray)."""

import json
from argparse import Namespace
from types import SimpleNamespace

import pytest

import orchestrate
from search_spaces import SPACES
from trainable.errors import AstCvError
from trainable.run.axes import expand_axes, grid_overrides, parse_axes
from trainable.run.plan import Plan, Resources, build_grid, continued_values, first_config
from trainable.store.experiment import expected_trials, parse_trial_dirname, trial_dirname, write_manifest


def test_axes_parse_with_the_fields_type_in_the_order_given():
    axes = parse_axes(["specaug=off,on", "mixup=0, 0.5", "optimizer=adam,adamw", "wa_start=0,3"])
    assert axes == {"specaug": ["off", "on"], "mixup": [0.0, 0.5], "optimizer": ["adam", "adamw"], "wa_start": [0, 3]}
    assert type(axes["wa_start"][1]) is int and type(axes["mixup"][0]) is float
    assert parse_axes(None) == {}


@pytest.mark.parametrize("spec, message", [
    ("foo=1,2", "--grid 'foo' is not a setting that can be a grid axis; valid: specaug (alias) and "),
    ("lr=1e-5,1e-4", "use --lrs, --batch-sizes, --test-folds"),
    ("mixup", "write NAME=V1,V2"),
    ("mixup=0,abc", "--grid mixup: value 'abc' is not a float"),
    ("wa_start=0,1.5", "--grid wa_start: value '1.5' is not a int"),
    ("specaug=off,maybe", "--grid specaug: value 'maybe' is not one of off, on"),
    ("mixup=0,0.0", "given twice"),
])
def test_bad_axes_are_one_clear_error(spec, message):
    with pytest.raises(AstCvError) as err:
        parse_axes([spec])
    assert message in str(err.value) and "\n" not in str(err.value)
    if spec.startswith("foo"):
        assert "mixup" in str(err.value) and "optimizer" in str(err.value)  # names the valid ones


def test_an_axis_twice_or_specaug_with_its_fields_is_refused():
    for specs in (["mixup=0,0.5", "mixup=0.2"], ["specaug=off,on", "freqm=0,24"]):
        with pytest.raises(AstCvError):
            parse_axes(specs)


def test_specaug_expands_to_the_spaces_masks_else_the_official_ones():
    assert expand_axes({"freqm": 0, "timem": 0, "specaug": "on"}) == {"freqm": 24, "timem": 96}
    assert expand_axes({"freqm": 12, "timem": 40, "specaug": "on"}) == {"freqm": 12, "timem": 40}
    assert expand_axes({"freqm": 12, "timem": 40, "specaug": "off"}) == {"freqm": 0, "timem": 0}
    assert expand_axes({"mixup": 0.5}) == {"mixup": 0.5}


def test_trial_names_round_trip_and_stay_as_before_without_axes():
    assert trial_dirname(1, 1e-5, 8) == "fold01_lr1e-05_bs8"
    assert parse_trial_dirname("fold01_lr1e-05_bs8") == {"test_fold": 1, "lr": 1e-5, "batch_size": 8}
    name = trial_dirname(1, 1e-5, 8, {"specaug": "on", "mixup": 0.5, "wa_start": 3})
    assert name == "fold01_lr1e-05_bs8__mixup-0.5__specaug-on__wa_start-3"
    assert parse_trial_dirname(name) == {"test_fold": 1, "lr": 1e-5, "batch_size": 8,
                                         "extra": {"mixup": "0.5", "specaug": "on", "wa_start": "3"}}
    assert parse_trial_dirname("fold01_lr1e-05_bs8__") is None
    from trainable.run.tuner import trial_name  # the name Ray gives the trial folder, from the trial's config

    config = {"test_fold": 1, "lr": 1e-5, "batch_size": 8, "mixup": 0.5, "specaug": "on", "wa_start": 3}
    assert trial_name(SimpleNamespace(config=config)) == name


def test_the_grid_is_fold_x_lr_x_batch_x_axes():
    args = Namespace(folds=[1, 2, 3], test_folds=None, lrs=None, batch_sizes=None, grid=["specaug=off,on", "mixup=0,0.5"])
    grid, _, _ = build_grid(SPACES["card"], args)
    assert grid["specaug"] == ["off", "on"] and grid["mixup"] == [0.0, 0.5]
    names = expected_trials(grid)
    assert len(names) == 3 * 2 * 2 * 2 * 2
    assert "fold02_lr5e-05_bs16__mixup-0.5__specaug-off" in names
    assert names["fold02_lr5e-05_bs16__mixup-0.5__specaug-off"] == (2, 5e-5, 16)
    plan = Plan(config=None, grid=grid, exp_dir="", storage_path="", name="", resources=None, classes=[], restore=False)
    assert plan.trials == len(names)
    from trainable.run.tuner import describe_grid

    assert describe_grid(grid).endswith("x 2 specaug x 2 mixup")


def test_each_axis_value_is_checked_through_the_config_before_ray():
    grid = {"test_fold": [1], "lr": [1e-5], "batch_size": [8], "mixup": [0.0, 2.0]}
    with pytest.raises(AstCvError) as err:
        first_config({"data_root": "/d", "folds": [1, 2, 3]}, grid, Resources(1.0, 0.0, 0.0, None))
    assert "--grid mixup=2.0" in str(err.value) and "probability" in str(err.value)


def test_a_resume_with_changed_axes_is_refused_and_without_grid_keeps_them():
    manifest = {"base_config": {"data_root": "/d", "epochs": 2, "folds": [1, 2, 3]},
                "grid": {"test_fold": [1], "lr": [1e-5], "batch_size": [8], "specaug": ["off", "on"]}}
    args = Namespace(folds=None, test_folds=None, lrs=None, batch_sizes=None, grid=None)
    _, grid, _ = continued_values(manifest, {}, args, None, "/x")
    assert grid["specaug"] == ["off", "on"]
    _, grid, _ = continued_values(manifest, {}, Namespace(**{**vars(args), "grid": ["specaug=on,off"]}), None, "/x")
    assert list(grid) == ["test_fold", "lr", "batch_size", "specaug"]
    with pytest.raises(AstCvError) as err:
        continued_values(manifest, {}, Namespace(**{**vars(args), "grid": ["mixup=0,0.5"]}), None, "/x")
    assert "--grid (recorded {'specaug': ['off', 'on']})" in str(err.value)


def test_an_unknown_axis_fails_the_cli_before_anything_starts(tmp_path, capsys):
    assert orchestrate.main(["--grid", "foo=1,2", "--storage-path", str(tmp_path), "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--grid 'foo' is not a setting that can be a grid axis" in err and not list(tmp_path.iterdir())


def _fake_axis_experiment(exp, val):
    """Folds 1-3 x lr 1e-3 x batch 8 x specaug off/on; ``val[(fold, specaug)]`` its validation accuracy."""
    grid = {"test_fold": [1, 2, 3], "lr": [1e-3], "batch_size": [8], "specaug": ["off", "on"]}
    write_manifest(exp, base_config={"epochs": 1, "seed": 0, "folds": [1, 2, 3]}, grid=grid, classes=["a", "b"],
                   command=["x"])
    for (fold, aug), v in val.items():
        d = exp / trial_dirname(fold, 1e-3, 8, {"specaug": aug})
        d.mkdir(parents=True)
        (d / "params.json").write_text(json.dumps({"test_fold": fold, "lr": 1e-3, "batch_size": 8, "specaug": aug}))
        (d / "result.json").write_text(json.dumps({"epoch": 1, "val_accuracy": v, "test_accuracy": v - 0.1}) + "\n")
    return exp


def test_nested_selection_treats_each_axis_value_as_a_config_and_the_report_and_console_name_it(tmp_path, capsys):
    from trainable.results.reduce import summarize

    val = {(1, "off"): 0.5, (1, "on"): 0.7, (2, "off"): 0.6, (2, "on"): 0.8, (3, "off"): 0.9, (3, "on"): 0.6}
    s = summarize(_fake_axis_experiment(tmp_path / "exp", val), export=False)
    assert s["complete"] and s["trials_expected"] == 6
    assert [(p["fold"], p["extra"]) for p in s["per_fold"]] == [(1, {"specaug": "on"}), (2, {"specaug": "on"}),
                                                                 (3, {"specaug": "off"})]
    assert s["mean"] == pytest.approx((0.6 + 0.7 + 0.8) / 3)
    assert [(c["extra"], c["mean_val_accuracy"]) for c in s["configs"]] == [
        ({"specaug": "off"}, pytest.approx(2 / 3)), ({"specaug": "on"}, pytest.approx(0.7))]
    assert s["best_config"]["extra"] == {"specaug": "on"}
    assert s["comparisons"][0]["extra"] == {"specaug": "off"}
    report = (tmp_path / "exp" / "report.md").read_text()
    assert "| test fold | lr | batch | specaug | epoch |" in report and "| 1 | 1e-03 | 8 | on | 1 |" in report
    assert "| 1e-03 | 8 | off | 40.00 |" in report
    assert "Best config by mean **validation** accuracy: lr 1e-03, batch 8, specaug on" in report
    assert "Grid axes beyond lr and batch size (`--grid`" in report and "specaug off, on" in report
    assert "specaug" in (tmp_path / "exp" / "per_trial.csv").read_text().splitlines()[0]
    capsys.readouterr()
    orchestrate.print_summary(s, str(tmp_path / "exp"))
    out = capsys.readouterr().out
    assert "(lr 1e-03, batch 8, specaug on, epoch 1)" in out and "Best config on validation: lr 1e-03, batch 8, specaug on" in out
    # the refit trains the chosen config's values
    grid = {"specaug": ["off", "on"], "mixup": [0.0, 0.5]}
    assert grid_overrides(s["best_config"]["extra"], grid, {"freqm": 0, "timem": 0}) == {"freqm": 24, "timem": 96}
    assert grid_overrides({"mixup": "0.5"}, grid, {"mixup": 0.0}) == {"mixup": 0.5}
