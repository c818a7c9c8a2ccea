#!/usr/bin/env bash
# The whole GPU check in one go (a few minutes): step and grid benchmarks, a short real training run with AMP,
# a real CUDA out-of-memory and its fallback, and a short orchestrate.py run when Ray is installed.
#   bash benchmarks/gpu.sh [OUT_DIR]        (from the repository root, on a machine with a CUDA GPU)
# Needs torch, torchaudio, transformers, soundfile, pandas; Ray only for the orchestrate.py part.
set -euxo pipefail
OUT=${1:-${OUT:-gpu-bench}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"

python benchmarks/step.py --frames 1024 400 --batch-size 16 --steps 10 --warmup 3 --json "$OUT/step_gpu.json" | tee "$OUT/step.txt"
python benchmarks/input.py --json "$OUT/input.json" | tee "$OUT/input.txt"
python benchmarks/grid.py --step-json "$OUT/step_gpu.json" --input-json "$OUT/input.json" --workers 2 | tee "$OUT/grid.txt"
python benchmarks/grid.py --step-json "$OUT/step_gpu.json" --input-json "$OUT/input.json" --workers 2 \
  --target-peak 8.1 65 --target-name "Tesla T4" | tee -a "$OUT/grid.txt"
python benchmarks/gpu_check.py --out "$OUT/check" 2>&1 | tail -n 40 | tee "$OUT/gpu_check.txt"

if python -c "import ray" 2>/dev/null; then
  python orchestrate.py --gpus 1 --data-root "$OUT/check/data" --model "$OUT/check/ast-base-random" --folds 1 2 3 \
    --test-folds 1 --lrs 5e-5 1e-5 --batch-sizes 16 --epochs 2 --num-frames auto --storage-path "$OUT/runs" \
    --name gpu 2>&1 | tail -n 30 | tee "$OUT/orchestrate.txt"
else
  echo "ray not installed: orchestrate.py skipped (benchmarks/gpu_check.py ran the same trial code path)" | tee "$OUT/orchestrate.txt"
fi
