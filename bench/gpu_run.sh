#!/usr/bin/env bash
# The whole GPU check, for a bare GPU machine without network (issue 21 item 3):
#
#   bench/gpu_run.sh OUT_DIR [--wheels DIR] [--tune] [--budget SECONDS] [--smoke] [--ops a,b] [--skip-tests]
#                    [--skip-check] [--only STEP,STEP]
#
# 1. installs what the machine lacks from a folder of wheels made beforehand on a networked machine by
#    bench/gpu_wheels.sh (--wheels, or $FASTDEC_WHEELS; nothing is fetched). The folder travels with the checkout:
#    e.g. bench/gpu_wheels.sh .whl with /.whl/ in .git/info/exclude, the device call carrying .whl;
# 2. builds fastdec and its CUDA extension from this checkout (pip install --no-build-isolation -e .);
# 3. runs the kernel tests natively on the GPU (no interpreter); with --only ...,attention_probe also
#    bench/attention_key_tail_probe.py (the attention launches found wrong on an H200, across tiles, each in its own
#    process);
# 4. bench/gpu_check.py: every op in fp16/bf16/fp32, contiguous/channels_last/strided, attention at head_dim
#    64/384/512, against its peers;
# 5. fastdec bench: end-to-end decodes at the performance goals' sizes against diffusers eager and torch.compile
#    (and fastdec replayed from a CUDA graph), with peak memory, then the tiled 4096^2 bf16 decode (--tiling);
# 6. with --tune, bench/tune_attention.py writes the attention table of this GPU into OUT_DIR;
# 7. bench/gpu_run_report.py writes OUT_DIR/gpu_run.json and gpu_run.md (environment, each step's status and time,
#    every table), ready to commit under bench/results/.
#
# Every step runs under a time limit within --budget (default 540 s, so that a 10-minute device command holds it
# with install and report); a step that fails or runs out of time is recorded and the next one still runs. The whole
# check does not fit one such call: on an H200 (2026-12-04, bench/results/2026-12-04-gpu-run-h200-call3-4/) each
# end-to-end step took 57-70 s, diffusers' torch.compile alone 20-25 s of it. --only runs just the named steps: a
# second call on the still-warm machine (install and build stay done) takes those the first ran out of time for.
# --smoke runs the same steps on the CPU at tiny sizes (no install, no build): CI runs it (tests/test_gpu_run.py) so
# the script never rots.
set -uo pipefail

usage() { sed -n '2,5p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
WHEELS=${FASTDEC_WHEELS:-}
TUNE=0 SMOKE=0 SKIP_TESTS=0 SKIP_CHECK=0 BUDGET=540 OPS="" ONLY=""
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) WHEELS=$2; shift 2 ;;
    --tune) TUNE=1; shift ;;
    --smoke) SMOKE=1; shift ;;
    --skip-tests) SKIP_TESTS=1; shift ;;
    --skip-check) SKIP_CHECK=1; shift ;;
    --budget) BUDGET=$2; shift 2 ;;
    --ops) OPS=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    *) echo "gpu_run.sh: unknown option $1" >&2; usage ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STEPS=$OUT/steps.tsv
: > "$STEPS"
START=$(date +%s)
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET FASTDEC_TRITON_INTERPRET  # natively on the GPU; --smoke takes the CPU reference paths
cd "$ROOT" || exit 1

# step NAME LIMIT COMMAND...: runs COMMAND with its output in OUT/NAME.log, under min(LIMIT, what is left of the
# budget); records "NAME<TAB>status<TAB>seconds" in steps.tsv.
step() {
  local name=$1 limit=$2; shift 2
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then return; fi
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 10 ]; then
    printf '%s\tskipped: budget spent\t0\n' "$name" >> "$STEPS"; echo "== $name: skipped (budget spent)"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit} s)"
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="timed out after ${limit} s"
  elif [ $rc -ne 0 ]; then status="failed (exit $rc)"; fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >> "$STEPS"
  echo "   $status; last lines:"; tail -n 5 "$OUT/$name.log" | sed 's/^/   | /'
}

if [ -n "$WHEELS" ]; then
  # Only what is missing or too old: pip resolves against the packages the machine already has.
  step install 120 "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" -r "$ROOT/bench/gpu_requirements.txt"
fi
if [ $SMOKE -eq 0 ]; then
  step build 240 "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e "$ROOT"
fi

if [ $SKIP_TESTS -eq 0 ]; then
  if [ $SMOKE -eq 1 ]; then
    TESTS=(tests/test_attention_dispatch.py -k "splits_only or matmul_precision")
  else
    TESTS=(tests/test_attention.py tests/test_attention_dispatch.py tests/test_attention_gpu_findings.py
           tests/test_group_norm_act.py
           tests/test_rms_norm_act.py tests/test_pixel_shuffle.py tests/test_patch_unembed.py
           # the row-chunked layers of large decodes (strided row views into group_norm_act and pixel_shuffle)
           "tests/test_layers.py::test_norm_act_conv_in_row_chunks_equals_the_whole"
           "tests/test_layers.py::test_upsample_conv_in_row_chunks_equals_the_whole"
           # what the README says of fastdec.decode under torch.cuda.graph, for every image family
           tests/test_validate.py::test_fastdec_decode_is_captured_in_a_cuda_graph)
  fi
  # Compiling the kernels for each parametrisation is CPU work: spread it over 8 processes where pytest-xdist is
  # there (the first run's serial tests did not end in 90 s on a 16-core H200 machine).
  PARALLEL=()
  [ $SMOKE -eq 0 ] && "$PYTHON" -c "import xdist" 2>/dev/null && PARALLEL=(-n 8)
  step tests 90 "$PYTHON" -m pytest "${TESTS[@]}" "${PARALLEL[@]}" -q -p no:cacheprovider --junitxml "$OUT/tests.xml"
fi

CHECK=(bench/gpu_check.py --out "$OUT/gpu_check" --skip-decoders)
[ -n "$OPS" ] && CHECK+=(--ops "$OPS")
if [ $SMOKE -eq 1 ]; then
  step gpu_check 120 "$PYTHON" "${CHECK[@]}" --smoke --seconds 0.01
  step decoders 120 "$PYTHON" -m fastdec.bench --decoders taesd --resolution 64 --batch 1 --repeats 2 --warmup 0 \
    --no-compile --device cpu --out "$OUT/decoders"
else
  # Only when named (--only ...,attention_probe): the split-head-dim attention launches found wrong on an H200,
  # across keys and tiles (kernels/support/attention_config.py key_tail_unverified), one line per launch with its error.
  # 83 s for 63 launches on an H200; fastdec pads D for those calls since the third session's probe.
  [[ ",$ONLY," == *",attention_probe,"* ]] && \
    step attention_probe 150 "$PYTHON" bench/attention_key_tail_probe.py --out "$OUT/attention_probe.json"
  # --skip-check: a later session that has gpu_check's tables already gives its minutes to the decoders
  [ $SKIP_CHECK -eq 0 ] && step gpu_check 170 "$PYTHON" "${CHECK[@]}" --budget 140  # stops in time for its report
  # The goals' sizes, one fastdec bench per step so that a slow torch.compile loses only its own rows: SD-VAE
  # 512/1024, FLUX.2 1024, TAESD 512, FLUX.1 1024 (each vs diffusers eager and torch.compile, with peak memory), the
  # video decoders at the goals' frame sizes (Wan 2.1 81x480x832, SVD 14x576x1024; no compile) and the tiled
  # 4096^2 bf16 decode.
  BENCH=("$PYTHON" -m fastdec.bench --batch 1 --dtype bf16)
  # (The first H200 run, 2026-12-04: SD-VAE 512 with its compiles took 52 s, so each size is its own step. The
  # video steps time fewer rounds and, with --quick, leave out compile and the fastdec-reference row: one Wan decode
  # of 81 frames takes seconds.)
  step sd-vae-512 90 "${BENCH[@]}" --decoders sd-vae --resolution 512 --out "$OUT/sd-vae-512"
  step sd-vae-1024 100 "${BENCH[@]}" --decoders sd-vae --resolution 1024 --out "$OUT/sd-vae-1024"
  step flux2 90 "${BENCH[@]}" --decoders flux2 --resolution 1024 --out "$OUT/flux2"
  step taesd 60 "${BENCH[@]}" --decoders taesd --resolution 512 --out "$OUT/taesd"
  step flux1 90 "${BENCH[@]}" --decoders flux1 --resolution 1024 --out "$OUT/flux1"
  step wan 90 "${BENCH[@]}" --decoders wan2.1 --resolution 832 --height 480 --quick --repeats 2 --warmup 1 \
    --out "$OUT/wan"
  step svd 75 "${BENCH[@]}" --decoders svd --resolution 1024 --height 576 --quick --repeats 5 --warmup 1 \
    --out "$OUT/svd"
  step tiling 120 "$PYTHON" -m fastdec.bench --tiling --resolution 4096 --device cuda --dtype bf16 --out "$OUT/tiling"
fi
if [ $TUNE -eq 1 ]; then
  cp "$ROOT/kernels/support/attention_table.py" "$OUT/attention_table.py"
  step tune 120 "$PYTHON" bench/tune_attention.py --out "$OUT/attention_table.py"
fi

"$PYTHON" bench/gpu_run_report.py "$OUT" $([ $SMOKE -eq 1 ] && echo --smoke)
report=$?
echo "gpu_run.sh: $(( $(date +%s) - START )) s; wrote $OUT/gpu_run.json and gpu_run.md"
exit $report
