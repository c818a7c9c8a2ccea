"""A resumed trial equals an uninterrupted one (issue 23 item 10): stopped at an epoch boundary or in the middle of
an epoch (its progress lost), then resumed from the last checkpoint, every epoch reports the same metrics (<= 1e-6).

With loader workers (persistent, as trials run) and dropout: the data order, the global RNGs and the workers' seeds
all have to be functions of (seed, epoch) for this to hold (``trainable.fit.rng``).
"""

import shutil

import pytest
import torch

from trainable.config import TrainConfig
from trainable.fit.model import build_tiny_ast
from trainable.fit.train import fit
from trainable.store.experiment import EPOCH

COMPARED = ("train_loss", "val_loss", "val_accuracy", "test_loss", "test_accuracy", "best_epoch", "micro_batch_size")
TOL = 1e-6


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def tiny_dropout_model(tmp_path_factory):
    """A tiny AST with dropout: its training depends on the RNG state."""
    return build_tiny_ast(tmp_path_factory.mktemp("tiny-dropout-exact"), max_length=400, dropout=0.2)


def exact_config(data_root, model, **kw) -> TrainConfig:
    values = dict(data_root=str(data_root), model=str(model), folds=(1, 2, 3), test_fold=2, lr=1e-3, batch_size=4,
                  epochs=3, num_frames=128, num_workers=2, max_steps_per_epoch=3, torch_threads=1)
    values.update(kw)
    return TrainConfig.from_dict(values)


class Recorder:
    """Reporter keeping every epoch's metrics and a copy of epoch ``keep``'s checkpoint."""

    def __init__(self, keep_dir=None, keep: int = 1, stop_after: int | None = None):
        self.rows, self.keep_dir, self.keep, self.stop_after = [], keep_dir, keep, stop_after

    def __call__(self, metrics, ckpt):
        self.rows.append({k: metrics[k] for k in (EPOCH, *COMPARED)})
        if self.keep_dir is not None and metrics[EPOCH] == self.keep:
            shutil.copytree(ckpt, self.keep_dir)
        if metrics[EPOCH] == self.stop_after:
            raise Interrupt


def stop_in_epoch(epoch: int, steps_per_epoch: int):
    """A global forward hook (torch's own) that interrupts training after one optimizer step of ``epoch``: the
    epoch's progress is lost, and the RNGs, optimizer and loaders of the process have moved on."""
    calls = []

    def hook(module, args, output):
        if module.training and type(module).__name__ == "ASTForAudioClassification":
            calls.append(1)
            if len(calls) == (epoch - 1) * steps_per_epoch + 2:
                raise Interrupt

    return torch.nn.modules.module.register_module_forward_hook(hook)


def assert_same_epochs(resumed, full):
    assert [r[EPOCH] for r in resumed] == [r[EPOCH] for r in full]
    for a, b in zip(resumed, full):
        for key in COMPARED:
            assert abs(a[key] - b[key]) <= TOL, f"epoch {a[EPOCH]} {key}: resumed {a[key]} != uninterrupted {b[key]}"


@pytest.mark.slow  # five short fits with loader workers: ~10-20 s on 2 shared cores
def test_resumed_fit_equals_uninterrupted_at_a_boundary_and_mid_epoch(synth_root, tiny_dropout_model, tmp_path):
    config = exact_config(synth_root, tiny_dropout_model)
    full = Recorder()
    fit(config, full)
    assert len({r["train_loss"] for r in full.rows}) == 3  # it trains (the comparison is not of constants)

    at_boundary = Recorder(tmp_path / "boundary", stop_after=1)
    with pytest.raises(Interrupt):
        fit(config, at_boundary)
    mid_epoch = Recorder(tmp_path / "mid-epoch")
    handle = stop_in_epoch(2, config.max_steps_per_epoch)
    try:
        with pytest.raises(Interrupt):
            fit(config, mid_epoch)
    finally:
        handle.remove()
    assert [r[EPOCH] for r in mid_epoch.rows] == [1]  # epoch 2 was interrupted before its report

    for part in (at_boundary, mid_epoch):  # resumed in this process: what ran before in it must not matter
        resumed = Recorder()
        fit(config, resumed, restore_dir=part.keep_dir)
        assert_same_epochs(part.rows + resumed.rows, full.rows)
