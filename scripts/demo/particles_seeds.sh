#!/usr/bin/env bash
# Successor of scripts/demo/particles.sh for eval/RESULTS.md (issue 12): every method with several
# seeds, calibrated with `--selector auto` and a temperature, benchmarked on ALL questions of the
# test split, of every OOD split and of eval/demo/photos.jsonl, with 1000-resample bootstrap
# intervals. Resumable: a finished training, calibration or benchmark is skipped, an interrupted
# one continues (train --resume, bench reruns into the same directory).
#
#   BELLA=$CARGO_TARGET_DIR/release/bella-vqa scripts/demo/particles_seeds.sh [WORK_DIR]
#
# Environment: SEEDS (default "1 2 3"), REPULSION (the stronger SVGD repulsion weight; default:
# the number in WORK_DIR/repulsion.txt, read when the first such run starts, else 3000; picked from
# the diversity of short runs, eval/RESULTS.md), COVERAGE (the share of validation
# questions the stored threshold answers, default 0.90), LIMIT (bench: first questions of every
# file; default all), TRAIN_LIMIT (first training questions; default all 3000), CAL_LIMIT
# (calibration: first validation questions; default all 600), EVAL_EVERY (default 150),
# VAL_SAMPLE (validation questions of each training evaluation, default 64),
# METHODS (default "single ensemble svgd svgd-rep"), ABSENT_SHARE (the share of training scenes
# with absent-object questions answered "unanswerable", `data shapes --absent-share`; default 0.15),
# CONFIDENCE_MAP (calibrate --confidence-map; default none),
# TEST_DATA (the in-distribution test file of bench; default WORK_DIR/world/test.jsonl), OOD_DATA
# (bench's OOD files, space-separated; default the world's five OOD splits and the photographs;
# set to "" for none).
# The guaranteed thresholds (Learn then Test at 1/5/10 % risk) are computed by results_seeds.py
# from the validation answers that bench records (samples.jsonl, split "val").
# Writes WORK_DIR/world/, WORK_DIR/<method>-s<seed>/ (particles, train_log.jsonl,
# train_summary.json, calibrate.json) and WORK_DIR/bench-s<seed>/ (bench --compare
# of base and every method of the seed). Then:
#   python3 scripts/demo/results_seeds.py WORK_DIR --notes eval/RESULTS-notes.md > eval/RESULTS.md
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=${1:-$HOME/.cache/bella-vqa/runs-results}
BELLA=${BELLA:-"cargo run --quiet --release --"}
SEEDS=${SEEDS:-"1 2 3"}
COVERAGE=${COVERAGE:-0.90}
METHODS=${METHODS:-"single ensemble svgd svgd-rep"}
LIMIT_ARGS=() TRAIN_LIMIT_ARGS=() CAL_LIMIT_ARGS=()
[ -n "${LIMIT:-}" ] && LIMIT_ARGS=(--limit "$LIMIT")
[ -n "${TRAIN_LIMIT:-}" ] && TRAIN_LIMIT_ARGS=(--limit "$TRAIN_LIMIT")
[ -n "${CAL_LIMIT:-}" ] && CAL_LIMIT_ARGS=(--limit "$CAL_LIMIT")
mkdir -p "$WORK"
log() { echo "[$(date -u +%H:%M:%S)] $*"; }

# The world of scripts/demo/particles.sh: seed 11, 15 % absent-object training scenes (only the
# training split depends on ABSENT_SHARE: val, test and the OOD splits draw from their own seeds).
if [ ! -f "$WORK/world/train.jsonl" ]; then
  $BELLA data shapes --out "$WORK/world" --seed 11 --n 3000 --absent-share "${ABSENT_SHARE:-0.15}" --quiet
fi

TARGETS="language_model.*.q_proj,language_model.*.k_proj,language_model.*.v_proj,language_model.*.o_proj"
TARGETS+=",vision_tower.*.q_proj,vision_tower.*.k_proj,vision_tower.*.v_proj,vision_tower.*.out_proj"
COMMON=(--model "$ROOT/demo/llava" --data "$WORK/world/train.jsonl" --val "$WORK/world/val.jsonl"
        --targets "$TARGETS" --epochs 1 --batch-size 4 --lr 2e-3 --rank 8 --alpha 16
        --init-b-std 0.1 --eval-every "${EVAL_EVERY:-150}" --val-sample "${VAL_SAMPLE:-64}" "${TRAIN_LIMIT_ARGS[@]}" --quiet)
method_args() { # method → train arguments
  case $1 in
    single) echo "--particles 1 --method ensemble" ;;
    ensemble) echo "--particles 4 --method ensemble" ;;
    svgd) echo "--particles 4 --method svgd --kernel delta-w" ;;
    svgd-rep) echo "--particles 4 --method svgd --kernel delta-w --repulsion ${REPULSION:-$(cat "$WORK/repulsion.txt" 2>/dev/null || echo 3000)}" ;;
    *) echo "unknown method $1" >&2; return 1 ;;
  esac
}

train() { # method seed
  local name=$1-s$2 resume=()
  [ -f "$WORK/$name/.done" ] && return
  [ -d "$WORK/$name/checkpoints" ] && resume=(--resume)
  log "train $name"
  # shellcheck disable=SC2046 # method_args is a list of options
  $BELLA train "${COMMON[@]}" --seed "$2" --out "$WORK/$name" "${resume[@]}" $(method_args "$1")
  touch "$WORK/$name/.done"
}

# --normalize official: eval/RESULTS.md's tables were made with it (bench's default until the
# default became `always`; the demo model answers in lowercase words).
calibrate() { # method seed: selector auto, temperature, threshold for COVERAGE on validation
  local dir=$WORK/$1-s$2
  [ -f "$dir/calibrate.json" ] && return
  log "calibrate $1-s$2"
  $BELLA calibrate --model "$ROOT/demo/llava" --adapters "$dir" --data "$WORK/world/val.jsonl" \
    "${CAL_LIMIT_ARGS[@]}" --normalize official --selector auto --target-coverage "$COVERAGE" \
    --confidence-map "${CONFIDENCE_MAP:-none}" --json --quiet \
    > "$dir/calibrate.json.tmp"
  mv "$dir/calibrate.json.tmp" "$dir/calibrate.json"
}

OOD=()
for split in ood-unseen-pairs ood-absent ood-corrupted ood-mismatched ood-unanswerable; do
  OOD+=("$WORK/world/$split.jsonl")
done
OOD+=("$ROOT/eval/demo/photos.jsonl")
if [ -n "${OOD_DATA+set}" ]; then
  read -r -a OOD <<< "$OOD_DATA"
fi
OOD_ARGS=()
[ ${#OOD[@]} -gt 0 ] && OOD_ARGS=(--ood-data "${OOD[@]}")

for seed in $SEEDS; do
  # The ensemble first: bench --compare's paired differences are against the first entry.
  entries=""
  for m in $METHODS; do
    train "$m" "$seed"
    calibrate "$m" "$seed"
    [ "$m" = ensemble ] && entries="$m=$WORK/$m-s$seed,base$entries"
    [ "$m" != ensemble ] && entries+=",$m=$WORK/$m-s$seed"
  done
  case $entries in ,*) entries="base$entries" ;; esac
  if [ ! -f "$WORK/bench-s$seed/.done" ]; then
    log "bench seed $seed"
    $BELLA bench --model "$ROOT/demo/llava" --compare "$entries" \
      --data "${TEST_DATA:-$WORK/world/test.jsonl}" --val "$WORK/world/val.jsonl" "${OOD_ARGS[@]}" \
      "${LIMIT_ARGS[@]}" --normalize official --bootstrap 1000 --out "$WORK/bench-s$seed" --quiet
    touch "$WORK/bench-s$seed/.done"
  fi
done
log "done: python3 scripts/demo/results_seeds.py $WORK --notes eval/RESULTS-notes.md > eval/RESULTS.md"
