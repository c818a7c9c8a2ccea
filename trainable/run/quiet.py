"""The driver's Ray environment and loggers while the Tuner runs: the classic console output, no usage stats, and Ray's
messages that are ours to word quieted unless --debug (Tune's slow-snapshot warning stays in sight). No Ray import.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

# Driver-side Ray settings for the Tuner's run (restored afterwards): no usage stats, and the
# classic console output (Tune's new one prints boxes and a TensorBoard path into /tmp/ray); --debug keeps Ray's own.
DRIVER_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
QUIET_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_PRINT_ALL_TRIAL_ERRORS": "0"}
QUIET_LOGGERS = ("ray.tune", "ray.train", "ray.air")  # their errors and warnings are ours to word, unless --debug


# Ray's notice on every local start (RAY_AUTH_MODE unset): "Token authentication is enabled for this Ray cluster. Set
# RAY_AUTH_MODE=disabled to opt out." The cluster is this run's own, its token made and read by Ray alone: nothing for
# the user to do, so it is left out (unless --debug). Joining a cluster (--address) keeps Ray's auth messages.
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"


class _TokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TOKEN_NOTICE)


# Of Tune's quieted messages one stays in sight: the experiment snapshot (what a resume restores from) taking longer than
# TUNE_WARN_SLOW_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S (30 s) to reach storage: slow object storage or a huge grid,
# where a crash of the driver would lose more. Its sibling about forced snapshots (every checkpoint forces one with
# num_to_keep=1: routine here) stays quiet unless --debug.
SNAPSHOT_LOGGER = "ray.tune.execution.experiment_state"
SLOW_SNAPSHOT = "Saving the experiment state"


class _SlowSnapshotOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return str(record.msg).startswith(SLOW_SNAPSHOT)


@contextmanager
def driver_env(debug: bool) -> Iterator[None]:
    """Set DRIVER_ENV (and QUIET_ENV unless ``debug``) where the user has not, and quiet Ray's loggers, for the
    block only."""
    wanted = {**DRIVER_ENV, **({} if debug else QUIET_ENV)}
    added = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(added)
    levels = {name: logging.getLogger(name).level for name in (*QUIET_LOGGERS, SNAPSHOT_LOGGER)}
    notice, slow = _TokenNotice(), _SlowSnapshotOnly()
    if not debug:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        logging.getLogger(SNAPSHOT_LOGGER).setLevel(logging.WARNING)
        logging.getLogger(SNAPSHOT_LOGGER).addFilter(slow)
        logging.getLogger(TOKEN_NOTICE_LOGGER).addFilter(notice)
    try:
        yield
    finally:
        logging.getLogger(TOKEN_NOTICE_LOGGER).removeFilter(notice)
        logging.getLogger(SNAPSHOT_LOGGER).removeFilter(slow)
        for k in added:
            os.environ.pop(k, None)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
