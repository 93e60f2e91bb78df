#!/usr/bin/env bash
# One answer of the full llava-1.5-7b-shaped checkpoint with P particles on the top quarter of the
# language model (layers 24-31, the prompt forked there), timed, with its peak RSS (eval/SCALE.md,
# "The full 7B on this machine").
#
#   scripts/scale/answer_7b.sh [--dtype bf16|f16|f32] [--quantize q4k|q8_0 [--quantize-vision]] [--particles 4]
#
# Needs: the checkpoint (scripts/make_real_size.py llava), the venv of requirements-real-size.txt
# (~/.cache/bella-vqa/venv-real-size) and a release build (BELLA=path, default target/release).
# Prints one JSON line: options, wall seconds (load included), peak RSS, checkpoint bytes.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BELLA=${BELLA:-${CARGO_TARGET_DIR:-$ROOT/target}/release/bella-vqa}
PY=${PY:-$HOME/.cache/bella-vqa/venv-real-size/bin/python}
MODEL=${MODEL:-$HOME/.cache/bella-vqa/real-size/llava-1.5-7b-hf}
WORK=${WORK:-$HOME/.cache/bella-vqa/real-size/answer-7b}
P=4
FLAGS=()
while [ $# -gt 0 ]; do
  case $1 in
    --particles) P=$2; shift 2 ;;
    --dtype|--quantize) FLAGS+=("$1" "$2"); shift 2 ;;
    --quantize-vision) FLAGS+=("$1"); shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ -f "$MODEL/model.safetensors.index.json" ] || { echo "no checkpoint at $MODEL: run scripts/make_real_size.py llava" >&2; exit 1; }
PARTICLES=$WORK/particles-p$P
if [ ! -f "$PARTICLES/bella_config.json" ]; then
  "$PY" scripts/scale/random_adapters.py --model "$MODEL" --out "$WORK/peft-p$P" --particles "$P" --from-layer 24
  peft=()
  for ((i = 0; i < P; i++)); do peft+=("$WORK/peft-p$P/p$i"); done
  "$BELLA" import-peft --quiet --peft "${peft[@]}" --out "$PARTICLES" --model "$MODEL"
fi
log=$(mktemp)
start=$(date +%s.%N)
/usr/bin/time -f "%M" -o "$log" "$BELLA" ask --quiet --json --model "$MODEL" --adapters "$PARTICLES" \
  "${FLAGS[@]}" --max-new-tokens 8 --image "$ROOT/eval/demo/red-circle.png" "What color is the circle?" >/dev/null
end=$(date +%s.%N)
bytes=$(du -cb "$MODEL"/*.safetensors | tail -1 | cut -f1)
printf '{"particles": %s, "flags": "%s", "wall_s": %.1f, "peak_rss_gb": %.2f, "checkpoint_gb": %.2f}\n' \
  "$P" "${FLAGS[*]}" "$(echo "$end - $start" | bc)" "$(echo "$(cat "$log") / 1000000" | bc -l)" \
  "$(echo "$bytes / 1000000000" | bc -l)"
rm -f "$log"
