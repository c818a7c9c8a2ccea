"""The Ray Tune trial: one fold x config, reporting every epoch with its checkpoint. The only module of
``trainable/`` besides ``tuner`` that imports Ray; what it runs is the Ray-free ``trainable.train.fit``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from .checkpoint import older_checkpoints, pick_restore_point
from .config import TrainConfig
from .experiment import CUDA_VISIBLE_DEVICES, NODE_ID

log = logging.getLogger(__name__)


def tune_trial(trial_config: dict[str, Any], base: Mapping[str, Any]) -> None:
    """Ray Tune entry point: one fold x config. ``base`` holds the fixed settings, ``trial_config`` the grid.

    Resumes from the trial's latest checkpoint; if that one is damaged (a kill during a write), from the newest
    older one that is intact, else from scratch, with a warning each time.
    """
    import ray
    import torch
    from ray import tune

    from .train import fit

    config = TrainConfig.from_dict({**base, **trial_config})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    placement = {NODE_ID: ray.get_runtime_context().get_node_id(),
                 CUDA_VISIBLE_DEVICES: os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    if placement[CUDA_VISIBLE_DEVICES] and not torch.cuda.is_available():
        log.warning("Ray assigned GPU(s) %s but torch sees no CUDA device: training on CPU", placement[CUDA_VISIBLE_DEVICES])

    def report(metrics: dict[str, Any], ckpt_dir: Path) -> None:
        tune.report({**metrics, **placement}, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        fit(config, report)
        return
    with checkpoint.as_directory() as restored:
        local = Path(tempfile.mkdtemp(prefix="astcv-restore-"))
        shutil.copytree(restored, local / "latest", dirs_exist_ok=True)
    try:
        stored = Path(checkpoint.path)
        candidates = [local / "latest"] + (older_checkpoints(stored) if stored.is_dir() else [])
        chosen, warnings = pick_restore_point(candidates)
        for w in warnings:
            log.warning(w)
        if chosen is None:
            log.warning("no usable checkpoint for this trial: restarting it from scratch")
        fit(config, report, restore_dir=chosen)
    finally:
        shutil.rmtree(local, ignore_errors=True)
