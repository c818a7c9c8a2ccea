"""TensorBoard while a trial runs (issue 25): the trial writes its own events, per optimizer step during the epoch
(before: only when the epoch ended, through the Tune results), with the HParams record and tags that sort the
accuracy and loss cards before perf/*."""

import threading

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from test_train import small_config
from trainable.fit.curves import LiveCurves, hparams_of
from trainable.fit.train import fit
from trainable.store.experiment import HPARAM_METRICS, TRAIN_LOSS, VAL_ACCURACY


def read(folder):
    events = EventAccumulator(str(folder))
    events.Reload()
    return events


class PausedInFirstEpoch(LiveCurves):
    """The trial's own writer, holding the trial after its third optimizer step until the test has looked."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reached, self.go = threading.Event(), threading.Event()

    def step(self, step, loss, lr):
        super().step(step, loss, lr)
        if step == 3:
            self.reached.set()
            assert self.go.wait(120), "the test never let the trial go on"


def test_a_running_trials_events_show_per_step_loss_during_its_first_epoch(synth_root, tiny_ast_1024, tmp_path):
    config = small_config(synth_root, tiny_ast_1024, epochs=1, batch_size=2, max_steps_per_epoch=5)
    reports = []
    curves = PausedInFirstEpoch(tmp_path / "trial", hparams_of(config), every_s=0.0)

    def report(metrics, checkpoint_dir):  # what the Ray trial's reporter does first (trainable.run.trial)
        curves.epoch(metrics)
        reports.append(metrics)

    trial = threading.Thread(target=lambda: fit(config, report, on_step=curves.step), daemon=True)
    trial.start()
    try:
        assert curves.reached.wait(180), "the trial never reached its third step"
        during = read(tmp_path / "trial")  # the first epoch is still running: nothing reported yet
        assert reports == []
        assert [e.step for e in during.Scalars("loss/train")] == [1, 2, 3]
        assert [e.step for e in during.Scalars("lr/train")] == [1, 2, 3]
        assert "accuracy/val" not in during.Tags()["scalars"]
    finally:
        curves.go.set()
        trial.join(180)
    curves.close(finished=True)
    after = read(tmp_path / "trial")
    assert [e.step for e in after.Scalars("loss/train")] == [1, 2, 3, 4, 5]
    assert after.Scalars("accuracy/val")[0].value == pytest.approx(reports[0][VAL_ACCURACY])
    assert after.Scalars("loss/train_epoch")[0].value == pytest.approx(reports[0][TRAIN_LOSS])
    assert "train_steps" not in reports[0]  # per-step data stays out of the Tune results


def test_the_epochs_reported_before_a_kill_are_on_disk(tmp_path):
    # A Ctrl-C or a crash closes no writer: each epoch's events must be on disk when it is reported (before, through
    # the driver's queued tensorboardX writer, a run interrupted after 3 epochs kept 1 of them, 3 runs of 3).
    curves = LiveCurves(tmp_path, every_s=60.0)
    for epoch in (1, 2, 3):
        curves.step(epoch * 10, 1.0, 1e-3)
        curves.epoch({"epoch": epoch, "val_accuracy": epoch / 10})
    events = read(tmp_path)  # not closed
    assert [e.step for e in events.Scalars("accuracy/val")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("loss/train")] == [10, 20, 30]


def test_the_hparams_view_gets_each_trials_grid_point_and_accuracy_tags(tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    curves = LiveCurves(tmp_path, {"lr": 1e-3, "batch_size": 8, "test_fold": 2, "val_fold": 1}, every_s=0.0)
    curves.epoch({"epoch": 1, "val_accuracy": 0.5, "test_accuracy": 0.25, "best_val_accuracy": 0.5,
                  "best_test_accuracy": 0.25, "samples_per_second": 9.0})
    curves.close(finished=True)
    content = read(tmp_path).PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert {k: v.number_value for k, v in start.hparams.items()} == {"lr": 1e-3, "batch_size": 8, "test_fold": 2,
                                                                      "val_fold": 1}
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == list(HPARAM_METRICS)
    assert "_hparams_/session_end_info" in content
    tags = read(tmp_path).Tags()["scalars"]
    assert set(HPARAM_METRICS) <= set(tags)  # the table's columns are scalars of the same run
    order = ("accuracy", "loss", "lr", "perf")  # TensorBoard sorts the cards' groups by name: perf/* comes last
    ranks = [order.index(tag.split("/")[0]) for tag in sorted(tags)]
    assert ranks == sorted(ranks) and ranks[0] == 0 and ranks[-1] == 3


def test_a_smoke_run_is_its_own_experiment_by_default(tmp_path):
    from trainable.run.plan import DEFAULT_NAME, experiment_location

    assert experiment_location(str(tmp_path), None, "smoke")[1] == "smoke"  # not the grid's folder, nor its curves
    assert experiment_location(str(tmp_path), None, "card")[1] == DEFAULT_NAME
    assert experiment_location(str(tmp_path), "mine", "smoke")[1] == "mine"
