#!/usr/bin/env bash
# Variants of the demo's particle sets, for the abstention targets of eval/RESULTS.md: each
# variant is trained on the same 1200 questions as scripts/demo/particles.sh, calibrated to answer
# 85 % of validation questions, and benchmarked on the test split, mismatched image-question
# pairs, absent objects and the photographs. JOBS variants run at once (default 1), each with
# RAYON_NUM_THREADS threads (default 2). About 1 minute per variant on 2 cores (release build).
#
#   BELLA=target/release/bella-vqa scripts/demo/sweep.sh WORK_DIR VARIANT [VARIANT ...]
#
# Prints a Markdown table, one row per variant (scripts/demo/sweep_summary.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=$1
shift
BELLA=${BELLA:-target/release/bella-vqa}
mkdir -p "$WORK"
if [ ! -f "$WORK/world/train.jsonl" ]; then
  "$BELLA" data shapes --out "$WORK/world" --seed 11 --n 3000 --quiet
fi
head -n 1200 "$WORK/world/train.jsonl" > "$WORK/world/train-1200.jsonl"
# The same world with absent-object questions ("unanswerable") in 15 % of the training scenes.
if [ ! -f "$WORK/world-absent/train.jsonl" ]; then
  "$BELLA" data shapes --out "$WORK/world-absent" --seed 11 --n 3000 --absent-share 0.15 --quiet
fi
head -n 1200 "$WORK/world-absent/train.jsonl" > "$WORK/world-absent/train-1200.jsonl"

LM="language_model.*.q_proj,language_model.*.k_proj,language_model.*.v_proj,language_model.*.o_proj"
PROJ="multi_modal_projector.linear_1,multi_modal_projector.linear_2"
VIS="vision_tower.*.q_proj,vision_tower.*.k_proj,vision_tower.*.v_proj,vision_tower.*.out_proj"
variant() { # name → train arguments
  case $1 in
    ens-b01) echo "--particles 4 --method ensemble --init-b-std 0.01 --epochs 1 --targets $LM" ;;
    ens-b05) echo "--particles 4 --method ensemble --init-b-std 0.05 --epochs 1 --targets $LM" ;;
    ens-b10) echo "--particles 4 --method ensemble --init-b-std 0.1 --epochs 1 --targets $LM" ;;
    ens-b20) echo "--particles 4 --method ensemble --init-b-std 0.2 --epochs 1 --targets $LM" ;;
    ens-b10-e2) echo "--particles 4 --method ensemble --init-b-std 0.1 --epochs 2 --targets $LM" ;;
    ens-b10-proj) echo "--particles 4 --method ensemble --init-b-std 0.1 --epochs 1 --targets $LM,$PROJ" ;;
    ens-b10-vis) echo "--particles 4 --method ensemble --init-b-std 0.1 --epochs 1 --targets $LM,$VIS" ;;
    svgd-b10) echo "--particles 4 --method svgd --init-b-std 0.1 --epochs 1 --targets $LM" ;;
    # trained on world-absent (see data_of)
    single-u) echo "--particles 1 --method ensemble --init-b-std 0.01 --epochs 1 --targets $LM" ;;
    ens-u) echo "--particles 4 --method ensemble --init-b-std 0.01 --epochs 1 --targets $LM" ;;
    ens-u-e2) echo "--particles 4 --method ensemble --init-b-std 0.01 --epochs 2 --targets $LM" ;;
    svgd-u) echo "--particles 4 --method svgd --init-b-std 0.01 --epochs 1 --targets $LM" ;;
    ens-u-full) echo "--particles 4 --method ensemble --init-b-std 0.01 --epochs 1 --targets $LM" ;;
    svgd-u-full) echo "--particles 4 --method svgd --init-b-std 0.01 --epochs 1 --targets $LM" ;;
    ens-u-full-vis) echo "--particles 4 --method ensemble --init-b-std 0.1 --epochs 1 --targets $LM,$VIS" ;;
    svgd-u-full-vis) echo "--particles 4 --method svgd --init-b-std 0.1 --epochs 1 --targets $LM,$VIS" ;;
    single-u-full) echo "--particles 1 --method ensemble --init-b-std 0.01 --epochs 1 --targets $LM" ;;
    *) echo "unknown variant $1" >&2; return 1 ;;
  esac
}

data_of() { # name → training questions
  case $1 in
    *-u-full | *-u-full-*) echo "$WORK/world-absent/train.jsonl" ;;
    *-u | *-u-*) echo "$WORK/world-absent/train-1200.jsonl" ;;
    *) echo "$WORK/world/train-1200.jsonl" ;;
  esac
}

run() {
  local name=$1 args
  args=$(variant "$name")
  # shellcheck disable=SC2086 # $args is a list of options
  "$BELLA" train --model "$ROOT/demo/llava" --data "$(data_of "$name")" \
    --val "$WORK/world/val.jsonl" --batch-size 4 --lr 2e-3 --rank 8 --alpha 16 \
    --eval-every 100 --val-sample 32 --seed 3 --quiet --out "$WORK/$name" $args
  "$BELLA" calibrate --model "$ROOT/demo/llava" --adapters "$WORK/$name" \
    --data "$WORK/world/val.jsonl" --limit 300 --target-coverage 0.85 --quiet
  "$BELLA" bench --model "$ROOT/demo/llava" --compare "$name=$WORK/$name" \
    --data "$WORK/world/test.jsonl" --val "$WORK/world/val.jsonl" \
    --ood-data "$WORK/world/ood-mismatched.jsonl" "$WORK/world/ood-absent.jsonl" \
    "$ROOT/eval/demo/photos.jsonl" --limit 150 --out "$WORK/bench-$name" --quiet
}

export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
for name in "$@"; do
  variant "$name" > /dev/null
  while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-1}" ]; do wait -n || true; done
  if [ -f "$WORK/$name/.done" ]; then continue; fi
  ( (run "$name" > "$WORK/$name.log" 2>&1 && touch "$WORK/$name/.done" && echo "$name done") \
    || echo "$name FAILED (see $WORK/$name.log)") &
done
wait
python3 scripts/demo/sweep_summary.py "$WORK" "$@"
