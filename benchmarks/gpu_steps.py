"""The GPU check's steps (see gpu_check.py, which runs each in its own process group under a hard limit).

Each ``step_*`` function runs inside its step's process and returns its figures (written to OUT/<step>.json);
with ``--rehearse`` the same steps run on CPU with a tiny model and tiny data.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

T4_GIB = 15.0  # a T4 has 16 GB, of which about 15 GiB is usable
OOM_CAP_GIB = 6.0
OOM_BATCH = 48


class Ctx:
    """Where a step reads and writes, and the sizes it uses (GPU or --rehearse)."""

    def __init__(self, out: Path, work: Path, rehearse: bool):
        self.out, self.work, self.rehearse = out, work, rehearse
        self.data = work / "data"  # folds 1-3; the throughput and Ray steps
        # folds 1-3, 50 clips each: the memory steps (the rehearsal's data is small already)
        self.small = self.data if rehearse else work / "data-small"
        self.model = work / "ast-model"
        self.cache = work / "feature-cache"
        self.frames = (1024, 400)  # (the seed recipe's, ours: --num-frames auto on 4 s clips)

    def write(self, name: str, result: dict) -> None:
        """Write OUT/<name>.json now (a step's figures survive a later kill)."""
        path = self.out / f"{name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(path)


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _fit(ctx: Ctx, data: Path, **values) -> tuple[dict, float]:
    """Run the trial path (trainable.fit.train.fit) with a reporter that keeps nothing; (last epoch's metrics, seconds)."""
    from trainable.config import TrainConfig
    from trainable.fit.train import fit

    config = TrainConfig.from_dict({"data_root": str(data), "model": str(ctx.model), "folds": (1, 2, 3),
                                    "test_fold": 1, "lr": 5e-5, "num_workers": 2, **values})
    start = time.perf_counter()
    state = fit(config, lambda metrics, ckpt: None)
    seconds = time.perf_counter() - start
    return state.history, seconds


def _row(history: list[dict]) -> dict:
    keep = ("epoch", "train_loss", "val_accuracy", "micro_batch_size", "grad_accum_steps", "oom_fallbacks",
            "samples_per_second")
    return {k: history[-1][k] for k in keep}




def step_0_prepare(ctx: Ctx) -> dict:
    """Generated clips (the real dataset's WAV kinds) and an AST checkpoint with a 527-class head."""
    import torch

    from trainable.fit.model import ast_base_config, build_tiny_ast
    from trainable.data.synth import generate

    result = {}
    for root, per_class in ((ctx.data, 2 if ctx.rehearse else 24), (ctx.small, 2 if ctx.rehearse else 5)):
        if not (root / "metadata" / "UrbanSound8K.csv").is_file():
            t0 = time.perf_counter()
            meta = generate(root, clips_per_class=per_class, folds=(1, 2, 3), seed=0)
            result[root.name] = {"clips": len(meta), "seconds": time.perf_counter() - t0}
    if not (ctx.model / "config.json").is_file():
        if ctx.rehearse:
            build_tiny_ast(ctx.model, hidden_size=32, num_heads=2)
            result["model"] = "tiny AST (2 layers, hidden 32), random init"
        else:
            from transformers import ASTForAudioClassification

            torch.manual_seed(0)
            ASTForAudioClassification(ast_base_config(max_length=1024, num_labels=527)).save_pretrained(ctx.model)
            result["model"] = "AST-base (MIT/ast-finetuned-audioset-10-10-0.4593's architecture), random init"
    return result


def _profile(frames: int, amp: str, batch: int, device, tiny: bool) -> dict:
    """One training step under torch.profiler: GPU busy fraction and device time by kernel family."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from step import tiny_config, training_step

    step, model = training_step(frames, amp, batch, device, config=tiny_config(frames) if tiny else None)
    for _ in range(3):
        step()
    torch.cuda.synchronize() if device.type == "cuda" else None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        torch.cuda.synchronize() if device.type == "cuda" else None
    wall_ms = 1000 * (time.perf_counter() - t0)
    rows = []
    for evt in prof.key_averages():
        dev = getattr(evt, "self_device_time_total", None)
        if dev is None:
            dev = getattr(evt, "self_cuda_time_total", 0)
        if device.type == "cpu":
            dev = evt.self_cpu_time_total
        if dev > 0 and (device.type == "cpu" or not evt.key.startswith(("aten::", "cuda", "Optimizer", "autograd"))):
            rows.append((evt.key, dev / 1000, evt.count))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    families = {"matmul": ("gemm", "xmma", "cutlass", "cublas", "nvjet", "sm90", "matmul", "addmm", "mm"),
                "attention": ("flash", "fmha", "attention", "efficient"),
                "optimizer": ("multi_tensor", "adam", "foreach"),
                "norm/softmax": ("norm", "softmax"),
                "elementwise/other": ("",)}
    by_family: dict[str, float] = {}
    for key, ms, _ in rows:
        name = key.lower()
        fam = next(f for f, pats in families.items() if any(p in name for p in pats))
        by_family[fam] = by_family.get(fam, 0.0) + ms
    del step, model
    return {"frames": frames, "amp": amp, "batch": batch, "wall_ms": wall_ms, "kernel_ms": total,
            "busy_fraction": total / wall_ms if wall_ms else None,
            "by_family_ms": dict(sorted(by_family.items(), key=lambda kv: -kv[1])),
            "top": [{"name": k[:120], "ms": ms, "calls": n} for k, ms, n in rows[:12]]}


def _amp_name(device) -> str:
    import torch

    if device.type == "cpu":
        return "bf16"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def step_1_step(ctx: Ctx) -> dict:
    """samples/s, MFU and peak memory of AST-base training steps, batch 16 (rehearsal: batch 2, tiny frames)."""
    from flops import PEAK_TFLOPS
    from step import device_name, measure

    device = _device()
    name = device_name(device)
    peak = PEAK_TFLOPS.get(name)
    amp = _amp_name(device)
    batch, steps, warmup = (2, 1, 0) if ctx.rehearse else (16, 10, 3)
    result = {"device": name, "batch": batch, "peak_tflops": peak, "rows": []}
    for frames in ctx.frames:
        for precision in ("off", amp):
            row = measure(frames, precision, batch, steps, warmup, device, tiny=ctx.rehearse)
            if peak:
                row["mfu"] = row["achieved_tflops"] / (peak[0] if precision == "off" else peak[1])
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            ctx.write("1_step", result)  # each row kept as soon as it is measured
            _free()
    result["profile"] = _profile(ctx.frames[1], amp, batch, device, ctx.rehearse)
    return result


def step_2_t4_memory(ctx: Ctx) -> dict:
    """Batch 8 and 16 at 1024 fp32 and 400 fp16 in a process capped at a T4's memory: does the fallback trigger?"""
    import torch

    result = {"runs": []}
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, T4_GIB / total))
        result.update(cap_gib=T4_GIB, card_gib=total)
    else:  # rehearsal: the fallback is driven by the simulated OOM instead of a memory cap
        os.environ["ASTCV_SIMULATE_OOM_ABOVE"] = "8"
        result["simulated_oom_above"] = 8
    settings = ((ctx.frames[0], "off"),) if ctx.rehearse else ((ctx.frames[0], "off"), (ctx.frames[1], "fp16"))
    for frames, amp in settings:  # the rehearsal runs one setting: the same code path, half the time
        for batch in (8, 16):
            _free()
            history, seconds = _fit(ctx, ctx.small, epochs=1, batch_size=batch, num_frames=frames, amp=amp)
            run = {"frames": frames, "amp": amp, "batch_size": batch, "seconds": seconds, **_row(history),
                   "peak_mem_gib": _peak_gib()}
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
            ctx.write("2_t4_memory", result)
    return result


def step_3_oom(ctx: Ctx) -> dict:
    """A real CUDA OOM (batch 48, 1024 frames, fp32, under a tight cap) survived by halving the micro-batch."""
    import torch

    result = {"batch_size": OOM_BATCH}
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(OOM_CAP_GIB / total)
        result["cap_gib"] = OOM_CAP_GIB
    else:
        os.environ["ASTCV_SIMULATE_OOM_ABOVE"] = "10"
        result["simulated_oom_above"] = 10
    _free()
    history, seconds = _fit(ctx, ctx.small, epochs=1, batch_size=OOM_BATCH, num_frames=ctx.frames[0], amp="off")
    result.update(seconds=seconds, **_row(history), peak_mem_gib=_peak_gib())
    last = history[-1]
    result["effective_batch_kept"] = last["micro_batch_size"] * last["grad_accum_steps"] >= OOM_BATCH > (
        last["micro_batch_size"] * (last["grad_accum_steps"] - 1))
    result["loss_finite"] = bool(last["train_loss"] == last["train_loss"] and abs(last["train_loss"]) < 1e6)
    return result


def step_4_seed_vs_ours(ctx: Ctx) -> dict:
    """Same clips, same model, batch 16, 2 epochs: the seed recipe's loop vs the project's trial path."""
    from trainable.data.audio import auto_num_frames
    from trainable.data.cache import FeatureCache
    from trainable.config import TrainConfig
    from trainable.data.metadata import load_metadata

    meta = load_metadata(ctx.data, (1, 2, 3))
    auto = auto_num_frames(ctx.data, meta)
    result = {"clips": len(meta), "batch_size": 16}
    _free()
    history, seconds = _fit(ctx, ctx.data, epochs=2, batch_size=16, num_frames=ctx.frames[0], amp="off")
    result["seed"] = {"num_frames": ctx.frames[0], "amp": "off", "input": "decoded on the fly, 2 workers",
                      "epoch_samples_per_s": [h["samples_per_second"] for h in history], "fit_seconds": seconds,
                      "peak_mem_gib": _peak_gib()}
    ctx.write("4_seed_vs_ours", result)
    _free()
    t0 = time.perf_counter()
    FeatureCache.open(TrainConfig(data_root=str(ctx.data), folds=(1, 2, 3), num_frames=auto,
                                  feature_cache=str(ctx.cache)), meta)
    build = time.perf_counter() - t0
    history, seconds = _fit(ctx, ctx.data, epochs=2, batch_size=16, num_frames=auto, amp="auto",
                            feature_cache=str(ctx.cache))
    result["ours"] = {"num_frames": auto, "amp": "auto", "input": "feature cache", "cache_build_seconds": build,
                      "epoch_samples_per_s": [h["samples_per_second"] for h in history], "fit_seconds": seconds,
                      "peak_mem_gib": _peak_gib()}
    seed_sps, ours_sps = result["seed"]["epoch_samples_per_s"], result["ours"]["epoch_samples_per_s"]
    result["ratio_epoch2"] = ours_sps[-1] / seed_sps[-1]
    result["ratio_epoch1"] = ours_sps[0] / seed_sps[0]
    result["ratio_fit_wall"] = result["seed"]["fit_seconds"] / (seconds + build)
    return result


class Stopped(Exception):
    """SIGTERM from the runner at the step's limit."""


def _stop(signum, frame):
    raise Stopped()


def stop_on_sigterm() -> None:
    """The runner's SIGTERM at a step's limit raises Stopped, so a step can still write what it has."""
    signal.signal(signal.SIGTERM, _stop)


VARIANTS = (  # (name, fused AdamW, compile mode): what the trials can run (--compile), at the grid's batch sizes
    ("eager foreach", False, None), ("eager fused", True, None), ("reduce-overhead fused", True, "reduce-overhead"),
)


def step_7_compile(ctx: Ctx) -> dict | None:
    """The step at the grid's batch sizes (8, 16) and both AMP kinds (bf16, and fp16 + GradScaler as on a T4): foreach
    vs fused AdamW, eager vs torch.compile (CUDA graphs), with each compile's cost; rows added to 1_step.json."""
    from flops import PEAK_TFLOPS
    from step import device_name, measure

    device = _device()
    peak = PEAK_TFLOPS.get(device_name(device))
    path = ctx.out / "1_step.json"
    step1 = json.loads(path.read_text()) if path.is_file() else {}
    step1["variants"] = []
    amps = ("off",) if ctx.rehearse else ("bf16", "fp16") if _amp_name(device) == "bf16" else ("fp16",)
    steps, warmup = (1, 1) if ctx.rehearse else (20, 6)
    for name, fused, mode in VARIANTS:
        for amp in amps:
            for batch in ((2,) if ctx.rehearse else (8, 16)):
                if mode and (amp == "fp16" or ctx.rehearse and batch != 2):
                    continue  # compiled: bf16 only on the GPU (the warm-up compiles, ~40 s each)
                backend = ("eager" if ctx.rehearse else "inductor") if mode else None  # rehearsal: trace only
                row = measure(ctx.frames[1], amp, batch, steps, warmup, device, compile=backend, tiny=ctx.rehearse,
                              fused=fused and device.type == "cuda", mode=None if ctx.rehearse else mode)
                row.update(name=name, mfu=row["achieved_tflops"] / (peak[0] if amp == "off" else peak[1]) if peak else None)
                step1["variants"].append(row)
                print(json.dumps(row), flush=True)
                ctx.write("1_step", step1)
                _free()
    eager = next(r for r in step1["variants"] if r["name"] == "eager foreach")
    compiled = next((r for r in step1["variants"] if r["compile"] and r["batch"] == eager["batch"] and r["amp"] == eager["amp"]), None)
    if compiled:
        step1["compile"] = {"eager": eager, "compiled": compiled, "speedup": compiled["samples_per_s"] / eager["samples_per_s"]}
    ctx.write("1_step", step1)
    return None  # written into 1_step.json


STEP_FUNCTIONS = {  # the Ray steps (5_ray, 6_packing) are in gpu_steps_ray.py
    "0_prepare": step_0_prepare, "1_step": step_1_step, "2_t4_memory": step_2_t4_memory, "3_oom": step_3_oom,
    "4_seed_vs_ours": step_4_seed_vs_ours, "7_compile": step_7_compile,
}
