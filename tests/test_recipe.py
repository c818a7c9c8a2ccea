"""The official AST recipe's options: SpecAugment, mixup, lr schedules, the optimizer and weight averaging."""

import json

import numpy as np
import pytest
import torch
import torchaudio
from safetensors.torch import load_file
from scipy import stats

from trainable.config import TrainConfig, recipe_summary
from trainable.fit.augment import MASK_VALUE, Augment, epoch_generator, mask_clip, mixup, soft_cross_entropy_sum
from trainable.fit.local import LocalRun
from trainable.fit.recipe import (WA_TEST_ACCURACY, WA_VAL_ACCURACY, Schedule, TrialRecipe, WeightAverage,
                                  make_optimizer, make_scheduler)
from trainable.fit.steps import IGNORE, pad_batch
from trainable.fit.train import fit
from trainable.store.experiment import EPOCH


def widths(masked: torch.Tensor, axis: int) -> int:
    """How many rows (axis 0) or columns (axis 1) of a clip are wholly the mask value."""
    return int((masked == MASK_VALUE).all(dim=axis).sum())


def test_masks_equal_torchaudios_and_their_widths_are_uniform_over_0_to_F_minus_1():
    g = torch.Generator().manual_seed(7)
    clip = torch.randn(400, 128)
    for s in range(5):  # the same draws as torchaudio's transforms under the same seed, in the official order
        torch.manual_seed(s)
        spec = clip.T.unsqueeze(0)
        want = torchaudio.transforms.TimeMasking(96)(torchaudio.transforms.FrequencyMasking(24)(spec, MASK_VALUE), MASK_VALUE)
        got = mask_clip(clip, 24, 96, torch.Generator().manual_seed(s))
        assert torch.equal(got, want.squeeze(0).T)
    small = torch.randn(100, 32)
    freq = np.array([widths(mask_clip(small, 24, 0, g), 0) for _ in range(4000)])
    time = np.array([widths(mask_clip(small, 0, 96, g), 1) for _ in range(4000)])
    assert freq.min() == 0 and freq.max() == 23 and time.max() == 95
    for w, F in ((freq, 24), (time, 96)):
        counts = np.bincount(w, minlength=F)
        assert len(counts) == F
        assert stats.chisquare(counts).pvalue > 1e-3  # uniform over 0..F-1 (fixed seed: deterministic)
    assert stats.chisquare(np.bincount(freq // 12, minlength=2)[:2]).pvalue > 1e-3


def test_augmentation_is_a_function_of_seed_and_epoch():
    x, y = torch.randn(6, 64, 128), torch.arange(6)
    a = Augment(24, 32, 0.5, 10, epoch_generator(3, 2))(x, y)
    b = Augment(24, 32, 0.5, 10, epoch_generator(3, 2))(x, y)
    c = Augment(24, 32, 0.5, 10, epoch_generator(3, 3))(x, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    config = TrainConfig(freqm=24, timem=96, mixup=0.5)
    recipe = TrialRecipe(config, make_optimizer(config, [torch.nn.Parameter(torch.zeros(1))]), 40, 10, 0)
    assert recipe.augment(1) is not None
    plain = TrainConfig()
    assert TrialRecipe(plain, make_optimizer(plain, [torch.nn.Parameter(torch.zeros(1))]), 40, 10, 0).augment(1) is None


def test_mixup_loss_is_the_lambda_weighted_cross_entropies_and_lambda_is_beta_10_10():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    lam = torch.tensor([0.3, 0.8])
    a, b = torch.tensor([0, 1]), torch.tensor([2, 0])
    target = lam[:, None] * torch.eye(3)[a] + (1 - lam[:, None]) * torch.eye(3)[b]
    ce = torch.nn.functional.cross_entropy
    want = sum(lam[i] * ce(logits[i:i + 1], a[i:i + 1]) + (1 - lam[i]) * ce(logits[i:i + 1], b[i:i + 1]) for i in range(2))
    torch.testing.assert_close(soft_cross_entropy_sum(logits, target, IGNORE), want)
    padded_x, padded_t = pad_batch(torch.zeros(2, 4, 3), target, 4)
    torch.testing.assert_close(soft_cross_entropy_sum(torch.cat([logits, logits]), padded_t, IGNORE), want)  # padding: 0

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5000, 2, 3), torch.randint(0, 10, (5000,))
    out, soft, lams = mixup(x, y, 10, 0.5, g)
    mixed = lams < 1
    assert abs(mixed.float().mean().item() - 0.5) < 0.03
    assert stats.kstest(lams[mixed].numpy(), stats.beta(10, 10).cdf).pvalue > 1e-3
    torch.testing.assert_close(soft.sum(1), torch.ones(5000))
    i = int(torch.nonzero(mixed)[0])
    partner = (out[i] - lams[i] * x[i]) / (1 - lams[i])  # the mixed clip is λ·own + (1-λ)·a batch-mate
    assert min((partner - x[j]).abs().max().item() for j in range(5000)) < 1e-4
    assert torch.equal(out[~mixed], x[~mixed])


OFFICIAL_STEP = [  # (warmup steps, decay start, step, factor, steps/epoch, step s) -> lr factor, from traintest.py
    (0, 5, 1, 0.85, 10, 0, 1.0), (0, 5, 1, 0.85, 10, 49, 1.0), (0, 5, 1, 0.85, 10, 50, 0.85),
    (0, 5, 1, 0.85, 10, 59, 0.85), (0, 5, 1, 0.85, 10, 60, 0.85 ** 2), (0, 5, 1, 0.85, 10, 249, 0.85 ** 20),
    (0, 2, 3, 0.5, 10, 19, 1.0), (0, 2, 3, 0.5, 10, 20, 0.5), (0, 2, 3, 0.5, 10, 49, 0.5), (0, 2, 3, 0.5, 10, 50, 0.25),
    (1000, 5, 1, 0.85, 5000, 0, 0.0), (1000, 5, 1, 0.85, 5000, 49, 0.0), (1000, 5, 1, 0.85, 5000, 50, 0.05),
    (1000, 5, 1, 0.85, 5000, 999, 0.95), (1000, 5, 1, 0.85, 5000, 1000, 1.0), (1000, 5, 1, 0.85, 100, 1000, 0.85 ** 6),
    (1000, 2, 1, 0.5, 100, 250, 0.25 * 0.5),  # a decay inside the warmup: the product (the official code would lose it)
]


@pytest.mark.parametrize("warmup,start,step,factor,per_epoch,s,want", OFFICIAL_STEP)
def test_step_schedule_follows_the_official_formula(warmup, start, step, factor, per_epoch, s, want):
    schedule = Schedule("step", per_epoch, per_epoch * 30, warmup, start, step, factor)
    assert schedule(s) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_cosine_and_constant_schedules():
    cos = Schedule("cosine", 10, 100, 10)
    assert [cos(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [cos(s) for s in (10, 55, 99)] == pytest.approx([1.0, 0.5, 0.5 * (1 + np.cos(np.pi * 89 / 90))])
    assert Schedule("constant", 10, 100)(57) == 1.0


def test_scheduler_steps_per_optimizer_step_and_resumes_exactly():
    config = TrainConfig(lr=1e-3, epochs=25, optimizer="adam", betas=(0.95, 0.999), weight_decay=5e-7,
                         lr_schedule="step", lr_decay_start=5, lr_decay_step=1, lr_decay_factor=0.85)

    def run(steps, state=None):
        p = torch.nn.Parameter(torch.ones(2))
        opt = make_optimizer(config, [p])
        sched = make_scheduler(config, opt, 4)
        if state:
            opt.load_state_dict(state[0])
            sched.load_state_dict(state[1])
        lrs = []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            p.grad = torch.ones(2)
            opt.step()
            sched.step()
        return lrs, (opt.state_dict(), sched.state_dict())

    assert isinstance(make_optimizer(config, [torch.nn.Parameter(torch.ones(1))]), torch.optim.Adam)
    full, _ = run(40)
    assert full == pytest.approx([1e-3 * Schedule("step", 4, 100, 0, 5, 1, 0.85)(s) for s in range(40)], rel=1e-12)
    first, saved = run(22)
    saved = torch.load(_roundtrip(saved), weights_only=True)  # as a checkpoint stores it
    rest, _ = run(18, saved)
    assert first + rest == full


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_weight_average_is_the_mean_of_the_chosen_epochs():
    wa, model, seen = WeightAverage(2, 4), torch.nn.Linear(3, 2), []
    for epoch in range(1, 6):
        with torch.no_grad():
            model.weight.normal_()
        if wa.wants(epoch):
            wa.add(model)
            seen.append(model.weight.detach().clone())
    assert len(seen) == 3
    torch.testing.assert_close(wa.mean["weight"], torch.stack(seen).mean(0))


@pytest.mark.slow
def test_resumed_trial_with_the_recipe_equals_an_uninterrupted_one_and_exports_the_average(synth_root, tiny_dropout, tmp_path):
    """SpecAugment, mixup, the step schedule, Adam and weight averaging: a kill after epoch 1 and a resume give the
    same metrics and weights; the averaged model is the mean of epochs 1-2 and is evaluated; training batches carry
    masks, evaluation batches never do."""
    config = TrainConfig.from_dict(dict(
        data_root=str(synth_root), model=str(tiny_dropout), folds=(1, 2, 3, 4), test_fold=2, lr=1e-3, batch_size=8,
        epochs=2, num_frames=128, num_workers=0, keep_checkpoints="all", freqm=24, timem=96, mixup=0.5,
        feature_cache=str(tmp_path / "cache"), torch_threads=1,
        optimizer="adam", betas=(0.95, 0.999), weight_decay=5e-7, lr_schedule="step", lr_decay_start=1,
        lr_decay_factor=0.5, wa_start=1, wa_end=2, max_steps_per_epoch=3))
    weights = {}

    def keep(run):
        def report(metrics, ckpt):
            run(metrics, ckpt)
            weights[(id(run), metrics[EPOCH])] = load_file(str(ckpt / "model.safetensors"))
        return report

    from trainable.fit import steps

    seen, real = [], steps.forward
    # a frequency bin masked over the whole clip (zero padding also becomes MASK_VALUE, but in time rows only)
    steps.forward = lambda model, xs, rehearsal=None: seen.append((model.training, (xs == MASK_VALUE).all(-2).any().item())) or real(model, xs)
    full, lrs = LocalRun(tmp_path / "full"), []
    try:
        fit(config, keep(full), on_step=lambda step, loss, lr: lrs.append(lr))  # the lr each step used
    finally:
        steps.forward = real
    assert any(masked for training, masked in seen if training)
    assert not any(masked for training, masked in seen if not training)
    part = LocalRun(tmp_path / "part")

    class Stop(Exception):
        pass

    def stop_after_one(metrics, ckpt):
        keep(part)(metrics, ckpt)
        if metrics[EPOCH] == 1:
            raise Stop

    with pytest.raises(Stop):
        fit(config, stop_after_one)
    fit(config, keep(part), restore_dir=part.resume_point())

    def rows(run):
        return [{k: v for k, v in json.loads(line).items() if k not in ("samples_per_second", "epoch_seconds", "setup_seconds", "startup")}
                for line in (run.out / "metrics.jsonl").read_text().splitlines()]

    assert rows(part) == rows(full)
    assert lrs == pytest.approx([1e-3] * 3 + [5e-4] * 3)  # ×0.5 at each epoch's end from epoch 1
    assert {WA_VAL_ACCURACY, WA_TEST_ACCURACY} <= set(rows(full)[-1])
    averaged = load_file(str(full.last / "averaged" / "model.safetensors"))
    for k, v in averaged.items():
        mean = (weights[(id(full), 1)][k].float() + weights[(id(full), 2)][k].float()) / 2
        torch.testing.assert_close(v.float(), mean, rtol=1e-6, atol=1e-6)


def test_config_checks_and_the_report_line():
    with pytest.raises(Exception, match="wa_start <= wa_end <= epochs"):
        TrainConfig(wa_start=3, wa_end=9, epochs=5)
    with pytest.raises(Exception, match="mixup is a probability"):
        TrainConfig(mixup=1.5)
    line = recipe_summary(TrainConfig(optimizer="adam", lr_schedule="step", freqm=24, timem=96).to_dict())
    assert "adam" in line and "x0.85 every 1 from epoch 5" in line and "SpecAugment freqm 24 timem 96" in line


@pytest.fixture(scope="module")
def tiny_dropout(tmp_path_factory):
    from trainable.fit.model import build_tiny_ast

    return build_tiny_ast(tmp_path_factory.mktemp("tiny-dropout"), max_length=400, dropout=0.1)


@pytest.mark.slow
def test_ast_official_space_runs_end_to_end_and_shows_the_recipe(demo_assets, tmp_path, capsys):
    """The demo with --space ast-official (one test fold, two epochs, the first decay after epoch 1 so the schedule
    shows): the manifest and each trial's config hold the recipe, the report lists it, TensorBoard's lr/train steps."""
    import orchestrate
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainable.store.experiment import MANIFEST

    data_root, model = demo_assets
    rc = orchestrate.main(["--data-root", str(data_root), "--model", str(model), "--folds", "1", "2", "3", "4",
                           "--test-folds", "1", "--epochs", "2", "--max-steps-per-epoch", "1", "--lr-decay-start", "1", "--num-frames", "400",
                           "--num-workers", "0", "--gpus", "0", "--storage-path", str(tmp_path), "--name", "official",
                           "--space", "ast-official"])
    assert rc == 0, capsys.readouterr()
    exp = tmp_path / "official"
    base = json.loads((exp / MANIFEST).read_text())["base_config"]
    want = {"optimizer": "adam", "betas": [0.95, 0.999], "weight_decay": 5e-7, "lr_schedule": "step", "freqm": 24,
            "timem": 96, "mixup": 0.0, "lr_decay_factor": 0.85, "lr_decay_start": 1}
    assert {k: base[k] for k in want} == want
    [trial] = [p for p in exp.iterdir() if p.is_dir() and p.name.startswith("fold01")]
    assert "bs48" in trial.name and "lr1e-05" in trial.name
    [state] = trial.glob("checkpoint_*/trainer_state.json")  # the trial's own full config
    assert {k: json.loads(state.read_text())["config"][k] for k in want} == want
    report = (exp / "report.md").read_text()
    assert "## Training recipe" in report and "SpecAugment freqm 24 timem 96" in report and "x0.85 every 1 from epoch 1" in report
    events = EventAccumulator(str(trial))
    events.Reload()
    lrs = [e.value for e in events.Scalars("lr/train")]
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(0.85e-5)  # epoch 2 after the first decay


def test_a_resume_refuses_a_changed_recipe_option():
    import argparse

    from trainable.errors import AstCvError
    from trainable.run.plan import continued_values

    manifest = {"base_config": TrainConfig(freqm=24, lr_schedule="step").to_dict(),
                "grid": {"test_fold": [1], "lr": [1e-5], "batch_size": [48]}}
    args = argparse.Namespace(folds=None, lrs=None, batch_sizes=None, test_folds=None)
    values, _, _ = continued_values(manifest, {"freqm": 24, "num_workers": 4}, args, None, "exp")
    assert values["freqm"] == 24 and values["num_workers"] == 4
    with pytest.raises(AstCvError, match="--freqm .recorded 24, now 0.*--lr-schedule"):
        continued_values(manifest, {"freqm": 0, "lr_schedule": "cosine"}, args, None, "exp")
