#!/usr/bin/env python
"""What SpecAugment and mixup (trainable/fit/augment.py) add to a training step of AST-base on CPU.

    python benchmarks/recipe_step.py --frames 400 --batch-size 2 --steps 3 --json benchmarks/results/recipe_step_cpu.json

Two measurements in the same process: (1) the augmentation alone (official ESC-50 masks, freqm 24 / timem 96, plus
mixup 0.5) on a batch of the configured size and on the official batch of 48, timed over many repeats, as a fraction
of one training step per sample; (2) whole training steps (``trainable.fit.steps.train_step``, AdamW) with and without
the augmentation, interleaved, so load on a shared machine hits both alike (on 2 shared cores this A/B is noisy: the
augmentation's cost is far below the step's noise, which is why (1) is the number to read).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainable.fit.augment import Augment, epoch_generator  # noqa: E402
from trainable.fit.model import ast_base_config  # noqa: E402
from trainable.fit.oom import MicroBatch  # noqa: E402
from trainable.fit.steps import train_step  # noqa: E402


def time_augment(batch: int, frames: int, repeats: int) -> float:
    """Seconds per call of the official augmentation (masks + mixup 0.5) on a [batch, frames, 128] batch."""
    x, y = torch.randn(batch, frames, 128), torch.randint(0, 10, (batch,))
    aug = Augment(24, 96, 0.5, 10, epoch_generator(0, 1))
    aug(x, y)
    start = time.perf_counter()
    for _ in range(repeats):
        aug(x, y)
    return (time.perf_counter() - start) / repeats


def time_steps(batch: int, frames: int, steps: int) -> dict[str, list[float]]:
    """Seconds of whole training steps, plain and augmented, interleaved (after one warm-up step of each)."""
    from transformers import ASTForAudioClassification

    torch.manual_seed(0)
    model = ASTForAudioClassification(ast_base_config(max_length=frames, num_labels=10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    micro = MicroBatch.start(batch, opt)
    x, y = torch.randn(batch, frames, 128), torch.randint(0, 10, (batch,))
    aug = Augment(24, 96, 0.5, 10, epoch_generator(0, 1))
    times: dict[str, list[float]] = {"plain": [], "augmented": []}
    for i in range(steps + 1):
        for kind in ("plain", "augmented"):
            start = time.perf_counter()
            xs, ys = aug(x, y) if kind == "augmented" else (x, y)
            train_step(model, xs, ys, opt, scaler, torch.device("cpu"), None, micro)
            if i:
                times[kind].append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=400, help="frames per clip (400: --num-frames auto for UrbanSound8K)")
    p.add_argument("--batch-size", type=int, default=2, help="batch of the whole-step measurement")
    p.add_argument("--steps", type=int, default=3, help="measured steps of each kind (after one warm-up each)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    aug_small = time_augment(args.batch_size, args.frames, 200)
    aug_48 = time_augment(48, args.frames, 20)
    times = time_steps(args.batch_size, args.frames, args.steps)
    plain, augmented = statistics.median(times["plain"]), statistics.median(times["augmented"])
    out = {
        "frames": args.frames, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "augment_s_per_batch": aug_small, "augment_s_per_batch_48": aug_48,
        "step_s_plain_median": plain, "step_s_augmented_median": augmented, "steps": times,
        "augment_fraction_of_step": aug_small / plain,
        "augment_48_fraction_of_step_per_sample": (aug_48 / 48) / (plain / args.batch_size),
        "ab_ratio_augmented_over_plain": augmented / plain,
    }
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
