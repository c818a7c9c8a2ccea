"""Bad input gets one clear message each; faults lose no finished work; a real multi-node Ray cluster; safe loading."""

import json
import re
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

import orchestrate
from trainable.fit.checkpoint import checkpoint_problem, load_checkpoint, pick_restore_point
from trainable.data.audio import read_headers
from trainable.data.metadata import load_metadata
from trainable.errors import AstCvError
from trainable.faults import HOLD_AT_ENV, HOLD_MARK_ENV
from trainable.store.experiment import trial_dirname, write_manifest
from trainable.results.reduce import summarize

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def base_args(data_root, model, storage, name="run", *extra):
    return ["--data-root", str(data_root), "--model", str(model), "--folds", "1", "2", "3", "4", "--test-folds", "1",
            "--lrs", "1e-3", "--batch-sizes", "8", "--epochs", "1", "--num-frames", "400", "--num-workers", "0",
            "--gpus", "0", "--storage-path", str(storage), "--name", name, *extra]


def _csv(root):
    return root / "metadata" / "UrbanSound8K.csv"


def _edit(root, fn):
    meta = pd.read_csv(_csv(root))
    fn(meta).to_csv(_csv(root), index=False)


BAD_DATA = {
    "data root missing": (lambda r: shutil.rmtree(r), "does not exist or is not a folder"),
    "no metadata CSV": (lambda r: _csv(r).unlink(), "No metadata CSV"),
    "CSV column missing": (lambda r: _edit(r, lambda m: m.drop(columns=["fold"])), "lacks the column(s) fold"),
    "fold outside 1..10": (lambda r: _edit(r, lambda m: m.assign(fold=m["fold"].where(m.index != 0, 12))), "fold(s) [12]"),
    "classID/class mismatch": (lambda r: _edit(r, lambda m: m.assign(classID=m["classID"].where(m.index != 0, 5))), "disagree"),
    "path separator": (lambda r: _edit(r, lambda m: m.assign(slice_file_name=m["slice_file_name"].where(m.index != 0, "../../etc/passwd"))), "not plain"),
    "files missing": (lambda r: [p.unlink() for p in sorted((r / "audio" / "fold2").iterdir())[:3]], "3 files listed in the CSV are missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_clear_message(case, synth_root, tiny_ast_1024, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    damage, message = BAD_DATA[case]
    damage(data)
    rc = orchestrate.main(base_args(data, tiny_ast_1024, tmp_path / "runs"))
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2


BAD_FLAGS = {
    "--lrs 0": (["--lrs", "0"], "--lrs must be finite numbers > 0"),
    "--lrs negative": (["--lrs=-1e-5"], "--lrs must be finite numbers > 0"),
    "--batch-sizes 0": (["--batch-sizes", "0"], "batch_size must be >= 1"),
    "--epochs 0": (["--epochs", "0"], "epochs must be >= 1"),
    "unknown fold": (["--folds", "1", "2", "11"], "outside 1..10"),
    "fewer than 3 folds": (["--folds", "1", "2"], "at least 3"),
    "test fold not in use": (["--test-folds", "5"], "must be among --folds"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_are_one_clear_message(case, synth_root, tiny_ast_1024, tmp_path, capsys):
    extra, message = BAD_FLAGS[case]
    rc = orchestrate.main(base_args(synth_root, tiny_ast_1024, tmp_path) + extra)  # later flags win in argparse
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_model_folder_that_is_not_ast(synth_root, tmp_path, capsys):
    fake = tmp_path / "bert"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert orchestrate.main(base_args(synth_root, fake, tmp_path)) == 2
    assert "not an Audio Spectrogram Transformer" in capsys.readouterr().err


def test_storage_path_not_writable(synth_root, tiny_ast_1024, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert orchestrate.main(base_args(synth_root, tiny_ast_1024, blocker / "runs")) == 2
    err = capsys.readouterr().err
    assert "Cannot write to" in err and "--storage-path" in err


def test_debug_shows_the_traceback(tmp_path, tiny_ast_1024):
    with pytest.raises(AstCvError):
        orchestrate.main(base_args(tmp_path / "nope", tiny_ast_1024, tmp_path) + ["--debug"])


def _write_bad_clips(data: Path) -> dict[str, str]:
    meta = load_metadata(data)
    names = {int(f): n for f, n in zip(meta["fold"], meta["slice_file_name"])}
    bad = {}
    p = data / "audio" / "fold2" / names[2]
    sf.write(str(p), np.zeros(0), 16000, subtype="PCM_16")
    bad[f"fold2/{names[2]}"] = "no samples"
    p = data / "audio" / "fold3" / names[3]
    p.write_bytes(np.random.default_rng(0).bytes(3000))
    bad[f"fold3/{names[3]}"] = "unreadable"
    p = data / "audio" / "fold4" / names[4]
    sf.write(str(p), np.array([0.1, np.nan, np.inf] * 1000, dtype=np.float32), 16000, subtype="FLOAT")
    bad[f"fold4/{names[4]}"] = "NaN"
    p = data / "audio" / "fold1" / names[1]
    sf.write(str(p), np.zeros(16000), 16000, subtype="PCM_16")  # silence is a valid clip
    return bad


@pytest.mark.slow
def test_unusable_clips_are_left_out_and_reported(synth_root, demo_assets, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    bad = _write_bad_clips(data)
    headers = read_headers(data, load_metadata(data)).bad
    assert set(headers) == set(list(bad)[:2])  # the header check finds empty and corrupt files, not NaN samples
    rc = orchestrate.main(base_args(data, demo_assets[1], tmp_path / "runs"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "3 clip(s) cannot be used" in captured.err
    summary = json.loads((tmp_path / "runs" / "run" / "summary.json").read_text())
    assert sorted(summary["skipped_clips"]) == sorted(bad)
    assert "NaN" in summary["skipped_clips"][list(bad)[2]]
    assert sum(map(sum, summary["confusion_matrix"])) == 20  # fold 1's 20 clips, the silent one included
    assert "could not be read and were left out" in (tmp_path / "runs" / "run" / "report.md").read_text()


# ---------------------------------------------------------------- faults


def _rows(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _wait(predicate, proc, log, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, Path(log).read_text()
        time.sleep(0.1)
    pytest.fail("timed out:\n" + Path(log).read_text())


def _kill_worker_after_epoch_2(demo_assets, tmp_path, name, *extra, then=lambda trial: None):
    """Run orchestrate.py with the trial held after reporting epoch 2 (faults.hold_point: the driver has recorded
    epoch 2's result and checkpoint, and no later checkpoint exists); then call ``then(trial_dir)``, SIGKILL the worker,
    and wait for the run to finish (it must succeed). Returns (trial folder, log path)."""
    log, mark = tmp_path / "run.log", tmp_path / "held"
    env = {**ENV, HOLD_AT_ENV: "checkpoint_stored:2", HOLD_MARK_ENV: str(mark)}  # the 2nd report: epoch 2's
    proc = subprocess.Popen([sys.executable, "orchestrate.py", *base_args(*demo_assets, tmp_path, name, *extra)], cwd=ROOT,
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    trial = tmp_path / name / trial_dirname(1, 1e-3, 8)
    try:
        _wait(lambda: mark.is_file() and mark.read_text() and any(r.get("epoch") == 2 for r in _rows(trial)), proc, log)
        then(trial)
        os.kill(int(mark.read_text().split()[1]), signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return trial, log


@pytest.mark.slow
def test_killed_worker_is_retried_and_a_damaged_latest_checkpoint_falls_back_to_an_older_one(demo_assets, tmp_path):
    # The worker is killed after its epoch-2 checkpoint, which a kill in the middle of a write left damaged: the retry
    # must warn and fall back to epoch 1's checkpoint, not crash.
    damaged = []

    def damage(trial):
        for ckpt in trial.glob("checkpoint_*"):
            state = ckpt / "trainer_state.json"
            epoch = json.loads(state.read_text())["epoch"] if state.is_file() else None
            if epoch == 1:
                continue
            damaged.append(epoch)
            weights = ckpt / "model.safetensors"
            if weights.is_file():
                weights.write_bytes(weights.read_bytes()[:100])

    trial, log = _kill_worker_after_epoch_2(demo_assets, tmp_path, "damaged", "--epochs", "6", "--debug",
                                            "--keep-checkpoints", "all", then=damage)  # older checkpoints are kept
    output = log.read_text()
    assert damaged == [2] and "is damaged" in output, (damaged, output[-3000:])
    # on the console too (not only in the worker's log, which --debug shows): an epoch is trained again
    assert re.search(r"\] fold01\S*: warning: checkpoint \S*checkpoint_000001 is damaged", output), output[-3000:]
    rows = _rows(trial)
    pids = list(dict.fromkeys(r["pid"] for r in rows))
    assert len(pids) == 2, rows  # a second worker process finished the trial
    first, second = ([r["epoch"] for r in rows if r["pid"] == pid] for pid in pids)
    assert first == [1, 2] and second == list(range(2, 7)), (first, second)  # epoch 2 redone from epoch 1's checkpoint
    assert json.loads((tmp_path / "damaged" / "summary.json").read_text())["complete"]


def _checkpoint_dirs(tmp_path, synth_root, tiny):
    from trainable.config import TrainConfig
    from trainable.fit.train import fit

    saved = []

    def keep(metrics, ckpt):
        dst = tmp_path / f"checkpoint_{metrics['epoch']:06d}"
        shutil.copytree(ckpt, dst)
        saved.append(dst)

    fit(TrainConfig.from_dict(dict(data_root=str(synth_root), model=str(tiny), folds=(1, 2, 3, 4), test_fold=1,
                                   epochs=2, num_frames=400, num_workers=0)), keep)
    return saved


def test_restore_point_skips_damaged_checkpoints(synth_root, tiny_ast_1024, tmp_path):
    first, second = _checkpoint_dirs(tmp_path, synth_root, tiny_ast_1024)
    assert checkpoint_problem(second) is None
    (second / "training_state.pt").write_bytes(b"garbage")
    chosen, warnings = pick_restore_point([second, first])
    assert chosen == first and "damaged" in warnings[0]
    (first / "trainer_state.json").write_text("{trunc")
    assert pick_restore_point([second, first])[0] is None


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoints_never_unpickle_code(synth_root, tiny_ast_1024, tmp_path):
    (ckpt,) = _checkpoint_dirs(tmp_path, synth_root, tiny_ast_1024)[:1]  # epoch 1 of 2: a resume point
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(ckpt / "training_state.pt", "wb") as fh:
        pickle.dump({"optimizer": Payload()}, fh)
    assert "Unpickling" in checkpoint_problem(ckpt) or "weights_only" in checkpoint_problem(ckpt)
    from trainable.fit.model import load_model

    model = load_model(str(ckpt), [str(i) for i in range(10)])
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(ckpt, model, opt, torch.amp.GradScaler("cpu", enabled=False))
    assert not marker.exists()


def test_reducer_on_a_partial_experiment_lists_what_is_missing(tmp_path):
    exp = tmp_path / "partial"
    grid = {"test_fold": [1, 2, 3], "lr": [1e-3], "batch_size": [8]}
    write_manifest(exp, base_config={"epochs": 2, "seed": 0}, grid=grid, classes=["a", "b"], command=["x"])

    def trial(fold, epochs_done):
        d = exp / trial_dirname(fold, 1e-3, 8)
        d.mkdir()
        (d / "params.json").write_text(json.dumps({"test_fold": fold, "lr": 1e-3, "batch_size": 8}))
        rows = [{"epoch": e, "val_accuracy": 0.5 + 0.1 * e, "test_accuracy": 0.4 + 0.1 * e, "best_epoch": e,
                 "test_confusion": json.dumps([[e, 1], [0, 2]])} for e in range(1, epochs_done + 1)]
        (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 3, "val_ac')

    trial(1, 2)  # finished (a half-written last line is ignored)
    trial(2, 1)  # interrupted; fold 3 never started
    s = summarize(exp)
    assert not s["complete"] and s["trials_finished"] == 1 and s["trials_expected"] == 3
    assert [(u["test_fold"], u["epochs_done"]) for u in s["unfinished"]] == [(2, 1), (3, 0)]
    assert [p["fold"] for p in s["per_fold"]] == [1] and s["per_fold"][0]["test_accuracy"] == pytest.approx(0.6)
    assert s["std"] is None and s["best_model_dir"] is None
    report = (exp / "report.md").read_text()
    assert "Partial experiment: 1 of 3 trials finished" in report and "fold03_lr1e-03_bs8 (0 epochs)" in report


# ---------------------------------------------------------------- a real multi-node cluster


@pytest.mark.slow
def test_a_run_without_address_starts_a_ray_of_its_own_beside_a_running_one(demo_assets, tmp_path, monkeypatch):
    # Ray's init joins the newest Ray on the machine (a 'ray start', a second experiment) when given no address, and
    # then refuses the resources planned for this machine. Without --address or RAY_ADDRESS a run starts its own.
    import ray
    from ray.cluster_utils import Cluster

    from search_spaces import SPACES
    from trainable.run.prepare import make_plan
    from trainable.run.tuner import ray_init_args

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = orchestrate.build_parser().parse_args(base_args(*demo_assets, tmp_path, "local"))
    plan = make_plan(args, SPACES, 0)[0]
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")  # what 'ray job submit' gives a job: the cluster to join
    assert orchestrate.build_parser().parse_args(base_args(*demo_assets, tmp_path)).address == "10.1.2.3:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        ray.init(**ray_init_args(plan, debug=False))
        try:
            assert ray.get_runtime_context().gcs_address != cluster.address
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()


def test_a_cluster_that_refuses_us_is_named_apart_from_no_cluster():
    """ray.init says only 'Failed to connect to Ray cluster' both when a cluster's token authentication refuses this
    machine (measured: a head started with RAY_AUTH_MODE=token, joined with a wrong token or with auth disabled) and
    when nothing listens; the first now names the token, the second the address and 'ray start --head'."""
    import socket

    from trainable.run.cluster import connect_problem

    failed = ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379.")
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        refused = connect_problem(address, failed)
    closed = connect_problem(address, failed)  # the port was just released: nothing answers
    assert "answers but refused" in refused and "RAY_AUTH_MODE=token" in refused and "RAY_AUTH_TOKEN" in refused
    assert "nothing answers there" in closed and "ray start --head" in closed and "token" not in closed
    assert "Failed to connect" in connect_problem("auto", failed) and "\n" not in refused + closed
