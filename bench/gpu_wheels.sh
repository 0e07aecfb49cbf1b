#!/usr/bin/env bash
# On a machine with network: download the wheels bench/gpu_run.sh installs on a GPU machine without network.
#
#   bench/gpu_wheels.sh DIR [--python 3.12] [--with-deps]
#
# Binary wheels for CPython 3.12 on x86-64 Linux (manylinux), whatever this machine is, for the packages in
# bench/gpu_requirements.txt. Without --with-deps only those packages are fetched (the GPU image has their
# dependencies; the folder stays small, a few MiB, so it can travel with the checkout); with it, every dependency
# too (a bare machine). Then: bench/gpu_run.sh OUT --wheels DIR.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,4p' "$0" >&2; exit 2; }
DIR=$1; shift
PY=3.12 DEPS=--no-deps
while [ $# -gt 0 ]; do
  case $1 in
    --python) PY=$2; shift 2 ;;
    --with-deps) DEPS=""; shift ;;
    *) echo "gpu_wheels.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$DIR"
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
           manylinux1_x86_64; do
  PLATFORMS+=(--platform "$tag")
done
python3 -m pip download $DEPS --only-binary=:all: --python-version "$PY" --implementation cp "${PLATFORMS[@]}" \
  -d "$DIR" -r "$ROOT/bench/gpu_requirements.txt"
ls -l "$DIR"
echo "gpu_wheels.sh: wheels in $DIR; on the GPU machine: bench/gpu_run.sh OUT --wheels $DIR"
