"""Running a Plan with Ray Tune: start or join Ray, build (or restore) the Tuner over the grid, print one line per
epoch result, and stop the whole run at once when the disk fills. With ``trainable.run.trial``, the only modules of the
project that import Ray.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import pickle
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..fit.checkpoint import SIMULATE_DISK_FULL_ENV
from ..fit.curves import LIVE_EVERY_ENV
from ..errors import AstCvError
from ..store.experiment import EPOCH, FINISHED_EARLIER, expected_epochs, expected_trials, extra_axes, trial_dirname
from .cluster import NodeProblem, code_env, connect_problem, on_cluster
from .live import syncs_artifacts
from ..store.lock import check_held
from .plan import GRID_KEYS, Plan
from .quiet import driver_env
from .progress import Progress, TrialView
from ..faults import FAULT_ENVS, armed, kill_point
from .resume import (folds_not_started, kill_point_hooks, restorable, run_settings, set_aside,
                     set_aside_damaged_snapshots, use_this_runs_settings, with_restore_fallback)
from ..store.storage import StorageFull, exception_chain, free_bytes, human_bytes, is_disk_full

REUSE_WORKERS_ENV = "ASTCV_REUSE_WORKERS"  # 0: a new worker process per trial (benchmarks/startup.py compares)
TIMELINE_ENV = "ASTCV_TIMELINE"  # a JSON file: the console's events of this session, recorded (benchmarks/eta.py)
POLL_S = 5.0  # how often the driver collects the trials' in-epoch progress
# Variables the trials need from the driver's environment (runtime env of every Ray worker).
PASSED_TO_TRIALS = ("HF_HUB_OFFLINE", "HF_HOME", "ASTCV_SIMULATE_OOM_ABOVE", "ASTCV_SIMULATE_OOM_IN_STEP",
                    SIMULATE_DISK_FULL_ENV, LIVE_EVERY_ENV, *FAULT_ENVS)


def trial_name(trial) -> str:
    c = trial.config
    return trial_dirname(c["test_fold"], c["lr"], c["batch_size"], {k: v for k, v in c.items() if k not in GRID_KEYS})


@dataclass
class Outcome:
    """How a Tuner run ended: trials that failed for good, and whether it stopped before every trial was done."""

    failed: int
    interrupted: bool


def last_error_line(text: str) -> str:
    """The exception line of a traceback (Ray's error.txt), e.g. 'ValueError: ...'."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(" ")]
    return lines[-1][:300] if lines else "see the error file"


def _error_text(trial) -> str:
    try:
        return Path(trial.error_file).read_text(errors="replace") if trial.error_file else ""
    except OSError:
        return ""


def views(trials) -> list[TrialView]:
    return [TrialView(trial_name(t), t.status, int((t.last_result or {}).get(EPOCH, 0)), dict(t.last_result or {}))
            for t in trials]


def make_callback(plan: Plan, progress: Progress, board_name: str | None = None):
    """The Tune callback: progress lines (``trainable.run.progress``) and the storage watch.

    A trial that failed on a full disk, or free space at a local storage path below what the next checkpoint needs,
    stops the whole run (raising StorageFull through Tune): every other trial would fail the same way.
    """
    from ray import tune

    import ray

    local = plan.store.local_path
    next_write = plan.footprint.checkpoint_bytes if plan.footprint else 0
    polled = [0.0]

    class Watch(tune.Callback):
        def setup(self, **info):
            progress.start()

        def on_step_begin(self, iteration, trials, **info):
            if board_name is None or time.time() - polled[0] < POLL_S:
                return
            polled[0] = time.time()
            try:
                progress.poll(views(trials), ray.get(ray.get_actor(board_name).drain.remote(), timeout=POLL_S))
            except (ValueError, ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
                pass

        def on_trial_start(self, iteration, trials, trial, **info):
            progress.trial_started(trial_name(trial), views(trials))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            progress.result(trial_name(trial), result, views(trials))
            if local is not None and next_write:
                free = free_bytes(local)
                if free is not None and free < next_write:
                    raise StorageFull(local, f"the next checkpoint needs about {human_bytes(next_write)}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            progress.trial_finished(trial_name(trial), views(trials))

        def _failure(self, trial, trials, final: bool):
            text = _error_text(trial)
            full = StorageFull.from_error_text(text, str(local or plan.exp_dir))
            if full is not None:
                raise full
            node = NodeProblem.from_error_text(text)  # not transient: stop the run, retrying fails the same way
            if node is not None:
                raise node
            progress.trial_failed(trial_name(trial), last_error_line(text), trial.error_file or trial.local_path,
                                  views(trials), final)

        def on_trial_recover(self, iteration, trials, trial, **info):
            self._failure(trial, trials, final=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._failure(trial, trials, final=True)

    return Watch()


def lock_guard_callback():
    """First of the Tune callbacks: before Tune handles a result, a checkpoint or its experiment snapshot, a driver
    that lost the experiment's lock (paused, then taken over by another run) stops (``store.lock.check_held``)."""
    from ray import tune

    class LockGuard(tune.Callback):
        def on_step_begin(self, iteration, trials, **info):
            check_held()

        def on_step_end(self, iteration, trials, **info):
            check_held()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            check_held()

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            check_held()

        def on_trial_complete(self, iteration, trials, trial, **info):
            check_held()

        def on_experiment_end(self, trials, **info):
            check_held()

    return LockGuard()


def tensorboard_callback():
    """In place of Ray's TensorBoard logger (which logs its internal counters too), one that writes nothing: each trial
    writes its own events, per step while an epoch runs (``trainable.fit.curves``), into its folder. A
    TBXLoggerCallback subclass, so that Ray adds no logger of its own."""
    from ray.tune.logger import TBXLoggerCallback

    class TrialsWriteTheirOwn(TBXLoggerCallback):
        def log_trial_start(self, trial):
            pass

        def log_trial_result(self, iteration, trial, result):
            pass

        def log_trial_end(self, trial, failed: bool = False):
            pass

    return TrialsWriteTheirOwn()


def csv_callback():
    """Ray's CSV logger (progress.csv) less the one result of a trial that ended at once (``FINISHED_EARLIER``): written
    under the header of the file it continues, its values landed in other columns (review of B3)."""
    from ray.tune.logger import CSVLoggerCallback

    class EpochRowsOnly(CSVLoggerCallback):
        def log_trial_result(self, iteration, trial, result):
            if not result.get(FINISHED_EARLIER):
                super().log_trial_result(iteration, trial, result)

    return EpochRowsOnly()


def progress_board(name: str):
    """A named actor the trials post their in-epoch progress to and the driver drains (trials' own output stays in
    their logs: the console shows our lines only). By name, not by handle: Tune pickles its callbacks with the
    experiment, and a handle would not outlive this Ray session."""
    import ray

    @ray.remote(num_cpus=0)
    class Board:
        def __init__(self):
            self.items: list[tuple[str, dict]] = []

        def post(self, name: str, message: dict) -> None:
            self.items = (self.items + [(name, message)])[-1000:]

        def drain(self) -> list[tuple[str, dict]]:
            items, self.items = self.items, []
            return items

    return Board.options(name=name).remote()


def checkpoint_config(tune, keep: str):
    """What Ray keeps of each trial's checkpoints: "best" the latest only (it carries the best weights, see
    ``trainable.fit.checkpoint``), "all" every one."""
    return tune.CheckpointConfig(num_to_keep=1 if keep == "best" else None)


def ray_init_args(plan: Plan, debug: bool) -> dict[str, Any]:
    code = code_env(plan.resources.address)  # on a cluster the package is shipped, locally PYTHONPATH
    env = {**code.pop("env_vars", {}), "TOKENIZERS_PARALLELISM": "false",
           **{k: os.environ[k] for k in PASSED_TO_TRIALS if k in os.environ}}
    init: dict[str, Any] = dict(log_to_driver=debug, runtime_env={"env_vars": env, **code},
                                logging_level=logging.INFO if debug else logging.WARNING)
    if plan.resources.address:
        init["address"] = plan.resources.address
    else:  # a local start: no dashboard (nothing listens beyond Ray's own ports), a modest object store (Colab's /dev/shm);
        # "local" starts a Ray of our own even where another one runs on this machine (a second experiment, a 'ray start'),
        # which Ray would otherwise join, with the resources planned for this machine refused
        init.update(address="local", num_gpus=plan.resources.num_gpus, include_dashboard=False,
                    object_store_memory=256 * 1024**2)
    return init


def new_tuner(tune, plan: Plan, trainable, test_folds, callbacks, debug: bool, max_failures: int, stop=None):
    """A Tuner over the grid's ``test_folds``. It gets a copy of ``callbacks``: Tune appends its default loggers to the
    list it is given, and those keep the Trial objects of the run they logged; a second Tuner given the same list
    pickled them into its tuner.pkl, which then could not be restored ("Unknown trainable: tune_trial")."""
    grid = {**plan.grid, "test_fold": list(test_folds)}
    return tune.Tuner(
        trainable,
        param_space={k: tune.grid_search(v) for k, v in grid.items()},
        tune_config=tune.TuneConfig(trial_dirname_creator=trial_name, trial_name_creator=trial_name,
                                    reuse_actors=os.environ.get(REUSE_WORKERS_ENV, "1") != "0"),
        run_config=tune.RunConfig(
            name=plan.name, storage_path=plan.storage_path, verbose=1 if debug else 0, callbacks=list(callbacks),
            stop=stop,
            checkpoint_config=checkpoint_config(tune, plan.config.keep_checkpoints),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            sync_config=tune.SyncConfig(sync_artifacts=syncs_artifacts(plan.storage_path)),
        ),
    )


def fit(tuner, plan: Plan) -> None:
    """``tuner.fit()``; a full disk becomes StorageFull, a damaged error file of Ray's is not our failure."""
    try:
        tuner.fit()
    except (pickle.UnpicklingError, EOFError):
        pass  # Tune's result grid could not read a damaged error file; the callback counted the trials
    except Exception as exc:
        ours = next((e for e in exception_chain(exc) if isinstance(e, (StorageFull, NodeProblem))), None)
        if ours is not None:  # raised by the callback (Tune may wrap it)
            raise ours from None
        if is_disk_full(exc):
            raise StorageFull(plan.store.local_path or plan.exp_dir) from exc
        raise


# Where each module of the flat layout (before trainable/ had folders) lives now. An experiment started before the
# move holds pickles (the Tuner, its callbacks) that name the old modules; restoring it needs them under both names.
# (trainable.data is now the folder: nothing of the old metadata module was pickled.)
MOVED_MODULES = {f"trainable.{old}": f"trainable.{new}" for old, new in {
    "audio": "data.audio", "features": "data.features", "cache": "data.cache",
    "synth": "data.synth", "train": "fit.train", "steps": "fit.steps", "oom": "fit.oom", "checkpoint": "fit.checkpoint",
    "model": "fit.model", "local": "fit.local", "storage": "store.storage", "experiment": "store.experiment",
    "lock": "store.lock", "footprint": "store.footprint", "plan": "run.plan", "prepare": "run.prepare",
    "tuner": "run.tuner", "trial": "run.trial", "progress": "run.progress", "demo": "run.demo",
    "reduce": "results.reduce", "select": "results.select", "stats": "results.stats", "report": "results.report",
    "plots": "results.plots"}.items()}


def alias_moved_modules() -> None:
    """Make the old module names importable for unpickling an experiment started before the layout move."""
    for old, new in MOVED_MODULES.items():
        sys.modules[old] = importlib.import_module(new)


@contextmanager
def ray_session(plan: Plan, debug: bool) -> Iterator[None]:
    """Ray for the block: started on this machine, or joined at --address; ``ray.shutdown`` when it ends (a joined
    cluster keeps running)."""
    import ray

    with driver_env(debug):
        try:
            ray.init(**ray_init_args(plan, debug))
        except ConnectionError as exc:
            raise AstCvError(connect_problem(plan.resources.address, exc)) from None
        try:
            yield
        finally:
            ray.shutdown()


@contextmanager
def cluster_session(plan: Plan, debug: bool) -> Iterator[Plan]:
    """On a cluster (--address): joined for the block, which gets the plan settled on its alive nodes
    (``cluster.on_cluster``; refused when none fits a trial): the preflight, the nodes' caches and the trials all run
    in this session. Locally the plan as it is, and nothing started: ``run_experiment`` starts Ray after the preflight."""
    if plan.resources.address is None:
        yield plan
        return
    with ray_session(plan, debug):
        yield on_cluster(plan)


def run_experiment(plan: Plan, debug: bool = False, max_failures: int = 2, trial=None) -> Outcome:
    """Start Ray (on a cluster: in the ``cluster_session`` the block runs in); continue the recorded Ray run
    (restore), then start the trials of test folds not run yet (all of them for a new experiment). Raises StorageFull
    when the disk fills. ``trial``: the function each trial runs, with ``trial.tune_trial``'s signature (the default);
    ``benchmarks/cluster_scale.py`` passes one that only reports, to measure the driver at hundreds of trials."""
    from ray import tune

    from .trial import tune_trial

    progress = Progress(list(expected_trials(plan.grid)), plan.finished, expected_epochs(plan.grid, plan.config.epochs),
                        plan.resources.slots())
    if os.environ.get(TIMELINE_ENV):
        progress.timeline = []
    session = ray_session(plan, debug) if plan.resources.address is None else driver_env(debug)  # cluster: joined
    try:
        with session:
            board = f"astcv-progress-{uuid.uuid4().hex[:8]}"
            board_actor = progress_board(board)  # held for the run: an actor without a handle is stopped
            trainable = with_restore_fallback(tune.with_resources(tune.with_parameters(
                trial or tune_trial, base=plan.trial_base, exp_dir=plan.exp_dir, board=board), plan.resources.as_ray()))
            callbacks = [lock_guard_callback(), make_callback(plan, progress, board), tensorboard_callback(),
                         run_settings(plan, max_failures), csv_callback()]  # run_settings copies the logs first
            stop = None
            if armed():
                hooks, stop = kill_point_hooks(plan)
                callbacks.append(hooks)
            r = plan.resources
            left = f"{plan.trials - len(plan.finished)} of {plan.trials} trials ({len(plan.finished)} finished earlier; " \
                if plan.finished else f"{plan.trials} trials ("
            print(f"Running {left}{describe_grid(plan.grid)}), {r.cpus_per_trial:g} CPU + "
                  f"{r.gpus_per_trial:g} GPU each, into {plan.exp_dir}", flush=True)
            new_folds = plan.grid["test_fold"]
            if plan.restore:
                new_folds = restore_and_fit(tune, plan, trainable, callbacks, stop)
            earlier = [n for n, (f, _, _) in expected_trials(plan.grid).items() if f not in new_folds]
            if new_folds and not progress.failed and progress.done(earlier):
                if plan.restore:
                    kill_point("growth")
                fit(new_tuner(tune, plan, trainable, new_folds, callbacks, debug, max_failures, stop), plan)
            del board_actor
            return Outcome(failed=progress.failed, interrupted=not progress.all_done)
    finally:
        if progress.timeline is not None:
            progress._record("end")
            Path(os.environ[TIMELINE_ENV]).write_text(json.dumps(progress.timeline_json()))


def damaged(name: str) -> None:
    print(f"warning: the experiment's saved state {name} is damaged (cut short?): set aside as {name}.damaged; "
          f"restoring from what else is there (each trial continues from the checkpoints in its folder).", flush=True)


def restore_and_fit(tune, plan: Plan, trainable, callbacks, stop) -> list[int]:
    """Continue the recorded Ray run (its newest intact snapshot; damaged ones set aside) to its end; the test folds
    still to start afterwards (``resume.folds_not_started``; with no snapshot to restore: those not finished)."""
    for name in set_aside_damaged_snapshots(plan.store):
        damaged(name)
    if not restorable(plan.store):
        return folds_not_started(plan)
    print(f"Resuming {plan.exp_dir}: finished trials are kept, the others continue from their last checkpoint.",
          flush=True)
    alias_moved_modules()
    try:
        tuner = tune.Tuner.restore(plan.exp_dir, trainable, resume_errored=True)
    except (pickle.UnpicklingError, EOFError):  # tuner.pkl cut short (a growth rewrites it)
        set_aside(plan.store, "tuner.pkl")
        damaged("tuner.pkl")
        return folds_not_started(plan)
    use_this_runs_settings(tuner, callbacks, stop)
    fit(tuner, plan)
    return folds_not_started(plan, tuner)


def describe_grid(grid) -> str:
    n_f, n_lr, n_bs = (len(grid[k]) for k in GRID_KEYS)
    return (f"{n_f} fold{'s' * (n_f != 1)} x {n_lr} learning rate{'s' * (n_lr != 1)} x "
            f"{n_bs} batch size{'s' * (n_bs != 1)}" + "".join(f" x {len(v)} {k}" for k, v in extra_axes(grid).items()))
