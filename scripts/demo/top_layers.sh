#!/usr/bin/env bash
# Particles on the top language-model layer only against particles everywhere (issue 10 §3,
# eval/RESULTS.md "Particles on the top layers"): the ensemble of scripts/demo/particles_seeds.sh
# (same world, same settings, same seeds) with --targets restricted to the last decoder layer of
# the demo LLaVA (layers.2-2 of 3), calibrated the same way and benchmarked against it in one
# `bench --compare` (paired intervals over the same questions).
#
#   BELLA=$CARGO_TARGET_DIR/release/bella-vqa SEEDS="1 2 3" scripts/demo/top_layers.sh [WORK_DIR]
#
# WORK_DIR is the one of particles_seeds.sh (its world/ and ensemble-s<seed>/ are reused: run it
# with METHODS=ensemble and the same SEEDS first); the size variables are those of
# particles_seeds.sh (TRAIN_LIMIT, EVAL_EVERY, VAL_SAMPLE, CAL_LIMIT, LIMIT, COVERAGE), so that
# both runs are trained and measured alike. Writes WORK_DIR/ensemble-top-s<seed>/ and
# WORK_DIR/bench-top-s<seed>/ (entries ensemble-top, ensemble).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=${1:-$HOME/.cache/bella-vqa/runs-results}
BELLA=${BELLA:-"cargo run --quiet --release --"}
SEEDS=${SEEDS:-1}
TRAIN_LIMIT_ARGS=() CAL_LIMIT_ARGS=() LIMIT_ARGS=()
[ -n "${TRAIN_LIMIT:-}" ] && TRAIN_LIMIT_ARGS=(--limit "$TRAIN_LIMIT")
[ -n "${CAL_LIMIT:-}" ] && CAL_LIMIT_ARGS=(--limit "$CAL_LIMIT")
[ -n "${LIMIT:-}" ] && LIMIT_ARGS=(--limit "$LIMIT")
[ -f "$WORK/world/train.jsonl" ] || { echo "run scripts/demo/particles_seeds.sh first (no $WORK/world)" >&2; exit 1; }
OOD=()
for split in ood-unseen-pairs ood-absent ood-corrupted ood-mismatched ood-unanswerable; do
  OOD+=("$WORK/world/$split.jsonl")
done
OOD+=("$ROOT/eval/demo/photos.jsonl")
TOP="language_model.layers.2-2.*.q_proj,language_model.layers.2-2.*.k_proj"
TOP+=",language_model.layers.2-2.*.v_proj,language_model.layers.2-2.*.o_proj"
for SEED in $SEEDS; do
  OUT=$WORK/ensemble-top-s$SEED
  [ -f "$WORK/ensemble-s$SEED/calibrate.json" ] || { echo "no $WORK/ensemble-s$SEED: run METHODS=ensemble SEEDS=$SEED scripts/demo/particles_seeds.sh $WORK first" >&2; exit 1; }
  if [ ! -f "$OUT/.done" ]; then
    resume=()
    [ -d "$OUT/checkpoints" ] && resume=(--resume)
    $BELLA train --model "$ROOT/demo/llava" --data "$WORK/world/train.jsonl" --val "$WORK/world/val.jsonl" \
      --targets "$TOP" --epochs 1 --batch-size 4 --lr 2e-3 --rank 8 --alpha 16 --init-b-std 0.1 \
      --eval-every "${EVAL_EVERY:-150}" --val-sample "${VAL_SAMPLE:-64}" "${TRAIN_LIMIT_ARGS[@]}" --quiet --seed "$SEED" --out "$OUT" "${resume[@]}" \
      --particles 4 --method ensemble
    touch "$OUT/.done"
  fi
  if [ ! -f "$OUT/calibrate.json" ]; then
    $BELLA calibrate --model "$ROOT/demo/llava" --adapters "$OUT" --data "$WORK/world/val.jsonl" \
      "${CAL_LIMIT_ARGS[@]}" --selector auto --target-coverage "${COVERAGE:-0.90}" --json --quiet > "$OUT/calibrate.json.tmp"
    mv "$OUT/calibrate.json.tmp" "$OUT/calibrate.json"
  fi
  if [ ! -f "$WORK/bench-top-s$SEED/.done" ]; then
    $BELLA bench --model "$ROOT/demo/llava" --compare "ensemble-top=$OUT,ensemble=$WORK/ensemble-s$SEED" \
      --data "$WORK/world/test.jsonl" --val "$WORK/world/val.jsonl" --ood-data "${OOD[@]}" "${LIMIT_ARGS[@]}" \
      --bootstrap 1000 --out "$WORK/bench-top-s$SEED" --quiet
    touch "$WORK/bench-top-s$SEED/.done"
  fi
  echo "results: $WORK/bench-top-s$SEED/comparison.md (entries ensemble-top, ensemble)"
done
