#!/usr/bin/env bash
# The whole GPU check in one bounded call (about 5 minutes on an H100; see benchmarks/gpu_check.py for the steps):
#
#   bash benchmarks/gpu.sh OUT                 # on a CUDA machine, from the repository root
#   bash benchmarks/gpu.sh OUT --rehearse      # the same steps and files on CPU (tiny model, tiny data)
#   bash benchmarks/gpu.sh OUT --only 5_ray    # rerun some steps; --budget SECONDS (default 330)
#
# Every step runs in its own process group under a hard limit and writes OUT/<step>.json as soon as it ends
# (OUT/env.json, OUT/log.txt: 8 files at most). If .gpupack/ (bash benchmarks/pack_gpu.sh .gpupack) is in the
# tree and the packages it holds are missing, they are unpacked first (the GPU image has no Ray or soundfile).
set -uo pipefail
[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
OUT=$1; shift
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
PACK=${ASTCV_GPUPACK:-.gpupack}
if ! "$PYTHON" -c "import ray, soundfile, tensorboardX" 2>/dev/null; then
  if [ -f "$PACK/unpack.sh" ]; then
    echo "gpu.sh: unpacking $PACK" >&2
    eval "$(PYTHON=$PYTHON bash "$PACK/unpack.sh" "${ASTCV_GPUSITE:-/tmp/astcv-site}")"
  else
    echo "gpu.sh: ray/soundfile/tensorboardX missing and no $PACK: run bash benchmarks/pack_gpu.sh $PACK first" >&2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2
exec "$PYTHON" benchmarks/gpu_check.py --out "$OUT" "$@"
