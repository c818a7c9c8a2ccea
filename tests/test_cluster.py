"""A Ray cluster (--address): resources read from its nodes, the code shipped, a GPU node without CUDA stopped in one
line, a cluster experiment held to its cluster. The slow test runs a real multi-node cluster: a head with no CPUs and
two worker nodes with fake GPUs, started from another folder, without PYTHONPATH and (as root) in a mount namespace
where the project's folder is an empty tmpfs, so the trials can only import the code Ray shipped."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import orchestrate
from trainable.errors import AstCvError
from trainable.run.cluster import NodeProblem, Node, check_resume_address, nodes_of, settle_resources
from trainable.run.plan import Resources
from trainable.store.experiment import MANIFEST

ROOT = Path(__file__).resolve().parent.parent


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

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ports() -> list[str]:
    return [arg for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")
            for arg in (flag, str(_free_port()))]


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
    cmd = [ray, "start", "--block", "--temp-dir", str(temp), "--disable-usage-stats", *_ports(), *args]
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
    """(address, a folder only this machine sees, or None when the workers see everything): a head with 0 CPUs, two
    workers of 1 CPU + 1 fake GPU, which see neither the project nor that folder (as root)."""
    base = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths live under each temp dir
    local = base / "local"
    local.mkdir()
    hide = [ROOT, local] if _can_hide_the_project() else []
    port = _free_port()
    address = f"127.0.0.1:{port}"
    procs = []
    with open(base / "nodes.log", "ab") as log:
        try:
            (base / "h").mkdir()
            procs.append(_start_node(["--head", "--port", str(port), "--num-cpus", "0", "--num-gpus", "0",
                                      "--include-dashboard", "false", "--ray-client-server-port", str(_free_port())],
                                     base / "h", [], log))
            for i in (1, 2):
                (base / f"w{i}").mkdir()
                procs.append(_start_node(["--address", address, "--num-cpus", "1", "--num-gpus", "1"], base / f"w{i}",
                                         hide, log))
            _wait_for_nodes(address, 3)
            yield address, (local if hide else None)
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
            "--storage-path", str(storage), "--name", name, *extra]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_a_cluster_gets_a_gpu_per_trial_ships_the_code_and_refuses_what_cannot_run(cluster, synth_root, tiny_ast_1024,
                                                                                   tmp_path, capsys, monkeypatch):
    address, local = cluster
    demo_assets = (synth_root, tiny_ast_1024)  # any data and model: these trials need not learn
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    storage = tmp_path / "shared"

    # 1. No node has 2 CPUs: refused in one line before any trial (it used to wait forever, silently).
    assert orchestrate.main(_args(demo_assets, storage, "big", "--address", address, "--cpus-per-trial", "2")) == 2
    out, err = capsys.readouterr()
    assert len(_error_lines(err)) == 1 and "No node of the Ray cluster" in err and "fits a trial's 2 CPU + 1 GPU" in err
    assert "1 CPU + 1 GPU (x2)" in err and not list((storage / "big").glob("fold*")), out

    # 2. --gpus-per-trial auto: a GPU per trial on this GPU cluster; torch on the node sees no CUDA (the GPUs are fake):
    # the trial fails at once with one line naming the node, and is not retried. The trial ran the shipped code.
    assert orchestrate.main(_args(demo_assets, storage, "gpu", "--address", address)) == 2
    out, err = capsys.readouterr()
    assert "1 CPU + 1 GPU each" in out, out
    lines = _error_lines(err)
    assert len(lines) == 1 and re.search(r"error: node \S+ \(id [0-9a-f]{8}\): Ray gave a trial GPU 0 but torch there "
                                         r"sees no CUDA device", lines[0]), err
    assert "retrying" not in out + err
    assert not [t for t in (storage / "gpu").glob("fold*/result.json") if t.read_text().strip()]  # no epoch on CPU

    # 3. The experiment records its cluster: continuing it without --address is refused (not run on this machine).
    manifest = json.loads((storage / "gpu" / MANIFEST).read_text())
    assert manifest["address"] == address
    assert orchestrate.main(["--storage-path", str(storage), "--name", "gpu", "--resume"]) == 2
    assert "pass --address again" in capsys.readouterr().err

    # 4. On CPU (--gpus-per-trial 0) the grid completes, its two trials on the two worker nodes (the head has no CPU),
    # running the code Ray shipped to them.
    assert orchestrate.main(_args(demo_assets, storage, "cpu", "--address", address, "--gpus-per-trial", "0",
                                  "--test-folds", "1", "2")) == 0, capsys.readouterr().err
    rows = [json.loads(line) for t in (storage / "cpu").glob("fold*/result.json") for line in t.read_text().splitlines()]
    assert len({r["node_id"] for r in rows}) == 2 and {r["cuda_visible_devices"] for r in rows} == {""}
    assert json.loads((storage / "cpu" / "summary.json").read_text())["complete"]
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
