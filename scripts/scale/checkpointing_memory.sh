#!/usr/bin/env bash
# Peak memory and time of `train` with and without --gradient-checkpointing on the llava-1.5-7b
# shapes with N language-model layers (one 601-token question, P particles, 2 steps), interleaved
# rounds, one fresh process each (/usr/bin/time -v). Prints one line per run and writes them to
# $OUT/results.txt (default /tmp/checkpointing-memory).
#
#   bash scripts/scale/checkpointing_memory.sh BIN [--layers 4] [--particles 4] [--dtype bf16]
#        [--device cpu] [--rounds 2] [--python PY]
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
BIN=${1:?usage: checkpointing_memory.sh BIN [options]}; shift
LAYERS=4; P=4; DTYPE=bf16; DEVICE=cpu; ROUNDS=2; PY=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --layers) LAYERS=$2; shift ;;
    --particles) P=$2; shift ;;
    --dtype) DTYPE=$2; shift ;;
    --device) DEVICE=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    --python) PY=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
ROOT=${BELLA_REAL_SIZE_DIR:-$HOME/.cache/bella-vqa/real-size}
MODEL=$ROOT/llava-1.5-7b-hf-L$LAYERS
[ "$LAYERS" = 32 ] && MODEL=$ROOT/llava-1.5-7b-hf
OUT=${OUT:-/tmp/checkpointing-memory}
mkdir -p "$OUT"
"$PY" scripts/make_real_size.py llava --layers "$LAYERS" --root "$ROOT" > "$OUT/make_real_size.log" 2>&1 || {
  echo "make_real_size.py failed: $OUT/make_real_size.log" >&2; exit 1; }
printf '{"question_id": "q0", "image": "%s", "question": "What color is the circle?", "answers": ["red"]}\n' \
  "$(pwd)/tests/fixtures/images/photo.png" > "$OUT/train.jsonl"
: > "$OUT/results.txt"
for round in $(seq "$ROUNDS"); do
  for flag in "" --gradient-checkpointing; do
    name=plain; [ -n "$flag" ] && name=checkpointing
    rm -rf "$OUT/particles"
    # shellcheck disable=SC2086
    /usr/bin/time -v "$BIN" train --quiet --model "$MODEL" --dtype "$DTYPE" --device "$DEVICE" \
      --data "$OUT/train.jsonl" --out "$OUT/particles" --particles "$P" --rank 8 --alpha 16 \
      --batch-size 1 --max-steps 2 --epochs 2 $flag > "$OUT/$name-$round.log" 2>&1
    rc=$?
    rss=$(awk -F: '/Maximum resident/ {gsub(/ /, "", $2); printf "%.2f", $2 / 1048576}' "$OUT/$name-$round.log")
    wall=$(awk '/Elapsed \(wall clock\)/ {print $NF}' "$OUT/$name-$round.log")
    loss=$(tail -n1 "$OUT/particles/train_log.jsonl" 2>/dev/null | "$PY" -c 'import json,sys; print(round(json.load(sys.stdin)["train_loss"], 6))' 2>/dev/null)
    echo "$name round $round: exit $rc, peak RSS ${rss} GiB, wall $wall, last loss ${loss:-?}" | tee -a "$OUT/results.txt"
  done
done
