"""A resumed trial equals an uninterrupted one (issue 23 item 10): stopped at an epoch boundary or in the middle of
an epoch (its progress lost), then resumed from the last checkpoint, every epoch reports the same metrics (<= 1e-6).

With loader workers (persistent, as trials run) and dropout: the data order, the global RNGs and the workers' seeds
all have to be functions of (seed, epoch) for this to hold (``trainable.fit.rng``).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainable.config import TrainConfig
from trainable.faults import KILL_AT_ENV, KILL_MARK_ENV
from trainable.fit.model import build_tiny_ast
from trainable.fit.oom import SIMULATE_OOM_ENV
from trainable.fit.train import fit
from trainable.store.experiment import EPOCH

COMPARED = ("train_loss", "val_loss", "val_accuracy", "test_loss", "test_accuracy", "best_epoch", "micro_batch_size",
            "oom_fallbacks")
TOL = 1e-6
ROOT = Path(__file__).resolve().parent.parent


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def tiny_dropout_model(tmp_path_factory):
    """A tiny AST with dropout: its training depends on the RNG state."""
    return build_tiny_ast(tmp_path_factory.mktemp("tiny-dropout-exact"), max_length=400, dropout=0.2)


def exact_config(data_root, model, **kw) -> TrainConfig:
    values = dict(data_root=str(data_root), model=str(model), folds=(1, 2, 3), test_fold=2, lr=1e-3, batch_size=4,
                  epochs=3, num_frames=128, num_workers=2, max_steps_per_epoch=3, torch_threads=1)
    values.update(kw)
    return TrainConfig.from_dict(values)


class Recorder:
    """Reporter keeping every epoch's metrics and a copy of epoch ``keep``'s checkpoint."""

    def __init__(self, keep_dir=None, keep: int = 1, stop_after: int | None = None):
        self.rows, self.keep_dir, self.keep, self.stop_after = [], keep_dir, keep, stop_after

    def __call__(self, metrics, ckpt):
        self.rows.append({k: metrics[k] for k in (EPOCH, *COMPARED)})
        if self.keep_dir is not None and metrics[EPOCH] == self.keep:
            shutil.copytree(ckpt, self.keep_dir)
        if metrics[EPOCH] == self.stop_after:
            raise Interrupt


def stop_at_forward(n: int):
    """A global forward hook (torch's own) that interrupts training at its ``n``-th training forward pass (a
    micro-batch): the epoch's progress is lost, and the RNGs, optimizer and loaders of the process have moved on."""
    calls = []

    def hook(module, args, output):
        if module.training and type(module).__name__ == "ASTForAudioClassification":
            calls.append(1)
            if len(calls) == n:
                raise Interrupt

    return torch.nn.modules.module.register_module_forward_hook(hook)


def assert_same_epochs(resumed, full):
    assert [r[EPOCH] for r in resumed] == [r[EPOCH] for r in full]
    for a, b in zip(resumed, full):
        for key in COMPARED:
            assert abs(a[key] - b[key]) <= TOL, f"epoch {a[EPOCH]} {key}: resumed {a[key]} != uninterrupted {b[key]}"


@pytest.mark.slow  # five short fits with loader workers: ~10-20 s on 2 shared cores
def test_resumed_fit_equals_uninterrupted_at_a_boundary_and_mid_epoch(synth_root, tiny_dropout_model, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv(SIMULATE_OOM_ENV, "2")  # the micro-batch controller halves 4 -> 2 in epoch 1 and must stay so
    config = exact_config(synth_root, tiny_dropout_model)
    full = Recorder()
    fit(config, full)
    assert len({r["train_loss"] for r in full.rows}) == 3  # it trains (the comparison is not of constants)
    assert [(r["micro_batch_size"], r["oom_fallbacks"]) for r in full.rows] == [(2, 1)] * 3

    at_boundary = Recorder(tmp_path / "boundary", stop_after=1)
    with pytest.raises(Interrupt):
        fit(config, at_boundary)
    mid_epoch = Recorder(tmp_path / "mid-epoch")
    handle = stop_at_forward(2 * config.max_steps_per_epoch + 3)  # epoch 2, step 2 (2 micro-batches a step)
    try:
        with pytest.raises(Interrupt):
            fit(config, mid_epoch)
    finally:
        handle.remove()
    assert [r[EPOCH] for r in mid_epoch.rows] == [1]  # epoch 2 was interrupted before its report

    for part in (at_boundary, mid_epoch):  # resumed in this process: what ran before in it must not matter
        resumed = Recorder()
        fit(config, resumed, restore_dir=part.keep_dir)
        assert_same_epochs(part.rows + resumed.rows, full.rows)


# ---------------------------------------------------------------- under Ray, killed with SIGKILL

# Test-only startup hook for the run's Python processes (on PYTHONPATH as sitecustomize): once the AST model code is
# imported, a global forward hook (torch's own) counts training forward passes; at the Nth it writes a marker file and
# freezes the process, so the test's SIGKILL lands at a known step, mid-epoch.
FREEZE_HOOK = '''
import os, sys, threading, time
AT, MARK = int(os.environ["ASTCV_TEST_FREEZE_AT"]), os.environ["ASTCV_TEST_FREEZE_MARK"]
AST = "transformers.models.audio_spectrogram_transformer.modeling_audio_spectrogram_transformer"

def _arm():
    while AST not in sys.modules:
        time.sleep(0.02)
    import torch
    calls = []

    def hook(module, args, output):
        if module.training and type(module).__name__ == "ASTForAudioClassification":
            calls.append(1)
            if len(calls) == AT:
                open(MARK, "w").write(str(os.getpid()))
                while True:
                    time.sleep(1)

    torch.nn.modules.module.register_module_forward_hook(hook)

threading.Thread(target=_arm, daemon=True).start()
'''


def orchestrate_args(demo_assets, storage, steps):
    data_root, model = demo_assets
    return ["--data-root", str(data_root), "--model", str(model), "--folds", "1", "2", "3", "4", "--test-folds", "1",
            "--lrs", "1e-3", "--batch-sizes", "8", "--epochs", "3", "--max-steps-per-epoch", str(steps),
            "--num-frames", "400", "--num-workers", "2", "--gpus", "0", "--storage-path", str(storage), "--name", "exp"]


def start_run(args, log, env):
    return subprocess.Popen([sys.executable, "orchestrate.py", *args], cwd=ROOT, env=env, stdout=open(log, "a"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # its own process group, killed whole


def wait_for(predicate, proc, log, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := predicate():
            return value
        assert proc.poll() is None, Path(log).read_text()[-5000:]
        time.sleep(0.1)
    pytest.fail("timed out:\n" + Path(log).read_text()[-5000:])


def kill_group(proc):
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started, as a crashed runtime
    proc.wait()


def epoch_rows(exp: Path) -> dict[str, dict[int, dict]]:
    """Each trial's rows by epoch as the reducer reads them: result.json (a resumed trial's holds the redone epochs
    again: the last one counts), completed from the newest checkpoint's history where a kill cost Ray's buffered
    line of an epoch whose checkpoint was stored (the next run then finds the trial finished)."""
    from trainable.store.experiment import parse_rows, rows_from_checkpoint
    from trainable.store.storage import Store

    store, out = Store.of(exp), {}
    for result in exp.glob("*/result.json"):
        rows = rows_from_checkpoint(store, result.parent.name, parse_rows(result.read_text()))
        out[result.parent.name] = {r[EPOCH]: r for r in rows}
    return out


@pytest.mark.slow
def test_ray_trial_killed_mid_epoch_then_at_an_epoch_boundary_resumes_exactly(demo_assets, tmp_path):
    steps = 3
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    reference = tmp_path / "uninterrupted"
    done = subprocess.run([sys.executable, "orchestrate.py", *orchestrate_args(demo_assets, reference, steps)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    storage, log = tmp_path / "killed", tmp_path / "killed.log"
    args = orchestrate_args(demo_assets, storage, steps)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(FREEZE_HOOK)
    mark = tmp_path / "frozen"
    frozen = {**env, "PYTHONPATH": os.pathsep.join([str(hooks), env.get("PYTHONPATH", "")]),
              "ASTCV_TEST_FREEZE_AT": str(steps + 2), "ASTCV_TEST_FREEZE_MARK": str(mark)}
    proc = start_run(args, log, frozen)  # 1: killed mid-epoch 2 (after its second step)
    try:
        wait_for(mark.is_file, proc, log)
    finally:
        kill_group(proc)
    assert {e for t in epoch_rows(storage / "exp").values() for e in t} == {1}

    # 2: resumes (epoch 2 redone from epoch 1's checkpoint); killed, the driver with it, at the epoch boundary: right
    # after epoch 2's checkpoint is on storage, before the driver has registered it (faults.kill_point)
    fired = tmp_path / "fired"
    boundary = subprocess.run([sys.executable, "orchestrate.py", *args, "--resume"], cwd=ROOT, capture_output=True,
                              text=True, timeout=400, start_new_session=True,
                              env={**env, KILL_AT_ENV: "checkpoint_stored", KILL_MARK_ENV: str(fired)})
    assert boundary.returncode == -signal.SIGKILL and fired.is_file(), boundary.stdout[-3000:] + boundary.stderr[-3000:]
    assert {e for t in epoch_rows(storage / "exp").values() for e in t} == {1, 2}

    finish = subprocess.run([sys.executable, "orchestrate.py", *args, "--resume"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=400)  # 3: resumes from epoch 2, finishes
    assert finish.returncode == 0, finish.stdout[-3000:] + finish.stderr[-3000:]
    assert " epoch 3/3" in finish.stdout and " epoch 2/3" not in finish.stdout, "epoch 2 was redone:\n" + finish.stdout

    expected, got = epoch_rows(reference / "exp"), epoch_rows(storage / "exp")
    assert got.keys() == expected.keys() and len(got) == 1
    for trial, rows in expected.items():
        assert sorted(got[trial]) == sorted(rows) == [1, 2, 3]
        assert_same_epochs([got[trial][e] for e in (1, 2, 3)], [rows[e] for e in (1, 2, 3)])
    a, b = (json.loads((s / "exp" / "summary.json").read_text()) for s in (reference, storage))
    assert b["complete"]
    assert b["confusion_matrix"] == a["confusion_matrix"]
    assert len(b["per_fold"]) == len(a["per_fold"]) == 1
    for x, y in zip(b["per_fold"], a["per_fold"]):
        assert x.keys() == y.keys()
        for key in x:
            same = abs(x[key] - y[key]) <= TOL if isinstance(x[key], float) else x[key] == y[key]
            assert same, f"summary per_fold {key}: resumed {x[key]} != uninterrupted {y[key]}"
