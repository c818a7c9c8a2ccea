"""The benchmark scripts run (tiny sizes) and their arithmetic holds; the figures themselves live in BENCHMARKS.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from flops import ast_forward_flops, ast_train_flops  # noqa: E402


def test_flop_count_matches_ast_base():
    # AST-base at 1024 frames: 1214 tokens; ~0.8 TFLOP per training clip.
    assert ast_train_flops(1024) == pytest.approx(0.79e12, rel=0.05)
    ratio = ast_forward_flops(1024) / ast_forward_flops(400)
    assert 2.5 < ratio < 3.2  # fewer tokens, and attention is quadratic in them


def run(script, *args):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_step_input_and_grid_benchmarks_run(tmp_path):
    step, inp, grid = tmp_path / "step.json", tmp_path / "input.json", tmp_path / "grid.json"
    run("step.py", "--frames", "64", "48", "--amp", "off", "bf16", "--batch-size", "1", "--steps", "1",
        "--warmup", "0", "--json", str(step))
    rows = json.loads(step.read_text())["rows"]
    assert {(r["frames"], r["amp"]) for r in rows} == {(64, "off"), (64, "bf16"), (48, "off"), (48, "bf16")}
    assert all(r["samples_per_s"] > 0 for r in rows)
    text = run("input.py", "--limit", "30", "--num-frames", "64", "--json", str(inp))
    result = json.loads(inp.read_text())
    assert result["clips"] == 30 and result["ratio"] == pytest.approx(result["cached_clips_per_s"] / result["on_the_fly_clips_per_s"])
    assert "ratio" in text
    run("grid.py", "--step-json", str(step), "--input-json", str(inp), "--orig-frames", "64", "--ours-frames", "48",
        "--json", str(grid))
    g = json.loads(grid.read_text())
    assert g["speedup"] == pytest.approx(g["original_hours"] / g["ours_hours"]) and g["ours_hours"] > 0
