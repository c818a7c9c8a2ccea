#!/usr/bin/env python
"""Training-step throughput of AST-base (random init, same architecture as the pretrained checkpoint).

Measures samples/s and model FLOP utilisation (MFU) at several frame counts, fp32 vs AMP, on CPU or GPU:

    python benchmarks/step.py --frames 1024 400 --batch-size 2 --steps 3            # CPU
    python benchmarks/step.py --frames 1024 400 --batch-size 16 --steps 20 --json out.json   # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flops import PEAK_TFLOPS, ast_train_flops  # noqa: E402
from trainable.fit.model import ast_base_config  # noqa: E402


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def training_step(frames: int, amp: str, batch: int, device: torch.device, attn: str = "sdpa", compile: str | None = None,
                  config=None, fused: bool = False, mode: str | None = None):
    """(step, model): ``step()`` runs one AdamW step of AST (AST-base unless ``config``) on fixed random input.

    ``amp``: off, bf16 or fp16 (fp16 with a GradScaler, as on a T4). ``compile``: a torch.compile backend
    ("inductor" for speed; "eager" only traces, for rehearsals), or None; the first calls compile; ``mode`` its mode
    (inductor: "reduce-overhead" = CUDA graphs). ``fused``: AdamW's fused kernel (the trials' optimizer on CUDA).
    """
    from transformers import ASTForAudioClassification

    torch.manual_seed(0)
    config = config or ast_base_config(max_length=frames, num_labels=10)
    config._attn_implementation = attn
    model = ASTForAudioClassification(config).to(device)
    model.train()
    net = torch.compile(model, backend=compile, mode=mode) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused or None)
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    x = torch.randn(batch, frames, 128, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(net(input_values=x).logits.float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step, model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tiny_config(frames: int):
    """A 2-layer AST with AST-base's patch geometry: for rehearsals and tests (its MFU means nothing)."""
    from transformers import ASTConfig

    return ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_length=frames, num_labels=10)


def wait_for_peers(sync_dir: str, count: int, timeout_s: float = 300) -> None:
    """Barrier between processes: mark this one ready in ``sync_dir``, wait until ``count`` are."""
    folder = Path(sync_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + timeout_s
    while len(list(folder.glob("ready-*"))) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(folder.glob('ready-*')))} of {count} processes reached {sync_dir}")
        time.sleep(0.005)


def measure(frames: int, amp: str, batch: int, steps: int, warmup: int, device: torch.device, attn: str = "sdpa",
            compile: str | None = None, sync: tuple[str, int] | None = None, tiny: bool = False, fused: bool = False,
            mode: str | None = None) -> dict:
    """Time ``steps`` training steps of AST-base after ``warmup`` untimed ones; one row of figures.

    ``sync`` = (folder, count): after the warm-up, wait until ``count`` processes are ready, so that they all time
    the same window (trials packed on one GPU). ``tiny``: a 2-layer model instead of AST-base (rehearsals).
    """
    step, model = training_step(frames, amp, batch, device, attn, compile, tiny_config(frames) if tiny else None, fused,
                                mode)
    began = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - began
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if sync is not None:
        wait_for_peers(*sync)
    wall_start, start = time.time(), time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - start
    samples_per_s = batch * steps / seconds
    row = {"frames": frames, "amp": amp, "batch": batch, "steps": steps, "samples_per_s": samples_per_s,
           "achieved_tflops": samples_per_s * ast_train_flops(frames) / 1e12,
           "train_tflop_per_clip": ast_train_flops(frames) / 1e12, "compile": compile, "compile_mode": mode,
           "fused_adamw": fused, "warmup_s": warmup_s,
           "window": [wall_start, wall_start + seconds]}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del step, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[1024, 400], help="frame counts to measure (default: 1024 400)")
    p.add_argument("--amp", nargs="+", default=None, choices=["off", "bf16", "fp16"],
                   help="precisions (default: off and the card's AMP: bf16 if supported else fp16; CPU: off bf16)")
    p.add_argument("--batch-size", type=int, default=2, help="samples per step (default: 2)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation (default: sdpa)")
    p.add_argument("--peak-tflops", type=float, nargs=2, metavar=("FP32", "AMP"), default=None,
                   help="the device's peak TFLOP/s for MFU (default: known GPUs' data sheets; none on CPU)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model with BACKEND (default inductor); the warm-up steps compile it")
    p.add_argument("--sync", nargs=2, metavar=("DIR", "COUNT"), default=None,
                   help="after the warm-up, wait until COUNT processes given the same DIR are ready, so that they time "
                   "the same window (trials packed on one GPU)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer AST instead of AST-base (rehearsals and tests)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = device_name(device)
    amps = args.amp or (["off", "bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16"])
    peak = tuple(args.peak_tflops) if args.peak_tflops else PEAK_TFLOPS.get(name)
    rows = []
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch_size}; {args.steps} timed steps; attention {args.attn}")
    print(f"{'frames':>6} {'amp':>5} {'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}")
    for frames in args.frames:
        for amp in amps:
            sync = (args.sync[0], int(args.sync[1])) if args.sync else None
            row = measure(frames, amp, args.batch_size, args.steps, args.warmup, device, args.attn, args.compile, sync,
                          args.tiny)
            if peak:
                row["mfu"] = row["achieved_tflops"] / (peak[0] if amp == "off" else peak[1])
            rows.append(row)
            mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else "n/a"
            mem = f"{row['peak_mem_gib']:.2f}" if "peak_mem_gib" in row else "n/a"
            print(f"{frames:>6} {amp:>5} {row['samples_per_s']:>10.2f} {row['achieved_tflops']:>8.3f} {mfu:>6} {mem:>8}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
