"""The GPU check's Ray steps: the grid through orchestrate.py one trial per GPU (5_ray) and packed (6_packing).
See gpu_steps.py for the others and gpu_check.py for the runner."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gpu_steps import ROOT, Ctx, Stopped, _amp_name, _device


def _orchestrate(ctx: Ctx, name: str, extra: list[str]) -> dict:
    """Run orchestrate.py on the generated folds 1-3 (2 lrs, batch 16, 2 epochs); wall time, summary, trial spans."""
    cmd = [sys.executable, str(ROOT / "orchestrate.py"), "--data-root", str(ctx.data), "--model", str(ctx.model),
           "--folds", "1", "2", "3", "--lrs", "5e-5", "1e-5", "--batch-sizes", "16", "--epochs", "2",
           "--num-frames", "auto", "--storage-path", str(ctx.work / "runs"), "--name", name,
           "--cache-dir", str(ctx.cache), *extra]
    if ctx.rehearse:  # later flags win: one test fold, one epoch
        cmd += ["--test-folds", "1", "--num-workers", "0", "--epochs", "1"]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        rc = proc.wait()
    except Stopped:  # the step's limit: report the trials finished so far
        rc = "stopped at the step's limit"
    result = {"command": " ".join(cmd[1:]), "rc": rc, "wall_s": time.perf_counter() - t0}
    result.update(_trial_figures(ctx.work / "runs" / name))
    return result


def _trial_figures(exp: Path) -> dict:
    """Summary and per-trial spans, placement and rates of an experiment folder (finished or not)."""
    result: dict = {"storage_bytes": sum(p.stat().st_size for p in exp.rglob("*") if p.is_file()) if exp.is_dir() else 0}
    if (exp / "summary.json").is_file():
        s = json.loads((exp / "summary.json").read_text())
        result["summary"] = {k: s.get(k) for k in ("complete", "trials_finished", "trials_expected", "mean", "std")}
    spans, placement, rates, startups = [], set(), [], []
    for rf in sorted(exp.glob("*/result.json")):
        rows = [json.loads(line) for line in rf.read_text().splitlines() if line.strip()]
        if rows:
            spans.append((rows[0]["timestamp"] - rows[0].get("time_this_iter_s", 0), rows[-1]["timestamp"]))
            placement.add(str(rows[-1].get("cuda_visible_devices", "")))
            rates.append(rows[-1].get("samples_per_second"))
            startups.append(rows[0].get("startup") or {})
    if spans:
        events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
        running = most = 0
        for _, d in events:
            running += d
            most = max(most, running)
        result.update(trials=len(spans), trial_span_s=max(b for _, b in spans) - min(a for a, _ in spans),
                      max_concurrent_trials=most, cuda_visible_devices=sorted(placement), last_epoch_samples_per_s=rates,
                      trial_seconds=[b - a for a, b in spans],
                      median_last_epoch_samples_per_s=statistics.median(r for r in rates if r is not None),
                      startup=startups,
                      startup_median={k: statistics.median(s[k] for s in startups if s.get(k) is not None)
                                      for k in ("worker_s", "imports_s", "data_s", "model_s", "loaders_s", "first_step_s")
                                      if any(s.get(k) is not None for s in startups)})
    return result


def step_5_ray(ctx: Ctx) -> dict:
    """orchestrate.py with Ray: one trial per GPU (rehearsal: CPU, 2 CPUs per trial, so one at a time)."""
    extra = ["--cpus-per-trial", "2", "--gpus", "0", "--lrs", "5e-5"] if ctx.rehearse else ["--gpus", "1"]  # rehearsal: 1 trial
    return _orchestrate(ctx, "gpu1", extra)


def _pair(ctx: Ctx) -> dict:
    """Aggregate samples/s of 1, 2, 3 and 4 step benchmarks timed in the same window on one device (trials packed at 1,
    0.5, 0.33 and 0.25 GPU each; rehearsal: 1 and 2)."""
    frames = ctx.frames[1]
    amp = "off" if ctx.rehearse else _amp_name(_device())
    args = [sys.executable, str(ROOT / "benchmarks" / "step.py"), "--frames", str(frames), "--amp", amp,
            "--batch-size", "2" if ctx.rehearse else "16", "--steps", "1" if ctx.rehearse else "30", "--warmup", "0" if ctx.rehearse else "5"]
    args += ["--tiny"] if ctx.rehearse else []
    out = {}
    for n in ((1, 2) if ctx.rehearse else (1, 2, 3, 4)):
        files = [ctx.work / f"pair{n}-{i}.json" for i in range(n)]
        shutil.rmtree(ctx.work / f"pair{n}-sync", ignore_errors=True)
        sync = ["--sync", str(ctx.work / f"pair{n}-sync"), str(n)]
        procs = [subprocess.Popen(args + sync + ["--json", str(f)]) for f in files]
        for p in procs:
            p.wait()
        rows = [json.loads(f.read_text())["rows"][0] for f in files]
        out[f"{n}_process"] = {"samples_per_s": [r["samples_per_s"] for r in rows],
                               "total_samples_per_s": sum(r["samples_per_s"] for r in rows),
                               "windows": [r["window"] for r in rows]}
    out["ratio"] = out["2_process"]["total_samples_per_s"] / out["1_process"]["total_samples_per_s"]
    out["ratios"] = {k: v["total_samples_per_s"] / out["1_process"]["total_samples_per_s"] for k, v in out.items()
                     if k.endswith("_process")}
    out["setting"] = {"frames": frames, "amp": amp}
    return out


def step_6_packing(ctx: Ctx) -> dict:
    """Trials packed on one GPU: the GPU-level gain (1-4 step benchmarks at once) and the step-5 grid at 0.5 GPU per
    trial. The rehearsal runs the step benchmarks only: the grid is step 5's command with another --gpus-per-trial."""
    result = {"pair": _pair(ctx)}
    ctx.write("6_packing", result)
    if ctx.rehearse:
        return result
    result["ray"] = _orchestrate(ctx, "gpu05", ["--gpus", "1", "--gpus-per-trial", "0.5"])
    one = ctx.out / "5_ray.json"
    if one.is_file():
        base = json.loads(one.read_text())
        if base.get("trial_span_s") and result["ray"].get("trial_span_s"):
            result["ray_span_ratio"] = base["trial_span_s"] / result["ray"]["trial_span_s"]
            result["ray_wall_ratio"] = base["wall_s"] / result["ray"]["wall_s"]
    return result
