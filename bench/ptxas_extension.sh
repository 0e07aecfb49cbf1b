#!/usr/bin/env bash
# ptxas's register/spill report of fastdec._C's CUDA kernels (csrc/*.cu) for sm_90 and sm_80, without a GPU (nvcc
# only): the extension's counterpart of bench/compile_check.py (which covers the Triton kernels).
#
#   bench/ptxas_extension.sh OUT.txt
#
# tests/test_compile_check.py reads the committed report: no spills, and the sources' hash must match (regenerate
# after changing csrc/).
set -euo pipefail
[ $# -eq 1 ] || { sed -n '5p' "$0" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
read -r TORCH PYINC ABI < <("$PYTHON" -c "import os, sysconfig, torch
print(os.path.dirname(torch.__file__), sysconfig.get_paths()['include'], int(torch._C._GLIBCXX_USE_CXX11_ABI))")
FLAGS=(-std=c++20 -O3 -lineinfo -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_80,code=sm_80
       -DFASTDEC_WITH_CUDA -Xptxas -v)
cd "$ROOT"
SOURCES=(csrc/*.cu csrc/*.h)
{
  echo "# nvcc -c csrc/*.cu ${FLAGS[*]} (with torch's include paths): $(date +%F), no GPU; $(nvcc --version | tail -1)"
  echo "# sources sha256: $(cat "${SOURCES[@]}" | sha256sum | cut -d' ' -f1)"
  for source in csrc/*.cu; do
    nvcc -c "$source" -o /dev/null "${FLAGS[@]}" -I"$TORCH/include" -I"$TORCH/include/torch/csrc/api/include" \
      -I"$PYINC" -D_GLIBCXX_USE_CXX11_ABI="$ABI" 2>&1 | grep -E "^ptxas|bytes stack" | grep -v "Compile time\|Function properties"
  done
} > "$1"
echo "wrote $1: $(grep -c 'Compiling entry' "$1") kernels"
