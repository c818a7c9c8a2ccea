"""Continuing an experiment (issue 23 items 6-9): what binds a re-run to the recorded settings, a damaged best checkpoint
in the reducer, and --max-failures on restored trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import orchestrate
from search_spaces import SPACES
from trainable.errors import AstCvError
from trainable.faults import KILL_AT_ENV, KILL_MARK_ENV, KILL_PID_ENV, fired
from trainable.results.reduce import summarize
from trainable.run.prepare import make_plan, prepare_inputs
from trainable.store.experiment import EXPERIMENT_STARTED, read_manifest, trial_dirname, update_manifest, write_manifest

ROOT = Path(__file__).resolve().parent.parent


def _plan(*argv: str):
    args = orchestrate.build_parser().parse_args(list(argv))
    plan, meta, headers = make_plan(args, SPACES, torch_gpus=0)
    return prepare_inputs(plan, meta, headers), args


def _args(demo_assets, storage: Path, *extra: str) -> list[str]:
    data, model = demo_assets
    return ["--data-root", str(data), "--model", str(model), "--num-workers", "0", "--gpus", "0", "--storage-path",
            str(storage), "--name", "exp", *extra]


def test_a_space_with_its_own_folds_is_continued_with_them(demo_assets, tmp_path):
    """Item 6: --space smoke --folds 1 2 3 run again was refused as "started with other settings: --folds (recorded
    [1, 2, 3], now [1..10])": the space's own folds were compared with the recorded ones."""
    argv = _args(demo_assets, tmp_path, "--space", "smoke", "--folds", "1", "2", "3")
    plan, args = _plan(*argv)
    orchestrate.record(plan, args)
    update_manifest(plan.store, **{EXPERIMENT_STARTED: True})
    again, _ = _plan(*argv)
    assert again.restore and list(again.config.folds) == [1, 2, 3] and again.grid["test_fold"] == [1]
    with pytest.raises(AstCvError, match="--folds"):  # other folds are still refused
        _plan(*_args(demo_assets, tmp_path, "--space", "smoke", "--folds", "1", "2", "4"))


def test_a_run_that_failed_before_any_trial_does_not_pin_its_settings(demo_assets, tmp_path):
    """Item 9: the manifest was written before Ray started, so a run that failed at import or connect time made the next
    run with other flags "started with other settings". It binds once the first trial started."""
    plan, args = _plan(*_args(demo_assets, tmp_path, "--folds", "1", "2", "3", "--lrs", "1e-3"))
    orchestrate.record(plan, args)  # ... and the run dies before its first trial
    assert read_manifest(plan.store)[EXPERIMENT_STARTED] is False
    other, _ = _plan(*_args(demo_assets, tmp_path, "--folds", "1", "2", "3", "--lrs", "5e-4"))
    assert not other.restore and other.grid["lr"] == [5e-4]
    orchestrate.record(other, args)
    update_manifest(other.store, **{EXPERIMENT_STARTED: True})  # what the first trial's start does
    with pytest.raises(AstCvError, match="started with other settings: --lrs"):
        _plan(*_args(demo_assets, tmp_path, "--folds", "1", "2", "3", "--lrs", "1e-3"))


def test_folds_whose_trials_all_finished_are_not_started_again(demo_assets, tmp_path):
    """Review of issue 23: grown to a second fold and interrupted, an experiment restores only the grown Tuner's
    snapshot (the newest); the fold finished before the growth was started again, as if new. Folds are started only
    when no trial of theirs is restored and not all of their trials finished."""
    import dataclasses

    from trainable.run.resume import folds_not_started

    plan, _ = _plan(*_args(demo_assets, tmp_path, "--folds", "1", "2", "3", "--test-folds", "1", "2", "3", "--lrs",
                           "1e-3", "5e-4", "--batch-sizes", "8"))
    done = {trial_dirname(1, 1e-3, 8), trial_dirname(1, 5e-4, 8), trial_dirname(2, 1e-3, 8)}
    assert folds_not_started(dataclasses.replace(plan, finished=frozenset(done))) == [2, 3]  # fold 2: half done
    assert folds_not_started(plan) == [1, 2, 3]


def test_damaged_saved_state_is_set_aside_and_kept_and_restore_needs_all_of_it(tmp_path):
    """Review of issue 23: a snapshot cut short, or one that parses but is not Ray's ({}), or a search state cut short
    made every re-run fail in Ray's restore (KeyError: 'test_fold'); with every snapshot set aside, Tuner.restore still
    ran (tuner.pkl was there) and failed the same way."""
    import ray.cloudpickle as cloudpickle

    from trainable.run.resume import restorable, set_aside_damaged_snapshots
    from trainable.store.storage import Store

    store = Store.open(tmp_path)
    good, searcher = '{"trial_data": [], "runner_data": {}}', cloudpickle.dumps({"_finished": True})
    files = {"experiment_state-2026-12-04_05-00-00.json": good, "experiment_state-2026-12-04_06-00-00.json": '{"trial',
             "experiment_state-2026-12-04_07-00-00.json": "{}", "basic-variant-state-2026-12-04_05-00-00.json": searcher,
             "basic-variant-state-2026-12-04_06-00-00.json": searcher[:10], "tuner.pkl": b"x", "result.json": "{"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    assert sorted(set_aside_damaged_snapshots(store)) == [
        "basic-variant-state-2026-12-04_06-00-00.json", "experiment_state-2026-12-04_06-00-00.json",
        "experiment_state-2026-12-04_07-00-00.json"]
    assert (tmp_path / "experiment_state-2026-12-04_06-00-00.json.damaged").read_text() == '{"trial'
    assert (tmp_path / "result.json").read_text() == "{"  # not Ray's saved state: left alone
    assert restorable(store)
    (tmp_path / "experiment_state-2026-12-04_05-00-00.json").write_text("")
    assert set_aside_damaged_snapshots(store) == ["experiment_state-2026-12-04_05-00-00.json"]
    assert not restorable(store)  # no snapshot left: the folds not finished start in a new Tuner


def test_a_manifest_without_the_flag_binds(tmp_path):
    """Experiments recorded before the flag existed stay bound to their settings."""
    from trainable.store.experiment import binding_manifest

    write_manifest(tmp_path, base_config={"epochs": 1}, grid={"test_fold": [1], "lr": [1e-3], "batch_size": [8]})
    assert binding_manifest(tmp_path) is not None
    update_manifest(tmp_path, **{EXPERIMENT_STARTED: False})
    assert binding_manifest(tmp_path) is None
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")  # Ray's snapshot: it did start
    assert binding_manifest(tmp_path) is not None


def _trial_with_checkpoint(exp: Path, fold: int, val: float, weights: bytes) -> None:
    d = exp / trial_dirname(fold, 1e-3, 8)
    (d / "checkpoint_000000" / "best").mkdir(parents=True)
    (d / "params.json").write_text(json.dumps({"test_fold": fold, "lr": 1e-3, "batch_size": 8}))
    (d / "result.json").write_text(json.dumps({"epoch": 1, "val_accuracy": val, "test_accuracy": val,
                                               "test_confusion": json.dumps([[1, 0], [0, 1]])}) + "\n")
    ck = d / "checkpoint_000000"
    (ck / "trainer_state.json").write_text(json.dumps({"epoch": 1, "history": []}))
    (ck / "best" / "best_epoch.json").write_text(json.dumps({"epoch": 1, "dtype": "float16"}))
    for name in ("config.json", "preprocessor_config.json"):
        (ck / "best" / name).write_text("{}")
    (ck / "best" / "model.safetensors").write_bytes(weights)


def test_a_damaged_best_checkpoint_is_an_export_problem_not_a_traceback(tmp_path, capsys):
    """Item 7: a truncated safetensors file in the chosen checkpoint raised SafetensorError out of the reducer (no
    summary); now the summary, the report and the console say no model was exported, and why, in one line."""
    import numpy as np
    from safetensors.numpy import save

    exp = tmp_path / "exp"
    write_manifest(exp, base_config={"epochs": 1, "seed": 0}, grid={"test_fold": [1, 2], "lr": [1e-3], "batch_size": [8]},
                   classes=["a", "b"], command=["x"])
    whole = save({"w": np.ones((64, 64), dtype=np.float16)})
    _trial_with_checkpoint(exp, 1, 0.9, whole[: len(whole) // 2])  # the best trial's weights, cut short by a kill
    _trial_with_checkpoint(exp, 2, 0.5, whole)
    s = summarize(exp)
    assert s["best_model_dir"] is None and not (exp / "best_model").exists()
    assert "damaged" in s["export_problem"] and trial_dirname(1, 1e-3, 8) in s["export_problem"]
    assert json.loads((exp / "summary.json").read_text())["export_problem"] == s["export_problem"]
    assert "No model was exported" in (exp / "report.md").read_text()
    capsys.readouterr()
    assert orchestrate.main(["--report-only", str(exp)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "no model exported" in line]) == 1


@pytest.mark.slow
def test_max_failures_given_on_resume_applies_to_restored_trials(demo_assets, tmp_path):
    """Item 8: the trials of an experiment started with --max-failures 0 kept 0 when the re-run said 3: a failure of a
    restored trial was final. Run 1 (--max-failures 0) is stopped once its trial started; run 2 (--max-failures 3)
    has the trial's worker killed once (the kill point with a driver pid that is gone kills the worker itself)."""
    cmd = [sys.executable, "orchestrate.py", *_args(demo_assets, tmp_path, "--folds", "1", "2", "3", "--test-folds", "1",
                                                    "--lrs", "1e-3", "--batch-sizes", "8", "--epochs", "1")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "runs.log"

    def run(*extra: str, **kill: str) -> int:
        with open(log, "a") as out:
            proc = subprocess.Popen([*cmd, *extra], cwd=ROOT, env={**env, **kill}, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                return proc.wait(timeout=600)
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    first, second = tmp_path / "first", tmp_path / "second"
    assert run("--max-failures", "0", **{KILL_AT_ENV: "params.json", KILL_MARK_ENV: str(first)}) == -signal.SIGKILL
    assert fired(first) == "params.json", log.read_text()
    assert list((tmp_path / "exp").glob("experiment_state-*.json"))  # the re-run restores the first run's trials
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    rc = run("--max-failures", "3", **{KILL_AT_ENV: "best", KILL_MARK_ENV: str(second), KILL_PID_ENV: str(gone.pid)})
    assert fired(second) == "best", log.read_text()
    assert rc == 0, log.read_text()[-4000:]
    assert "retrying from its last checkpoint" in log.read_text()


@pytest.mark.slow
def test_a_trial_ray_starts_afresh_continues_from_the_checkpoints_in_its_folder(local_ray, tmp_path):
    """Review of issue 23 (B3): after a damaged snapshot, a trial that finished (or ran epochs) after the restored older
    snapshot, or whose fold starts in a new Tuner because no snapshot was left, was trained again from scratch: Ray
    gave it no checkpoint. It continues from its folder's newest checkpoint (a finished one ends at once), and its
    next checkpoint goes past every folder there. One CPU: the trials run one after another in one reused worker, so
    both ways Ray starts a trial (a new worker's setup, a reused worker's reset) are taken."""
    from ray import tune

    from trainable.run.resume import with_restore_fallback

    def trial(config):
        checkpoint = tune.get_checkpoint()
        done = int((Path(checkpoint.path) / "epoch").read_text()) if checkpoint else 0
        for epoch in range(done + 1, 3):
            folder = tmp_path / f"report-{config['point']}-{epoch}"
            folder.mkdir()
            (folder / "epoch").write_text(str(epoch))
            tune.report({"epoch": epoch, "resumed_after": done}, checkpoint=tune.Checkpoint.from_directory(str(folder)))

    exp = tmp_path / "exp"
    for point, folders in {"finished": {2: 1, 4: 2}, "half": {3: 1}}.items():  # checkpoint index: epochs it holds
        for index, epoch in folders.items():
            (exp / point / f"checkpoint_{index:06d}").mkdir(parents=True)
            (exp / point / f"checkpoint_{index:06d}" / "epoch").write_text(str(epoch))
    tuner = tune.Tuner(with_restore_fallback(trial), param_space={"point": tune.grid_search(["finished", "half", "new"])},
                       tune_config=tune.TuneConfig(trial_dirname_creator=lambda t: t.config["point"], reuse_actors=True),
                       run_config=tune.RunConfig(name="exp", storage_path=str(tmp_path), verbose=0,
                                                 checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    reported = {r.config["point"]: [row["epoch"] for row in (r.metrics_dataframe.to_dict("records")
                                                              if r.metrics_dataframe is not None else [])]
                for r in tuner.fit()}
    assert reported == {"finished": [], "half": [2], "new": [1, 2]}
    assert (exp / "half" / "checkpoint_000004" / "epoch").read_text() == "2"  # past checkpoint_000003, not over it
    assert (exp / "new" / "checkpoint_000001" / "epoch").read_text() == "2"
    assert sorted(p.name for p in (exp / "finished").glob("checkpoint_*")) == ["checkpoint_000002", "checkpoint_000004"]



@pytest.mark.slow
def test_a_trial_whose_folder_holds_its_last_epoch_ends_at_once(local_ray, demo_assets, tmp_path):
    """Review B3: a finished trial that Ray starts again finds its last checkpoint in its folder, then ends before
    loading model or data, with one result that holds no epoch (a trial ending without any result makes Ray print
    "Trial ... completed. Last result:"). Before the fix it trained again from scratch."""
    from ray import tune

    from trainable.run.resume import run_settings, with_restore_fallback
    from trainable.run.trial import tune_trial
    from trainable.run.tuner import csv_callback, tensorboard_callback, trial_name
    from trainable.store.experiment import FINISHED_EARLIER, TRAINER_STATE

    plan, _ = _plan(*_args(demo_assets, tmp_path, "--folds", "1", "2", "3", "--test-folds", "1", "--lrs", "1e-3",
                           "--batch-sizes", "8", "--epochs", "2"))
    last = tmp_path / "exp" / trial_dirname(1, 1e-3, 8) / "checkpoint_000001"
    last.mkdir(parents=True)
    (last / TRAINER_STATE).write_text(json.dumps({"epoch": 2, "config": {"epochs": 2}}))
    rows = "".join(json.dumps({"epoch": e, "val_accuracy": 0.5}) + "\n" for e in (1, 2))
    (last.parent / "result.json").write_text(rows)  # the earlier run's: Ray's logger started it empty (review of B3)
    table = "epoch,val_accuracy\n1,0.5\n2,0.5\n"
    (last.parent / "progress.csv").write_text(table)  # Ray's CSV logger wrote the one result under this header
    trainable = with_restore_fallback(tune.with_parameters(tune_trial, base=plan.trial_base, exp_dir=plan.exp_dir))
    tuner = tune.Tuner(trainable, param_space={"test_fold": tune.grid_search([1]), "lr": tune.grid_search([1e-3]),
                                               "batch_size": tune.grid_search([8])},
                       tune_config=tune.TuneConfig(trial_dirname_creator=trial_name, trial_name_creator=trial_name),
                       run_config=tune.RunConfig(name="exp", storage_path=str(tmp_path), verbose=0,
                                                 callbacks=[tensorboard_callback(), run_settings(plan, 0),
                                                            csv_callback()]))
    [result] = tuner.fit()  # (Ray's own TensorBoard logger would write an events file)
    assert result.error is None and result.metrics[FINISHED_EARLIER] is True and "epoch" not in result.metrics
    assert (last.parent / "result.json").read_text().startswith(rows) and (last.parent / "progress.csv").read_text() == table
    assert sorted(p.name for p in last.parent.iterdir() if p.name.startswith(("checkpoint_", "events"))) == [last.name]


def test_a_finished_trial_keeps_only_its_last_checkpoint_once_that_one_is_intact(tmp_path):
    """Ray deletes only the checkpoints it registered: a trial that continued from a checkpoint Ray did not name left
    the older folder behind (1.03 GB at AST-base). The driver removes a finished trial's older checkpoints, and only
    when the newest holds the trial's own last epoch (a --grid epochs=... trial has its own) and is intact."""
    from trainable.run.resume import drop_superseded_checkpoints
    from trainable.store.experiment import TRAINER_STATE
    from trainable.store.storage import Store

    def checkpoint(trial: str, index: int, epoch: int, epochs: int = 2, text: str | None = None) -> None:
        folder = tmp_path / trial / f"checkpoint_{index:06d}"
        folder.mkdir(parents=True)
        (folder / TRAINER_STATE).write_text(text or json.dumps({"epoch": epoch, "config": {"epochs": epochs}}))

    for index, epoch in ((1, 1), (3, 1), (4, 2)):
        checkpoint("done", index, epoch)
    checkpoint("running", 2, 1)
    checkpoint("running", 3, 1)
    checkpoint("damaged", 1, 1)
    checkpoint("damaged", 2, 2, text='{"epoch": 2, "con')  # cut short
    checkpoint("one", 0, 2)
    checkpoint("three_epochs_done", 0, 2, epochs=3)
    checkpoint("three_epochs_done", 1, 3, epochs=3)
    checkpoint("one_epoch_done", 0, 1, epochs=1)
    checkpoint("one_epoch_done", 1, 1, epochs=1)
    checkpoint("three_epochs_running", 0, 1, epochs=3)
    checkpoint("three_epochs_running", 1, 2, epochs=3)
    assert drop_superseded_checkpoints(Store.open(tmp_path), epochs=2) == [
        "done/checkpoint_000001", "done/checkpoint_000003", "one_epoch_done/checkpoint_000000",
        "three_epochs_done/checkpoint_000000"]
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["checkpoint_000004"]
    assert all(len(list((tmp_path / t).iterdir())) == 2 for t in ("running", "damaged", "three_epochs_running"))


def test_a_trial_restores_from_the_newest_checkpoint_in_its_folder_not_the_one_ray_names(tmp_path):
    """Review of B3: with --keep-checkpoints all, the checkpoint Ray's snapshot names may be older than the folder's
    newest (the driver was killed before its next snapshot): the trial resumed from it and trained an epoch again."""
    import pyarrow.fs as pafs
    from ray.tune import Checkpoint

    from trainable.run.trial import restore_candidates

    for index in (0, 1, 10):
        (tmp_path / "trial" / f"checkpoint_{index:06d}").mkdir(parents=True)
    (tmp_path / "trial" / "checkpoint_tmp").mkdir()  # not one of Ray's
    fs, folder = pafs.LocalFileSystem(), str(tmp_path / "trial")
    newest_first = [f"{folder}/checkpoint_{i:06d}" for i in (10, 1, 0)]
    assert restore_candidates(Checkpoint(f"{folder}/checkpoint_000001", filesystem=fs)) == [(fs, p) for p in newest_first]
    gone = f"{folder}/checkpoint_000011"  # named by the snapshot, deleted since: tried first, then found missing
    assert [p for _, p in restore_candidates(Checkpoint(gone, filesystem=fs))] == [gone, *newest_first]
