"""The per-node preflight on a Ray cluster (--address): before the first trial, a task pinned to each node that can
run one checks what the trials need there (the experiment storage, the data, the model, the cache folder, CUDA, disk)
and then builds that node's feature cache with its CPUs; any problem is one line naming the node. Ray is imported
inside the functions that need a connection.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..errors import AstCvError
from .cluster import Node, no_cuda, trial_nodes
from .plan import Resources


PREFLIGHT_TIMEOUT_S = 300.0  # a node's first task sets up the shipped code (runtime_env) too
MARKER = ".astcv-preflight-"
SAME_DATA = "put the whole dataset at the same path on every node"


@dataclass(frozen=True)
class NodeCheck:
    """What the preflight asks of every node: the experiment folder, the trials' config, metadata rows
    (``data.load_metadata``) and resources, one trial's temporary checkpoint in bytes, whether a disk too small only
    warns (--no-space-check), the marker the driver wrote into the experiment folder, and how many trials are left
    to run (0: not known; a node runs at most that many at once)."""

    exp_dir: str
    config: TrainConfig
    meta: Any
    resources: Resources
    checkpoint_bytes: int = 0
    override: bool = False
    token: str = ""
    trials_left: int = 0


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

    at_once = min(node.slots(check.resources), check.trials_left or node.slots(check.resources))
    needs = [Need(tempfile.gettempdir(), at_once * check.checkpoint_bytes, "temporary checkpoints")]
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
