#!/usr/bin/env bash
# The lightweight decoders of FLUX.2's latent space, trained on a GPU in one call of at most 8 minutes (issue 23):
#
#   bench/gpu_train.sh OUT_DIR [--wheels DIR] [--minutes M] [--smoke]
#
# 1. installs from a wheel folder (bench/gpu_wheels.sh) and builds fastdec, as bench/gpu_run.sh does (skip both
#    when that script ran on this machine already: leave out --wheels);
# 2. plus: fastdec train fine-tuning the TAEF2 decoder on photos (MSE);
# 3. slim: fastdec distill of plus to widths 64,64,48,32 (pruned, distilled to plus, fine-tuned on photos);
#    both bf16 autocast, torch.compile, channels_last, the data on the GPU, BSDS500 train for training and val for
#    the stage-end checks; M minutes of training in all (default 5), split between them;
# 4. fastdec eval on all 200 BSDS500 test images at 320x480: TAEF2, the latent preview, slim, plus and
#    efficientvit-taef2, with frontier.png; copy OUT_DIR/frontier and the decoders into the repository to ship them.
# --smoke: the same commands on the CPU with two images and a few steps (tests/test_gpu_train.py, a slow test).
set -euo pipefail

usage() { sed -n '2,4p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
WHEELS="" MINUTES=5 SMOKE=0
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) WHEELS=$2; shift 2 ;;
    --minutes) MINUTES=$2; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    *) echo "gpu_train.sh: unknown option $1" >&2; usage ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${FASTDEC_SHARED:-$ROOT/../shared}
PYTHON=${PYTHON:-python3}
TAEF2=$SHARED/weights/taef2
BSDS=$SHARED/data/bsds500
for needed in "$TAEF2/taef2_decoder.pth" "$TAEF2/taef2_encoder.pth" "$BSDS/train" "$BSDS/val" "$BSDS/test"; do
  [ -e "$needed" ] || { echo "gpu_train.sh: $needed is missing (set FASTDEC_SHARED to the shared folder)" >&2; exit 2; }
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
fastdec() { "$PYTHON" -m fastdec.cli "$@"; }

if [ -n "$WHEELS" ]; then
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" -r bench/gpu_requirements.txt
  "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e .
fi

if [ $SMOKE -eq 1 ]; then
  # Two photos of each split, two steps a stage, 64 px crops, on the CPU: every command and option of the recipe.
  for split in train val test; do
    mkdir -p "$OUT/data/$split"
    for photo in $(ls "$BSDS/$split" | sort | head -n 2); do ln -sf "$BSDS/$split/$photo" "$OUT/data/$split/"; done
  done
  BSDS=$OUT/data
  DEVICE=(--device cpu --threads 1) EVAL_DEVICE=(--device cpu --threads 1)
  SPEED=(--crop 64 --batch 2) STEPS=(2 2 2) EVAL=2
else
  DEVICE=(--device cuda --compile --channels-last) EVAL_DEVICE=(--device cuda)
  SPEED=(--crop 256 --batch 16) STEPS=(20000 10000 30000) EVAL=200
fi
HALF=$("$PYTHON" -c "print($MINUTES / 2)")
COMMON=(--encoder "$TAEF2/taef2_encoder.pth" --cache-dir "$OUT/cache" "${DEVICE[@]}" "${SPEED[@]}")

echo "== plus: fastdec train, the TAEF2 decoder fine-tuned on photos ($HALF min)"
fastdec train "$BSDS/train" -o "$OUT/plus" --decoder "$TAEF2/taef2_decoder.pth" --loss mse --lr 1e-4 \
  --warmup 20 --steps "${STEPS[2]}" --time-limit "$HALF" --ema 0.99 --eval-data "$BSDS/val" "${COMMON[@]}"
echo "== slim: fastdec distill of plus to widths 64,64,48,32 ($HALF min)"
fastdec distill "$BSDS/train" -o "$OUT/slim" --teacher "$OUT/plus/decoder" --width 64,64,48,32 \
  --distill-steps "${STEPS[0]}" --finetune-steps "${STEPS[1]}" --time-limit "$HALF" \
  --eval-data "$BSDS/val" --eval-images 8 "${COMMON[@]}"
echo "== frontier: fastdec eval on $EVAL BSDS500 test images"
fastdec eval "$BSDS/test" --images "$EVAL" --size 320x480 --encoder "$TAEF2/taef2_encoder.pth" \
  --reference "$TAEF2/taef2_decoder.pth" --preview-data "$BSDS/train" --cache-dir "$OUT/cache" \
  --decoder "slim=$OUT/slim/finetune/decoder" --decoder "plus=$OUT/plus/decoder" \
  --decoder efficientvit-taef2=efficientvit-taef2 "${EVAL_DEVICE[@]}" -o "$OUT/frontier"
echo "gpu_train.sh: done; the frontier is in $OUT/frontier (report.md, frontier.png)"
