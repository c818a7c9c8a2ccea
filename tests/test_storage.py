"""Storage at the users' scale (issue 17): what a trial keeps, full disks, the lock, URI storage, the non-Ray best/."""

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
from conftest import moto_server
import torch
from safetensors.torch import load_file
from transformers import ASTForAudioClassification

from trainable.fit.checkpoint import SIMULATE_DISK_FULL_ENV, TrainerState, save_checkpoint, snapshot_weights
from trainable.config import TrainConfig
from trainable.errors import AstCvError
from trainable.store.experiment import trial_dirname
from trainable.store.footprint import Footprint
from trainable.store.lock import LOCK, ExperimentLock
from trainable.results.reduce import summarize
from trainable.store.storage import StorageFull, is_disk_full
from trainable.fit.train import fit

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(data_root, model, **kw):
    values = dict(data_root=str(data_root), model=str(model), folds=(1, 2, 3, 4), test_fold=2, lr=1e-3, batch_size=8,
                  epochs=3, num_frames=400, num_workers=0)
    return TrainConfig.from_dict({**values, **kw})


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---------------------------------------------------------------- what a trial keeps


def test_a_finished_trial_keeps_half_precision_best_weights_and_no_optimizer_state(synth_root, tiny_ast_1024, tmp_path):
    latest, seen = tmp_path / "latest", []

    def keep_latest(metrics, ckpt):  # as Ray does with num_to_keep=1
        seen.append(sorted(p.name for p in ckpt.iterdir()))
        shutil.rmtree(latest, ignore_errors=True)
        shutil.copytree(ckpt, latest)

    state = fit(tiny_config(synth_root, tiny_ast_1024), keep_latest)
    assert seen[0] == seen[1] == ["best", "config.json", "model.safetensors", "preprocessor_config.json",
                                  "trainer_state.json", "training_state.pt"]  # a running trial can resume
    assert seen[2] == ["best", "trainer_state.json"]  # a finished one keeps its best weights only
    assert json.loads((latest / "best" / "best_epoch.json").read_text())["epoch"] == state.best_epoch
    floating = [t for t in load_file(latest / "best" / "model.safetensors").values() if t.is_floating_point()]
    assert floating and all(t.dtype == torch.float16 for t in floating)
    assert ASTForAudioClassification.from_pretrained(latest / "best").dtype == torch.float32  # loads as float32
    reports = []
    again = fit(tiny_config(synth_root, tiny_ast_1024), lambda m, c: reports.append(m), restore_dir=latest)
    assert reports == [] and again.epoch == 3  # a finished trial's checkpoint: nothing left to do


def test_keep_all_keeps_the_resume_point_of_every_epoch(synth_root, tiny_ast_1024, tmp_path):
    seen = []
    fit(tiny_config(synth_root, tiny_ast_1024, epochs=2, keep_checkpoints="all"),
        lambda m, c: seen.append((c / "training_state.pt").is_file()))
    assert seen == [True, True]


def test_a_finished_ast_base_trial_holds_under_0_45_gb_as_estimated(tmp_path):
    from trainable.fit.model import ast_base_config, count_parameters

    config = ast_base_config(max_length=400, num_labels=10)
    model = ASTForAudioClassification(config)
    state = TrainerState(epoch=5, best_epoch=3, best_val_accuracy=0.8, config={"epochs": 5})
    out = save_checkpoint(tmp_path / "final", model, None, None, state, 400, snapshot_weights(model), resumable=False)
    size = folder_bytes(out)
    assert size < 0.45e9 and not (out / "training_state.pt").exists()
    config.save_pretrained(tmp_path / "cfg")
    params = count_parameters(str(tmp_path / "cfg"), 10, 400)
    assert params == sum(p.numel() for p in model.parameters())
    assert size == pytest.approx(Footprint(params, 1, 1, 5, "best").best_bytes, rel=0.02)


# ---------------------------------------------------------------- full disks


def test_disk_full_at_the_checkpoint_write_leaks_no_temporary_folder(synth_root, tiny_ast_1024, tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv(SIMULATE_DISK_FULL_ENV, "2")
    reports = []
    with pytest.raises(OSError) as raised:
        fit(tiny_config(synth_root, tiny_ast_1024), lambda m, c: reports.append(m["epoch"]))
    assert is_disk_full(raised.value) and reports == [1]
    assert list(tmp.iterdir()) == []


def test_storage_full_reaches_the_driver_through_rays_error_text():
    exc = StorageFull("/runs/x", "a checkpoint could not be saved")
    assert "/runs/x is full" in str(exc) and "run the same command again" in str(exc)
    assert str(pickle.loads(pickle.dumps(exc))) == str(exc)
    text = "ray::ImplicitFunc.train()\n" + "".join(traceback.format_exception(exc))
    assert str(StorageFull.from_error_text(text, "/elsewhere")) == str(exc)
    plain = StorageFull.from_error_text("OSError: [Errno 28] No space left on device", "/runs/y")
    assert plain is not None and plain.path == "/runs/y"
    assert StorageFull.from_error_text("ValueError: nothing to do with disks", "/runs/y") is None


def _orchestrate(demo_assets, storage, name, *extra):
    """orchestrate.main in this process (Ray starts and stops in it); its exit status."""
    import orchestrate

    data, model = demo_assets
    return orchestrate.main(["--data-root", str(data), "--model", str(model), "--folds", "1", "2", "3", "--test-folds",
                             "1", "--lrs", "1e-3", "--batch-sizes", "8", "--epochs", "3", "--num-workers", "0", "--gpus",
                             "0", "--storage-path", str(storage), "--name", name, *extra])


def _epochs(trial: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (trial / "result.json").read_text().splitlines() if line.strip()]


def _one_error_line(err: str) -> str:
    """The stop's message: the last line, the only error (progress lines before it, such as the cache's, are not)."""
    assert "Traceback" not in err and err.count("error:") == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "run the same command again" in last, err
    return last


@pytest.mark.slow
def test_injected_disk_full_stops_in_one_line_and_the_rerun_finishes(demo_assets, tmp_path, capsys, monkeypatch):
    tmp = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))  # short: Ray's socket paths live under TMPDIR
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setenv(SIMULATE_DISK_FULL_ENV, "2")
    try:
        assert _orchestrate(demo_assets, tmp_path, "full") == 2
        captured = capsys.readouterr()
        assert "is full" in _one_error_line(captured.err) and "Traceback" not in captured.out
        assert not list(tmp.glob("astcv-*"))  # no temporary checkpoint left behind (Ray keeps its session in ray/)
        monkeypatch.delenv(SIMULATE_DISK_FULL_ENV)
        assert _orchestrate(demo_assets, tmp_path, "full") == 0, capsys.readouterr().err
        assert "Resuming" in capsys.readouterr().out
        assert _epochs(tmp_path / "full" / trial_dirname(1, 1e-3, 8)) == [1, 2, 3]  # epoch 1 was not redone
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MB filesystem (tmpfs), mounted when the tests run as root."""
    path = tmp_path / "small"
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


@pytest.mark.slow
def test_a_real_full_disk_stops_the_run_keeps_finished_trials_and_the_rerun_completes(demo_assets, small_disk, capsys):
    args = ("--test-folds", "1", "2", "--epochs", "2", "--cpus-per-trial", "2", "--keep-checkpoints", "all",
            "--no-space-check")
    assert _orchestrate(demo_assets, small_disk, "exp", *args) == 2
    assert f"{small_disk}/exp is full" in _one_error_line(capsys.readouterr().err)
    exp = small_disk / "exp"
    finished = {d.name: {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file() and p.suffix != ".csv"}
                for d in exp.glob("fold*") if (d / "result.json").is_file() and 2 in _epochs(d)}
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    assert _orchestrate(demo_assets, small_disk, "exp", *args) == 0, capsys.readouterr().err
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["complete"] and summary["trials_finished"] == 2
    for name, files in finished.items():  # finished trials were neither rerun nor damaged
        for rel, data in files.items():
            if rel.name != "params.json" and not rel.name.startswith("events."):
                assert (exp / name / rel).read_bytes() == data, f"{name}/{rel} changed"


def test_reducer_reads_the_grid_point_when_params_json_is_unreadable(tmp_path):
    from fakes import fake_experiment, fake_trial

    exp = fake_experiment(tmp_path / "exp")
    row = {"epoch": 1, "val_accuracy": 0.5}
    fake_trial(exp, 1, [{**row, "test_accuracy": 0.2}])
    fake_trial(exp, 2, [{**row, "test_accuracy": 0.4, "config": {"test_fold": 2, "lr": 1e-3, "batch_size": 8}}],
               params="")  # left at 0 bytes by a sync on a full disk: the rows carry the config
    fake_trial(exp, 3, [{**row, "test_accuracy": 0.6}], params=None)  # nothing but the folder's name
    s = summarize(exp)
    assert s["complete"] and [p["fold"] for p in s["per_fold"]] == [1, 2, 3]


# ---------------------------------------------------------------- the lock

def _write_lock(folder: Path, host: str, age_s: float, pid: int = 4242) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK).write_text(json.dumps({"pid": pid, "host": host, "started": "2026-11-28T10:00:00",
                                           "command": ["orchestrate.py", "--gpus", "1"], "refreshed": time.time() - age_s}))


def test_a_reconnect_from_another_host_takes_over_once_the_lock_has_not_changed(tmp_path, caplog):
    _write_lock(tmp_path, "colab-vm-that-went-away", age_s=10)  # its age on the holder's clock does not count
    with caplog.at_level("WARNING"):
        with ExperimentLock(tmp_path, stale_s=0.5):
            assert json.loads((tmp_path / LOCK).read_text())["host"] == socket.gethostname()
    assert "colab-vm-that-went-away" in caplog.text and "did not refresh it for 0 s watched on this machine" in caplog.text
    assert not (tmp_path / LOCK).exists()


def test_an_empty_lock_follows_the_same_staleness_rule(tmp_path, caplog):
    (tmp_path / LOCK).write_text("")
    with caplog.at_level("WARNING"), ExperimentLock(tmp_path, stale_s=0.5):
        pass
    assert "empty or garbled" in caplog.text


def test_the_holder_refreshes_its_lock(tmp_path):
    with ExperimentLock(tmp_path, refresh_s=0.1):
        first = json.loads((tmp_path / LOCK).read_text())["refreshed"]
        deadline = time.monotonic() + 60  # a loaded machine may delay the refresh thread; it must come
        while json.loads((tmp_path / LOCK).read_text())["refreshed"] == first:
            assert time.monotonic() < deadline, "the lock was not refreshed"
            time.sleep(0.05)


# ---------------------------------------------------------------- URI storage


def _uri_args(demo_assets, storage, *extra):
    data, model = demo_assets
    return ["--data-root", str(data), "--model", str(model), "--folds", "1", "2", "3", "--lrs", "1e-3",
            "--batch-sizes", "8", "--epochs", "1", "--num-workers", "0", "--gpus", "0", "--storage-path", storage,
            "--name", "uri", *extra]


@pytest.mark.slow
def test_s3_storage_resumes_without_retraining_and_reports_into_the_bucket(demo_assets, s3, tmp_path, capsys):
    import orchestrate
    from trainable.store.storage import Store

    args = _uri_args(demo_assets, s3, "--test-folds", "1")
    assert orchestrate.main(args) == 0, capsys.readouterr().err
    store = Store.open(f"{s3}/uri")
    trial = trial_dirname(1, 1e-3, 8)
    before = store.read_text(f"{trial}/result.json")
    [last] = [d for d in store.list_dirs(trial) if d.startswith("checkpoint_")]
    with tempfile.TemporaryDirectory() as copy:  # as an interrupted run leaves it: an older checkpoint beside the last,
        store.download(f"{trial}/{last}", copy)  # here a full (float32) one of the best epoch, which the export prefers
        store.put_dir(copy, f"{trial}/checkpoint_000007")
    for name in ("config.json", "model.safetensors"):
        store.write_bytes(f"{trial}/{last}/{name}", store.read_bytes(f"{trial}/{last}/best/{name}"))
    capsys.readouterr()
    assert orchestrate.main(args) == 0  # the same command again: nothing to train, no Ray
    out = capsys.readouterr().out
    assert "is complete (" in out and "Resuming" not in out and " epoch 1/1" not in out
    assert store.read_text(f"{trial}/result.json") == before
    assert [d for d in store.list_dirs(trial) if d.startswith("checkpoint_")] == ["checkpoint_000007"]  # review of B3
    # removed before the export, which must not name the deleted folder (it did: second review of B3)
    assert json.loads(store.read_text("best_model/astcv_source.json"))["checkpoint"].endswith("checkpoint_000007/best")
    summary = json.loads(store.read_text("summary.json"), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert summary["complete"] and summary["best_model_dir"] == f"{s3}/uri/best_model"
    assert "Nested cross-validation" in store.read_text("report.md") and store.is_file("plots/fold_accuracy.png")
    model = store.download("best_model", tmp_path / "best_model")
    assert ASTForAudioClassification.from_pretrained(model).dtype == torch.float32
    assert orchestrate.main(["--report-only", f"{s3}/uri"]) == 0
    assert orchestrate.main(["--resume", "--storage-path", s3, "--name", "uri", "--gpus", "0"]) == 0


@pytest.mark.slow
def test_file_uri_storage_resumes_and_test_folds_can_grow(demo_assets, tmp_path, capsys):
    import orchestrate

    storage = f"file://{tmp_path}/runs"
    assert orchestrate.main(_uri_args(demo_assets, storage, "--test-folds", "1")) == 0, capsys.readouterr().err
    exp = tmp_path / "runs" / "uri"
    first = (exp / trial_dirname(1, 1e-3, 8) / "result.json").read_bytes()
    capsys.readouterr()
    assert orchestrate.main(_uri_args(demo_assets, storage, "--test-folds", "1", "2")) == 0
    out = capsys.readouterr().out
    assert "Adding test fold(s) 2" in out and "fold02_lr1e-03_bs8 epoch 1/1" in out
    assert "fold01_lr1e-03_bs8 epoch" not in out  # fold 1 was not trained again
    assert (exp / trial_dirname(1, 1e-3, 8) / "result.json").read_bytes() == first
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["complete"] and [p["fold"] for p in summary["per_fold"]] == [1, 2]


# ---------------------------------------------------------------- the non-Ray runner


def test_local_best_is_repaired_after_a_kill_between_last_and_best(synth_root, tiny_ast_1024, tmp_path):
    from trainable.fit.local import main as train_main

    out = tmp_path / "run"
    args = ["--data-root", str(synth_root), "--model", str(tiny_ast_1024), "--folds", "1", "2", "3", "--test-fold", "1",
            "--num-frames", "64", "--num-workers", "0", "--lr", "1e-3", "--epochs", "2", "--output", str(out)]
    assert train_main(args) == 0
    held = json.loads((out / "last" / "best" / "best_epoch.json").read_text())["epoch"]
    shutil.rmtree(out / "best")  # killed after last/ was replaced, before best/ was written
    assert train_main(args) == 0
    assert json.loads((out / "best" / "best_epoch.json").read_text())["epoch"] == held
    (out / "best" / "best_epoch.json").write_text(json.dumps({"epoch": 99}))  # best/ of another epoch than last/ says
    assert train_main(args) == 0
    assert json.loads((out / "best" / "best_epoch.json").read_text())["epoch"] == held
    assert ASTForAudioClassification.from_pretrained(out / "best").config.num_labels == 10


def test_preflight_refuses_in_one_line_when_the_disk_is_too_small(tmp_path):
    from trainable.store.footprint import Need, check_space

    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(AstCvError, match=f"Not enough disk space: {tmp_path} has") as refused:
        check_space([Need(str(tmp_path), 2 * free, "checkpoints")], override=False)
    assert "--no-space-check" in str(refused.value) and "\n" not in str(refused.value)
    assert check_space([Need(str(tmp_path), 2 * free, "checkpoints")], override=True)[0].startswith("warning: Not enough")
    (tmp_path / "cache").mkdir()
    halves = [Need(str(tmp_path), int(0.6 * free), "checkpoints"), Need(str(tmp_path / "cache"), int(0.6 * free), "feature cache")]
    assert check_space(halves[:1], override=False) == []
    with pytest.raises(AstCvError, match="checkpoints .* \\+ feature cache"):  # one filesystem: the needs add up
        check_space(halves, override=False)


def test_footprint_of_the_grid_at_ast_base_size():
    fp = Footprint(params=85_625_098, trials_left=40, at_once=1, epochs=5, keep="best")
    assert fp.resume_bytes == pytest.approx(1.03e9, rel=0.02) and fp.best_bytes == pytest.approx(0.171e9, rel=0.02)
    assert 6.9e9 < fp.end_bytes < 7.5e9 and fp.end_bytes < fp.peak_bytes < 10e9  # the bound: 10 GB
    assert Footprint(85_625_098, 40, 1, 5, "all").end_bytes > 90e9  # every epoch's full checkpoint


@pytest.fixture
def s3_with_auth(monkeypatch):
    """moto's S3 server checking credentials (after its first 4 requests, which make the bucket and a user allowed
    everything); the AWS variables hold that user's keys. Yields (bucket URI, server port)."""
    boto3 = pytest.importorskip("boto3")
    with moto_server(monkeypatch, INITIAL_NO_AUTH_ACTION_COUNT="4") as port:
        boto3.client("s3").create_bucket(Bucket="astcv-auth")
        iam = boto3.client("iam")
        iam.create_user(UserName="runner")
        key = iam.create_access_key(UserName="runner")["AccessKey"]
        iam.put_user_policy(UserName="runner", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        yield "s3://astcv-auth/runs", port


@pytest.mark.slow
def test_s3_errors_are_one_line_each_in_a_run_and_in_report_only(synth_root, tiny_ast_1024, s3_with_auth, capsys,
                                                                 monkeypatch):
    """A missing bucket, wrong credentials, an unreachable endpoint: one line each saying what to fix (were
    tracebacks), before any trial and in --report-only."""
    import orchestrate
    from trainable.store.storage import Store

    uri, port = s3_with_auth
    Store.open(uri).check_writable()  # the right keys work
    cases = {
        "the bucket does not exist": ("s3://astcv-missing/runs", {}),
        "access denied": (uri, {"AWS_SECRET_ACCESS_KEY": "wrong"}),
        "the endpoint cannot be reached": (uri, {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}"}),
    }
    for what, (storage, env) in cases.items():
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            for argv in (_uri_args((synth_root, tiny_ast_1024), storage, "--num-frames", "400"),
                         ["--report-only", f"{storage}/uri"]):
                assert orchestrate.main(argv) == 2, (what, argv[0])
                out, err = capsys.readouterr()
                lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
                assert len(lines) == 1 and lines[0].startswith("error: Storage") and what in lines[0], (argv[0], err)
                assert "Running" not in out and "Traceback" not in err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
