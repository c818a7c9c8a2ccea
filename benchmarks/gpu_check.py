#!/usr/bin/env python
"""GPU check without Ray: a short real training run of AST-base (random init) on generated data with AMP, and a
real CUDA out-of-memory forced by capping the process's GPU memory, which the fallback must survive.

    python benchmarks/gpu_check.py --out OUT [--mem-fraction 0.08] [--oom-batch 48]

Prints the epochs' metrics, the micro-batch after the fallback, and peak memory; writes OUT/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainable.config import TrainConfig  # noqa: E402
from trainable.model import ast_base_config  # noqa: E402
from trainable.synth import generate  # noqa: E402
from trainable.train import LocalRun, fit  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the AMP run (default: 2)")
    p.add_argument("--mem-fraction", type=float, default=0.08, help="GPU memory cap for the OOM run (default: 0.08)")
    p.add_argument("--oom-batch", type=int, default=48, help="batch size that cannot fit under the cap (default: 48)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    data = out / "data"
    if not (data / "metadata").is_dir():
        generate(data, clips_per_class=4, folds=(1, 2, 3))
    from transformers import ASTForAudioClassification

    model_dir = out / "ast-base-random"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        ASTForAudioClassification(ast_base_config(max_length=1024, num_labels=527)).save_pretrained(model_dir)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    base = dict(data_root=str(data), model=str(model_dir), folds=(1, 2, 3), test_fold=1, num_workers=2, lr=5e-5)

    # 1. A short AMP run at 400 frames (cropped position grid), cached features.
    t0 = time.time()
    torch.cuda.reset_peak_memory_stats()
    run = LocalRun(out / "amp-run")
    state = fit(TrainConfig.from_dict({**base, "epochs": args.epochs, "batch_size": 16, "num_frames": 400,
                                       "feature_cache": str(out / "cache")}), run)
    report["amp_run"] = {"seconds": time.time() - t0, "history": state.history,
                         "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    print("AMP run:", json.dumps({k: v for k, v in state.history[-1].items() if k != "test_confusion"}))

    # 2. A real CUDA OOM: cap this process's memory so the batch cannot fit at 1024 frames.
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(args.mem_fraction)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    state = fit(TrainConfig.from_dict({**base, "epochs": 1, "batch_size": args.oom_batch, "num_frames": 1024}),
                LocalRun(out / "oom-run"))
    last = state.history[-1]
    report["oom_run"] = {"seconds": time.time() - t0, "batch_size": args.oom_batch, "mem_fraction": args.mem_fraction,
                         "micro_batch_size": last["micro_batch_size"], "grad_accum_steps": last["grad_accum_steps"],
                         "oom_fallbacks": last["oom_fallbacks"], "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    print("OOM run:", json.dumps(report["oom_run"]))
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
