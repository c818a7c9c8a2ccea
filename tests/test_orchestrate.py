"""End-to-end runs of the real Ray Tune on CPU: tiny AST, generated data."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from transformers import ASTForAudioClassification

import orchestrate
from search_spaces import SPACES
from trainable.faults import HOLD_AT_ENV, HOLD_MARK_ENV
from trainable.store.experiment import trial_dirname

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_search_spaces_are_plain_grids_over_config_fields():
    from trainable.config import TrainConfig

    card = SPACES["card"]
    assert card["test_fold"] == {"grid_search": list(range(1, 11))}
    assert card["lr"] == {"grid_search": [1e-5, 5e-5]} and card["batch_size"] == {"grid_search": [8, 16]}
    for space in SPACES.values():
        assert set(space) <= set(TrainConfig.__dataclass_fields__)


def test_trial_folder_names_are_readable():
    assert trial_dirname(3, 5e-5, 16) == "fold03_lr5e-05_bs16"
    assert trial_dirname(10, 2.5e-5, 8) == "fold10_lr2.5e-05_bs8"


def run_args(demo_assets, storage, name, *extra):
    data_root, model = demo_assets
    return ["--data-root", str(data_root), "--model", str(model), "--folds", "1", "2", "3", "4",
            "--epochs", "2", "--num-frames", "400", "--num-workers", "0", "--gpus", "0",
            "--storage-path", str(storage), "--name", name, *extra]


def _check_nested_summary(s, exp, names):
    """summary.json's numbers recomputed from the trials' own rows."""
    for key in ("per_fold", "mean", "std", "ci95", "configs", "comparisons", "best_config", "optimistic", "best_model",
                "best_model_dir", "command", "config", "seed", "versions", "git_commit"):
        assert key in s
    assert s["complete"] and s["trials_finished"] == 4
    accs = [p["test_accuracy"] for p in s["per_fold"]]
    assert [p["fold"] for p in s["per_fold"]] == [1, 2]
    assert s["mean"] == pytest.approx(np.mean(accs)) and s["std"] == pytest.approx(np.std(accs, ddof=1))
    assert s["ci95"][0] <= s["ci95_plain"][0] <= s["mean"] <= s["ci95_plain"][1] <= s["ci95"][1]  # corrected: wider
    for c in s["configs"]:
        vals = list(c["test_accuracy"].values())
        assert c["mean"] == pytest.approx(np.mean(vals)) and c["std"] == pytest.approx(np.std(vals, ddof=1))
    best = max(s["configs"], key=lambda c: c["mean_val_accuracy"])
    assert (s["best_config"]["lr"], s["best_config"]["batch_size"]) == (best["lr"], best["batch_size"])
    [comp] = s["comparisons"]
    assert comp["lr"] != best["lr"] and comp["folds"] == 2
    # Nested selection: each fold's pick has the highest validation accuracy among that fold's trials.
    rows = [json.loads(l) for n in names for l in (exp / n / "result.json").read_text().splitlines()]
    for p in s["per_fold"]:
        fold_rows = [r for r in rows if r["config"]["test_fold"] == p["fold"]]
        assert p["val_accuracy"] == max(r["val_accuracy"] for r in fold_rows)
    assert sum(map(sum, s["confusion_matrix"])) == 2 * 40  # two test folds of 40 clips
    assert s["versions"]["ray"] and s["config"]["epochs"] == 2


def _check_refit(s, exp):
    epochs = sorted(s["configs"], key=lambda c: -c["mean_val_accuracy"])[0]["best_epoch"].values()
    assert s["refit"]["epochs"] == int(np.ceil(np.median(list(epochs)))) and s["refit"]["folds"] == [1, 2, 3, 4]
    final = ASTForAudioClassification.from_pretrained(exp / "final_model")
    assert final.config.max_length == 400 and final.config.num_labels == 10
    assert json.loads((exp / "final_model" / "preprocessor_config.json").read_text())["max_length"] == 400
    assert "## Final model (refit on all folds)" in (exp / "report.md").read_text()


def test_cross_validation_end_to_end(demo_assets, tmp_path, capsys):
    rc = orchestrate.main(run_args(demo_assets, tmp_path, "e2e", "--test-folds", "1", "2", "--lrs", "1e-3", "3e-4",
                                   "--batch-sizes", "8", "--refit"))
    assert rc == 0
    out = capsys.readouterr().out
    assert "Test accuracy (nested CV over 2 folds)" in out and "95 % CI" in out
    exp = tmp_path / "e2e"
    names = {trial_dirname(f, lr, 8) for f in (1, 2) for lr in (1e-3, 3e-4)}
    assert names <= {p.name for p in exp.iterdir() if p.is_dir()}
    for name in names:
        assert list((exp / name).glob("events.out.tfevents.*")), f"no TensorBoard events in {name}"
        assert list((exp / name).glob("checkpoint_*"))
    s = json.loads((exp / "summary.json").read_text())
    _check_nested_summary(s, exp, names)
    _check_refit(s, exp)
    for f in ("report.md", "per_trial.csv"):
        assert (exp / f).is_file()
    report = (exp / "report.md").read_text()
    assert "Nested cross-validation test accuracy" in report and "corrected resampled t-test" in report
    for plot in ("fold_accuracy", "learning_curves", "confusion_matrix", "per_class_accuracy"):
        rel = s["plots"][plot]
        assert (exp / rel).is_file() and (exp / rel).stat().st_size > 10_000
        assert f"]({rel})" in report

    from transformers import pipeline

    clf = pipeline("audio-classification", model=s["best_model_dir"])
    pred = clf(np.zeros(16000, dtype=np.float32), top_k=3)
    assert len(pred) == 3 and pred[0]["label"] in s["classes"]
    assert orchestrate.main(["--report-only", str(exp)]) == 0
    assert json.loads((exp / "summary.json").read_text())["per_fold"] == s["per_fold"]


def _finished(trial_dir: Path, epochs: int) -> bool:
    result = trial_dir / "result.json"
    if not result.is_file():
        return False
    lines = [json.loads(l) for l in result.read_text().splitlines() if l.strip()]
    return any(r.get("epoch") == epochs for r in lines)


def test_sigkill_then_resume_finishes_without_rerunning_finished_trials(demo_assets, tmp_path):
    args = run_args(demo_assets, tmp_path, "killed", "--test-folds", "1", "2", "--lrs", "1e-3", "--batch-sizes", "8",
                    "--cpus-per-trial", "2")  # 2 epochs
    exp = tmp_path / "killed"
    names = [trial_dirname(f, 1e-3, 8) for f in (1, 2)]
    mark = tmp_path / "held"
    # Fold 2's trial waits after its first checkpoint (faults.hold_point), so the kill finds fold 1 finished and
    # fold 2 half done (its epoch 1 recorded by the driver) however fast or slow the machine is.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           HOLD_AT_ENV: f"checkpoint_stored:1@{names[1]}", HOLD_MARK_ENV: str(mark)}
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, "orchestrate.py", *args], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            done = [n for n in names if _finished(exp / n, 2)]
            if mark.is_file() and mark.read_text() and done == names[:1] and _finished(exp / names[1], 1):
                break
            assert proc.poll() is None, (tmp_path / "first.log").read_text()
            time.sleep(0.2)
        else:
            pytest.fail("fold 2 never held after its first checkpoint:\n" + (tmp_path / "first.log").read_text())
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started, as a crashed runtime
        proc.wait()
    started = names[1:]
    finished_before = {n: (exp / n / "result.json").read_bytes() for n in done}
    time.sleep(1)

    env = {k: v for k, v in env.items() if k not in (HOLD_AT_ENV, HOLD_MARK_ENV)}
    second = subprocess.run([sys.executable, "orchestrate.py", *args, "--resume"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Resuming" in second.stdout
    s = json.loads((exp / "summary.json").read_text())
    assert s["complete"] and s["trials_finished"] == 2
    for n, content in finished_before.items():
        assert (exp / n / "result.json").read_bytes() == content, f"{n} ran again"
        assert f"{n} epoch" not in second.stdout
    for n in started:
        epochs = [json.loads(l)["epoch"] for l in (exp / n / "result.json").read_text().splitlines()]
        assert epochs[-1] == 2 and epochs.count(1) == 1, f"{n} restarted from scratch: {epochs}"


def test_gpus_without_cuda_is_a_clear_error(demo_assets, tmp_path, capsys):
    args = run_args(demo_assets, tmp_path, "nogpu")
    args[args.index("--gpus") + 1] = "1"
    assert orchestrate.main(args) == 2
    err = capsys.readouterr().err
    assert "torch sees 0 CUDA device" in err and "--gpus 0" in err


def test_resume_without_experiment_and_changed_settings_are_clear_errors(demo_assets, tmp_path, capsys):
    assert orchestrate.main(run_args(demo_assets, tmp_path, "none", "--resume")) == 2
    assert "no experiment to resume" in capsys.readouterr().err
    from trainable.store.experiment import write_manifest

    write_manifest(tmp_path / "other", base_config={"epochs": 9}, grid={"test_fold": [1]})
    assert orchestrate.main(run_args(demo_assets, tmp_path, "other")) == 2
    assert "was started with other settings: --epochs (recorded 9, now 2)" in capsys.readouterr().err
