"""What lets a re-run continue an experiment under Ray Tune whatever moment the last one stopped at (issue 23): Ray's
restore path made to restore what is there, this run's settings applied to restored trials, the test folds still to
start, and the hooks that reach the kill-point sweep's moments at Ray's own writes.

Ray's restore path (item 1):
With ``num_to_keep=1`` Ray deletes a trial's previous checkpoint once the next one is registered; a driver killed before
the next experiment snapshot reaches storage leaves a snapshot that names the deleted one. Ray's ``Trainable.restore``
then raises "Could not recover from checkpoint as it does not exist on storage anymore" before our trial function runs,
on every re-run. ``RestoreWhatIsThere`` (a mixin of Ray's function trainable, given through ``__mixins__``) restores
from the newest checkpoint folder the trial has instead (the trial then picks the newest intact one, see
``trial.choose_restore_point``), or starts the trial afresh, with one warning; and it moves Ray's checkpoint index past
every folder there, so a checkpoint written later never lands in an orphaned newer folder. A trial Ray starts without
a checkpoint continues from its folder's too (``continue_from_folder``): a finished one ends at once.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from ..faults import kill_point
from ..store.experiment import EXPERIMENT_STARTED, expected_trials, parse_trial_dirname, read_manifest, update_manifest
from ..store.storage import temp_dir
from .plan import Plan

log = logging.getLogger(__name__)

RESTORE_FALLBACK_ENV = "ASTCV_RESTORE_FALLBACK"  # 0: Ray's own restore (the kill-point test shows it fails)
_CHECKPOINT = re.compile(r"^checkpoint_(\d+)$")
_SNAPSHOT = re.compile(r"^experiment_state-.*\.json$")
_SEARCHER = re.compile(r"^basic-variant-state-.*\.json$")


def checkpoint_folders(fs, trial_path: str) -> list[tuple[int, str]]:
    """(index, path) of the trial's ``checkpoint_NNNNNN`` folders on ``fs``, oldest first."""
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(trial_path.rstrip("/"), recursive=False, allow_not_found=True))
    except OSError:
        return []
    found = [(int(m[1]), i.path) for i in infos if i.type == pafs.FileType.Directory and (m := _CHECKPOINT.match(i.base_name))]
    return sorted(found)


def local_copy(fs, path: str, stack) -> Path | None:
    """The checkpoint folder on this machine: itself on a local filesystem, else a temporary copy removed when
    ``stack`` (an ExitStack) closes. None when it does not exist."""
    import pyarrow.fs as pafs

    if not exists(fs, path):
        return None
    if isinstance(fs, pafs.LocalFileSystem):
        return Path(path)
    tmp = Path(stack.enter_context(temp_dir("restore")))
    pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return tmp


def exists(fs, path: str) -> bool:
    import pyarrow.fs as pafs

    try:
        return fs.get_file_info(path).type == pafs.FileType.Directory
    except OSError:
        return False


def what_is_there(result):
    """The training result to restore, or None for a fresh start. ``result`` is Ray's ``_TrainingResult``
    (checkpoint + metrics) the experiment snapshot names."""
    from ray.tune import Checkpoint

    checkpoint = result.checkpoint
    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    if exists(fs, path):
        return result
    folders = checkpoint_folders(fs, path.rsplit("/", 1)[0])
    if not folders:
        log.warning("checkpoint %s is gone and the trial has no other: restarting it from scratch", path)
        return None
    newest = folders[-1][1]
    log.warning("checkpoint %s is gone (deleted after the last experiment snapshot); restoring from %s", path, newest)
    return type(result)(checkpoint=Checkpoint(newest, filesystem=fs), metrics=dict(result.metrics or {}))


def continue_from_folder(storage) -> None:
    """For a trial Ray starts without a checkpoint whose folder holds some: the newest one there becomes the trial's
    (``tune.get_checkpoint()``; the trial then picks the newest intact one) and Ray's checkpoint index moves past every
    folder there. Such a trial finished, or ran epochs, after the experiment snapshot that was restored (the newer
    ones were damaged and set aside), or its fold starts in a new Tuner because no snapshot could be restored: without
    this it was trained again from scratch (review of issue 23, B3). Called once the trial's session exists; when Ray
    restores the trial after that, its ``restore`` replaces the checkpoint (``RestoreWhatIsThere``)."""
    from ray.train._internal.session import get_session
    from ray.tune import Checkpoint

    session = get_session()
    if storage is None or session is None:
        return
    folders = checkpoint_folders(storage.storage_filesystem, storage.trial_fs_path)
    if not folders:
        return
    storage.current_checkpoint_index = max(storage.current_checkpoint_index, folders[-1][0])
    if session.loaded_checkpoint is None:
        session.loaded_checkpoint = Checkpoint(folders[-1][1], filesystem=storage.storage_filesystem)
        log.warning("Ray starts this trial afresh, but its folder holds checkpoints: continuing from %s", folders[-1][1])


class RestoreWhatIsThere:
    """Mixin of Ray's function trainable (``tune_trial.__mixins__``): see the module's docstring. Ray calls ``setup``
    (a new worker) or ``reset_config`` (a reused one) before ``restore``."""

    def setup(self, config):
        super().setup(config)
        continue_from_folder(getattr(self, "_storage", None))

    def reset_config(self, new_config):  # a reused worker's next trial (Tune's reuse_actors): no setup
        reset = super().reset_config(new_config)
        if reset:
            continue_from_folder(getattr(self, "_storage", None))
        return reset

    def restore(self, checkpoint_path):
        from ray.tune import Checkpoint

        result = checkpoint_path
        if isinstance(result, str):
            result = Checkpoint.from_directory(result)
        if isinstance(result, Checkpoint):
            from ray.train._internal.session import _TrainingResult

            result = _TrainingResult(checkpoint=result, metrics={})
        result = what_is_there(result)  # Ray's checkpoint index is past every folder already (setup, reset_config)
        if result is None:
            return None  # nothing to restore: the trial starts afresh (tune.get_checkpoint() is None)
        return super().restore(result)


def snapshot_stamp(store) -> tuple:
    """(name, size, mtime) of the experiment's Ray snapshots (experiment_state-*.json) on storage."""
    import pyarrow.fs as pafs

    try:
        infos = store.fs.get_file_info(pafs.FileSelector(store.root, recursive=False))
    except OSError:
        return ()
    return tuple(sorted((i.base_name, i.size, i.mtime_ns) for i in infos if i.base_name.startswith("experiment_state")))


_MOMENTS_SEEN: set[str] = set()


def moments_seen() -> set[str]:
    """The driver's one set of Ray writes seen and not yet killed at. A module-level function: Tune pickles a
    restored run's stopper and callbacks apart, and each would get a copy of a set they captured."""
    return _MOMENTS_SEEN


def kill_point_hooks(plan: Plan) -> tuple[Any, Any]:
    """(Tune callback, Tune stopper) that reach the kill points at Ray's own writes; only when a test armed one
    (``trainable.faults``). Tune calls, in one step: the result callbacks (Ray's JSON logger writes params.json at a
    trial's start and a result.json line), then the checkpoint's registration (Ray deletes the previous checkpoint
    with num_to_keep=1), then the stopper's ``stop_all``, then the experiment snapshot, then ``on_step_end``. So
    "checkpoint" fires in ``stop_all`` (the old checkpoint deleted, the snapshot naming it not yet rewritten: issue 23
    item 1's window), "params.json", "result.json" and "snapshot" in ``on_step_end`` (the snapshot seen changed on
    storage)."""
    from ray import tune

    stamp = [snapshot_stamp(plan.store)]

    class KillPoints(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            moments_seen().add("params.json")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            moments_seen().add("result.json")

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            moments_seen().add("checkpoint")

        def on_step_end(self, iteration, trials, **info):
            for point in ("params.json", "result.json"):
                if point in moments_seen():
                    moments_seen().discard(point)
                    kill_point(point)
            now = snapshot_stamp(plan.store)
            if now != stamp[0]:
                stamp[0] = now
                kill_point("snapshot")

    class Window(tune.Stopper):
        def __call__(self, trial_id, result):
            return False

        def stop_all(self):
            if "checkpoint" in moments_seen():
                moments_seen().discard("checkpoint")
                kill_point("checkpoint")
            return False

    return KillPoints(), Window()


def run_settings(plan: Plan, max_failures: int):
    """The Tune callback that applies this run's settings to every trial, restored ones included (a restored trial
    keeps the --max-failures pickled with it otherwise), and marks the experiment started in its manifest when its
    first trial starts (until then another run may start it with other settings)."""
    from ray import tune

    started = [bool((read_manifest(plan.store) or {}).get(EXPERIMENT_STARTED, True))]

    class RunSettings(tune.Callback):
        def on_step_begin(self, iteration, trials, **info):
            for trial in trials:
                trial.max_failures = max_failures

        def on_trial_start(self, iteration, trials, trial, **info):
            keep_earlier_rows(trial)
            if not started[0]:
                update_manifest(plan.store, **{EXPERIMENT_STARTED: True})
                started[0] = True

    return RunSettings()


def keep_earlier_rows(trial) -> None:
    """Ray's loggers continue a trial's result.json and progress.csv from storage only when Ray restores the trial from
    a checkpoint. One it starts afresh that continues from its folder (``continue_from_folder``) or ends at once began
    them empty on the driver, and the next sync replaced the ones on storage: the rows of its earlier epochs were lost
    (review of B3). They are copied from storage first, where this driver has none (Ray's loggers, later in Tune's
    callback list, then append to them)."""
    import pyarrow.fs as pafs
    from ray.tune.result import EXPR_PROGRESS_FILE, EXPR_RESULT_FILE

    if trial.checkpoint is not None:
        return
    fs, local = trial.storage.storage_filesystem, Path(trial.local_path)
    for name in (EXPR_RESULT_FILE, EXPR_PROGRESS_FILE):
        remote = f"{trial.storage.trial_fs_path.rstrip('/')}/{name}"
        try:
            if (local / name).exists() or fs.get_file_info(remote).type != pafs.FileType.File:
                continue
            local.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(remote, str(local / name), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        except OSError as exc:  # the rows stay in the trial's checkpoints (the reducer reads them there too)
            log.warning("could not copy %s of %s from storage: %s", name, trial, exc)


def use_this_runs_settings(tuner, callbacks, stop) -> None:
    """Give a restored Tuner this run's callbacks (and the kill-point stopper), not the ones pickled with the first
    run. Tune has no public way (``Tuner.restore`` takes no RunConfig), so this is the one place that sets its
    private run config; the restored trials' --max-failures is applied by ``run_settings``."""
    run_config = tuner._local_tuner._run_config
    run_config.callbacks = list(callbacks)  # a copy: Tune adds its loggers to it (see ``tuner.new_tuner``)
    run_config.stop = stop


def _experiment_state_ok(raw: bytes) -> bool:
    try:
        state = json.loads(raw.decode("utf-8"))
    except ValueError:
        return False
    return isinstance(state, dict) and isinstance(state.get("trial_data"), list) and isinstance(
        state.get("runner_data"), dict)


def _searcher_state_ok(raw: bytes) -> bool:
    import ray.cloudpickle as cloudpickle

    try:
        return isinstance(cloudpickle.loads(raw), dict)
    except Exception:  # cut short or not Ray's: whatever unpickling raises
        return False


# Ray's restore reads the newest of each: the experiment snapshot (JSON) and the search algorithm's state (a pickle,
# written in the same save).
_SAVED_STATE = ((_SNAPSHOT, _experiment_state_ok), (_SEARCHER, _searcher_state_ok))


def set_aside_damaged_snapshots(store) -> list[str]:
    """Ray restores from the experiment's newest snapshot (``experiment_state-*.json``) and search state
    (``basic-variant-state-*.json``); one cut short (the driver killed while it was copied to storage) or not Ray's
    made every re-run fail with a traceback. Each such file is renamed to NAME.damaged (kept for a look), so Ray
    restores from the newest intact ones of an earlier session, if any (its trials continue from what their folders
    hold: ``RestoreWhatIsThere``). Returns the names set aside."""
    damaged = []
    for name in store.list_files():
        ok = next((check for pattern, check in _SAVED_STATE if pattern.match(name)), None)
        if ok is None:
            continue
        if not ok(store.read_bytes(name) or b""):
            set_aside(store, name)
            damaged.append(name)
    return damaged


def restorable(store) -> bool:
    """Whether Ray's restore has what it reads: the Tuner (tuner.pkl), a snapshot and a search state (intact, once
    ``set_aside_damaged_snapshots`` ran). Without them ``Tuner.restore`` started a grid of empty configs."""
    names = store.list_files()
    return "tuner.pkl" in names and all(any(pattern.match(n) for n in names) for pattern, _ in _SAVED_STATE)


def set_aside(store, name: str) -> None:
    """Rename ``name`` in the experiment folder to NAME.damaged."""
    store.write_bytes(f"{name}.damaged", store.read_bytes(name) or b"")
    store.delete(name)


def folds_not_started(plan: Plan, tuner=None) -> list[int]:
    """The grid's test folds that the restored Ray experiment (``tuner``; None: nothing restored) holds no trial of
    and whose trials have not all finished in an earlier run: folds a --test-folds growth added and whose Tuner never
    started (an interruption in between), found from the trials, so none is ever lost. A growth's Tuner writes a
    snapshot of its own, the newest, so an experiment grown and then interrupted restores only the grown folds'
    trials: the folds finished before the growth are held by their finished trials (``plan.finished``), not started
    again."""
    try:
        held = {int(r.config["test_fold"]) for r in tuner.get_results() if r.config} if tuner is not None else set()
    except Exception:  # a damaged experiment state: Tune's restore above has said so
        log.warning("could not list the restored trials; starting the test folds that have no trial folder")
        held = {int(p["test_fold"]) for name in plan.store.list_dirs() if (p := parse_trial_dirname(name))}
    trials = expected_trials(plan.grid)
    finished = {f for f in plan.grid["test_fold"]
                if all(name in plan.finished for name, (fold, *_) in trials.items() if fold == int(f))}
    return [f for f in plan.grid["test_fold"] if int(f) not in held and f not in finished]


def drop_superseded_checkpoints(store, epochs: int) -> list[str]:
    """With ``--keep-checkpoints best`` a finished trial keeps its last checkpoint only, but Ray deletes only the
    checkpoints it registered: a trial that continued from a folder Ray did not name (``RestoreWhatIsThere``,
    ``continue_from_folder``) left the older ones behind, 1.03 GB each at AST-base. Once a trial's newest checkpoint
    holds its last epoch and is intact (checked on a local copy), its older ones are removed. Run by the driver after
    its Tuners returned (no trial writes then). Returns the folders removed."""
    from contextlib import ExitStack

    from ..fit.checkpoint import checkpoint_problem, read_trainer_state

    removed = []
    for trial in store.list_dirs():
        folders = checkpoint_folders(store.fs, store.path(trial))
        if len(folders) < 2:
            continue
        *older, (_, newest) = folders
        with ExitStack() as stack:
            local = local_copy(store.fs, newest, stack)
            if local is None or checkpoint_problem(local) is not None:
                continue
            state = read_trainer_state(local)
            if not (state.finished if state.config else state.epoch >= epochs):  # a --grid epochs=... trial: its own
                continue
        for _, path in older:
            rel = f"{trial}/{path.rstrip('/').rsplit('/', 1)[1]}"
            store.delete(rel)
            removed.append(rel)
    return removed


def with_restore_fallback(trainable):
    """The trial function with ``RestoreWhatIsThere`` in Ray's restore path (Ray's function trainable takes the
    classes of a function's ``__mixins__`` as bases): a snapshot naming a deleted checkpoint restores what is there.
    Set last, on the function Tune gets (``with_parameters`` copies the attribute, ``with_resources`` may wrap)."""
    if os.environ.get(RESTORE_FALLBACK_ENV, "1") != "0":
        trainable.__mixins__ = (RestoreWhatIsThere,)
    return trainable
