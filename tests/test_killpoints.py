"""The kill-point sweep (issue 23): the orchestrator (the driver) is SIGKILLed at a named moment, right after a kind of
file is written (trainable/faults.py, armed by environment variables only); the same command, run again, finishes with
the summary an uninterrupted run writes.

A run costs 25-50 s here (Ray's start and a trial's start dominate), so the suite runs one chain that holds the
moments that broke experiments for good: on S3 (moto's server), a one-fold experiment killed in the checkpoint window
(Ray deleted the previous checkpoint, its snapshot still names it: issue 23 item 1), grown to two folds and killed
before the new folds' Tuner starts (item 5), its experiment snapshots cut short, killed again after the new
fold's first checkpoint (the grown Tuner's snapshot, the newest, holds only the new fold: the finished fold must not
be trained again), then finished. ASTCV_KILL_SWEEP=1 runs every moment, chained, on local storage and on S3 (8.8
minutes measured on 2 busy cores: 62 s for the uninterrupted run, 222 s local, 241 s S3; 524 s for the three tests
with the default chain, once a resumed trial no longer redid epochs).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainable.faults import KILL_AT_ENV, KILL_MARK_ENV, fired
from trainable.store.storage import Store

ROOT = Path(__file__).resolve().parent.parent
FULL = os.environ.get("ASTCV_KILL_SWEEP") == "1"
RUN_TIMEOUT_S = 600
# Every moment, in the order a run reaches them (each re-run is killed at a later one, so the chain moves on).
TRAINING_MOMENTS = ["manifest", "params.json", "snapshot", "best", "checkpoint_stored", "result.json", "checkpoint",
                    "checkpoint:2", "reducer", "export", "best_model", "summary"]


def command(demo_assets, storage: str, name: str, test_folds: tuple[int, ...] = (1, 2)) -> list[str]:
    data, model = demo_assets
    return [sys.executable, "orchestrate.py", "--data-root", str(data), "--model", str(model), "--folds", "1", "2", "3",
            "--test-folds", *map(str, test_folds), "--lrs", "1e-3", "--batch-sizes", "8", "--epochs", "2",
            "--num-workers", "0", "--gpus", "0", "--storage-path", storage, "--name", name]


def run(cmd: list[str], log: Path, **env: str) -> int:
    """The command in a session of its own (a kill of its group never reaches pytest); its exit status. Whatever of
    its group outlives it (Ray's processes after a SIGKILL of the driver) is killed too."""
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=RUN_TIMEOUT_S)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def kill_at(cmd: list[str], moment: str, tmp: Path, may_finish: bool = False) -> bool:
    """Run ``cmd`` with a kill armed at ``moment``; it must die of it there. ``may_finish``: it may instead finish
    (exit status 0) before it reaches the moment (the experiment had no more of it left); whether it was killed."""
    mark = tmp / f"fired-{moment.replace(':', '-')}-{time.monotonic_ns()}"
    log = tmp / "runs.log"
    with open(log, "a") as out:
        out.write(f"\n===== kill at {moment}: {' '.join(cmd[1:])}\n")
    rc = run(cmd, log, **{KILL_AT_ENV: moment, KILL_MARK_ENV: str(mark)})
    if may_finish and rc == 0 and fired(mark) is None:
        return False
    assert rc == -signal.SIGKILL and fired(mark) == re.split("[:@]", moment)[0], (
        f"the run was to be killed at {moment} (exit status {rc}):\n{log.read_text()[-4000:]}")
    return True


def finish(cmd: list[str], tmp: Path, tries: int = 3) -> int:
    """Re-run ``cmd`` until it exits 0 (at most ``tries`` times); how many runs it took."""
    log = tmp / "runs.log"
    for n in range(1, tries + 1):
        with open(log, "a") as out:
            out.write(f"\n===== re-run {n}\n")
        if run(cmd, log) == 0:
            return n
    pytest.fail(f"the same command did not finish in {tries} runs:\n{log.read_text()[-6000:]}")


def numbers(location: str) -> dict:
    """What the summary says: per fold (accuracy, epoch, config), the mean, whether complete and exported."""
    summary = json.loads(Store.open(location).read_text("summary.json"))
    return {"per_fold": [(p["fold"], p["test_accuracy"], p["epoch"], p["lr"], p["batch_size"]) for p in summary["per_fold"]],
            "mean": summary["mean"], "complete": summary["complete"], "exported": summary["best_model_dir"] is not None}


@pytest.fixture(scope="module")
def uninterrupted(demo_assets, tmp_path_factory):
    """The summary of the grid run without a kill (local storage; the numbers do not depend on the storage)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    assert run(command(demo_assets, str(tmp), "base"), tmp / "run.log") == 0, (tmp / "run.log").read_text()
    found = numbers(str(tmp / "base"))
    assert found["complete"] and found["exported"] and [f for f, *_ in found["per_fold"]] == [1, 2]
    return found


@pytest.mark.slow
def test_killed_in_the_checkpoint_window_and_during_growth_the_same_command_finishes_equal(demo_assets, uninterrupted,
                                                                                            s3, tmp_path):
    grow = command(demo_assets, s3, "chain")
    one_fold = command(demo_assets, s3, "chain", test_folds=(1,))
    kill_at(one_fold, "checkpoint:2", tmp_path)  # epoch 2's checkpoint registered, epoch 1's deleted, no new snapshot
    kill_at(grow, "growth", tmp_path)  # fold 1 restored and finished; fold 2 recorded, its Tuner not started
    # every experiment snapshot cut short (a driver killed while copying it to storage): every re-run failed
    # (KeyError: 'test_fold'); they are set aside, nothing is restored, fold 1 (finished) is kept and fold 2 starts
    store = Store.open(f"{s3}/chain")
    snapshots = [n for n in store.list_files() if n.startswith("experiment_state-")]
    for name in snapshots:
        store.write_bytes(name, store.read_bytes(name)[:200])
    # fold 2's Tuner started (its snapshot, the newest, holds fold 2 only) and killed after its first checkpoint: the
    # re-run restores fold 2 and must not train the finished fold 1 again (it did: review of issue 23)
    kill_at(grow, "checkpoint_stored@fold02", tmp_path)
    assert finish(grow, tmp_path) == 1
    last_run = (tmp_path / "runs.log").read_text().rsplit("===== re-run", 1)[1]
    # fold 2 continues from its epoch-1 checkpoint, stored before the kill, whether or not Ray's snapshot names it
    # (it was trained again from scratch when the snapshot did not: review B3)
    assert " epoch 2/2" in last_run and not re.search(r"fold01\S* epoch|fold02\S* epoch 1/2", last_run), last_run[-4000:]
    assert all(f"{n} is damaged" in (tmp_path / "runs.log").read_text() and store.is_file(f"{n}.damaged")
               for n in snapshots)
    assert numbers(f"{s3}/chain") == uninterrupted


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="the whole sweep takes ~9 min: ASTCV_KILL_SWEEP=1")
@pytest.mark.parametrize("where", ["local", "s3"])
def test_every_kill_point_then_the_same_command_finishes_equal(where, demo_assets, uninterrupted, request, tmp_path):
    storage = request.getfixturevalue("s3") if where == "s3" else str(tmp_path / "runs")
    sweeps = 0
    cmd = command(demo_assets, storage, "sweep0")
    for moment in TRAINING_MOMENTS:
        # a resumed trial redoes no epoch, so an experiment can finish before the chain's later moments: it must then
        # equal the uninterrupted run, and the chain goes on with a new experiment, killed at that moment
        if not kill_at(cmd, moment, tmp_path, may_finish=True):
            assert numbers(f"{storage}/sweep{sweeps}") == uninterrupted
            sweeps += 1
            cmd = command(demo_assets, storage, f"sweep{sweeps}")
            kill_at(cmd, moment, tmp_path)
    assert finish(cmd, tmp_path) <= 2
    assert numbers(f"{storage}/sweep{sweeps}") == uninterrupted
    grow, one_fold = command(demo_assets, storage, "grow"), command(demo_assets, storage, "grow", test_folds=(1,))
    assert finish(one_fold, tmp_path) == 1
    kill_at(grow, "manifest", tmp_path)  # the grown grid recorded
    kill_at(grow, "growth", tmp_path)
    assert finish(grow, tmp_path) == 1
    assert numbers(f"{storage}/grow") == uninterrupted
