"""Running a Plan with Ray Tune: start or join Ray, build (or restore) the Tuner over the grid, print one line per
epoch result. With ``trainable.trial``, the only modules of the project that import Ray.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .experiment import EPOCH, SAMPLES_PER_SECOND, SELECTION_SCORE, TEST_ACCURACY, VAL_ACCURACY, trial_dirname
from .plan import GRID_KEYS, Plan

# Driver-side Ray settings for the Tuner's run (restored afterwards): no usage stats, no sync-time warnings, and the
# classic console output (Tune's new one prints boxes and a TensorBoard path into /tmp/ray); --debug keeps Ray's own.
DRIVER_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
QUIET_ENV = {"RAY_AIR_NEW_OUTPUT": "0"}
# Variables the trials need from the driver's environment (runtime env of every Ray worker).
PASSED_TO_TRIALS = ("HF_HUB_OFFLINE", "HF_HOME", "ASTCV_SIMULATE_OOM_ABOVE", "ASTCV_SIMULATE_OOM_IN_STEP")


@contextmanager
def driver_env(debug: bool) -> Iterator[None]:
    """Set DRIVER_ENV (and QUIET_ENV unless ``debug``) where the user has not, for the block only."""
    wanted = {**DRIVER_ENV, **({} if debug else QUIET_ENV)}
    added = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def trial_name(trial) -> str:
    c = trial.config
    return trial_dirname(c["test_fold"], c["lr"], c["batch_size"])


def make_progress_callback(total: int, epochs: int):
    """A Tune callback printing one line per epoch result and per finished/failed trial, instead of Ray's tables."""
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self):
            self.start = time.time()
            self.best = (-1.0, "")
            self.completed: set[str] = set()  # trial ids whose completion was reported (status may lag)

        def setup(self, **info):
            self.start = time.time()

        def _counts(self, trials) -> str:
            states = ["TERMINATED" if t.trial_id in self.completed else t.status for t in trials]
            return (f"{states.count('TERMINATED')}/{total} done, {states.count('RUNNING')} running, "
                    f"{states.count('PENDING')} pending" + (f", {states.count('ERROR')} failed" if "ERROR" in states else ""))

        def _stamp(self) -> str:
            s = int(time.time() - self.start)
            return f"[{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}]"

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if VAL_ACCURACY not in result:
                return
            name = trial_name(trial)
            if result[VAL_ACCURACY] > self.best[0]:
                self.best = (result[VAL_ACCURACY], name)
            print(f"{self._stamp()} {name} epoch {result[EPOCH]}/{epochs}: val_acc {result[VAL_ACCURACY]:.3f} "
                  f"test_acc {result[TEST_ACCURACY]:.3f} ({result[SAMPLES_PER_SECOND]:.0f} samples/s) | "
                  f"{self._counts(trials)} | best val_acc {self.best[0]:.3f} ({self.best[1]})", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.completed.add(trial.trial_id)
            print(f"{self._stamp()} {trial_name(trial)} finished | {self._counts(trials)}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"{self._stamp()} {trial_name(trial)} FAILED (see {trial.local_path}/error.txt) | "
                  f"{self._counts(trials)}", flush=True)

    return Progress()


def ray_init_args(plan: Plan, debug: bool) -> dict[str, Any]:
    project_root = str(Path(__file__).resolve().parent.parent)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [project_root, os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false", **{k: os.environ[k] for k in PASSED_TO_TRIALS if k in os.environ}}
    init: dict[str, Any] = dict(log_to_driver=debug, runtime_env={"env_vars": env},
                                logging_level=logging.INFO if debug else logging.WARNING)
    if plan.resources.address:
        init["address"] = plan.resources.address
    else:  # a local start: no dashboard (nothing listens beyond Ray's own ports), a modest object store (Colab's /dev/shm)
        init.update(num_gpus=plan.resources.num_gpus, include_dashboard=False, object_store_memory=256 * 1024**2)
    return init


def run_experiment(plan: Plan, debug: bool = False, max_failures: int = 2) -> int:
    """Start or join Ray, run (or restore) the Tuner. Returns the number of failed trials."""
    import ray
    from ray import tune

    from .trial import tune_trial

    with driver_env(debug):
        ray.init(**ray_init_args(plan, debug))
        try:
            trainable = tune.with_resources(tune.with_parameters(tune_trial, base=plan.trial_base), plan.resources.as_ray())
            if plan.restore and tune.Tuner.can_restore(plan.exp_dir):
                print(f"Resuming {plan.exp_dir}: finished trials are kept, the others continue from their last checkpoint.",
                      flush=True)
                tuner = tune.Tuner.restore(plan.exp_dir, trainable, resume_errored=True)
            else:
                tuner = tune.Tuner(
                    trainable,
                    param_space={k: tune.grid_search(v) for k, v in plan.grid.items()},
                    tune_config=tune.TuneConfig(trial_dirname_creator=trial_name, trial_name_creator=trial_name),
                    run_config=tune.RunConfig(
                        name=plan.name, storage_path=plan.storage_path, verbose=1 if debug else 0,
                        callbacks=[make_progress_callback(plan.trials, plan.config.epochs)],
                        # Ranked by the score the reducer selects epochs by: the chosen epoch's checkpoint is kept.
                        checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=SELECTION_SCORE,
                                                                checkpoint_score_order="max"),
                        failure_config=tune.FailureConfig(max_failures=max_failures),
                    ),
                )
            n_f, n_lr, n_bs = (len(plan.grid[k]) for k in GRID_KEYS)
            r = plan.resources
            print(f"Running {plan.trials} trials ({n_f} fold{'s' * (n_f != 1)} x {n_lr} learning rate{'s' * (n_lr != 1)} x "
                  f"{n_bs} batch size{'s' * (n_bs != 1)}), {r.cpus_per_trial:g} CPU + {r.gpus_per_trial:g} GPU each, "
                  f"into {plan.exp_dir}", flush=True)
            return tuner.fit().num_errors
        finally:
            ray.shutdown()
