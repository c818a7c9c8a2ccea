"""Where a trial writes its own TensorBoard events (``trainable.fit.curves.LiveCurves``): straight into its folder of
the experiment when that is on this machine's filesystem (a local disk, a mounted Drive, NFS), where TensorBoard sees
the curves grow during an epoch; behind a URI (s3://, gs://), into the trial's working folder, which Ray uploads
with each report (``SyncConfig(sync_artifacts=True)``, set by ``trainable.run.tuner`` for such storage).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from ..fit.curves import LiveCurves, hparams_of
from ..store.storage import is_uri


def trial_logdir(exp_dir: str, trial_name: str) -> Path:
    """The folder a trial's events go to (see the module's docstring)."""
    if exp_dir and trial_name and not is_uri(exp_dir):
        return Path(exp_dir) / trial_name
    return Path.cwd()


def syncs_artifacts(storage_path: str) -> bool:
    """Whether Ray must upload the trials' working folders (their events) to the storage."""
    return is_uri(storage_path)


def live_curves(exp_dir: str, trial_name: str, config, stack: ExitStack) -> LiveCurves:
    """The trial's writer, closed with ``stack`` (set ``finished`` once the trial ran all its epochs)."""
    curves = LiveCurves(trial_logdir(exp_dir, trial_name), hparams_of(config))
    stack.callback(lambda: curves.close(curves.finished))
    return curves
