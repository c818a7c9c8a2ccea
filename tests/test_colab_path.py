"""The Colab path and the second review (issue 18): resume from the manifest, the model resolved before Ray, time and
progress, TensorBoard names, Ctrl-C, and the review's bugs, each with a test that failed before its fix."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import orchestrate
from trainable.data.metadata import US8K_FOLD_SIZES
from trainable.faults import HOLD_AT_ENV, HOLD_MARK_ENV
from trainable.store.experiment import trial_dirname
from trainable.run.progress import Progress, TrialView, eta_seconds
from trainable.results.reduce import summarize
from trainable.results.report import comparison_verdict, render_report

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def demo_args(demo_assets, storage, name, *extra):
    data, model = demo_assets
    return ["--data-root", str(data), "--model", str(model), "--folds", "1", "2", "3", "--test-folds", "1",
            "--lrs", "1e-3", "--batch-sizes", "8", "--epochs", "2", "--num-workers", "0", "--gpus", "0",
            "--storage-path", str(storage), "--name", name, *extra]


# ---------------------------------------------------------------- flags refused before anything is written


@pytest.mark.parametrize("flags, message", [
    (["--lrs", "nan"], "--lrs must be finite numbers > 0 (got nan)"),
    (["--lrs", "inf"], "--lrs must be finite numbers > 0 (got inf)"),
    (["--weight-decay", "inf"], "weight_decay must be a finite number (got inf)"),
    (["--lrs", "1e-5", "1.00000001e-5"], "are too close"),
])
def test_bad_grid_values_are_one_line_and_write_nothing(synth_root, tiny_ast_1024, tmp_path, capsys, flags, message):
    assert orchestrate.main(demo_args((synth_root, tiny_ast_1024), tmp_path, "bad") + flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()  # no manifest to block the corrected command


def test_repeated_grid_values_are_one_trial_each():
    from argparse import Namespace

    from search_spaces import SPACES
    from trainable.run.plan import build_grid

    args = Namespace(folds=None, test_folds=None, lrs=[1e-3, 1e-3, 5e-5], batch_sizes=[8, 8, 16])
    grid, _, _ = build_grid(SPACES["card"], args)
    assert grid["lr"] == [5e-5, 1e-3] and grid["batch_size"] == [8, 16]


def test_an_unknown_model_is_one_line_in_seconds_and_blocks_nothing(synth_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub cannot be reached (as offline, or a typo'd id)
    args = demo_args((synth_root, "x"), tmp_path, "typo")
    args[args.index("--model") + 1] = "demo/tiny-astt"
    start = time.time()
    assert orchestrate.main(args) == 2
    err = capsys.readouterr().err
    assert time.time() - start < 60 and "Cannot get model 'demo/tiny-astt'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "typo").exists()  # no trial folder, no manifest: the corrected command runs under this name


def test_help_shows_num_frames_auto_and_every_flag_explained(capsys):
    with pytest.raises(SystemExit):
        orchestrate.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--num-frames NUM_FRAMES" in out and "(default: auto)" in out
    for flag in ("--keep-checkpoints", "--no-space-check", "--resume", "--test-folds"):
        assert flag in out


# ---------------------------------------------------------------- resume from the manifest


def test_continuing_reads_the_manifest_applies_changeable_flags_and_names_the_others(tmp_path):
    from argparse import Namespace

    from trainable.run.plan import continued_values

    manifest = {"base_config": {"data_root": "/data", "model": "/m", "epochs": 5, "folds": [1, 2, 3, 4], "num_workers": 2,
                                "num_frames": 400, "feature_cache": "/c"},
                "grid": {"test_fold": [1, 2], "lr": [1e-5], "batch_size": [8]}}
    none = Namespace(folds=None, test_folds=None, lrs=None, batch_sizes=None)
    values, grid, added = continued_values(manifest, {}, none, None, "/runs/x")
    assert values["data_root"] == "/data" and grid["test_fold"] == [1, 2] and added == []
    values, grid, added = continued_values(manifest, {"num_workers": 0, "num_frames": "auto"},
                                           Namespace(folds=None, test_folds=[1, 2, 3], lrs=None, batch_sizes=None),
                                           None, "/runs/x")
    assert values["num_workers"] == 0 and grid["test_fold"] == [1, 2, 3] and added == [3]
    with pytest.raises(Exception) as refused:
        continued_values(manifest, {"epochs": 9, "data_root": "/other"},
                         Namespace(folds=None, test_folds=[1], lrs=[1e-3], batch_sizes=None), None, "/runs/x")
    text = str(refused.value)
    for named in ("--epochs (recorded 5, now 9)", "--data-root", "--lrs", "--test-folds"):
        assert named in text


# ---------------------------------------------------------------- the console says what the report says


def _summary_with(p_values, folds=4):
    comps = [{"lr": 1e-4 * (i + 1), "batch_size": 8, "mean_difference": -0.119, "t": -2.0, "p_value": p, "folds": folds}
             for i, p in enumerate(p_values)]
    return {"comparisons": comps, "best_config": {"lr": 1e-3, "batch_size": 8, "mean": 0.7, "std": 0.05,
                                                  "mean_val_accuracy": 0.7, "folds": list(range(folds))}}


def test_comparison_wording_is_one_function_and_never_says_indistinguishable():
    assert comparison_verdict(_summary_with([0.0])).startswith("Significantly different")  # p = 0.0 is not 'no p'
    assert comparison_verdict(_summary_with([None])).startswith("With fewer than two common folds")
    low = comparison_verdict(_summary_with([0.09], folds=4))
    assert "no significant difference" in low.lower() and "4 folds" in low and "low power" in low
    assert "indistinguishable" not in low
    s = {**_summary_with([0.09]), "per_fold": [], "mean": None, "std": None, "complete": True, "configs": [],
         "optimistic": None, "per_class_accuracy": None, "confusion_matrix": None, "classes": [], "command": ["x"],
         "seed": 0, "git_commit": None, "versions": {}}
    assert low in render_report(s)


def test_headline_interval_is_corrected_for_overlapping_training_sets():
    from trainable.results.select import holdout_ratio
    from trainable.results.stats import ci95

    acc = [0.70, 0.74, 0.68, 0.77, 0.72, 0.81, 0.69, 0.75, 0.73, 0.71]
    folds = list(range(1, 11))
    ratio = holdout_ratio(folds, folds, US8K_FOLD_SIZES)
    plain, corrected = ci95(acc), ci95(acc, ratio)
    widen = (corrected[1] - corrected[0]) / (plain[1] - plain[0])
    assert widen == pytest.approx(math.sqrt(1 + 10 * ratio)) and 1.45 < widen < 1.55  # 2.76 -> 4.14 points


def test_summary_json_is_strict_json(tmp_path):
    from fakes import fake_experiment, fake_trial

    exp = fake_experiment(tmp_path / "exp")
    fake_trial(exp, 1, [{"epoch": 1, "val_accuracy": 0.5, "test_accuracy": 0.5, "val_loss": float("nan")}])
    summarize(exp)
    text = (exp / "summary.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))  # one fold: std and ci95 are null


# ---------------------------------------------------------------- time


def test_eta_is_right_after_a_resume_from_the_trials_last_results():
    lines = []
    p = Progress(["a", "b", "c"], {"a"}, epochs=4, slots=1, out=lambda *a, **k: lines.append(a[0]))
    p.seed([TrialView("b", "PAUSED", 2, {"epoch_seconds": 100.0, "setup_seconds": 10.0})])
    assert p.est.epoch == 100.0 and p.est.startup == 10.0
    assert eta_seconds(p.trials, 4, 1, p.est) == pytest.approx(2 * 100 + 10 + 4 * 100 + 10)  # b continues, c starts


def test_the_console_progress_pickles_after_ray_replaced_print(capsys):
    # A --debug run shows the workers' output, and Ray's tqdm support then replaces builtins.print in the driver; the
    # Tuner pickles its callbacks, which hold the Progress, after that (a CI run failed so: "Can't pickle <built-in
    # function print>: it's not the same object as builtins.print").
    import builtins

    from ray import cloudpickle
    from ray.experimental import tqdm_ray

    progress = Progress(["a"], set(), epochs=1, slots=1)
    original = builtins.print
    try:
        tqdm_ray.instance()  # what the driver does on showing a worker's line
        assert builtins.print is not original
        copy = cloudpickle.loads(cloudpickle.dumps(progress))
        copy.out("through the console")
    finally:
        builtins.print = original
    assert "through the console" in capsys.readouterr().out


def test_in_epoch_progress_line_when_nothing_was_said_for_a_minute():
    lines = []
    p = Progress(["a"], set(), epochs=2, slots=1, out=lambda *a, **k: lines.append(a[0]))
    p.seed([TrialView("a", "RUNNING", 0)])
    p.poll([TrialView("a", "RUNNING", 0)], [("a", {"epoch": 1, "step": 10, "steps": 100, "samples_per_s": 3.0, "time": 1})])
    assert lines == []  # a line came less than a minute ago (the start)
    p.poll([TrialView("a", "RUNNING", 0)], [("a", {"epoch": 1, "step": 40, "steps": 100, "samples_per_s": 3.2, "time": 2})])
    p.last_line -= 61
    p.poll([TrialView("a", "RUNNING", 0)])  # no new message: the latest one is shown once a minute has passed
    assert len(lines) == 1 and "batch 40/100" in lines[0] and "3 samples/s" in lines[0] and "training" in lines[0]
    p.poll([TrialView("a", "RUNNING", 0)], [("a", {"epoch": 1, "phase": "validation", "step": 2, "steps": 9,
                                                   "samples_per_s": 8.0, "time": 3})])
    assert len(lines) == 1  # shown at the next minute without a line
    p.poll([TrialView("a", "RUNNING", 0)], [("a", {"warning": "checkpoint c2 is damaged (x); trying an older one"})])
    assert len(lines) == 2 and "a: warning: checkpoint c2 is damaged" in lines[1]  # at once, not as in-epoch news
    p.last_line -= 61
    p.poll([TrialView("a", "RUNNING", 0)])
    assert len(lines) == 3 and "validation: batch 2/9" in lines[2]


@pytest.mark.slow
def test_progress_eta_tensorboard_names_ctrl_c_and_a_resume_without_data_root(demo_assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = demo_args(demo_assets, tmp_path, "stop", "--test-folds", "1", "2", "3")
    held = tmp_path / "held"  # fold 2's trial waits after its first checkpoint: Ctrl-C once fold 1 has finished
    env = {**ENV, HOLD_AT_ENV: f"checkpoint_stored:1@{trial_dirname(2, 1e-3, 8)}", HOLD_MARK_ENV: str(held)}
    proc = subprocess.Popen([sys.executable, "orchestrate.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = tmp_path / "stop" / trial_dirname(1, 1e-3, 8) / "result.json"
    deadline = time.time() + 300
    while not (held.is_file() and first.is_file() and len(first.read_text().splitlines()) >= 2):
        assert time.time() < deadline and proc.poll() is None, "fold 2 never held after its first checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("Interrupted: finished trials and epoch checkpoints are kept")
    assert "Tuner.restore" not in out + err and "Traceback" not in out + err and "FileNotFoundError" not in out + err
    epoch_lines = [line for line in out.splitlines() if " epoch " in line and "val_acc" in line]
    assert epoch_lines and all("| ETA " in line for line in epoch_lines)
    assert "Estimate: the grid needs about" in out
    events = EventAccumulator(str(first.parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "lr/train", "accuracy/val", "loss/val", "accuracy/test", "loss/test"} <= tags
    assert not [t for t in tags if t.startswith("ray/")]  # Ray's counters out of sight
    assert len(events.Scalars("loss/train")) > len(events.Scalars("accuracy/val")) == 2  # per step vs per epoch
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")  # the HParams view's row
    startup = json.loads(first.read_text().splitlines()[0])["startup"]
    assert {"worker_s", "imports_s", "data_s", "model_s", "loaders_s", "first_step_s"} <= set(startup)
    resumed = subprocess.run([sys.executable, "orchestrate.py", "--resume", "--storage-path", str(tmp_path), "--name",
                              "stop", "--gpus", "0"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr  # no --data-root: the manifest has it
    assert "Resuming" in resumed.stdout and json.loads((tmp_path / "stop" / "summary.json").read_text())["complete"]
    assert "fold01_lr1e-03_bs8 epoch" not in resumed.stdout  # the finished trial was kept


# ---------------------------------------------------------------- --no-cache finds unusable clips first


def test_no_cache_check_decodes_every_clip_before_trials(synth_root, tmp_path):
    import shutil

    import soundfile as sf

    from trainable.data.audio import find_unusable, read_headers
    from trainable.data.metadata import load_metadata

    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    meta = load_metadata(data)
    name = meta.loc[meta["fold"] == 2, "slice_file_name"].iloc[0]
    sf.write(str(data / "audio" / "fold2" / name), np.array([0.1, np.nan] * 2000, dtype=np.float32), 16000,
             subtype="FLOAT")
    assert not read_headers(data, meta).bad  # the headers look fine: only decoding finds NaN samples
    bad = find_unusable(data, meta, workers=2)
    assert list(bad) == [f"fold2/{name}"] and "NaN" in bad[f"fold2/{name}"]


def test_gpus_per_trial_auto_packs_two_trials_on_big_cards_only():
    from argparse import Namespace

    from trainable.run.plan import plan_resources

    def plan(gpt, gpus=1, memory=None, address=None):
        args = Namespace(address=address, gpus=None, gpus_per_trial=gpt, cpus_per_trial=None)
        return plan_resources(args, gpus, cpu_count=16, gpu_memory_gib=memory)

    assert plan(None, memory=15.0).gpus_per_trial == 1.0  # a T4
    big = plan("auto", memory=139.8)  # an H200
    assert big.gpus_per_trial == 0.5 and big.slots(16) == 2
    assert plan(0.25, memory=139.8).gpus_per_trial == 0.25  # asked for
    assert plan(None, gpus=0).gpus_per_trial == 0.0


def test_remaining_tracebacks_are_one_line(tmp_path, exported, capsys):
    import shutil

    import predict
    from trainable.data import cache
    from trainable.errors import AstCvError
    from trainable.run.plan import probe_address

    assert cache.main(["--data-root", str(tmp_path / "nonexistent"), "--cache-dir", str(tmp_path / "c")]) == 2
    broken = tmp_path / "model"
    shutil.copytree(exported, broken)
    (broken / "config.json").write_text("{not json")
    assert predict.main(["--model", str(broken), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 2 and "does not exist" in err and "is damaged" in err
    start = time.time()
    with pytest.raises(AstCvError, match="Cannot reach the Ray cluster at --address 127.0.0.1:1"):
        probe_address("127.0.0.1:1", timeout=2)  # nothing listens on port 1
    assert time.time() - start < 5


@pytest.mark.slow
def test_in_epoch_news_travels_from_a_ray_worker_to_the_console(local_ray):
    import ray

    from trainable.run.tuner import progress_board

    board = progress_board("astcv-progress-test")  # noqa: F841  (held: an actor without a handle is stopped)

    @ray.remote
    def trial():  # what a trial's on_progress does
        ray.get_actor("astcv-progress-test").post.remote("t", {"epoch": 1, "step": 5, "steps": 9,
                                                               "samples_per_s": 12.0, "time": 1.0})

    ray.get(trial.remote())
    lines = []
    p = Progress(["t"], set(), epochs=1, slots=1, out=lambda *a, **k: lines.append(a[0]))
    p.last_line -= 61
    messages = []
    for _ in range(50):  # the post is asynchronous
        messages = ray.get(ray.get_actor("astcv-progress-test").drain.remote())
        if messages:
            break
        time.sleep(0.1)
    p.poll([TrialView("t", "RUNNING", 0)], messages)
    assert len(lines) == 1 and "batch 5/9" in lines[0] and "12 samples/s" in lines[0]
