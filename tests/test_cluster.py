"""A Ray cluster (--address): resources and the trials run at once read from its nodes, the code shipped, a preflight
on each node (a GPU node without CUDA refused in one line) that builds the node's feature cache, a cluster experiment
held to its cluster. The slow test runs a real multi-node cluster: a head with no CPUs and two worker nodes with fake
GPUs, started from another folder, without PYTHONPATH and (as root) in a mount namespace where the project's folder
and a folder of the driver's are empty tmpfs, so the trials can only import the code Ray shipped and each worker has a
disk of its own there; the grid that completes keeps its experiment on S3 (moto's server)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import orchestrate
from conftest import moto_server
from trainable.errors import AstCvError
from trainable.run.cluster import NodeProblem, Node, check_resume_address, no_cuda, nodes_of, settle_resources
from trainable.run.preflight import agreed_exclusions
from trainable.run.plan import Plan, Resources
from trainable.store.experiment import MANIFEST
from trainable.store.storage import Store

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from cluster_scale import free_port, node_ports  # noqa: E402  (the benchmark's cluster starts its nodes the same way)


def _auto(address="10.0.0.1:6379", cpus=1.0, gpus=0.0, auto_cpus=True):
    return Resources(cpus, gpus, None, address, auto_gpus=True, auto_cpus=auto_cpus)


def test_auto_gpus_per_trial_follows_the_clusters_nodes_and_an_unfit_request_is_refused():
    cpu_head = Node("h", "10.0.0.1", 4, 0)
    t4 = [cpu_head, *(Node(f"w{i}", f"10.0.0.{i}", 8, 1, "T4") for i in (2, 3))]
    r = settle_resources(_auto(), t4)
    assert (r.gpus_per_trial, r.cpus_per_trial) == (1.0, 2.0)  # one GPU per trial, CUDA_VISIBLE_DEVICES set by Ray
    h200 = [cpu_head, Node("w", "10.0.0.2", 16, 8, "H200")]
    assert settle_resources(_auto(), h200).gpus_per_trial == 0.5  # two trials per big card
    assert settle_resources(_auto(), [cpu_head, Node("w", "10.0.0.2", 16, 8)]).gpus_per_trial == 1.0  # card unknown
    assert settle_resources(_auto(), [cpu_head]).gpus_per_trial == 0.0  # a CPU cluster trains on CPU
    assert settle_resources(_auto(), [Node("w", "x", 1, 1)]).cpus_per_trial == 1.0  # default CPUs fit the GPU node
    for asked, nodes in ((Resources(1, 1, None, "a:1"), [cpu_head]), (Resources(2, 0, None, "a:1"), [Node("w", "x", 1, 1)]),
                         (_auto(cpus=4, auto_cpus=False), t4[:1] + [Node("w", "x", 2, 1)])):
        with pytest.raises(AstCvError, match=r"No node of the Ray cluster at --address a?.*fits a trial's") as e:
            settle_resources(asked, nodes)
        assert "\n" not in str(e.value)


def test_the_trials_a_cluster_runs_at_once_count_each_nodes_cpus_and_gpus():
    cpu_head = Node("h", "10.0.0.1", 4, 0)
    t4 = [cpu_head, *(Node(f"w{i}", f"10.0.0.{i}", 8, 1, "T4") for i in (2, 3))]
    assert Resources(1, 0, None, "a:1").slots() is None  # not settled on the cluster yet
    assert settle_resources(_auto(), t4).slots() == 2  # a GPU per trial: one on each T4 node, none on the head
    assert settle_resources(_auto(), [cpu_head, Node("w", "x", 16, 8, "H200")]).slots() == 8  # 16 GPU halves, 2 CPUs each
    assert settle_resources(Resources(1, 0, None, "a:1"), t4).slots() == 4 + 8 + 8  # CPU trials: every node's CPUs
    assert settle_resources(Resources(3, 0, None, "a:1"), t4).slots() == 1 + 2 + 2


def test_on_a_cluster_the_disk_preflight_counts_the_trials_it_runs_at_once_and_no_temp_or_cache_on_the_driver(tmp_path):
    """The issue's case: 40 trials at AST-base were checked as if all ran at once (96.9 GB), with temporary checkpoints
    and the feature cache on the driver, which writes neither on a cluster (each node checks its own)."""
    from trainable.config import TrainConfig
    from trainable.run.prepare import driver_needs, footprint

    t4 = [Node("h", "10.0.0.1", 4, 0), *(Node(f"w{i}", f"10.0.0.{i}", 8, 1, "T4") for i in (2, 3))]
    grid = {"test_fold": list(range(1, 11)), "lr": [1e-5, 5e-5], "batch_size": [8, 16]}
    config = TrainConfig(data_root=str(tmp_path), feature_cache=str(tmp_path / "cache"))
    plan = Plan(config=config, grid=grid, exp_dir=str(tmp_path / "exp"), storage_path=str(tmp_path), name="exp",
                resources=settle_resources(_auto(), t4), classes=[], restore=False)
    fp = footprint(plan, params=85_625_098, left=plan.trials, refit=False)
    assert (plan.trials, fp.at_once) == (40, 2) and fp.peak_bytes < 12e9
    assert footprint(dataclasses.replace(plan, resources=_auto()), 85_625_098, 40, False).peak_bytes > 96e9  # unsettled
    assert [(n.path, n.what) for n in driver_needs(plan, fp, meta=None)] == [(str(tmp_path / "exp"), "checkpoints")]
    local = dataclasses.replace(plan, resources=Resources(1, 0, 0, None), config=dataclasses.replace(config, feature_cache=""))
    assert [n.what for n in driver_needs(local, footprint(local, 85_625_098, 40, False), None)] == [
        "temporary checkpoints", "checkpoints"]


def test_the_manifest_records_the_resources_asked_for_so_a_resume_settles_them_again():
    from argparse import Namespace

    from trainable.run.plan import plan_resources

    t4 = [Node("w", "10.0.0.2", 8, 1, "T4")]

    def asked(gpt=None, cpt=None, address="auto"):
        return plan_resources(Namespace(address=address, gpus=0 if address is None else None, gpus_per_trial=gpt,
                                        cpus_per_trial=cpt), 0)

    settled = settle_resources(asked(), t4)
    assert (settled.gpus_per_trial, settled.cpus_per_trial) == (1.0, 2.0)
    assert settled.requested() == {"cpu": "auto", "gpu": "auto"}  # not 2 CPU + 1 GPU: another cluster settles anew
    assert settle_resources(asked("auto", 3.0), t4).requested() == {"cpu": 3.0, "gpu": "auto"}
    assert settle_resources(asked(0.0), t4).requested() == {"cpu": "auto", "gpu": 0.0}
    assert asked(address=None).requested() == {"cpu": "auto", "gpu": "auto"}


def test_the_nodes_must_agree_on_the_clips_that_cannot_be_used_and_a_node_without_cuda_is_named_in_one_line():
    same = {"fold1/a.wav": "empty file"}
    assert agreed_exclusions([("node A", same), ("node B", dict(same))]) == same
    with pytest.raises(AstCvError, match=r"copies of the dataset differ: fold2/b.wav cannot be used on node B \(NaN "
                                         r"samples\) but can on node A\. Put the same copy") as e:
        agreed_exclusions([("node A", same), ("node B", {**same, "fold2/b.wav": "NaN samples"})])
    assert "\n" not in str(e.value)
    import torch

    if torch.cuda.is_available():
        assert no_cuda("Ray gave a trial GPU 0") is None
    else:  # the trial's second guard (a node that joined after the preflight) words it as the preflight does
        problem = no_cuda("Ray gave a trial GPU 0")
        assert problem.startswith("Ray gave a trial GPU 0 but torch there sees no CUDA device (torch ") and "\n" not in problem
        assert problem.endswith("or pass --gpus-per-trial 0 to train on CPU")


def test_a_nodes_preflight_names_what_to_fix_there(synth_root, tmp_path):
    """``check_node`` as each node's task runs it (here in this process): the experiment folder shared, the data whole,
    the disk for the node's own trials' temporary checkpoints and cache, CUDA where the trials get GPUs."""
    import torch

    from trainable.config import TrainConfig
    from trainable.data.metadata import load_metadata
    from trainable.run.preflight import MARKER, NodeCheck, check_node, prepare_node

    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / f"{MARKER}tok").write_text("tok")  # the driver's marker
    config = TrainConfig(data_root=str(synth_root), model="org/ast", feature_cache=str(tmp_path / "cache"),
                         folds=(1, 2, 3, 4), num_frames=400)
    check = NodeCheck(str(exp), config, load_metadata(synth_root), Resources(1, 0, None, "a:1"), 1000, token="tok")
    node = Node("ab" * 14, "10.0.0.2", 2, 1)
    assert check_node(check, node) == (None, []) and len(list(exp.glob(f"{MARKER}tok-*"))) == 1  # its own marker too
    assert check_node(dataclasses.replace(check, token="x"), node)[0].startswith("cannot see the experiment folder")
    big = dataclasses.replace(check, checkpoint_bytes=shutil.disk_usage(tmp_path).free)  # x 2 trials at once there
    problem = check_node(big, node)[0]
    assert problem.startswith("Not enough disk space: ") and "temporary checkpoints" in problem and "\n" not in problem
    assert check_node(dataclasses.replace(big, override=True), node)[1][0].startswith("warning: Not enough disk space")
    # a node runs at most the trials left at once: 2 slots x 0.6 of the free space is refused, the 1 trial left fits
    most = dataclasses.replace(check, checkpoint_bytes=int(shutil.disk_usage(tmp_path).free * 0.6))
    assert check_node(most, node)[0].startswith("Not enough disk space")
    assert check_node(dataclasses.replace(most, trials_left=1), node) == (None, [])
    if not torch.cuda.is_available():
        gpu = dataclasses.replace(check, resources=Resources(1, 1, None, "a:1"))
        assert check_node(gpu, node)[0].startswith("Ray has 1 GPU(s) on it for the trials but torch there sees no CUDA")
    copy = tmp_path / "data"
    shutil.copytree(synth_root, copy)
    last = sorted((copy / "audio" / "fold4").iterdir())[-1]
    last.unlink()  # not among the first clips the CSV lists: found while sizing the cache
    problem = check_node(dataclasses.replace(check, config=dataclasses.replace(config, data_root=str(copy))), node)[0]
    assert problem == f"--data-root {copy}: {last} is missing on this node: put the whole dataset at the same path on every node"
    done, bad = prepare_node(dataclasses.replace(check, config=dataclasses.replace(config, feature_cache="")), node)
    assert done.startswith("80 clips decoded (--no-cache), 2 process(es)") and bad == {}  # with the node's 2 CPUs


def test_nodes_of_reads_alive_nodes_and_their_card_and_a_node_problem_is_read_back_from_rays_error_text():
    nodes = nodes_of([{"NodeID": "ab" * 14, "Alive": True, "NodeManagerAddress": "10.0.0.2",
                       "Resources": {"CPU": 8.0, "GPU": 2.0, "accelerator_type:A10G": 1.0}},
                      {"NodeID": "cd" * 14, "Alive": False, "Resources": {"CPU": 8.0}}])
    assert nodes == [Node("ab" * 14, "10.0.0.2", 8.0, 2.0, "A10G")]
    text = ("Traceback (most recent call last):\n  File ...\n"
            "trainable.run.cluster.NodeProblem: node 10.0.0.2 (id abcd1234): Ray gave a trial GPU 0 but torch ...\n")
    assert str(NodeProblem.from_error_text(text)).startswith("node 10.0.0.2 (id abcd1234): Ray gave a trial GPU 0")
    assert NodeProblem.from_error_text("ValueError: x") is None


def test_a_cluster_experiment_is_not_continued_without_its_address():
    check_resume_address({"address": None}, None, "runs/x")  # a local experiment
    check_resume_address({"address": "10.0.0.1:6379"}, "10.0.0.9:6379", "runs/x")  # the cluster moved: fine
    with pytest.raises(AstCvError, match=r"ran on the Ray cluster at --address 10.0.0.1:6379: pass --address again"):
        check_resume_address({"address": "10.0.0.1:6379"}, None, "runs/x")


# --- a real cluster -------------------------------------------------------------------------------------------------

def _can_hide_the_project() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs tmpfs '{ROOT}' && test ! -e '{ROOT}/trainable'"], capture_output=True)
    return probe.returncode == 0


def _start_node(args: list[str], temp: Path, hide: list[Path], log) -> subprocess.Popen:
    """A Ray node of its own (its own temp dir and ports), in a process group of its own: killed by its group only."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    ray = str(Path(sys.executable).with_name("ray"))
    cmd = [ray, "start", "--block", "--temp-dir", str(temp), "--disable-usage-stats", *node_ports(), *args]
    if hide:  # the worker node cannot see these (the project: only what Ray ships reaches its trials)
        mounts = " && ".join(f"mount -t tmpfs tmpfs '{p}'" for p in hide)
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{mounts} && exec \"$@\"", "sh", *cmd]
    return subprocess.Popen(cmd, cwd=temp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_nodes(address: str, count: int, deadline_s: float = 120) -> None:
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        deadline = time.time() + deadline_s
        while sum(n["Alive"] for n in ray.nodes()) < count:
            assert time.time() < deadline, f"the cluster has not {count} nodes after {deadline_s} s"
            time.sleep(0.5)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster():
    """(address, a folder only this machine sees, or None when the workers see everything, the workers' pids, an S3
    URI): a head with 0 CPUs, two workers of 1 CPU + 1 fake GPU, which see neither the project nor that folder (as
    root: each sees an empty tmpfs of its own there, under /proc/PID/root from here), and moto's S3 server, whose
    credentials and endpoint every node has from its own environment (as a cloud cluster's nodes have theirs)."""
    boto3 = pytest.importorskip("boto3")
    base = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths live under each temp dir
    local = base / "local"
    local.mkdir()
    hide = [ROOT, local] if _can_hide_the_project() else []
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs = []
    with pytest.MonkeyPatch.context() as mp, moto_server(mp), open(base / "nodes.log", "ab") as log:
        boto3.client("s3").create_bucket(Bucket="astcv-cluster")
        try:
            (base / "h").mkdir()
            procs.append(_start_node(["--head", "--port", str(port), "--num-cpus", "0", "--num-gpus", "0",
                                      "--include-dashboard", "false", "--ray-client-server-port", str(free_port())],
                                     base / "h", [], log))
            for i in (1, 2):
                (base / f"w{i}").mkdir()
                procs.append(_start_node(["--address", address, "--num-cpus", "1", "--num-gpus", "1"], base / f"w{i}",
                                         hide, log))
            _wait_for_nodes(address, 3)
            yield address, (local if hide else None), [p.pid for p in procs[1:]], "s3://astcv-cluster/runs"
        finally:
            for p in reversed(procs):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
            shutil.rmtree(base, ignore_errors=True)


def _args(demo_assets, storage, name, *extra):
    data, model = demo_assets
    return ["--data-root", str(data), "--model", str(model), "--folds", "1", "2", "3", "4", "--test-folds", "1",
            "--lrs", "1e-3", "--batch-sizes", "8", "--epochs", "1", "--num-frames", "400", "--num-workers", "0",
            "--storage-path", str(storage), "--name", name, "--cache-dir", str(storage.parent / "cache"), *extra]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_a_cluster_gets_a_gpu_per_trial_ships_the_code_and_refuses_what_cannot_run(cluster, synth_root, tiny_ast_1024,
                                                                                   tmp_path, capsys, monkeypatch):
    address, local, workers, s3 = cluster
    demo_assets = (synth_root, tiny_ast_1024)  # any data and model: these trials need not learn
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    storage, shared_cache = tmp_path / "shared", tmp_path / "cache"  # both on a disk the workers see too

    # 1. No node has 2 CPUs: refused in one line before any trial (it used to wait forever, silently).
    assert orchestrate.main(_args(demo_assets, storage, "big", "--address", address, "--cpus-per-trial", "2")) == 2
    out, err = capsys.readouterr()
    assert len(_error_lines(err)) == 1 and "No node of the Ray cluster" in err and "fits a trial's 2 CPU + 1 GPU" in err
    assert "1 CPU + 1 GPU (x2)" in err and not list((storage / "big").glob("fold*")), out

    # 2. --gpus-per-trial auto: a GPU per trial on this GPU cluster, so 2 of the 8 trials at once (one per worker; the
    # disk check counted all 8 before); torch on the nodes sees no CUDA (the GPUs are fake): the preflight refuses in
    # one line naming the node, before any trial, any cache or the manifest (the trial's own check stays behind it).
    argv = _args(demo_assets, storage, "gpu", "--address", address, "--test-folds", "1", "2", "3", "4", "--lrs", "1e-3", "1e-4")
    assert orchestrate.main(argv) == 2
    out, err = capsys.readouterr()
    assert "Disk: 8 trial(s) to run, 2 at once on the cluster" in out, out
    lines = _error_lines(err)
    assert len(lines) == 1 and re.search(r"error: Preflight: node \S+ \(id [0-9a-f]{8}\): Ray has 1 GPU\(s\) on it for "
                                         r"the trials but torch there sees no CUDA device", lines[0]), err
    assert "Running" not in out and not (storage / "gpu" / MANIFEST).exists()
    assert not list(shared_cache.glob("*/index.json")) and not list((storage / "gpu").glob(".astcv-pre*"))

    # 3. On CPU (--gpus-per-trial 0) the grid completes on S3 storage, its two trials on the two worker nodes (the head
    # has no CPU), running the code Ray shipped to them. Each worker built the feature cache before the first trial,
    # with its CPU, in a folder only it sees (as root), the driver none; else both shared one folder and it was built
    # once.
    cache = local / "cache" if local else shared_cache
    assert orchestrate.main(_args(demo_assets, storage, "cpu", "--address", address, "--gpus-per-trial", "0",
                                  "--test-folds", "1", "2", "--cache-dir", str(cache), "--storage-path", s3)) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    exp = Store.open(f"{s3}/cpu")
    built = re.findall(r"^  node \S+ \(id ([0-9a-f]{8})\): feature cache \S+-f400 \(\d+ clips, 400 frames\), 1 process",
                       out, re.M)
    assert "Disk: 2 trial(s) to run, 2 at once on the cluster" in out and len(set(built)) == 2, out
    rows = [json.loads(line) for t in exp.list_dirs() if t.startswith("fold")
            for line in exp.read_text(f"{t}/result.json").splitlines()]
    assert len({r["node_id"] for r in rows}) == 2 and {r["cuda_visible_devices"] for r in rows} == {""}
    assert {r["node_id"][:8] for r in rows} == set(built)
    assert json.loads(exp.read_text("summary.json"))["complete"]
    if local:
        assert not cache.exists()  # nothing on the driver's disk
        for pid in workers:
            assert len(list(Path(f"/proc/{pid}/root{cache}").glob("*-f400/index.json"))) == 1, pid
    else:
        assert len(list(cache.glob("*-f400/index.json"))) == 1 and not list(cache.glob("*.building*"))

    # 4. The experiment records its cluster and the resources asked for (CPUs left to settle on the next cluster):
    # continuing it without --address is refused (not run on this machine).
    manifest = json.loads(exp.read_text(MANIFEST))
    assert manifest["address"] == address and manifest["resources"] == {"cpu": "auto", "gpu": 0.0}
    assert orchestrate.main(["--storage-path", s3, "--name", "cpu", "--resume"]) == 2
    assert "pass --address again" in capsys.readouterr().err
    if local is None:
        pytest.skip("not root: the worker nodes could see the project folder, so code shipping was not isolated")

    # 5. The per-node preflight: data that only this machine has is refused in one line naming a node, before any trial.
    shutil.copytree(synth_root, local / "data")
    argv = _args((local / "data", tiny_ast_1024), storage, "local-data", "--address", address, "--gpus-per-trial", "0")
    assert orchestrate.main(argv) == 2
    out, err = capsys.readouterr()
    lines = _error_lines(err)
    assert len(lines) == 1 and re.search(r"error: Preflight: node \S+ \(id [0-9a-f]{8}\): --data-root \S+ has no "
                                         r"metadata/UrbanSound8K.csv on this node", lines[0]), err
    assert not list((storage / "local-data").glob("fold*")) and not list((storage / "local-data").glob(".astcv-pre*"))
