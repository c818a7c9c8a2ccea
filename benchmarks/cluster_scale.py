#!/usr/bin/env python
"""The driver at hundreds of trials (issue 24): Ray Tune's experiment snapshot and the driver's memory on a real
multi-node Ray with fake GPUs, through the project's own Tuner path, with trials that only report.

    python benchmarks/cluster_scale.py --trials 40 400 --timeout-s 3600 --json benchmarks/results/cluster_scale_cpu.json

For each trial count: a Ray cluster of its own on this machine (``ray start``: a head with 0 CPUs and NODES workers of
NODE_CPUS CPUs and NODE_GPUS fake GPUs, each in a session of its own (setsid) with its own --temp-dir and ports,
stopped by killing those process groups only), then a driver process of its own that builds the Plan as orchestrate.py
does (``make_plan`` from orchestrate's own parser: the card's 10 folds x 2 lrs x 2 batch sizes, ``--test-folds`` and
``--grid seed=...`` for other counts), joins the cluster (``cluster_session``: the plan settled on its nodes, 1 fake GPU
+ 1 CPU per trial, 8 at once), holds the experiment's lock, writes the manifest and calls ``run_experiment`` with
``quick_trial``: EPOCHS epochs of EPOCH_S s, each reporting a real trial's keys with a checkpoint of a few kB
(``num_to_keep`` as the real run sets it). The disk preflight and the nodes' feature caches are left out (they check
disk and data, not the driver; the node check would refuse the fake GPUs).

Measured in the driver: its RSS (psutil, every 0.25 s) just before ``run_experiment`` and at its peak; the wall time of
``run_experiment``; every experiment-state save, timed by wrapping Ray's own functions in the driver process (Ray
2.60's private API, a benchmark only): ``TuneController.save_to_dir`` (the snapshot serialized into the driver's staging
folder), ``TuneController.checkpoint`` calls that saved (what the driver's loop waited: the serialization, plus the
previous upload when the save is forced, as ``num_to_keep=1`` forces one after every checkpoint), and the background
upload of the staging folder to the experiment folder (``_upload_to_fs_path``: what Ray's 30 s slow-snapshot warning
times); Ray's slow-snapshot warnings are counted. Afterwards: the ``experiment_state-*.json`` size, result.json sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NODES, NODE_CPUS, NODE_GPUS = 4, 2, 2
EPOCHS, EPOCH_S = 5, 0.1
OBJECT_STORE_BYTES = 100 * 2**20  # per node: the trials pass nothing through it
SAMPLE_S = 0.25


# --- pure parts ------------------------------------------------------------------------------------------------------

def grid_flags(trials: int) -> list[str]:
    """orchestrate.py flags for a grid of exactly ``trials`` trials: test folds x the card's 2 lrs x 2 batch sizes (up
    to 40), then x seeds (``--grid seed=0,1,...``) for multiples of 40."""
    per = trials // 4
    if trials < 4 or trials % 4 or (per > 10 and per % 10):
        raise ValueError(f"--trials {trials}: give a multiple of 4 up to 40, or a multiple of 40")
    folds, seeds = (per, 1) if per <= 10 else (10, per // 10)
    flags = ["--test-folds", *map(str, range(1, folds + 1))]
    return flags + (["--grid", "seed=" + ",".join(map(str, range(seeds)))] if seeds > 1 else [])


def summary(values: list[float]) -> dict[str, float | int | None]:
    """count, total, median, p95 (nearest rank) and max of durations in seconds."""
    if not values:
        return {"count": 0, "total_s": 0.0, "median_s": None, "p95_s": None, "max_s": None}
    ordered = sorted(values)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    return {"count": len(values), "total_s": round(sum(values), 4), "median_s": round(statistics.median(values), 4),
            "p95_s": round(p95, 4), "max_s": round(ordered[-1], 4)}


def per_extra_trial(small: dict, large: dict) -> dict[str, float]:
    """What each trial beyond the smaller grid added: snapshot bytes, driver peak RSS (kB), its growth during the run."""
    extra = large["trials"] - small["trials"]
    grow = lambda r: r["driver"]["rss_peak_mb"] - r["driver"]["rss_before_run_mb"]  # noqa: E731
    return {"from_trials": small["trials"], "to_trials": large["trials"],
            "snapshot_bytes": round((large["snapshot"]["bytes"] - small["snapshot"]["bytes"]) / extra, 1),
            "driver_peak_kb": round((large["driver"]["rss_peak_mb"] - small["driver"]["rss_peak_mb"]) * 1024 / extra, 1),
            "driver_growth_kb": round((grow(large) - grow(small)) * 1024 / extra, 1),
            "saves": round((large["saves"]["count"] - small["saves"]["count"]) / extra, 2)}


def fmt(v, unit="") -> str:
    return "-" if v is None else f"{v:g}{unit}" if isinstance(v, int) else f"{v:.3g}{unit}"


def table(runs: list[dict]) -> str:
    """The figures of each run, one row each (markdown)."""
    head = ("| trials | wall | snapshot | per trial | driver RSS start -> peak | saves | save_to_dir med / p95 / max | "
            "loop waited med / p95 / max | upload med / p95 / max | slow warnings | result.json |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        s, d, w, u, c = r["snapshot"], r["driver"], r["saves"], r["uploads"], r["checkpoint_calls"]
        trio = lambda x: f"{fmt(x['median_s'])} / {fmt(x['p95_s'])} / {fmt(x['max_s'])} s"  # noqa: E731
        lines.append(f"| {r['trials']} | {r['wall_s']:.0f} s | {s['bytes'] / 1e6:.2f} MB | {s['bytes_per_trial'] / 1e3:.1f} kB "
                     f"| {d['rss_before_run_mb']:.0f} -> {d['rss_peak_mb']:.0f} MB | {w['count']} | {trio(w)} | {trio(c)} "
                     f"| {trio(u)} | {r['slow_snapshot_warnings']} | {r['result_json']['median_bytes'] / 1e3:.1f} kB |")
    return "\n".join(lines)


# --- the trial -------------------------------------------------------------------------------------------------------

def quick_trial(trial_config, base, exp_dir="", board=None):
    """``tune_trial``'s signature: EPOCHS epochs of EPOCH_S s, each reported with the keys a real trial reports
    (``fit.train.epoch_metrics``, the start-up, the placement; a 10-class confusion matrix of a real test fold's counts)
    and a checkpoint of trainer_state.json (its growing history and config, as the real one) and best/best_epoch.json."""
    import random
    import tempfile as tmp

    import ray
    from ray import tune

    rng, rows = random.Random(str(sorted(trial_config.items()))), []
    placement = {"node_id": ray.get_runtime_context().get_node_id(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    startup = {"reused_worker": False, "worker_s": 3.0, "imports_s": 0.4, "data_s": 0.03, "model_s": 2.0, "loaders_s": 0.01,
               "first_step_s": 6.0}
    for epoch in range(1, EPOCHS + 1):
        began = time.perf_counter()
        time.sleep(EPOCH_S)
        acc = rng.uniform(0.6, 0.9)
        confusion = [[rng.randint(60, 99) if i == j else rng.randint(0, 6) for j in range(10)] for i in range(10)]
        row = {"epoch": epoch, "train_loss": rng.random(), "val_loss": rng.random(), "val_accuracy": acc,
               "selection_score": acc - 1e-9 * epoch, "test_loss": rng.random(), "test_accuracy": rng.uniform(0.6, 0.9),
               "micro_batch_size": trial_config["batch_size"], "grad_accum_steps": 1, "samples_per_second": rng.uniform(300, 400),
               "best_epoch": epoch, "best_val_accuracy": acc, "best_test_accuracy": acc, "oom_fallbacks": 0,
               "test_confusion": json.dumps(confusion), "epoch_seconds": time.perf_counter() - began,
               "setup_seconds": 8.0, "startup": startup}
        rows.append(row)
        with tmp.TemporaryDirectory() as ckpt:
            state = {"epoch": epoch, "micro_batch_size": trial_config["batch_size"], "oom_fallbacks": 0, "best_epoch": epoch,
                     "best_val_accuracy": acc, "best_test_accuracy": acc, "history": rows, "config": {**base, **trial_config}}
            Path(ckpt, "trainer_state.json").write_text(json.dumps(state, indent=1))
            Path(ckpt, "best").mkdir()
            Path(ckpt, "best", "best_epoch.json").write_text(json.dumps({"epoch": epoch, "dtype": "float16"}))
            tune.report({**row, **placement}, checkpoint=tune.Checkpoint.from_directory(ckpt))


# --- the driver (a process of its own per trial count) ---------------------------------------------------------------

def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class Sampler(threading.Thread):
    """The driver's peak RSS, sampled every SAMPLE_S until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.samples, self.halt = rss_mb(), 0, threading.Event()

    def run(self):
        while not self.halt.wait(SAMPLE_S):
            self.peak, self.samples = max(self.peak, rss_mb()), self.samples + 1


def instrument() -> dict[str, list]:
    """Time Ray's experiment-state saves in this process (see the module's docstring); the lists fill as Tune runs."""
    import logging

    import ray.train._internal.storage as storage
    from ray.tune.execution.tune_controller import TuneController

    found: dict[str, list] = {"save_to_dir": [], "checkpoint": [], "upload": [], "slow_warnings": []}
    save, checkpoint, upload = TuneController.save_to_dir, TuneController.checkpoint, storage._upload_to_fs_path

    def timed_save(self):
        t = time.perf_counter()
        save(self)
        found["save_to_dir"].append(time.perf_counter() - t)

    def timed_checkpoint(self, *a, **kw):
        before, t = len(found["save_to_dir"]), time.perf_counter()
        checkpoint(self, *a, **kw)
        if len(found["save_to_dir"]) > before:
            found["checkpoint"].append(time.perf_counter() - t)

    def timed_upload(local_path, *a, **kw):
        t = time.perf_counter()
        upload(local_path, *a, **kw)
        if str(local_path).rstrip("/").endswith("driver_artifacts"):  # the experiment's folder, not a trial's artifact
            found["upload"].append(time.perf_counter() - t)

    class Count(logging.Handler):
        def emit(self, record):
            if str(record.msg).startswith("Saving the experiment state"):
                found["slow_warnings"].append(record.getMessage()[:200])

    TuneController.save_to_dir, TuneController.checkpoint = timed_save, timed_checkpoint
    storage._upload_to_fs_path = timed_upload
    logging.getLogger("ray.tune.execution.experiment_state").addHandler(Count())
    return found


def drive(spec: dict) -> dict:
    """The driver: the Plan from orchestrate's parser, joined to the cluster, ``run_experiment`` with ``quick_trial``."""
    from contextlib import ExitStack

    import orchestrate
    from search_spaces import SPACES
    from trainable.run.prepare import make_plan
    from trainable.run.tuner import cluster_session, run_experiment

    rss_start = rss_mb()
    args = orchestrate.build_parser().parse_args(spec["argv"])
    plan, _, _ = make_plan(args, SPACES, 0, None)
    assert plan.trials == spec["trials"], (plan.trials, spec["trials"])
    found = instrument()
    orchestrate.ensure_writable(Path(plan.exp_dir))
    with ExitStack() as held:
        orchestrate.hold_lock(held, Path(plan.exp_dir), 0)
        with cluster_session(plan, False) as plan:
            orchestrate.record(plan, args)
            before, sampler = rss_mb(), Sampler()
            sampler.start()
            began = time.perf_counter()
            outcome = run_experiment(plan, False, args.max_failures, trial=quick_trial)
            wall = time.perf_counter() - began
            sampler.halt.set()
            sampler.join()
    return {"trials": plan.trials, "exp_dir": plan.exp_dir, "wall_s": round(wall, 2), "failed": outcome.failed,
            "interrupted": outcome.interrupted, "slots": plan.resources.cluster_slots,
            "per_trial": {"cpu": plan.resources.cpus_per_trial, "gpu": plan.resources.gpus_per_trial},
            "driver": {"rss_after_imports_mb": round(rss_start, 1), "rss_before_run_mb": round(before, 1),
                       "rss_peak_mb": round(max(sampler.peak, rss_mb()), 1), "rss_end_mb": round(rss_mb(), 1),
                       "samples": sampler.samples},
            "saves": summary(found["save_to_dir"]), "checkpoint_calls": summary(found["checkpoint"]),
            "uploads": summary(found["upload"]), "slow_snapshot_warnings": len(found["slow_warnings"]),
            "slow_snapshot_warning_texts": found["slow_warnings"][:3]}


# --- the cluster -----------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    return [a for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                           "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")
            for a in (flag, str(free_port()))]


class Cluster:
    """A head with 0 CPUs and ``nodes`` workers of NODE_CPUS CPUs + NODE_GPUS fake GPUs, each ``ray start --block`` in
    a session (process group) of its own under ``base``; ``stop`` kills those groups, nothing else."""

    def __init__(self, base: Path, nodes: int = NODES):
        self.base, self.nodes, self.procs = base, nodes, []
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    def _start(self, name: str, args: list[str]) -> None:
        temp = self.base / name
        temp.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}  # trials: shipped code only
        env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--temp-dir", str(temp),
               "--disable-usage-stats", "--object-store-memory", str(OBJECT_STORE_BYTES), *node_ports(), *args]
        with open(self.base / "nodes.log", "ab") as log:
            self.procs.append(subprocess.Popen(cmd, cwd=temp, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))
        (self.base / "pgids.txt").write_text("".join(f"{p.pid}\n" for p in self.procs))

    def start(self, timeout_s: float) -> None:
        self._start("h", ["--head", "--port", str(self.port), "--num-cpus", "0", "--num-gpus", "0",
                          "--include-dashboard", "false", "--ray-client-server-port", str(free_port())])
        for i in range(self.nodes):
            self._start(f"w{i}", ["--address", self.address, "--num-cpus", str(NODE_CPUS), "--num-gpus", str(NODE_GPUS)])
        code = ("import ray, sys, time; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
                "while sum(n['Alive'] for n in ray.nodes()) < int(sys.argv[2]): time.sleep(0.5)")
        subprocess.run([sys.executable, "-c", code, self.address, str(self.nodes + 1)], check=True, timeout=timeout_s,
                       env={**os.environ, "RAY_AUTH_MODE": "disabled"}, stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        self.procs = []


def files_of(exp: Path) -> dict:
    """The experiment folder's snapshot and result.json sizes, its trials' rows and its total size."""
    snaps = sorted(exp.glob("experiment_state-*.json"))
    results = sorted(exp.glob("fold*/result.json"))
    sizes = [p.stat().st_size for p in results]
    rows = [len(p.read_text().splitlines()) for p in results]
    total = sum(p.stat().st_size for p in exp.rglob("*") if p.is_file())
    return {"snapshot": {"files": len(snaps), "bytes": sum(p.stat().st_size for p in snaps)},
            "result_json": {"files": len(results), "median_bytes": statistics.median(sizes) if sizes else 0,
                            "total_bytes": sum(sizes), "rows_min": min(rows, default=0), "rows_max": max(rows, default=0)},
            "experiment_folder_bytes": total}


def measure(trials: int, work: Path, data: Path, model: Path, timeout_s: float) -> dict:
    """One trial count: a cluster of its own, a driver of its own (``--drive``), then the folder's files."""
    cluster = Cluster(Path(tempfile.mkdtemp(prefix=f"cs{trials}-", dir="/tmp")))  # short: Ray's socket paths
    print(f"[{trials} trials] cluster under {cluster.base} (process groups in pgids.txt)", flush=True)
    try:
        cluster.start(timeout_s)
        argv = ["--data-root", str(data), "--model", str(model), "--num-frames", "400", "--epochs", str(EPOCHS),
                "--num-workers", "0", "--no-cache", "--address", cluster.address, "--cpus-per-trial", "1",
                "--storage-path", str(work / "runs"), "--name", f"scale{trials}", *grid_flags(trials)]
        spec, out = work / f"spec{trials}.json", work / f"driver{trials}.json"
        spec.write_text(json.dumps({"trials": trials, "argv": argv, "out": str(out)}))
        log = work / f"driver{trials}.log"
        with open(log, "w") as f:
            done = subprocess.run([sys.executable, __file__, "--drive", str(spec)], timeout=timeout_s, cwd=ROOT,
                                  stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if done.returncode != 0:
            raise SystemExit(f"the driver of {trials} trials failed (exit status {done.returncode}):\n"
                             + log.read_text()[-4000:])
        result = json.loads(out.read_text())
    finally:
        cluster.stop()
        shutil.rmtree(cluster.base, ignore_errors=True)  # its session logs; the driver's log stays in the work folder
    files = files_of(Path(result["exp_dir"]))
    files["snapshot"]["bytes_per_trial"] = round(files["snapshot"]["bytes"] / trials, 1)
    return {**result, **files, "nodes": f"head 0 CPU + {NODES} x ({NODE_CPUS} CPU + {NODE_GPUS} fake GPU)",
            "argv": argv}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, nargs="+", default=[40, 400], help="trial counts, each a run of its own")
    p.add_argument("--timeout-s", type=float, default=3600, help="limit of each step (the cluster's start, each run)")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--work", default=None, help="keep the experiments here (default: a temporary folder, removed)")
    p.add_argument("--drive", default=None, help=argparse.SUPPRESS)  # internal: run the driver of one spec
    args = p.parse_args(argv)
    if args.drive:
        spec = json.loads(Path(args.drive).read_text())
        Path(spec["out"]).write_text(json.dumps(drive(spec)))
        return 0
    for n in args.trials:
        grid_flags(n)  # refuse a count the grid cannot make before anything starts
    with tempfile.TemporaryDirectory(prefix="astcv-scale-") as tmp:
        work = Path(args.work).resolve() if args.work else Path(tmp)
        data, model = make_inputs(work)
        runs = [measure(n, work, data, model, args.timeout_s) for n in args.trials]
    result = {"command": " ".join(["python", "benchmarks/cluster_scale.py", *(argv or sys.argv[1:])]),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray_version()},
              "epochs": EPOCHS, "epoch_s": EPOCH_S, "runs": runs,
              "per_extra_trial": per_extra_trial(runs[0], runs[-1]) if len(runs) > 1 else None}
    print(table(runs))
    if result["per_extra_trial"]:
        print("per extra trial:", json.dumps(result["per_extra_trial"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if all(r["failed"] == 0 and not r["interrupted"] for r in runs) else 1


def make_inputs(work: Path) -> tuple[Path, Path]:
    """A generated dataset with the card's 10 folds (one clip per class and fold) and a tiny AST: make_plan reads them;
    the quick trials do not."""
    from trainable.data.synth import generate
    from trainable.fit.model import build_tiny_ast

    if not (work / "data" / "metadata").is_dir():
        generate(work / "data", clips_per_class=1, folds=range(1, 11), seed=0)
    if not (work / "model" / "config.json").is_file():
        build_tiny_ast(work / "model")
    return work / "data", work / "model"


def ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


if __name__ == "__main__":
    raise SystemExit(main())
