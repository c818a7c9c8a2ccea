"""The review's findings (issue 12), one test each, plus the uncertainty of the results.

Each of these failed before its fix; the note of that change lists the command and what it prints now.
"""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import orchestrate
import predict
from trainable.data.metadata import load_metadata
from trainable.errors import AstCvError
from trainable.store.experiment import trial_dirname, write_manifest
from trainable.results.reduce import render_report, summarize

ROOT = Path(__file__).resolve().parent.parent


def _csv(root: Path) -> Path:
    return root / "metadata" / "UrbanSound8K.csv"


# ------------------------------------------------------------------ 1 + 4: ties keep the chosen checkpoint; fsIDs


@pytest.mark.slow
def test_tied_validation_exports_the_chosen_epoch_and_fsids_across_folds_are_reported(demo_assets, tmp_path, capsys):
    """lr 1e-12 keeps validation accuracy constant over 3 epochs: the reducer picks epoch 1, whose checkpoint must
    still be there and be the one exported. The data has one recording (fsID) in two folds: warned once, recorded."""
    data_src, model = demo_assets
    data = tmp_path / "data"
    shutil.copytree(data_src, data)
    meta = pd.read_csv(_csv(data))
    moved = int(meta.loc[meta["fold"] == 2, "fsID"].iloc[0])
    first_in_1 = meta.index[meta["fold"] == 1][0]
    meta.loc[first_in_1, "fsID"] = moved  # a clip of fold 1 now shares its recording with fold 2
    meta.to_csv(_csv(data), index=False)

    rc = orchestrate.main(["--data-root", str(data), "--model", str(model), "--folds", "1", "2", "3",
                           "--test-folds", "1", "--lrs", "1e-12", "--batch-sizes", "8", "--epochs", "3",
                           "--num-frames", "400", "--num-workers", "0", "--gpus", "0", "--storage-path", str(tmp_path),
                           "--name", "ties"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    exp = tmp_path / "ties"
    rows = [json.loads(line) for line in (exp / trial_dirname(1, 1e-12, 8) / "result.json").read_text().splitlines()]
    assert len({r["val_accuracy"] for r in rows}) == 1, "the setting must tie validation accuracy across epochs"
    s = json.loads((exp / "summary.json").read_text())
    assert s["per_fold"][0]["epoch"] == 1
    assert s["best_model_dir"] is not None
    source = json.loads((Path(s["best_model_dir"]) / "astcv_source.json").read_text())
    assert (source["trial"], source["epoch"]) == (trial_dirname(1, 1e-12, 8), 1)
    report = (exp / "report.md").read_text()
    assert f"{trial_dirname(1, 1e-12, 8)}, epoch 1" in report and "`None`" not in report

    assert captured.err.count(f"fsID {moved}") == 1 and "folds 1, 2" in captured.err
    assert s["fsids_in_several_folds"] == {str(moved): [1, 2]}
    assert f"{moved}" in report and "several folds" in report


def _fake_trial(exp: Path, fold: int, lr: float, vals: list[float], tests: list[float], keep_epochs=()):
    d = exp / trial_dirname(fold, lr, 8)
    d.mkdir(parents=True)
    (d / "params.json").write_text(json.dumps({"test_fold": fold, "lr": lr, "batch_size": 8}))
    rows = [{"epoch": e, "val_accuracy": v, "test_accuracy": t, "test_confusion": json.dumps([[1, 0], [0, 1]])}
            for e, (v, t) in enumerate(zip(vals, tests), start=1)]
    (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for e in keep_epochs:  # a checkpoint folder holding that epoch, as Ray keeps them
        ck = d / f"checkpoint_{e - 1:06d}"
        ck.mkdir()
        (ck / "trainer_state.json").write_text(json.dumps({"epoch": e}))
        for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
            (ck / name).write_text(f"fold {fold} epoch {e}")


def test_export_never_falls_back_to_another_trials_model(tmp_path):
    """If the named trial's chosen checkpoint is gone, nothing is exported (and the report says so), instead of the
    next trial's model."""
    exp = tmp_path / "exp"
    write_manifest(exp, base_config={"epochs": 2, "seed": 0}, grid={"test_fold": [1, 2], "lr": [1e-3], "batch_size": [8]},
                   classes=["a", "b"], command=["x"])
    _fake_trial(exp, 1, 1e-3, [0.9, 0.5], [0.8, 0.5], keep_epochs=(2,))  # the best trial lost its epoch-1 checkpoint
    _fake_trial(exp, 2, 1e-3, [0.6, 0.7], [0.6, 0.7], keep_epochs=(2,))
    s = summarize(exp)
    assert s["best_model_dir"] is None
    assert "fold01_lr1e-03_bs8" in s["export_problem"] and "epoch 1" in s["export_problem"]
    assert not (exp / "best_model").exists()
    assert "No model was exported" in (exp / "report.md").read_text()


# ------------------------------------------------------------------ 2: two orchestrators on one experiment


def test_second_orchestrator_on_a_running_experiment_is_refused(synth_root, tiny_ast_1024, tmp_path, capsys):
    data, model = synth_root, tiny_ast_1024
    exp = tmp_path / "busy"
    exp.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # stands for the running one
    try:
        (exp / ".astcv.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                     "started": "2026-11-26T10:00:00", "command": ["orchestrate.py"]}))
        rc = orchestrate.main(["--data-root", str(data), "--model", str(model), "--folds", "1", "2", "3",
                               "--test-folds", "1", "--lrs", "1e-3", "--batch-sizes", "8", "--epochs", "1",
                               "--num-frames", "400", "--num-workers", "0", "--gpus", "0",
                               "--storage-path", str(tmp_path), "--name", "busy"])
        err = capsys.readouterr().err
        assert rc == 2
        assert f"pid {holder.pid}" in err and socket.gethostname() in err and "--name" in err
        assert not list(exp.glob("fold*"))  # nothing trained
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    from trainable.store.lock import ExperimentLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".astcv.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with caplog.at_level("WARNING"):
        with ExperimentLock(tmp_path):
            held = json.loads((tmp_path / ".astcv.lock").read_text())
            assert held["pid"] == os.getpid()
    assert "taking over the lock" in caplog.text and f"pid {dead.pid}" in caplog.text and "no longer runs" in caplog.text
    assert not (tmp_path / ".astcv.lock").exists()


# ------------------------------------------------------------------ 3: repeated rows


def test_repeated_csv_rows_and_file_names_are_clear_errors(synth_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    meta = pd.read_csv(_csv(data))
    pd.concat([meta, meta.iloc[[3]]]).to_csv(_csv(data), index=False)
    with pytest.raises(AstCvError, match=r"repeated.*" + meta["slice_file_name"].iloc[3]):
        load_metadata(data)
    renamed = meta.copy()
    renamed.loc[7, "slice_file_name"] = meta.loc[2, "slice_file_name"]  # one file listed twice, different rows
    renamed.to_csv(_csv(data), index=False)
    with pytest.raises(AstCvError, match="listed 2 times"):
        load_metadata(data, check_files=False)


def test_recordings_in_several_folds_are_found(synth_root):
    from trainable.data.metadata import recordings_in_several_folds

    meta = load_metadata(synth_root)
    assert recordings_in_several_folds(meta) == {}
    meta.loc[0, "fsID"] = int(meta.loc[meta["fold"] == 3, "fsID"].iloc[0])
    assert recordings_in_several_folds(meta) == {int(meta.loc[0, "fsID"]): [1, 3]}


# ------------------------------------------------------------------ 5: OOM inside the optimizer step


@pytest.mark.parametrize("how", ["hook", "rehearsal"])
def test_oom_in_the_fp16_optimizer_step_is_a_clear_error_not_a_retry(tiny_ast_1024, how, monkeypatch):
    """An OOM in scaler.step (AdamW allocating its state) must not be retried with a smaller micro-batch: the
    GradScaler has already unscaled the gradients, and the retry would step with scaled ones."""
    from trainable.fit import oom, steps
    from trainable.fit.model import load_model

    model = load_model(str(tiny_ast_1024), [str(i) for i in range(10)], 64)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    if how == "hook":
        calls = []

        def oom_once(optimizer, args, kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (AdamW state)")

        opt.register_step_pre_hook(oom_once)
    else:
        monkeypatch.setenv("ASTCV_SIMULATE_OOM_IN_STEP", "1")
    x, y = torch.randn(4, 64, 128), torch.tensor([0, 1, 2, 3])
    micro = oom.MicroBatch(size=4, batch_size=4, rehearsal=oom.OomRehearsal.from_env())
    micro.rehearsal.arm(opt)
    with pytest.raises(oom.OptimizerOutOfMemory, match="optimizer step"):
        steps.train_one_epoch(model, [(x, y)], opt, scaler, torch.device("cpu"), None, micro)
    assert micro.size == 4 and micro.fallbacks == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ------------------------------------------------------------------ 6 + 7: predict.py


def test_predict_batches_windows_with_the_same_result(exported, tmp_path):
    from trainable.data.synth import WAV_KINDS, class_signal, write_clip

    path = tmp_path / "long.wav"
    write_clip(path, class_signal(9, 30.0, 16000, np.random.default_rng(0)), WAV_KINDS[1])  # 14 windows of 400
    model, frames, mean, std = predict.load_classifier(exported)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_values"].shape[0]),
                                           with_kwargs=True)
    batched = predict.predict_file(model, path, frames, mean, std, batch_size=4)
    assert seen and max(seen) <= 4 and sum(seen) >= 14
    seen.clear()
    whole = predict.predict_file(model, path, frames, mean, std, batch_size=64)
    hook.remove()
    assert seen == [sum(seen)]
    assert torch.allclose(batched, whole, atol=1e-6)


def test_predict_folder_reports_bad_files_and_goes_on(exported, tmp_path, capsys):
    from trainable.data.synth import WAV_KINDS, class_signal, write_clip

    folder = tmp_path / "clips"
    folder.mkdir()
    write_clip(folder / "a_good.wav", class_signal(1, 2.0, 16000, np.random.default_rng(1)), WAV_KINDS[0])
    (folder / "b_broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    write_clip(folder / "c_good.wav", class_signal(2, 2.0, 16000, np.random.default_rng(2)), WAV_KINDS[0])
    assert predict.main(["--model", str(exported), "--json", str(folder)]) == 1
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert [Path(r["file"]).name for r in results] == ["a_good.wav", "b_broken.wav", "c_good.wav"]
    assert "predictions" in results[0] and "predictions" in results[2]
    assert "error" in results[1] and "predictions" not in results[1]
    assert "b_broken.wav" in captured.err and "CSV" not in captured.err + results[1]["error"]


# ------------------------------------------------------------------ 8: --num-frames


def test_auto_frames_ignore_a_few_long_clips_and_say_which_are_cut(synth_root, tmp_path, caplog):
    from trainable.data.audio import auto_num_frames
    from trainable.data.synth import WAV_KINDS, class_signal, write_clip

    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    meta = pd.read_csv(_csv(data))
    long_name = meta.loc[0, "slice_file_name"]
    kind = WAV_KINDS[0]
    write_clip(data / "audio" / "fold1" / long_name, class_signal(0, 70.0, kind.sample_rate, np.random.default_rng(0)), kind)
    with caplog.at_level("WARNING"):
        frames = auto_num_frames(data, load_metadata(data))
    assert frames == 400
    assert f"fold1/{long_name}" in caplog.text and "70.0 s" in caplog.text


def test_num_frames_above_the_pretrained_1024_warns(synth_root, tiny_ast_1024, capsys):
    data, model = synth_root, tiny_ast_1024
    args = orchestrate.build_parser().parse_args(["--data-root", str(data), "--model", str(model), "--folds", "1", "2", "3",
                                                  "--num-frames", "2048", "--gpus", "0", "--storage-path", "/tmp/x"])
    from search_spaces import SPACES
    from trainable.run.prepare import make_plan

    make_plan(args, SPACES, 0)
    err = capsys.readouterr().err
    assert "2048" in err and "1024" in err and "warning" in err


# ------------------------------------------------------------------ 9: non-Ray resume after a kill mid-swap


def test_local_resume_survives_a_kill_between_the_checkpoint_renames(synth_root, tiny_ast_1024, tmp_path):
    from trainable.fit.local import main as train_main

    out = tmp_path / "run"
    args = ["--data-root", str(synth_root), "--model", str(tiny_ast_1024), "--folds", "1", "2", "3", "--test-fold", "1",
            "--num-frames", "64", "--num-workers", "0", "--lr", "1e-3", "--output", str(out)]
    args += ["--epochs", "2"]
    assert train_main(args) == 0
    (out / "last").rename(out / "last.old")  # killed after the old copy moved away, before the new one moved in
    shutil.copytree(out / "last.old", out / "last.tmp")
    assert train_main(args) == 0  # the same command again: resumes after epoch 2 (nothing left), not from scratch
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert json.loads((out / "last" / "trainer_state.json").read_text())["epoch"] == 2
    assert not (out / "last.old").exists() and not (out / "last.tmp").exists()


# ------------------------------------------------------------------ 10 + 11: the report


def _summary(**extra):
    base = {"per_fold": [{"fold": 1, "lr": 1e-3, "batch_size": 8, "epoch": 2, "val_accuracy": 0.5, "test_accuracy": 0.6}],
            "mean": 0.6, "std": None, "ci95": None, "complete": True, "configs": [], "comparisons": [],
            "best_config": {"lr": 1e-3, "batch_size": 8, "mean": 0.6, "std": None, "mean_val_accuracy": 0.5, "folds": [1]},
            "best_model": None, "best_model_dir": None, "optimistic": None, "per_class_accuracy": None,
            "confusion_matrix": None, "classes": [], "command": ["x"], "seed": 0, "git_commit": None, "versions": {}}
    return {**base, **extra}


def test_report_shows_the_refit_model_without_a_test_figure():
    refit = {"lr": 1e-3, "batch_size": 8, "epochs": 2, "folds": [1, 2, 3]}
    report = render_report(_summary(refit=refit, final_model_dir="/runs/x/final_model"))
    section = report.split("## Final model")[1]
    assert "every fold" in section and "/runs/x/final_model" in section and "no test accuracy" in section
    assert "%" not in section.split("\n\n## ")[0]


def test_best_config_test_figure_is_labelled_optimistic():
    report = render_report(_summary())
    line = next(line for line in report.splitlines() if line.startswith("Best config by mean"))
    assert "optimistic" in line


# ------------------------------------------------------------------ uncertainty


def test_ci95_is_the_t_interval_over_folds():
    from scipy import stats as st

    from trainable.results.stats import ci95

    acc = [0.70, 0.74, 0.68, 0.77, 0.72]
    lo, hi = ci95(acc)
    half = st.t.ppf(0.975, 4) * np.std(acc, ddof=1) / math.sqrt(5)
    assert (lo, hi) == pytest.approx((np.mean(acc) - half, np.mean(acc) + half))
    assert ci95([0.7]) is None


def test_corrected_resampled_t_test_by_hand():
    from scipy import stats as st

    from trainable.results.stats import corrected_paired_ttest

    chosen = [0.80, 0.78, 0.83, 0.79]
    other = [0.76, 0.77, 0.80, 0.75]
    d = np.subtract(other, chosen)
    ratio = 100 / 700  # test clips / training clips
    t = d.mean() / math.sqrt(np.var(d, ddof=1) * (1 / 4 + ratio))
    result = corrected_paired_ttest(other, chosen, ratio)
    assert result["mean_difference"] == pytest.approx(d.mean())
    assert result["t"] == pytest.approx(t)
    assert result["p_value"] == pytest.approx(2 * st.t.sf(abs(t), 3))
    naive = st.ttest_rel(other, chosen)
    assert result["p_value"] > naive.pvalue  # the correction widens the test: folds share training data
    same = corrected_paired_ttest(chosen, chosen, ratio)
    assert same["t"] == 0 and same["p_value"] == 1


def test_summary_carries_ci95_and_comparisons(tmp_path):
    exp = tmp_path / "exp"
    write_manifest(exp, base_config={"epochs": 1, "seed": 0, "folds": [1, 2, 3]},
                   grid={"test_fold": [1, 2, 3], "lr": [1e-3, 1e-4], "batch_size": [8]},
                   classes=["a", "b"], command=["x"], fold_sizes={"1": 100, "2": 100, "3": 100})
    for f, (good, bad) in {1: (0.8, 0.6), 2: (0.7, 0.65), 3: (0.9, 0.5)}.items():
        _fake_trial(exp, f, 1e-3, [good], [good], keep_epochs=(1,))
        _fake_trial(exp, f, 1e-4, [bad], [bad], keep_epochs=(1,))
    s = summarize(exp, export=False)
    from trainable.results.stats import ci95

    assert s["ci95_plain"] == pytest.approx(list(ci95([0.8, 0.7, 0.9])))
    assert s["ci95"] == pytest.approx(list(ci95([0.8, 0.7, 0.9], 1.0)))  # 3 folds: n_test / n_train = 100 / 100
    [c] = s["comparisons"]
    assert (c["lr"], c["batch_size"]) == (1e-4, 8) and c["mean_difference"] == pytest.approx(-0.65 / 3)
    assert c["test_train_ratio"] == pytest.approx(100 / 100)  # 3 folds: 1 test, 1 validation, 1 training fold
    report = (exp / "report.md").read_text()
    assert "95 % CI" in report and "corrected resampled t-test" in report and "p =" in report
