#!/usr/bin/env python3
"""The GPU check in one bounded run: every step in its own process group under a hard limit, each writing its figures
to OUT as soon as it ends (at most 8 files), Ray steps last. Usually started by ``bash benchmarks/gpu.sh OUT``.

    python3 benchmarks/gpu_check.py --out OUT                 # on a CUDA machine (about 5 minutes on an H100)
    python3 benchmarks/gpu_check.py --out OUT --rehearse      # the same steps and files on CPU, tiny model and data
    python3 benchmarks/gpu_check.py --out OUT --only 5_ray 6_packing   # rerun some steps (prepared work is reused)

Steps (OUT/<step>.json each, plus OUT/env.json and OUT/log.txt):
  1_step        AST-base (random init), batch 16: 1024/400 frames x fp32/AMP: samples/s, MFU, peak memory; a profile
                of one AMP step at 400 frames (where the time goes)
  2_t4_memory   T4 rehearsal: the process capped at 15 GiB, batch 8 and 16 at 1024 fp32 and 400 fp16: fallback?
  3_oom         a real CUDA out-of-memory under a tighter cap, survived by the micro-batch fallback
  4_seed_vs_ours the seed recipe's loop (on-the-fly decode, 1024 frames, fp32) vs the trial path (feature cache,
                --num-frames auto, AMP) on the same clips and model: samples/s and the ratio
  5_ray         orchestrate.py --gpus 1: 3 folds x 2 lrs, 2 epochs, with Ray on the GPU
  6_packing     two trials per GPU: two step benchmarks timed in the same window vs one; the step-5 grid at
                --gpus-per-trial 0.5 vs 1
  7_compile     torch.compile vs eager at 400 frames with AMP (written into 1_step.json), if time is left
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_steps import STEP_FUNCTIONS as _STEPS, Ctx, stop_on_sigterm  # noqa: E402
from gpu_steps_ray import step_5_ray, step_6_packing  # noqa: E402

STEP_FUNCTIONS = {**_STEPS, "5_ray": step_5_ray, "6_packing": step_6_packing}


@dataclass(frozen=True)
class Step:
    name: str
    limit_s: int  # hard limit on a GPU machine (the whole process group is killed at it)
    rehearse_limit_s: int
    min_s: int = 20  # not started with less of the budget left


STEPS = (
    Step("0_prepare", 90, 120),
    Step("1_step", 75, 120),
    Step("2_t4_memory", 60, 120),
    Step("3_oom", 45, 90),
    Step("4_seed_vs_ours", 75, 120),
    Step("5_ray", 180, 180, min_s=60),  # 6 trials of ~22 s each on an H200 (mostly start-up and checkpoints)
    Step("6_packing", 150, 180, min_s=60),
    Step("7_compile", 90, 120, min_s=45),
)
STEP_NAMES = tuple(s.name for s in STEPS)


def environment() -> dict:
    import importlib

    info = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    for mod in ("torch", "torchaudio", "transformers", "ray", "soundfile", "tensorboardX", "scipy"):
        try:
            m = importlib.import_module(mod)
            info[mod] = getattr(m, "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - report any import failure
            info[mod] = f"missing: {type(exc).__name__}: {exc}"[:200]
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_gib=props.total_memory / 2**30, cuda=torch.version.cuda,
                    bf16=torch.cuda.is_bf16_supported())
    return info


def run_step(step: Step, ctx: Ctx, budget_end: float, log) -> dict:
    """Run one step in its own process group under its limit; kill the whole group at the limit."""
    limit = min(step.rehearse_limit_s if ctx.rehearse else step.limit_s, budget_end - time.monotonic())
    if limit < step.min_s:
        return {"step": step.name, "status": "skipped", "why": f"{limit:.0f} s of the budget left (< {step.min_s} s)"}
    cmd = [sys.executable, __file__, "--step", step.name, "--out", str(ctx.out), "--work", str(ctx.work)]
    cmd += ["--rehearse"] if ctx.rehearse else []
    log.write(f"\n===== {step.name} (limit {limit:.0f} s) {time.strftime('%H:%M:%S')}\n")
    log.flush()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    try:
        rc = proc.wait(timeout=limit)
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        rc, status = None, "timeout"
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if step.name in ("5_ray", "6_packing") and not ctx.rehearse:  # Ray's daemons may sit outside the group (a
            # rehearsal runs beside other Ray instances, the test suite's, which this would kill)
            subprocess.call(["pkill", "-9", "-f", "raylet|gcs_server|ray::|default_worker.py|ray/_private"])
    return {"step": step.name, "status": status, "rc": rc, "seconds": round(time.monotonic() - t0, 1)}


def run_all(args) -> int:
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(out, work, args.rehearse)
    budget_end = time.monotonic() + args.budget
    env = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "rehearse": args.rehearse, "budget_s": args.budget,
           **environment(), "steps": []}
    ctx.write("env", env)
    wanted = args.only or [s for s in STEP_NAMES if s not in (args.skip or [])]
    with open(out / "log.txt", "a") as log:
        for step in STEPS:
            if step.name not in wanted:
                continue
            outcome = run_step(step, ctx, budget_end, log)
            print(json.dumps(outcome), flush=True)
            written = json.loads((out / "env.json").read_text())  # a step may have added its figures (0_prepare)
            env.update({k: v for k, v in written.items() if k not in env})
            env["steps"].append(outcome)
            ctx.write("env", env)
            if step.name == "0_prepare" and outcome["status"] != "ok":
                break  # nothing else can run without the data and model
    env["total_s"] = round(args.budget - (budget_end - time.monotonic()), 1)
    ctx.write("env", env)
    return 0 if all(s["status"] == "ok" for s in env["steps"]) else 1


def run_one(args) -> int:
    """Inside a step's process: run it and write its figures."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx = Ctx(Path(args.out), Path(args.work), args.rehearse)
    stop_on_sigterm()
    t0 = time.perf_counter()
    result = STEP_FUNCTIONS[args.step](ctx)
    if result is not None:
        if args.step == "0_prepare":  # its figures go into env.json (OUT holds at most 8 files)
            env_path = ctx.out / "env.json"
            env = json.loads(env_path.read_text()) if env_path.is_file() else {}
            env["prepare"] = {**result, "seconds": time.perf_counter() - t0}
            ctx.write("env", env)
        else:
            failed = any(r.get("rc") not in (0, None) for r in (result, result.get("ray", {})))
            ctx.write(args.step, {"step": args.step, "status": "failed" if failed else "ok",
                                  "seconds": time.perf_counter() - t0, **result})
            return 1 if failed else 0
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the figures: env.json, <step>.json, log.txt (8 files at most)")
    p.add_argument("--work", default="/tmp/astcv-gpu-work",
                   help="folder for generated data, the model, caches and Ray runs (reused by --only; default: %(default)s)")
    p.add_argument("--rehearse", action="store_true", help="CPU rehearsal: same steps and files, tiny model and data")
    p.add_argument("--budget", type=float, default=330, help="seconds for all steps together (default: %(default)s)")
    p.add_argument("--only", nargs="+", choices=STEP_NAMES, default=None, help="run only these steps")
    p.add_argument("--skip", nargs="+", choices=STEP_NAMES, default=None, help="leave out these steps")
    p.add_argument("--step", choices=STEP_NAMES, default=None, help=argparse.SUPPRESS)  # internal: one step's process
    args = p.parse_args(argv)
    if args.step:
        return run_one(args)
    return run_all(args)


if __name__ == "__main__":
    raise SystemExit(main())
