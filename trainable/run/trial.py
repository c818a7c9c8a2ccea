"""The Ray Tune trial: one fold x config, reporting every epoch with its checkpoint. The only module of
``trainable/`` besides ``tuner`` that imports Ray; what it runs is the Ray-free ``trainable.fit.train.fit``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Mapping

from ..faults import hold_point, kill_point
from ..fit.checkpoint import pick_restore_point, read_trainer_state
from ..config import TrainConfig
from ..store.experiment import CUDA_VISIBLE_DEVICES, FINISHED_EARLIER, NODE_ID
from ..store.storage import StorageFull, is_disk_full, join, sweep_temp
from .axes import expand_axes
from .cluster import require_cuda
from .progress import WARNING
from .resume import checkpoint_folders, local_copy

log = logging.getLogger(__name__)

_trials_in_this_process = 0  # Tune reuses a trial's worker for the next trial (see tuner.REUSE_WORKERS)


def process_age() -> float | None:
    """Seconds since this process started (Linux), else None."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return time.time() - (boot + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def restore_candidates(checkpoint) -> list[tuple[Any, str]]:
    """(filesystem, path) of the trial's checkpoints, newest first by index: the ``checkpoint_*`` folders beside the one
    Ray restores from, that one included (first when it is none of them: gone, or named otherwise). Ray's experiment
    snapshot may name one that was deleted since, or, with --keep-checkpoints all, one older than the folder holds
    (the trial trained an epoch again)."""
    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    folders = [p.rstrip("/") for _, p in reversed(checkpoint_folders(fs, path.rsplit("/", 1)[0]))]
    return [(fs, p) for p in ([] if path in folders else [path]) + folders]


def choose_restore_point(checkpoint, stack: ExitStack, tell: Callable[[str], None] | None = None) -> Path | None:
    """The newest intact checkpoint of the trial on this machine (None: none, or no ``checkpoint`` from Ray). Each
    damaged one passed over, and a restart from scratch, is logged and told (``tell``: the console, through the
    progress board: epochs are trained again); a missing one (deleted after Ray's last snapshot named it) is logged."""
    def warn(text: str) -> None:
        log.warning(text)
        if tell is not None:
            tell(text)

    if checkpoint is None:
        return None
    for fs, path in restore_candidates(checkpoint):
        local = local_copy(fs, path, stack)
        if local is None:
            log.warning("checkpoint %s is missing; trying an older one", path)
            continue
        chosen, warnings = pick_restore_point([local])
        for w in warnings:
            warn(w.replace(str(local), path))  # the checkpoint on storage, not its temporary copy
        if chosen is not None:
            return chosen
    warn("no usable checkpoint for this trial: restarting it from scratch")
    return None


def ended_before(restore: Path | None, epochs: int, name: str) -> bool:
    """Whether the checkpoint the trial restores holds its last epoch already: a finished trial Ray started again
    (``resume.continue_from_folder``). It then reports so, with no epoch row (a trial ending without any result makes
    Ray print "Trial ... completed. Last result:"), and ends before loading model or data."""
    from ray import tune

    if restore is None or read_trainer_state(restore).epoch < epochs:
        return False
    log.info("%s ran all its %d epochs already (%s): nothing to do", name, epochs, restore)
    tune.report({FINISHED_EARLIER: True})
    return True


def worker_startup() -> dict[str, Any]:
    """Whether this trial runs in a worker that ran another trial before (Tune reuses them), and if not, the seconds
    from the process's start to here (Ray starting the worker, Python, torch, unpickling the trial)."""
    global _trials_in_this_process
    reused = _trials_in_this_process > 0
    _trials_in_this_process += 1
    return {"reused_worker": reused, "worker_s": 0.0 if reused else process_age()}


def local_disk_full(exc: BaseException) -> StorageFull:
    """StorageFull for a local write of the trial (the temporary checkpoint, the feature cache)."""
    where = str(getattr(exc, "filename", None) or tempfile.gettempdir())
    if where.startswith(tempfile.gettempdir()):
        return StorageFull(tempfile.gettempdir(), "a local file could not be written", "TMPDIR=/a/larger/disk")
    return StorageFull(where, "a local file could not be written", "--cache-dir on a larger disk")


def tune_trial(trial_config: dict[str, Any], base: Mapping[str, Any], exp_dir: str = "", board: str | None = None) -> None:
    """Ray Tune entry point: one fold x config. ``base`` holds the fixed settings, ``trial_config`` the grid,
    ``exp_dir`` the experiment folder (named when the disk is full), ``board`` the name of the actor that takes
    in-epoch progress to the driver's console.

    Resumes from the trial's latest checkpoint; if that one is damaged (a kill during a write) or gone, from the
    newest older one that is intact, else from scratch, with a warning each time. A full disk ends the trial with
    ``StorageFull``, which the driver turns into one message and a stop of the whole run.
    """
    startup = worker_startup()
    began = time.perf_counter()
    import ray
    import torch
    import transformers  # noqa: F401  (imported by the model loader anyway: timed here, with the rest)
    from ray import tune

    from ..fit.train import fit
    from .live import live_curves

    startup["imports_s"] = round(time.perf_counter() - began, 4)
    config = TrainConfig.from_dict(expand_axes({**base, **trial_config}))  # --grid aliases set their fields
    sweep_temp()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    placement = {NODE_ID: ray.get_runtime_context().get_node_id(),
                 CUDA_VISIBLE_DEVICES: os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    require_cuda(placement[CUDA_VISIBLE_DEVICES])  # a GPU given but no CUDA here: one line naming the node, no CPU run
    name = tune.get_context().get_trial_name() or ""
    trial_dir = join(exp_dir, name) if exp_dir else "the storage path"

    def on_progress(message: dict[str, Any]) -> None:
        try:
            ray.get_actor(board).post.remote(name, message)
        except (TypeError, ValueError):  # no board (None), or gone: the console misses one line
            pass

    def report(metrics: dict[str, Any], ckpt_dir: Path) -> None:
        curves.epoch(metrics)  # on disk before Ray has the result
        try:
            tune.report({**metrics, **placement}, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))
            kill_point("checkpoint_stored", name)  # the checkpoint is on storage; the driver has not registered it yet
        except Exception as exc:
            if is_disk_full(exc):
                raise StorageFull(trial_dir, "a checkpoint could not be saved") from exc
            raise
        hold_point("checkpoint_stored", name)

    with ExitStack() as stack:
        restore = choose_restore_point(tune.get_checkpoint(), stack, tell=lambda w: on_progress({WARNING: w}))
        if ended_before(restore, config.epochs, name):
            return
        curves = live_curves(exp_dir, name, config, stack)  # TensorBoard, while the epoch runs
        try:
            fit(config, report, restore_dir=restore, on_progress=on_progress, startup=startup, on_step=curves.step)
            curves.finished = True
        except StorageFull:
            raise
        except Exception as exc:
            if is_disk_full(exc):  # the local temporary checkpoint or the feature cache could not be written
                raise local_disk_full(exc) from exc
            raise
