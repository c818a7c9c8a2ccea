#!/usr/bin/env python
"""What storing a finished trial's best weights in float16 costs in test accuracy.

    python benchmarks/fp16_weights.py --json benchmarks/results/fp16_weights_demo.json

Runs the demo's grid (generated data, the tiny pretrained AST, CPU) with --keep-checkpoints all, so every epoch's
float32 weights stay on disk; then, for each trial's best-validation epoch, evaluates its test fold with those float32
weights and with the same weights rounded to float16 (as --keep-checkpoints best stores them) and compares accuracy
and logits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from transformers import ASTForAudioClassification

    from trainable.config import TrainConfig
    from trainable.store.experiment import row_score
    from trainable.fit.oom import MicroBatch
    from trainable.results.reduce import parse_rows
    from trainable.fit.steps import evaluate
    from trainable.fit.train import build_datasets, make_loader

    with tempfile.TemporaryDirectory(prefix="astcv-fp16-") as tmp:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        run = subprocess.run([sys.executable, str(ROOT / "orchestrate.py"), "--demo", "--keep-checkpoints", "all",
                              "--storage-path", tmp, "--name", "fp16"], cwd=ROOT, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(run.stdout[-3000:] + run.stderr[-3000:])
        rows = []
        for trial in sorted((Path(tmp) / "fp16").glob("fold*")):
            history = parse_rows((trial / "result.json").read_text())
            best = max(history, key=row_score)
            ckpt = next(c for c in trial.glob("checkpoint_*")
                        if json.loads((c / "trainer_state.json").read_text())["epoch"] == best["epoch"])
            config = TrainConfig.from_dict({**json.loads((ckpt / "trainer_state.json").read_text())["config"],
                                            "num_workers": 0})
            data = build_datasets(config)
            loader = make_loader(config, data.test, torch.device("cpu"))
            model = ASTForAudioClassification.from_pretrained(ckpt).eval()
            micro = MicroBatch(size=config.batch_size, batch_size=config.batch_size)
            loss32, acc32, _ = evaluate(model, loader, torch.device("cpu"), None, micro, len(data.classes))
            with torch.no_grad():
                for param in model.parameters():
                    param.copy_(param.half().float())
            loss16, acc16, _ = evaluate(model, loader, torch.device("cpu"), None, micro, len(data.classes))
            rows.append({"trial": trial.name, "epoch": best["epoch"], "test_clips": len(data.test),
                         "test_accuracy_fp32": acc32, "test_accuracy_fp16": acc16, "test_loss_fp32": loss32,
                         "test_loss_fp16": loss16, "reported_test_accuracy": best["test_accuracy"]})
            print(f"{trial.name} epoch {best['epoch']}: test accuracy {100 * acc32:.2f} % (float32) vs "
                  f"{100 * acc16:.2f} % (float16 weights); loss {loss32:.5f} vs {loss16:.5f}")
    changed = sum(r["test_accuracy_fp32"] != r["test_accuracy_fp16"] for r in rows)
    print(f"{changed} of {len(rows)} trials' test accuracy changed; largest loss change "
          f"{max(abs(r['test_loss_fp32'] - r['test_loss_fp16']) for r in rows):.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"trials": rows, "accuracy_changed": changed}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
