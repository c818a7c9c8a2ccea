#!/usr/bin/env python
"""A trial's start, piece by piece, with and without reusing Ray workers between trials.

    python benchmarks/startup.py --json benchmarks/results/startup_cpu.json             # the demo's tiny AST, CPU
    python benchmarks/startup.py --ast-base --trials 4 --json out.json                  # AST-base size (random init)

Runs the same grid twice through orchestrate.py (one trial at a time), once with a new worker process per trial
(ASTCV_REUSE_WORKERS=0) and once reusing them (the default), and reads what each trial reported of its start
(``startup`` in result.json): worker_s (process start to the trial's first line: Ray starting a worker, Python and
torch imports, unpickling the trial), imports_s, data_s (metadata, feature cache), model_s (weights read, device),
loaders_s, first_step_s (the first optimizer step), and the wall time of the whole grid.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PIECES = ("worker_s", "imports_s", "data_s", "model_s", "loaders_s", "first_step_s")


def make_inputs(work: Path, ast_base: bool) -> tuple[Path, Path]:
    from trainable.fit.model import ast_base_config, build_tiny_ast
    from trainable.data.synth import generate

    data = work / "data"
    generate(data, clips_per_class=1, folds=(1, 2, 3, 4), seed=0)
    model = work / "model"
    if ast_base:
        from transformers import ASTForAudioClassification

        ASTForAudioClassification(ast_base_config(max_length=1024, num_labels=527)).save_pretrained(model)
    else:
        build_tiny_ast(model)
    return data, model


def run_grid(data: Path, model: Path, storage: Path, trials: int, reuse: bool) -> dict:
    name = "reuse" if reuse else "fresh"
    folds = [str(f) for f in range(1, 5)]
    lrs = [f"{1e-4 * (i + 1):g}" for i in range(max(1, trials // 4 + (trials % 4 > 0)))]
    cmd = [sys.executable, str(ROOT / "orchestrate.py"), "--data-root", str(data), "--model", str(model), "--folds", *folds,
           "--test-folds", *folds[: min(trials, 4)], "--lrs", *lrs, "--batch-sizes", "4", "--epochs", "1",
           "--num-frames", "400", "--num-workers", "0", "--gpus", "0", "--cpus-per-trial", str(os.cpu_count() or 1),
           "--storage-path", str(storage), "--name", name, "--cache-dir", str(storage / "cache")]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "ASTCV_REUSE_WORKERS": str(int(reuse))}
    start = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - start
    if out.returncode != 0:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
    rows = []
    for result in sorted((storage / name).glob("fold*/result.json")):
        first = json.loads(result.read_text().splitlines()[0])
        rows.append({"trial": result.parent.name, **first["startup"], "setup_seconds": first["setup_seconds"]})
    started = [line for line in out.stdout.splitlines() if line.startswith("Running ")]
    return {"reuse_workers": reuse, "wall_s": round(wall, 1), "trials": rows, "run": started[0] if started else "",
            "median": {p: round(statistics.median([r[p] for r in rows if r.get(p) is not None]), 3) for p in PIECES
                       if any(r.get(p) is not None for r in rows)}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=4, help="trials per grid, one at a time (default 4)")
    p.add_argument("--ast-base", action="store_true", help="AST-base size (random init) instead of the tiny AST")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="astcv-startup-") as tmp:
        data, model = make_inputs(Path(tmp), args.ast_base)
        results = [run_grid(data, model, Path(tmp) / "runs", args.trials, reuse) for reuse in (False, True)]
    for r in results:
        later = [t for t in r["trials"][1:]]
        print(f"{'reused workers' if r['reuse_workers'] else 'a new worker per trial'}: grid {r['wall_s']} s; "
              f"median {', '.join(f'{k} {v}' for k, v in r['median'].items())}; trials after the first: worker_s "
              f"{[round(t['worker_s'] or 0, 2) for t in later]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"ast_base": args.ast_base, "grids": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
