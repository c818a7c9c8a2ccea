import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import ASTForAudioClassification

from trainable.fit import local
from trainable.config import TrainConfig
from trainable.fit.model import build_tiny_ast, load_model
from trainable.store.experiment import EPOCH
from trainable.fit.local import LocalRun
from trainable.fit.oom import SIMULATE_OOM_ENV, MicroBatch, OutOfMemoryAtOne
from trainable.fit.steps import train_step
from trainable.fit.train import fit

REPORTED = {
    "epoch", "train_loss", "val_loss", "val_accuracy", "test_loss", "test_accuracy",
    "micro_batch_size", "grad_accum_steps", "samples_per_second",
}


@pytest.fixture(scope="module")
def tiny_dropout(tmp_path_factory):
    """A tiny AST with dropout, so exact resume depends on restoring the RNG state."""
    return build_tiny_ast(tmp_path_factory.mktemp("tiny-dropout"), max_length=400, dropout=0.1)


def small_config(data_root, model, **kw):
    values = dict(data_root=str(data_root), model=str(model), folds=(1, 2, 3, 4), test_fold=2, lr=1e-3,
                  batch_size=8, epochs=2, num_frames=400, num_workers=0)
    values.update(kw)
    return TrainConfig.from_dict(values)


@pytest.mark.slow
def test_one_fold_without_ray_learns_and_writes_a_loadable_best_model(demo_assets, tmp_path, capsys):
    data_root, model = demo_assets
    out = tmp_path / "out"
    rc = local.main([
        "--data-root", str(data_root), "--model", str(model), "--folds", "1", "2", "3", "4", "--test-fold", "1",
        "--lr", "1e-3", "--batch-size", "8", "--epochs", "3", "--num-frames", "400", "--num-workers", "0",
        "--output", str(out),
    ])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r[EPOCH] for r in rows] == [1, 2, 3]
    assert REPORTED <= set(rows[0])
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    best = max(rows, key=lambda r: r["val_accuracy"])
    assert best["val_accuracy"] >= 0.35, rows  # 10 classes: chance is 0.1
    assert rows[-1]["best_epoch"] == best["epoch"]
    assert rows[-1]["best_test_accuracy"] == best["test_accuracy"]  # chosen on validation, not test
    loaded = ASTForAudioClassification.from_pretrained(out / "best")
    assert loaded.config.num_labels == 10 and loaded.config.id2label[0] == "air_conditioner"
    assert "best epoch" in capsys.readouterr().out
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


class Interrupt(Exception):
    pass


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(synth_root, tiny_dropout, tmp_path):
    config = small_config(synth_root, tiny_dropout, epochs=3, keep_checkpoints="all")  # last/ keeps its float32 weights
    full = LocalRun(tmp_path / "full")
    fit(config, full)

    part = LocalRun(tmp_path / "part")

    def stop_after_first(metrics, ckpt):
        part(metrics, ckpt)
        if metrics[EPOCH] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(config, stop_after_first)
    fit(config, part, restore_dir=part.resume_point())

    def rows(run):
        return [{k: v for k, v in json.loads(line).items() if k not in ("samples_per_second", "epoch_seconds", "setup_seconds", "startup")}
                for line in (run.out / "metrics.jsonl").read_text().splitlines()]

    assert rows(part) == rows(full)
    a, b = load_file(str(full.last / "model.safetensors")), load_file(str(part.last / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)


def test_cli_resumes_from_its_output_folder(synth_root, tiny_dropout, tmp_path):
    args = ["--data-root", str(synth_root), "--model", str(tiny_dropout), "--folds", "1", "2", "3", "4",
            "--test-fold", "3", "--epochs", "2", "--num-frames", "400", "--num-workers", "0", "--output", str(tmp_path)]
    assert local.main(args) == 0
    state = json.loads((tmp_path / "last" / "trainer_state.json").read_text())
    assert state["epoch"] == 2
    assert local.main(args) == 0  # finished: nothing left to train, history kept
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert local.main(args[:-4] + ["--epochs", "3", "--output", str(tmp_path)]) == 2  # config changed


def test_oom_fallback_keeps_the_effective_batch(synth_root, tiny_dropout, tmp_path, monkeypatch):
    monkeypatch.setenv(SIMULATE_OOM_ENV, "4")
    run = LocalRun(tmp_path)
    state = fit(small_config(synth_root, tiny_dropout, epochs=2, batch_size=8), run)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["micro_batch_size"], r["grad_accum_steps"]) for r in rows] == [(4, 2), (4, 2)]
    assert rows[0]["oom_fallbacks"] == 1 and rows[1]["oom_fallbacks"] == 1
    assert state.micro_batch_size == 4
    assert json.loads((run.last / "trainer_state.json").read_text())["micro_batch_size"] == 4


def test_oom_at_micro_batch_one_fails_with_a_clear_message(synth_root, tiny_dropout, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(SIMULATE_OOM_ENV, "0")
    with pytest.raises(OutOfMemoryAtOne, match="even with micro-batch 1"):
        fit(small_config(synth_root, tiny_dropout, epochs=1), LocalRun(tmp_path))


def test_accumulated_update_equals_the_full_batch_update(tiny_ast_1024):
    classes = [str(i) for i in range(10)]
    torch.manual_seed(0)
    x, y = torch.randn(8, 400, 128), torch.randint(0, 10, (8,))
    params = []
    for size in (8, 4, 1):
        torch.manual_seed(1)
        model = load_model(str(tiny_ast_1024), classes, num_frames=400)
        model.train()
        # SGD: the update is linear in the gradient (Adam's first step is ~lr*sign(g), which magnifies float noise).
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        micro = MicroBatch(size=size, batch_size=8)
        assert micro.accum_steps == 8 // size
        loss = train_step(model, x, y, opt, scaler, torch.device("cpu"), None, micro)
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        params.append((loss, grads, torch.cat([p.detach().flatten() for p in model.parameters()])))
    for loss, grads, weights in params[1:]:
        assert loss == pytest.approx(params[0][0], rel=1e-5)
        torch.testing.assert_close(grads, params[0][1], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(weights, params[0][2], rtol=1e-4, atol=1e-6)


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    rc = local.main(["--data-root", str(tmp_path / "nope"), "--folds", "1", "2", "3", "--output", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Data root") and "Traceback" not in err
    assert local.main(["--data-root", str(tmp_path), "--lr", "0", "--output", str(tmp_path / "o")]) == 2
    assert "lr must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16+GradScaler"])
def test_mixed_precision_step_runs_and_learns(tiny_ast_1024, dtype):
    """The AMP code path (autocast, and GradScaler for fp16) as it runs on a GPU, exercised on the CPU."""
    torch.manual_seed(0)
    model = load_model(str(tiny_ast_1024), [str(i) for i in range(10)], num_frames=400)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype is torch.float16)
    x, y = torch.randn(8, 400, 128), torch.arange(8) % 10
    micro = MicroBatch(size=4, batch_size=8)
    losses = [train_step(model, x, y, opt, scaler, torch.device("cpu"), dtype, micro) for _ in range(8)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_the_model_uses_sdpa_attention(tiny_ast_1024):
    model = load_model(str(tiny_ast_1024), [str(i) for i in range(10)], 400)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_compiled_path_matches_eager_and_compiles_once_per_mode(synth_root, tiny_ast_1024):
    """torch.compile (inductor, on CPU here): the same losses and accuracies as eager, one graph for training and one
    for evaluation although every epoch ends with a short batch (padded: 40 training clips in batches of 6)."""
    import torch._dynamo

    runs = {}
    for mode in ("off", "default"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        history, steps = [], []
        fit(small_config(synth_root, tiny_ast_1024, batch_size=6, compile=mode), lambda m, c: history.append(m),
            on_step=lambda step, loss, lr: steps.append((step, loss)))
        runs[mode] = (history, dict(torch._dynamo.utils.counters["stats"]), steps)
    eager, compiled = runs["off"][0], runs["default"][0]
    assert [s for s, _ in runs["off"][2]] == [s for s, _ in runs["default"][2]]
    torch.testing.assert_close([v for _, v in runs["off"][2]], [v for _, v in runs["default"][2]], rtol=0, atol=2e-4)
    for a, b in zip(eager, compiled):
        assert a["val_accuracy"] == b["val_accuracy"] and a["test_accuracy"] == b["test_accuracy"]
        assert abs(a["val_loss"] - b["val_loss"]) < 2e-4
    assert runs["default"][1]["unique_graphs"] == 2  # training and evaluation; nothing recompiled in epoch 2
