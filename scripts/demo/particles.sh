#!/usr/bin/env bash
# Trains, calibrates and benchmarks the demo's Bella particles on top of demo/llava, and writes the
# numbers behind eval/RESULTS.md. Reproducible: fixed seeds; about 20 minutes on 2 CPU cores with
# a release build (BELLA=target/release/bella-vqa). The settings were chosen with
# scripts/demo/sweep.sh (eval/RESULTS.md, "What was tried").
#
#   scripts/demo/particles.sh [WORK_DIR]      (default ~/.cache/bella-vqa/runs)
#
# Writes demo/particles/llava-{single,ensemble,svgd}/ (calibrated) and WORK_DIR/bench-*/.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=${1:-$HOME/.cache/bella-vqa/runs}
BELLA=${BELLA:-"cargo run --quiet --release --"}
mkdir -p "$WORK"

# Fresh shapes-world data (the base model was trained on seed 7). 15 % of the training scenes
# ask about an object that is not there, answered "unanswerable" (VizWiz); val, test and the OOD
# splits are as without the option.
if [ ! -f "$WORK/world/train.jsonl" ]; then
  $BELLA data shapes --out "$WORK/world" --seed 11 --n 3000 --absent-share 0.15 --quiet
fi

# Particles on the attention projections of the language model and of the vision tower.
TARGETS="language_model.*.q_proj,language_model.*.k_proj,language_model.*.v_proj,language_model.*.o_proj"
TARGETS+=",vision_tower.*.q_proj,vision_tower.*.k_proj,vision_tower.*.v_proj,vision_tower.*.out_proj"
COMMON=(--model "$ROOT/demo/llava" --data "$WORK/world/train.jsonl" --val "$WORK/world/val.jsonl"
        --targets "$TARGETS" --epochs 1 --batch-size 4 --lr 2e-3 --rank 8 --alpha 16
        --init-b-std 0.1 --eval-every 250 --val-sample 32 --seed 3 --quiet)
train() { # name, extra args…: trains once, resumes an interrupted run
  local name=$1; shift
  [ -f "$WORK/$name/.done" ] && return
  local resume=()
  [ -d "$WORK/$name/checkpoints" ] && resume=(--resume)
  $BELLA train "${COMMON[@]}" --out "$WORK/$name" "${resume[@]}" "$@"
  touch "$WORK/$name/.done"
}
train single   --particles 1 --method ensemble
train ensemble --particles 4 --method ensemble
train svgd     --particles 4 --method svgd --kernel delta-w
train svgd-params --particles 4 --method svgd --kernel params

# Calibrate each set to answer 85 % of the validation questions, then copy the particles into demo/.
for name in single ensemble svgd svgd-params; do
  $BELLA calibrate --model "$ROOT/demo/llava" --adapters "$WORK/$name" --data "$WORK/world/val.jsonl" \
    --limit 300 --target-coverage 0.85 --quiet
done
for name in single ensemble svgd; do
  mkdir -p "$ROOT/demo/particles/llava-$name"
  cp "$WORK/$name/particles.safetensors" "$WORK/$name/bella_config.json" "$ROOT/demo/particles/llava-$name/"
done

# Benchmark: in-distribution test and every out-of-distribution split, plus natural photographs.
OOD=()
for split in ood-unseen-pairs ood-absent ood-corrupted ood-mismatched ood-unanswerable; do
  OOD+=("$WORK/world/$split.jsonl")
done
OOD+=("$ROOT/eval/demo/photos.jsonl")
$BELLA bench --model "$ROOT/demo/llava" --compare "base,single=$WORK/single,ensemble=$WORK/ensemble,svgd=$WORK/svgd,svgd-params=$WORK/svgd-params" \
  --data "$WORK/world/test.jsonl" --val "$WORK/world/val.jsonl" --ood-data "${OOD[@]}" \
  --limit 150 --out "$WORK/bench" --quiet
echo "results: $WORK/bench/comparison.md"
