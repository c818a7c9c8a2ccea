"""Running on a Ray cluster (--address): the trials' resources read from the cluster's alive nodes, the code shipped to
every node through Ray's runtime_env, a trial whose node cannot use the GPU it was given stopped in one line, a resume
of a cluster experiment held to a cluster, and a failed connection named. The per-node preflight is
``trainable.run.preflight``. Ray is imported inside the functions that need a connection.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import AstCvError
from .plan import Plan, Resources

# Ray's accelerator_type labels (ray.util.accelerators) of cards with 40 GB or more: --gpus-per-trial auto packs two
# trials on each (plan.PACK_MIN_GIB). "A100" covers both the 40 and 80 GB cards. Any other label, or none (a node
# started with --num-gpus but no label), gets one trial per card.
BIG_ACCELERATORS = frozenset({"A100", "A100-40G", "A100-80G", "H100", "H200", "H20", "B200", "B300", "GB200", "GB300",
                              "L40S", "RTX_PRO_6000"})
AUTO_CPUS_WITH_GPU = 2.0  # --cpus-per-trial's default with a GPU (plan.plan_resources), capped by the GPU nodes' CPUs
# What ships to the worker nodes (runtime_env py_modules): the trainable package only; trials import nothing else of
# the project. Left out of the upload:
SHIP_EXCLUDES = ["__pycache__", "*.pyc", "*.safetensors", "*.bin", "*.pt", "*.ckpt", ".pytest_cache"]


@dataclass(frozen=True)
class Node:
    """An alive node as Ray's scheduler sees it."""

    node_id: str
    ip: str
    cpus: float
    gpus: float
    accelerator: str | None = None

    def fits(self, resources: Resources) -> bool:
        return self.cpus + 1e-9 >= resources.cpus_per_trial and self.gpus + 1e-9 >= resources.gpus_per_trial

    def slots(self, resources: Resources) -> int:
        """How many trials of ``resources`` this node runs at once."""
        limits = [math.floor(self.cpus / resources.cpus_per_trial + 1e-9)]
        if resources.gpus_per_trial > 0:
            limits.append(math.floor(self.gpus / resources.gpus_per_trial + 1e-9))
        return min(limits)

    @property
    def name(self) -> str:
        """'node IP (id 1a2b3c4d)', as ``this_node`` says it."""
        return f"node {self.ip} (id {self.node_id[:8]})"

    def describe(self) -> str:
        card = f" {self.accelerator}" if self.accelerator else ""
        return f"{self.cpus:g} CPU + {self.gpus:g}{card} GPU"


def nodes_of(ray_nodes: Iterable[Mapping[str, Any]]) -> list[Node]:
    """The alive nodes of ``ray.nodes()``."""
    out = []
    for n in ray_nodes:
        if not n.get("Alive"):
            continue
        res = n.get("Resources") or {}
        accelerator = next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), None)
        out.append(Node(n["NodeID"], n.get("NodeManagerAddress", "?"), float(res.get("CPU", 0)), float(res.get("GPU", 0)),
                        accelerator))
    return out


def describe_nodes(nodes: Iterable[Node]) -> str:
    counts = Counter(n.describe() for n in nodes)
    return ", ".join(f"{d}{f' (x{c})' if c > 1 else ''}" for d, c in sorted(counts.items()))


def settle_resources(resources: Resources, nodes: list[Node]) -> Resources:
    """The trial's resources on this cluster, with the trials its nodes run at once: --gpus-per-trial auto becomes 1
    GPU per trial when the cluster has GPUs (0.5 when every GPU node's card has 40 GB or more), CPUs left at their
    default follow. Refused in one line when no single alive node fits a trial (Ray would wait for one forever)."""
    r = resources
    gpu_nodes = [n for n in nodes if n.gpus > 0]
    if r.auto_gpus and gpu_nodes:
        gpus = 0.5 if all(n.accelerator in BIG_ACCELERATORS for n in gpu_nodes) else 1.0
        cpus = min(AUTO_CPUS_WITH_GPU, max(n.cpus for n in gpu_nodes)) if r.auto_cpus else r.cpus_per_trial
        r = dataclasses.replace(r, gpus_per_trial=gpus, cpus_per_trial=cpus or AUTO_CPUS_WITH_GPU)
    if not any(n.fits(r) for n in nodes):
        raise AstCvError(
            f"No node of the Ray cluster at --address {r.address} fits a trial's {r.cpus_per_trial:g} CPU + "
            f"{r.gpus_per_trial:g} GPU (alive nodes: {describe_nodes(nodes) or 'none'}); the trials would wait forever. "
            f"Pass --cpus-per-trial and --gpus-per-trial that one node has, or add such a node to the cluster.")
    return dataclasses.replace(r, cluster_slots=sum(n.slots(r) for n in nodes))


def on_cluster(plan: Plan) -> Plan:
    """The plan with the resources settled on the connected cluster (a no-op for a local Ray start)."""
    if plan.resources.address is None:
        return plan
    import ray

    resources = settle_resources(plan.resources, nodes_of(ray.nodes()))
    config = dataclasses.replace(plan.config, torch_threads=max(1, int(resources.cpus_per_trial)))
    return dataclasses.replace(plan, resources=resources, config=config)


def trial_nodes(resources: Resources) -> list[Node]:
    """The alive nodes of the connected cluster that can run a trial of ``resources``."""
    import ray

    return [n for n in nodes_of(ray.nodes()) if n.fits(resources)]


def project_package() -> Path:
    """The ``trainable`` package folder (shipped to the cluster's nodes)."""
    return Path(__file__).resolve().parents[1]


def code_env(address: str | None) -> dict[str, Any]:
    """The runtime_env part that makes the project importable in the trials: on a cluster, the ``trainable`` package
    uploaded by Ray to every node (no node needs the project, nor the same path); locally, PYTHONPATH (nothing to
    copy: the workers run on this machine)."""
    if address is not None:
        return {"py_modules": [str(project_package())], "excludes": list(SHIP_EXCLUDES)}
    root = str(project_package().parent)
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}}


class NodeProblem(AstCvError):
    """A node cannot run the trials given to it (e.g. a GPU that its torch cannot use): not transient, so the driver
    stops the run with this message instead of retrying the trial."""

    MARKER = "NodeProblem: "  # how Ray's error.txt shows it: ``trainable.run.cluster.NodeProblem: message``

    @classmethod
    def from_error_text(cls, text: str) -> NodeProblem | None:
        line = next((ln for ln in reversed(text.splitlines()) if cls.MARKER in ln), None)
        return None if line is None else cls(line.split(cls.MARKER, 1)[1].strip())


def this_node() -> str:
    """'node IP (id 1a2b3c4d)' of the Ray worker this runs in."""
    import ray

    ctx = ray.get_runtime_context()
    return f"node {ray.util.get_node_ip_address()} (id {ctx.get_node_id()[:8]})"


def no_cuda(given: str) -> str | None:
    """What is wrong when Ray gives trials GPUs here (``given`` says which) but torch here sees no CUDA device (they
    would train on CPU, silently, hours slower); None when it sees one."""
    import torch

    if torch.cuda.is_available():
        return None
    built = f"torch {torch.__version__} built {'for CUDA ' + torch.version.cuda if torch.version.cuda else 'without CUDA'}"
    return (f"{given} but torch there sees no CUDA device ({built}). Install the NVIDIA driver and a CUDA build of torch "
            f"on that node, start it with --num-gpus 0, or pass --gpus-per-trial 0 to train on CPU")


def require_cuda(cuda_visible_devices: str) -> None:
    """Raise NodeProblem when Ray gave this trial GPU(s) but torch here sees no CUDA device: the preflight checks each
    node before the first trial; this holds for a node that joined later."""
    problem = no_cuda(f"Ray gave a trial GPU {cuda_visible_devices}") if cuda_visible_devices else None
    if problem:
        raise NodeProblem(f"{this_node()}: {problem}.")


def check_resume_address(manifest: Mapping[str, Any], address: str | None, exp_dir: str) -> None:
    """Refuse to continue an experiment recorded on a cluster without --address (it would run the rest here)."""
    recorded = manifest.get("address")
    if recorded and not address:
        raise AstCvError(f"Experiment {exp_dir} ran on the Ray cluster at --address {recorded}: pass --address again "
                         f"(that one, or the cluster's address now) to continue it there; without it the remaining "
                         f"trials would run on this machine.")


def answers(address: str, timeout_s: float = 5.0) -> bool | None:
    """Whether something listens at a 'host:port' address (None when the address has another form: 'auto',
    'ray://...')."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def connect_problem(address: str, error: Exception) -> str:
    """One line for a failed ``ray.init(address=...)``: a cluster that answers but refused us is most often token
    authentication (Ray says only 'Failed to connect'); nothing answering means no cluster there."""
    said = str(error).splitlines()[0].rstrip(".") if str(error) else type(error).__name__
    listening = answers(address)
    if listening:
        return (f"Cannot join the Ray cluster at --address {address}: it answers but refused this connection ({said}). "
                f"Most often its token authentication did not accept this machine: set RAY_AUTH_MODE=token and give "
                f"the cluster's token (the head's 'ray get-auth-token' prints it) as RAY_AUTH_TOKEN, or in the file "
                f"~/.ray/auth_token or RAY_AUTH_TOKEN_PATH; also check that this machine's Ray version is the cluster's.")
    where = "nothing answers there" if listening is False else said
    return (f"Cannot connect to the Ray cluster at --address {address}: {where}. Check the address and port (the "
            f"head's 'ray status' shows them); start a cluster with 'ray start --head', or leave --address out to "
            f"run on this machine.")
