#!/usr/bin/env python
"""Disk used by the experiment folder at AST-base size: peak and final bytes under the storage path of a few real
trials (orchestrate.py, Ray, random-init AST-base, a handful of generated clips, CPU), and the 40-trial projection.

    python benchmarks/storage.py --keep best --json benchmarks/results/storage_cpu_best.json
    python benchmarks/storage.py --keep all  --json benchmarks/results/storage_cpu_all.json
    python benchmarks/storage.py --tiny --keep best   # rehearsal with a tiny AST (seconds)

The folder is sampled every 0.1 s while the trials run (``du``-like sum of file sizes), so the peak includes the
moments when a new checkpoint is written before Ray deletes the previous one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainable.store.footprint import Footprint  # noqa: E402
from trainable.store.storage import human_bytes  # noqa: E402


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass  # deleted while walking
    return total


def sample(path: Path, stop: threading.Event, peaks: list[int]) -> None:
    while not stop.is_set():
        peaks.append(folder_bytes(path))
        stop.wait(0.1)


def make_inputs(work: Path, tiny: bool) -> tuple[Path, Path]:
    from trainable.fit.model import ast_base_config, build_tiny_ast
    from trainable.data.synth import generate

    data = work / "data"
    generate(data, clips_per_class=1, folds=(1, 2, 3), seed=0)
    model = work / "model"
    if tiny:
        build_tiny_ast(model)
    else:
        import torch
        from transformers import ASTForAudioClassification

        torch.manual_seed(0)
        ASTForAudioClassification(ast_base_config(max_length=1024, num_labels=527)).save_pretrained(model)
    return data, model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", choices=["best", "all"], default="best", help="--keep-checkpoints of the run")
    p.add_argument("--trials", type=int, default=2, help="trials to run (test folds 1..N of 3 folds; default 2)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a tiny AST instead of AST-base (a rehearsal)")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="astcv-storage-bench-") as tmp:
        work = Path(tmp)
        data, model = make_inputs(work, args.tiny)
        storage = work / "runs"
        cmd = [sys.executable, str(ROOT / "orchestrate.py"), "--data-root", str(data), "--model", str(model),
               "--folds", "1", "2", "3", "--test-folds", *map(str, range(1, args.trials + 1)), "--lrs", "1e-5",
               "--batch-sizes", "4", "--epochs", str(args.epochs), "--num-frames", "400", "--num-workers", "0",
               "--gpus", "0", "--cpus-per-trial", str(os.cpu_count() or 1), "--keep-checkpoints", args.keep,
               "--storage-path", str(storage), "--name", "bench", "--cache-dir", str(work / "cache")]
        stop, peaks = threading.Event(), []
        storage.mkdir()
        watcher = threading.Thread(target=sample, args=(storage, stop, peaks), daemon=True)
        start = time.time()
        watcher.start()
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        stop.set()
        watcher.join()
        if run.returncode != 0:
            print(run.stdout[-3000:], run.stderr[-3000:], file=sys.stderr)
            return run.returncode
        exp = storage / "bench"
        final = folder_bytes(storage)
        trial_bytes = sorted(folder_bytes(d) for d in exp.glob("fold*"))
        best_model = folder_bytes(exp / "best_model")
        disk_line = next((line for line in run.stdout.splitlines() if line.startswith("Disk:")), "")
        from trainable.fit.model import count_parameters

        params = count_parameters(str(model), 10, 400)
    per_trial = max(trial_bytes)
    fp = Footprint(params=params, trials_left=40, at_once=1, epochs=args.epochs, keep=args.keep)
    result = {
        "keep_checkpoints": args.keep, "trials": args.trials, "epochs": args.epochs, "tiny": args.tiny,
        "parameters": params, "seconds": round(time.time() - start, 1),
        "peak_bytes": max(peaks), "final_bytes": final, "finished_trial_bytes": trial_bytes, "best_model_bytes": best_model,
        "projection_40_trials": {
            # From the measured figures: 40 finished trials + the exported model; the peak adds one running trial's
            # measured swing (the peak above minus the finished trials and export that were on disk at the end).
            "final_bytes": 40 * per_trial + best_model,
            "peak_bytes": 39 * per_trial + best_model + max(max(peaks) - (args.trials - 1) * per_trial - best_model, per_trial),
            "estimate_final_bytes": fp.end_bytes, "estimate_peak_bytes": fp.peak_bytes,
        },
        "disk_line": disk_line,
    }
    print(f"{args.trials} trials x {args.epochs} epochs, --keep-checkpoints {args.keep}: peak {human_bytes(max(peaks))}, "
          f"final {human_bytes(final)} (a finished trial {human_bytes(per_trial)}, best_model {human_bytes(best_model)}); "
          f"40 trials: final {human_bytes(result['projection_40_trials']['final_bytes'])}, peak "
          f"{human_bytes(result['projection_40_trials']['peak_bytes'])} (estimate {human_bytes(fp.end_bytes)} / "
          f"{human_bytes(fp.peak_bytes)})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
