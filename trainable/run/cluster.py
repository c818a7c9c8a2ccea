"""Running on a Ray cluster (--address): the trials' resources read from the cluster's alive nodes, the code shipped to
every node through Ray's runtime_env, a preflight task on each node that can run a trial (it checks what the trials
need there, then builds that node's feature cache with its CPUs), a trial whose node cannot use the GPU it was given
stopped in one line, and a resume of a cluster experiment held to a cluster. Ray is imported inside the functions that
need a connection.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..config import TrainConfig
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


PREFLIGHT_TIMEOUT_S = 300.0  # a node's first task sets up the shipped code (runtime_env) too
MARKER = ".astcv-preflight-"
SAME_DATA = "put the whole dataset at the same path on every node"


@dataclass(frozen=True)
class NodeCheck:
    """What the preflight asks of every node: the experiment folder, the trials' config, metadata rows
    (``data.load_metadata``) and resources, one trial's temporary checkpoint in bytes, whether a disk too small only
    warns (--no-space-check), and the marker the driver wrote into the experiment folder."""

    exp_dir: str
    config: TrainConfig
    meta: Any
    resources: Resources
    checkpoint_bytes: int = 0
    override: bool = False
    token: str = ""


def check_node(check: NodeCheck, node: Node) -> tuple[str | None, list[str]]:
    """On one node: (what keeps it from running trials, as one line, or None; warnings). The driver's marker must be
    readable in the experiment folder (storage every node shares) and this node's own written there; the data root
    (its CSV and first clips), a local model folder and the cache folder must be there; torch must see CUDA when the
    trials get GPUs; the temporary folder must hold the checkpoints of the trials the node runs at once, the cache
    folder the feature cache unless built."""
    c = check.config
    uses_gpus = check.resources.gpus_per_trial > 0 and node.gpus > 0
    problem = (_storage_problem(check.exp_dir, check.token) or _data_problem(c.data_root) or _model_problem(c.model)
               or _cache_dir_problem(c.feature_cache)
               or (no_cuda(f"Ray has {node.gpus:g} GPU(s) on it for the trials") if uses_gpus else None))
    if problem:
        return problem, []
    from ..store.footprint import Need, cache_bytes, check_space

    needs = [Need(tempfile.gettempdir(), node.slots(check.resources) * check.checkpoint_bytes, "temporary checkpoints")]
    if c.feature_cache:
        from ..data.cache import cache_is_built

        try:
            built = cache_is_built(c, check.meta)  # reads every clip file's size
        except OSError as exc:
            return f"--data-root {c.data_root}: {exc.filename} is missing on this node: {SAME_DATA}", []
        if not built:
            needs.append(Need(c.feature_cache, cache_bytes(len(check.meta), c.num_frames), "feature cache"))
    try:
        return None, check_space(needs, check.override)
    except AstCvError as exc:
        return str(exc).rstrip("."), []


def _storage_problem(exp_dir: str, token: str) -> str | None:
    from ..store.storage import Store

    shared = "pass --storage-path with storage every node shares (an NFS path, or an s3:// or gs:// URI)"
    try:
        store = Store.open(exp_dir)
        if store.read_text(MARKER + token) != token:
            return f"cannot see the experiment folder {exp_dir} the driver wrote (a folder on each node's own disk?): {shared}"
        store.write_text(f"{MARKER}{token}-{uuid.uuid4().hex[:8]}", token)
    except (OSError, AstCvError) as exc:
        return f"cannot write the experiment folder {exp_dir} ({' '.join(str(exc).split())[:200]}): {shared}"
    return None


def _data_problem(data_root: str) -> str | None:
    import csv

    csv_path = Path(data_root) / "metadata" / "UrbanSound8K.csv"
    if not csv_path.is_file():
        return f"--data-root {data_root} has no metadata/UrbanSound8K.csv on this node: put the dataset at the same path on every node"
    with open(csv_path, newline="") as fh:
        rows = [r for _, r in zip(range(3), csv.DictReader(fh))]
    for r in rows:
        clip = Path(data_root) / "audio" / f"fold{r.get('fold')}" / str(r.get("slice_file_name"))
        if not clip.is_file():
            return f"--data-root {data_root}: {clip} is missing on this node: {SAME_DATA}"
    return None


def _model_problem(model: str) -> str | None:
    if model.startswith("/") and not (Path(model) / "config.json").is_file():
        return f"--model {model} is not on this node: put the model folder at the same path on every node, or pass a hub id"
    return None


def _cache_dir_problem(cache_dir: str) -> str | None:
    if not cache_dir:
        return None
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"--cache-dir {cache_dir} cannot be made on this node ({exc.strerror or exc}): pass one it can write"
    if not os.access(cache_dir, os.W_OK):
        return f"--cache-dir {cache_dir} cannot be written on this node: pass one it can write"
    return None


def prepare_node(check: NodeCheck, node: Node) -> tuple[str, dict[str, str]]:
    """On one node: build its feature cache (with --no-cache: decode every clip) with as many processes as the node
    has CPUs for Ray; (what was done, in words; the clips that cannot be used -> why)."""
    began, workers, c = time.monotonic(), max(1, int(node.cpus)), check.config
    if c.feature_cache:
        from ..data.cache import FeatureCache

        cache = FeatureCache.open(c, check.meta, workers)
        done, bad = f"feature cache {cache.path} ({len(cache.index)} clips, {c.num_frames} frames)", dict(cache.excluded)
    else:
        from ..data.audio import find_unusable

        done, bad = f"{len(check.meta)} clips decoded (--no-cache)", find_unusable(c.data_root, check.meta, workers=workers)
    return f"{done}, {workers} process(es), {time.monotonic() - began:.0f} s", bad


def agreed_exclusions(answers: list[tuple[str, dict[str, str]]]) -> dict[str, str]:
    """The clips that cannot be used, from each node's (name, clip -> why): the same on every node (trials on each
    must see the same dataset), else refused in one line naming a clip and the nodes."""
    (first, bad), *rest = answers
    for node, other in rest:
        differ = sorted(set(bad) ^ set(other))
        if differ:
            clip = differ[0]
            on, off = (first, node) if clip in bad else (node, first)
            raise AstCvError(f"Preflight: the nodes' copies of the dataset differ: {clip} cannot be used on {on} "
                             f"({bad.get(clip) or other.get(clip)}) but can on {off}. Put the same copy of the dataset "
                             f"on every node.")
    return bad


def preflight_nodes(check: NodeCheck, store) -> list[str]:
    """``check_node`` on each node that can run a trial (a task pinned to it), after the driver wrote the marker into
    ``store`` (the experiment folder); the first problem is refused in one line naming the node, before any trial.
    Returns the nodes' warnings (--no-space-check)."""
    check = dataclasses.replace(check, token=uuid.uuid4().hex[:12])
    store.write_text(MARKER + check.token, check.token)
    try:
        answers = on_each_node(check_node, check, trial_nodes(check.resources), PREFLIGHT_TIMEOUT_S)
    finally:
        _remove_markers(store, check.token)
    for node, (problem, _) in answers:
        if problem:
            raise AstCvError(f"Preflight: {node}: {problem}.")
    return [f"Preflight: {node}: {w.removeprefix('warning: ')}" for node, (_, warnings) in answers for w in warnings]


def prepare_nodes(check: NodeCheck) -> tuple[list[str], dict[str, str]]:
    """``prepare_node`` on each node that can run a trial, all at once, as long as they take: (one line per node; the
    clips that cannot be used, the same on every node)."""
    answers = on_each_node(prepare_node, check, trial_nodes(check.resources))
    return [f"{node}: {done}" for node, (done, _) in answers], agreed_exclusions([(n, bad) for n, (_, bad) in answers])


def on_each_node(fn, check: NodeCheck, nodes: list[Node], timeout: float | None = None) -> list[tuple[str, Any]]:
    """(node's name, ``fn(check, node)``) for each node, in a task pinned to it (NodeAffinitySchedulingStrategy,
    soft=False) that reserves none of its CPUs (no trial runs yet; a reservation would wait behind another job's
    tasks). A task that fails or does not answer within ``timeout`` seconds is refused in one line naming its node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def task(fn, check, node):
        return fn(check, node)

    shared = ray.put(check)  # the metadata rows once, not once per node
    refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)).remote(fn, shared, n): n
            for n in nodes}
    _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    if pending:
        raise AstCvError(f"{len(pending)} node(s) of the Ray cluster did not answer the preflight within {timeout:g} s "
                         f"({', '.join(refs[r].name for r in pending)}): check them ('ray status') or restart them.")
    out = []
    for ref, node in refs.items():
        try:
            out.append((node.name, ray.get(ref)))
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            raise AstCvError(f"Preflight: {node.name}: {type(cause).__name__}: "
                             f"{' '.join(str(cause).split())[:300]}") from None
    return out


def _remove_markers(store, token: str) -> None:
    import pyarrow.fs as pafs

    try:
        infos = store.fs.get_file_info(pafs.FileSelector(store.path(), recursive=False))
    except OSError:
        return
    for info in infos:
        if info.base_name.startswith(MARKER + token):
            store.delete(info.base_name)


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
