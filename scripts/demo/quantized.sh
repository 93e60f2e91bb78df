#!/usr/bin/env bash
# f32 vs --quantize q8_0 (language model; and with --quantize-vision) vs q4k on the demo LLaVA with
# its calibrated ensemble particles: the numbers behind "Quantized base" in eval/SCALE.md.
# A few minutes on 2 CPU cores with a release build (BELLA=target/release/bella-vqa).
#
#   scripts/demo/quantized.sh [WORK_DIR] [LIMIT]      (default ~/.cache/bella-vqa/runs-quant, 300)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=${1:-$HOME/.cache/bella-vqa/runs-quant}
LIMIT=${2:-300}
BELLA=${BELLA:-"cargo run --quiet --release --"}
# The quantized weights are cached here, not in the user's cache.
export BELLA_VQA_CACHE=$WORK/cache
mkdir -p "$WORK"
# The same shapes world as scripts/demo/particles.sh.
if [ ! -f "$WORK/world/test.jsonl" ]; then
  $BELLA data shapes --out "$WORK/world" --seed 11 --n 3000 --absent-share 0.15 --quiet
fi
for cfg in f32 q8_0 q8_0-vision q4k; do
  case $cfg in
    f32) extra=() ;;
    q8_0) extra=(--quantize q8_0) ;;
    q8_0-vision) extra=(--quantize q8_0 --quantize-vision) ;;
    q4k) extra=(--quantize q4k) ;;
  esac
  rm -rf "$WORK/bench-$cfg"
  $BELLA bench --model "$ROOT/demo/llava" --adapters "$ROOT/demo/particles/llava-ensemble" \
    --dtype f32 ${extra[@]+"${extra[@]}"} --data "$WORK/world/test.jsonl" --val "$WORK/world/val.jsonl" \
    --limit "$LIMIT" --out "$WORK/bench-$cfg" --quiet
done
python3 - "$WORK" <<'PY'
import json, sys
work = sys.argv[1]
def load(cfg):
    r = json.load(open(f"{work}/bench-{cfg}/results.json"))
    s = [json.loads(l) for l in open(f"{work}/bench-{cfg}/samples.jsonl")]
    return r, {x["question_id"]: x for x in s if x["split"] == "test"}
base, base_s = load("f32")
print("| base | VQA accuracy | ECE | AURC | NLL | answers = f32 | max |Δ confidence| | answering s | peak RSS MiB |")
print("|---|---|---|---|---|---|---|---|---|")
for cfg in ["f32", "q8_0", "q8_0-vision", "q4k"]:
    r, s = load(cfg)
    m = r["results"]
    same = sum(s[q]["answer"] == base_s[q]["answer"] for q in s)
    dconf = max(abs(s[q]["confidence"] - base_s[q]["confidence"]) for q in s)
    t = r["timing"]
    print(f"| {cfg} | {100 * r['summary']['accuracy']:.2f} % | {m['ece']:.4f} | {m['aurc']:.4f} | "
          f"{m['nll']:.4f} | {same}/{len(s)} | {dconf:.4f} | {t['answering_time_s']:.1f} | "
          f"{t['peak_memory_mib']:.1f} |")
PY
