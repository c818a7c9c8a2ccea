#!/usr/bin/env python
"""Projected wall time of the design card's grid (40 trials) from measured step and input rates.

Original recipe: fp32, 1024 frames, every clip decoded on the fly in every epoch of every trial (the decode runs in
the DataLoader's workers, overlapped with the GPU: a clip costs max(GPU step, decode / workers)).
Ours: AMP, --num-frames auto (400 for UrbanSound8K), feature cache (input cost ~0).

    python benchmarks/grid.py --step-json step.json --input-json input.json [--workers 2] [--epochs 5]
    # What-if for a card you did not measure (say a T4), assuming the measured MFU carries over (or --mfu 0.25):
    python benchmarks/grid.py --step-json step.json --input-json input.json --target-peak 8.1 65 --target-name "Tesla T4"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import ast_train_flops  # noqa: E402

US8K_CLIPS = 8732
EVAL_COST = 1 / 3  # a forward pass costs about a third of a training step


def trial_hours(sps: float, input_ms: float, workers: int, epochs: int, folds: int = 10) -> float:
    """Hours of one trial: train on 8 folds, evaluate on 2, each clip paced by the slower of GPU and input."""
    train = US8K_CLIPS * (folds - 2) / folds
    evaluate = US8K_CLIPS * 2 / folds
    gpu = 1 / sps
    per_train_clip = max(gpu, input_ms / 1000 / workers)
    per_eval_clip = max(gpu * EVAL_COST, input_ms / 1000 / workers)
    return epochs * (train * per_train_clip + evaluate * per_eval_clip) / 3600


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step-json", required=True, help="output of benchmarks/step.py --json (needs 1024/off and 400/AMP rows)")
    p.add_argument("--input-json", required=True, help="output of benchmarks/input.py --json")
    p.add_argument("--input-ms", type=float, default=None, help="override on-the-fly ms per clip (e.g. measured on real UrbanSound8K)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding in parallel (Colab: 2)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per trial (card: 5-10; default 5)")
    p.add_argument("--trials", type=int, default=40, help="trials in the grid (card: 40)")
    p.add_argument("--orig-frames", type=int, default=1024, help="frames of the original recipe (default: 1024)")
    p.add_argument("--ours-frames", type=int, default=400, help="frames of ours, --num-frames auto on UrbanSound8K (default: 400)")
    p.add_argument("--target-peak", type=float, nargs=2, metavar=("FP32", "AMP"), default=None,
                   help="project to another card with these peak TFLOP/s, keeping the measured MFU")
    p.add_argument("--target-name", default="target card", help="name of that card, for the printout")
    p.add_argument("--mfu", type=float, default=None,
                   help="with --target-peak: assume this MFU for ours (AMP) instead of the measured one (a what-if)")
    p.add_argument("--json", default=None, help="write the projection to this JSON file")
    args = p.parse_args(argv)
    step = json.loads(Path(args.step_json).read_text())
    inp = json.loads(Path(args.input_json).read_text())
    rows = {(r["frames"], r["amp"]): r for r in step["rows"]}
    orig = rows.get((args.orig_frames, "off"))
    ours = next((r for (f, a), r in rows.items() if f == args.ours_frames and a != "off"), None)
    if orig is None or ours is None:
        p.error(f"step JSON needs rows for {args.orig_frames} frames fp32 ('off') and {args.ours_frames} frames with AMP")
    device = step["device"]
    orig_sps, ours_sps = orig["samples_per_s"], ours["samples_per_s"]
    if args.target_peak:
        if "mfu" not in orig or "mfu" not in ours:
            p.error("--target-peak needs MFU in the step JSON (run step.py with --peak-tflops on CPU)")
        orig_sps = orig["mfu"] * args.target_peak[0] * 1e12 / ast_train_flops(args.orig_frames)
        ours_sps = (args.mfu or ours["mfu"]) * args.target_peak[1] * 1e12 / ast_train_flops(args.ours_frames)
        device = (f"{args.target_name} (projected at an assumed {100 * args.mfu:.0f} % MFU for ours)" if args.mfu
                  else f"{args.target_name} (projected from {step['device']}'s MFU)")
    input_ms = args.input_ms if args.input_ms is not None else inp["ms_per_clip_on_the_fly"]
    t_orig = args.trials * trial_hours(orig_sps, input_ms, args.workers, args.epochs)
    t_ours = args.trials * trial_hours(ours_sps, 0.0, args.workers, args.epochs)
    print(f"device: {device}; {args.trials} trials x {args.epochs} epochs; {args.workers} input workers; "
          f"on-the-fly input {input_ms:.2f} ms/clip")
    print(f"original (fp32, {args.orig_frames} frames, on the fly): {orig_sps:.2f} samples/s -> {t_orig:.1f} h")
    amp = "AMP" if args.target_peak else f"AMP {ours['amp']}"  # a projected card runs its own AMP (fp16 on a T4)
    print(f"ours ({amp}, {args.ours_frames} frames, cached):      {ours_sps:.2f} samples/s -> {t_ours:.1f} h")
    print(f"speed-up: {t_orig / t_ours:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "original_hours": t_orig, "ours_hours": t_ours,
                                               "speedup": t_orig / t_ours, "epochs": args.epochs, "trials": args.trials}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
