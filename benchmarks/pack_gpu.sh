#!/usr/bin/env bash
# Pack everything the GPU image lacks for the whole project (Ray included) into one small folder that travels with
# the working tree (the GPU machine has no network and takes at most 64 MiB of files).
#
#   bash benchmarks/pack_gpu.sh DIR                  # wheels for the GPU image: CPython 3.12, manylinux x86_64
#   bash benchmarks/pack_gpu.sh DIR --python 3.11    # for another CPython (the CPU test packs for its own)
#   XZ_LEVEL=0 bash benchmarks/pack_gpu.sh DIR        # faster, larger (default: 9, ~2-3 minutes on 2 cores)
#
# DIR then holds wheels/ (soundfile, cffi, pycparser, tensorboardX, jsonschema, pydantic and their helpers), ray.tar.xz
# (Ray's wheel unpacked without ray/jars, the dashboard's web build, rllib and *.js.map: ~25 MB instead of 79 MB)
# and unpack.sh. On the GPU machine:
#
#   eval "$(bash DIR/unpack.sh /tmp/astcv-site)"      # installs into that folder, prints the PYTHONPATH export
#
# What the GPU image already has (torch, torchaudio, transformers, pandas, pyarrow, filelock, tqdm, msgpack, click,
# protobuf, aiohttp, requests, pyyaml, ...) is not packed: see shared GPU notes and benchmarks/gpu.sh.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
[ $# -ge 1 ] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0;; esac
DIR=$1; shift
PYVER=3.12
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYVER=$2; shift 2;;
    *) echo "pack_gpu.sh: unknown argument $1" >&2; exit 2;;
  esac
done
PYTHON=${PYTHON:-python3}
RAY_VERSION=${RAY_VERSION:-2.60.0}
XZ_LEVEL=${XZ_LEVEL:-9}
# Small packages the GPU image lacks (pins match constraints-ci.txt where the project pins them). Ray Tune imports
# ray.train, which needs pydantic (found missing on the GPU image in the first run there, 2026-11-26).
SMALL=(soundfile==0.14.0 cffi pycparser tensorboardX==2.6.5 jsonschema jsonschema-specifications referencing rpds-py
       pydantic pydantic-core annotated-types typing-inspection typing-extensions)

mkdir -p "$DIR/wheels"
DIR=$(cd "$DIR" && pwd)
download() {  # binary wheels for CPython $PYVER on manylinux x86_64, none of their dependencies
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$1" "${@:2}"
}
echo "pack_gpu: downloading ${SMALL[*]} for CPython $PYVER" >&2
download "$DIR/wheels" "${SMALL[@]}"

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
echo "pack_gpu: downloading ray==$RAY_VERSION and trimming it" >&2
download "$TMP" "ray==$RAY_VERSION"
mkdir "$TMP/site"
"$PYTHON" -m zipfile -e "$TMP"/ray-*.whl "$TMP/site"
rm -rf "$TMP/site/ray/jars" "$TMP/site/ray/dashboard/client/build" "$TMP/site/ray/rllib"
find "$TMP/site" -name '*.js.map' -delete
# Executables lose their mode bit in zipfile's extraction: Ray starts its own binaries (raylet, gcs_server).
find "$TMP/site/ray/core/src" -type f -exec chmod +x {} + 2>/dev/null || true
echo "pack_gpu: compressing (xz -$XZ_LEVEL)" >&2
(cd "$TMP/site" && tar -cf - . | xz "-$XZ_LEVEL" -T0 > "$DIR/ray.tar.xz")

cat > "$DIR/unpack.sh" <<'EOF'
#!/usr/bin/env bash
# Install the packed packages into SITE (default /tmp/astcv-site) without network; print the PYTHONPATH export.
#   eval "$(bash unpack.sh SITE)"
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SITE=${1:-/tmp/astcv-site}
PYTHON=${PYTHON:-python3}
mkdir -p "$SITE"
"$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$HERE"/wheels/*.whl >&2
tar -xJf "$HERE/ray.tar.xz" -C "$SITE"
echo "export PYTHONPATH=$SITE\${PYTHONPATH:+:\$PYTHONPATH}"
EOF
chmod +x "$DIR/unpack.sh"
du -sh "$DIR" >&2
echo "pack_gpu: done; on the GPU machine: eval \"\$(bash $DIR/unpack.sh /tmp/astcv-site)\"" >&2
