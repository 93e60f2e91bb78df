#!/usr/bin/env bash
# The GPU check of issue 10 (section 4): on a machine with an NVIDIA GPU and nvcc, in one go and in
# under 10 minutes on an H200:
#
#   1. builds bella-vqa with `cargo build --release --features cuda` (and the ask_latency bench);
#      meanwhile writes a random checkpoint with the exact llava-1.5-7b-hf shapes (all 32 layers,
#      f16, 3 shards + index) with scripts/make_real_size.py;
#      meanwhile a smoke test on the 2-layer variant (ask, logits, parity, a q4k base answering and
#      a q8_0 base training) and the demo's whole loop on the GPU;
#   2. one training step with P = 4 (`bella-vqa train --max-steps 1 --gradient-checkpointing`: without
#      it the 32 layers' activations of 4 particle rows outgrew an H200's 139 GiB);
#   3. the transformers + PEFT peer's training step of 4 adapters on the same GPU
#      (scripts/scale/peft_bench.py);
#   4. times `ask` with P = 1/4/8 (the ask_latency bench: whole ask, prefill, decode per token,
#      candidate scoring), and the peer answering (P adapters via load_adapter, set_adapter in turn
#      and one adapter_names batch);
#   5. the same timings with particles on the top quarter only (layers 24-31);
#   6. `ask` over a q8_0 base (its first load quantizes and caches; then from the cache);
#   7. parity against transformers on the GPU: input ids, logits of one image prompt (relative error
#      within the stated tolerance, bf16 0.05 / f16 0.01) and the greedy answer (scripts/scale/parity.py).
#
# Everything goes to $OUT (default ./gpu-check-out): SUMMARY.md, *.json, logs. Timings are printed
# as it goes; a step that would not fit in the time left (--budget, default 540 s) is skipped and
# says so.
#
# Needs: nvidia-smi, nvcc, cargo (Rust is NOT installed by this script: rustup needs the internet,
# which such machines often lack; set BELLA_BIN/BELLA_BENCH to binaries built elsewhere with
# `--features cuda` to skip the build), python3 with torch, transformers, peft, numpy, safetensors,
# tokenizers and pillow (scripts/requirements-scale.txt; a GPU image with PyTorch usually has them).
#
#   bash scripts/gpu-check.sh                 # the GPU check
#   bash scripts/gpu-check.sh --cpu           # the same steps on the CPU with the 2-layer variant in
#                                             # f32 (no nvcc, debug build): checks the script itself
#   On a leased machine whose calls are capped at 10 minutes, split it in two calls: first
#   `cargo build --locked --release --features cuda --bin bella-vqa && cargo bench --locked
#   --features cuda --bench ask_latency --no-run` (candle's CUDA kernels take minutes to build), then
#   `bash scripts/gpu-check.sh --skip-build` while the machine is still warm.
#   options: --layers N (default 32; --cpu: 2), --dtype bf16|f16|f32, --budget SECONDS,
#            --model-root DIR (where checkpoints go; default ~/.cache/bella-vqa/real-size),
#            --skip-build (use target/ as it is), --python PY,
#            --skip train,peer,ask,top,quantize,parity (steps to leave out)
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
MODE=gpu
LAYERS=
DTYPE=
BUDGET=540
SKIP_BUILD=0
SKIP=
PY=${PYTHON:-python3}
MODEL_ROOT=${BELLA_REAL_SIZE_DIR:-$HOME/.cache/bella-vqa/real-size}
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu|--dry-run) MODE=cpu ;;
    --layers) LAYERS=$2; shift ;;
    --dtype) DTYPE=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --model-root) MODEL_ROOT=$2; shift ;;
    --skip-build) SKIP_BUILD=1 ;;
    --skip) SKIP=$2; shift ;;
    --python) PY=$2; shift ;;
    -h|--help) sed -n '2,41p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [ "$MODE" = cpu ]; then
  LAYERS=${LAYERS:-2}; DTYPE=${DTYPE:-f32}; DEVICE=cpu; PROFILE=debug
else
  LAYERS=${LAYERS:-32}; DTYPE=${DTYPE:-bf16}; DEVICE=cuda; PROFILE=release
fi
OUT=${OUT:-$REPO/gpu-check-out}
mkdir -p "$OUT"
SUMMARY=$OUT/SUMMARY.md
LOG=$OUT/gpu-check.log
: > "$LOG"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
START=$SECONDS
# /usr/bin/time -v for peak RSS where it exists
if [ -x /usr/bin/time ]; then TIMEV=(/usr/bin/time -v); else TIMEV=(); fi

say() { printf '[%4ds] %s\n' "$((SECONDS - START))" "$*" | tee -a "$LOG" >&2; }
left() { echo $((BUDGET - (SECONDS - START))); }
# fits SECONDS_NEEDED NAME: true when that many seconds are left, else says the step is skipped
fits() {
  if [ "$(left)" -ge "$1" ]; then return 0; fi
  say "SKIPPED $2: needs ~$1 s, $(left) s left of the $BUDGET s budget"
  echo "- **skipped** $2: needs ~$1 s, $(left) s left" >> "$SUMMARY"
  return 1
}
# step NAME CMD...: runs CMD with its output in $OUT/NAME.log, prints the time it took
step() {
  local name=$1; shift
  local t0=$SECONDS
  say "start $name: $*"
  local from; from=$(date +%s.%N)
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name $from $(date +%s.%N)" >> "$OUT/steps.txt"
  say "done  $name in $((SECONDS - t0)) s (exit $rc)"
  if [ $rc -ne 0 ]; then
    tail -n 30 "$OUT/$name.log" | tee -a "$LOG" >&2
    echo "- **failed** $name (exit $rc; $OUT/$name.log)" >> "$SUMMARY"
  fi
  return $rc
}

{
  echo "# gpu-check ($MODE): llava-1.5-7b-hf shapes, $LAYERS language-model layers, $DTYPE on $DEVICE"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
} > "$SUMMARY"

# --- 0. the machine ------------------------------------------------------------------------------
if [ "$MODE" = gpu ]; then
  if ! command -v nvidia-smi >/dev/null; then say "no nvidia-smi: not a GPU machine (use --cpu)"; exit 1; fi
  GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n1)
  echo "- GPU: $GPU" >> "$SUMMARY"
  say "GPU: $GPU"
  if ! command -v nvcc >/dev/null && [ -z "${BELLA_BIN:-}" ]; then
    say "no nvcc on the PATH: candle's CUDA kernels cannot be built (or set BELLA_BIN/BELLA_BENCH)"; exit 1
  fi
  command -v nvcc >/dev/null && echo "- nvcc: $(nvcc --version | tail -n1)" >> "$SUMMARY"
  # GPU memory in use, 5 times a second, for each step's peak (the table at the end)
  nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/gpu-memory.csv" 2>/dev/null &
  SAMPLER_PID=$!
fi
echo "- CPU: $(nproc) threads; python: $($PY -c 'import sys, torch, transformers, peft; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)' 2>&1 | tail -n1)" >> "$SUMMARY"
HAVE_PY=1
$PY -c 'import torch, transformers, peft, numpy, safetensors, tokenizers, PIL' 2>/dev/null || {
  HAVE_PY=0; say "python3 lacks torch/transformers/peft/numpy/safetensors/tokenizers/pillow: no checkpoint, parity or peer"
}

IMAGE=tests/fixtures/images/photo.png
QUESTION="What color is the circle?"
FLAGS=(--dtype "$DTYPE" --device "$DEVICE")

# --- 1. build + checkpoint in parallel -----------------------------------------------------------
MODEL=$MODEL_ROOT/llava-1.5-7b-hf
[ "$LAYERS" != 32 ] && MODEL=$MODEL-L$LAYERS
GEN_PID=
if [ "$HAVE_PY" = 1 ]; then
  say "writing the checkpoint to $MODEL (in the background)"
  ( t0=$SECONDS; $PY scripts/make_real_size.py llava --layers "$LAYERS" --root "$MODEL_ROOT" > "$OUT/make_real_size.log" 2>&1;
    rc=$?; echo "make_real_size: exit $rc in $((SECONDS - t0)) s" >> "$OUT/make_real_size.log"; exit $rc ) &
  GEN_PID=$!
fi

if [ -n "${BELLA_BIN:-}" ]; then
  BIN=$BELLA_BIN; BENCH=${BELLA_BENCH:-}
  say "using BELLA_BIN=$BIN (no build)"
else
  if ! command -v cargo >/dev/null; then
    say "cargo not found: install Rust (https://rustup.rs) or set BELLA_BIN to a bella-vqa built with --features cuda"
    echo "- **no cargo**: Rust parts skipped" >> "$SUMMARY"
    BIN=; BENCH=
  else
    TARGET=${CARGO_TARGET_DIR:-$REPO/target}
    if [ "$MODE" = gpu ]; then FEAT=(--release --features cuda); else FEAT=(); fi
    if [ "$SKIP_BUILD" = 0 ]; then
      step build cargo build --locked "${FEAT[@]}" --bin bella-vqa || exit 1
      if [ "$MODE" = gpu ]; then BFEAT=(--features cuda); else BFEAT=(--profile dev); fi
      step build-bench cargo bench --locked "${BFEAT[@]}" --bench ask_latency --no-run || true
    fi
    BIN=$TARGET/$PROFILE/bella-vqa
    BENCH=
    for f in "$TARGET/$PROFILE"/deps/ask_latency-*; do
      case "$f" in *.d) continue ;; esac
      if [ -x "$f" ] && { [ -z "$BENCH" ] || [ "$f" -nt "$BENCH" ]; }; then BENCH=$f; fi
    done
  fi
fi
# A binary built elsewhere (BELLA_BIN) names the CUDA libraries it was linked with; where the
# loader does not know them, look in the CUDA toolkit and in the Python wheels (torch's nvidia-*).
if [ "$MODE" = gpu ] && [ -n "$BIN" ]; then
  MISSING=$(ldd "$BIN" 2>/dev/null | awk '/not found/ {print $1}' | sort -u)
  if [ -n "$MISSING" ]; then
    SITES=$($PY -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)
    for lib in $MISSING; do
      # shellcheck disable=SC2086
      found=$(find /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib /usr/local/nvidia/lib64 $SITES \
        -name "$lib" -print -quit 2>/dev/null)
      [ -n "$found" ] && LD_LIBRARY_PATH=$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    done
    export LD_LIBRARY_PATH
    STILL=$(ldd "$BIN" 2>/dev/null | awk '/not found/ {print $1}' | tr '\n' ' ')
    say "CUDA libraries: LD_LIBRARY_PATH=$LD_LIBRARY_PATH${STILL:+; still missing: $STILL}"
  fi
  "$BIN" --version >> "$LOG" 2>&1 || { say "$BIN does not run here"; tail -n 5 "$LOG" >&2; exit 1; }
fi

# --- 1b. smoke test on the 2-layer variant while the 32-layer checkpoint is written --------------
# A bug on the GPU shows in seconds here, not after minutes of writing 14 GB (the lease is short).
if [ "$MODE" = gpu ] && [ "$LAYERS" != 2 ] && [ -n "$BIN" ] && [ "$HAVE_PY" = 1 ]; then
  SMOKE=$MODEL_ROOT/llava-1.5-7b-hf-L2
  echo -e "\n## Smoke test: the 2-layer variant on the GPU\n" >> "$SUMMARY"
  if step smoke-checkpoint "$PY" scripts/make_real_size.py llava --layers 2 --root "$MODEL_ROOT" &&
    step smoke-ask "$BIN" ask --quiet --model "$SMOKE" "${FLAGS[@]}" --image "$IMAGE" --json "$QUESTION"; then
    sed -n '/^{/,$p' "$OUT/smoke-ask.log" > "$OUT/smoke-ask.json"
    step smoke-logits "$BIN" logits --quiet --model "$SMOKE" "${FLAGS[@]}" --image "$IMAGE" \
      --prompt "$QUESTION" --out "$OUT/smoke-logits.safetensors" &&
      step smoke-parity "$PY" scripts/scale/parity.py --model "$SMOKE" --rust-logits "$OUT/smoke-logits.safetensors" \
        --rust-ask "$OUT/smoke-ask.json" --dtype "$DTYPE" --device "$DEVICE" --json "$OUT/smoke-parity.json"
    grep -v '^\s*$' "$OUT/smoke-parity.log" 2>/dev/null | grep -E '^(-|####)' >> "$SUMMARY"
    rm -f "$OUT/smoke-logits.safetensors"
    # A quantized base on the GPU: candle's quantized product forward, our backward (dequantized
    # weight) for the particles below it.
    Q=$(mktemp -d)
    printf '{"question_id": "q0", "image": "%s", "question": "%s", "answers": ["red"]}\n' \
      "$REPO/$IMAGE" "$QUESTION" > "$Q/train.jsonl"
    step smoke-q4k-ask "$BIN" ask --quiet --model "$SMOKE" "${FLAGS[@]}" --quantize q4k --image "$IMAGE" \
      --json "$QUESTION" &&
      echo "- \`ask --quantize q4k\` on the GPU: $(grep -oE '"answer": *"[^"]*"' "$OUT/smoke-q4k-ask.log" | head -n1)" >> "$SUMMARY"
    step smoke-q8-train "$BIN" train --model "$SMOKE" "${FLAGS[@]}" --quantize q8_0 --data "$Q/train.jsonl" \
      --out "$Q/particles" --particles 2 --rank 8 --alpha 16 --batch-size 1 --max-steps 2 --epochs 2 &&
      echo "- \`train --quantize q8_0 --particles 2 --max-steps 2\` on the GPU: losses $(grep -oE '"train_loss": *[0-9.eE+-]+' "$Q/particles/train_log.jsonl" | sed 's/.*: *//' | tr '\n' ' ')" >> "$SUMMARY"
    rm -rf "$Q"
  else
    say "the smoke test failed: stopping here (see $OUT/smoke-*.log)"
    [ -n "$GEN_PID" ] && kill "$GEN_PID" 2>/dev/null
    exit 1
  fi
fi

# --- 1c. the whole loop on the embedded demo, on the GPU and on the CPU --------------------------
# ask, train, calibrate, bench and serve with --device cuda; ask and bench also on the CPU with the
# same shipped particles, whose answers the GPU must reproduce.
if [ "$MODE" = gpu ] && [ -n "$BIN" ]; then
  echo -e "\n## The demo loop on the GPU (the embedded demo model and particles)\n" >> "$SUMMARY"
  W=$(mktemp -d)
  step demo-data "$BIN" data shapes --quiet --out "$W/world" --n 200
  for dev in cpu cuda; do
    step "demo-ask-$dev" "$BIN" ask --quiet --device "$dev" --image eval/demo/red-circle.png --json \
      "What color is the circle?"
    step "demo-bench-$dev" "$BIN" bench --quiet --model demo --device "$dev" --data "$W/world/test.jsonl" \
      --limit 40 --out "$W/bench-$dev"
  done
  step demo-train-cuda "$BIN" train --quiet --device cuda --data "$W/world/train.jsonl" --out "$W/particles" \
    --particles 4 --max-steps 8
  step demo-calibrate-cuda "$BIN" calibrate --quiet --model demo --device cuda --adapters "$W/particles" \
    --data "$W/world/val.jsonl" --guarantee none
  PORT=$((20000 + RANDOM % 20000))
  "$BIN" serve --quiet --device cuda --host 127.0.0.1 --port "$PORT" > "$OUT/demo-serve.log" 2>&1 &
  SERVE_PID=$!
  for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 0.5; done
  IMG64=$(base64 -w0 eval/demo/red-circle.png)
  printf '{"max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "text", "text": "What color is the circle?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,%s"}}]}]}' \
    "$IMG64" > "$W/request.json"
  curl -s --max-time 60 -H 'content-type: application/json' --data @"$W/request.json" \
    "http://127.0.0.1:$PORT/v1/chat/completions" > "$OUT/demo-serve.json" 2>> "$OUT/demo-serve.log"
  kill "$SERVE_PID" 2>/dev/null; wait "$SERVE_PID" 2>/dev/null
  "$PY" - "$OUT" "$W" cpu cuda >> "$SUMMARY" 2>> "$LOG" <<'EOF_PY'
import json, sys
from pathlib import Path
out, w = Path(sys.argv[1]), Path(sys.argv[2])
cpu, gpu = sys.argv[3:5]
def ask(dev):
    text = (out / f"demo-ask-{dev}.log").read_text()
    return json.loads(text[text.index("{"):])
try:
    a, b = ask(cpu), ask(gpu)
    print(f"- `ask` (demo, shipped particles): CPU {a['answer']!r} {a['confidence']:.4f}, "
          f"GPU {b['answer']!r} {b['confidence']:.4f}")
except Exception as e:  # noqa: BLE001 - the summary says what is missing
    print(f"- `ask`: no comparison ({e})")
try:
    rows = {d: [json.loads(l) for l in open(w / f"bench-{d}" / "samples.jsonl")] for d in (cpu, gpu)}
    same = sum(x["answer"] == y["answer"] for x, y in zip(rows[cpu], rows[gpu]))
    dconf = max(abs(x["confidence"] - y["confidence"]) for x, y in zip(rows[cpu], rows[gpu]))
    acc = {d: json.load(open(w / f"bench-{d}" / "results.json"))["summary"]["accuracy"] for d in (cpu, gpu)}
    print(f"- `bench --limit 40` (demo, shipped particles): answers equal {same}/{len(rows[cpu])}, max |Δ "
          f"confidence| {dconf:.2e}; accuracy CPU {acc[cpu]:.4f}, GPU {acc[gpu]:.4f}")
except Exception as e:  # noqa: BLE001
    print(f"- `bench`: no comparison ({e})")
try:
    log = [json.loads(l) for l in open(w / "particles" / "train_log.jsonl")]
    print(f"- `train --particles 4 --max-steps 8` on the GPU: last loss {log[-1]['train_loss']:.4f}")
    cfg = json.load(open(w / "particles" / "bella_config.json"))
    ab = cfg["abstention"]
    print(f"- `calibrate` on the GPU: threshold {ab['threshold']:.4f}, selector {ab['selector']['name']}, "
          f"temperature {ab.get('temperature')}")
except Exception as e:  # noqa: BLE001
    print(f"- train/calibrate: {e}")
try:
    r = json.load(open(out / "demo-serve.json"))
    print(f"- `serve` on the GPU: {r['choices'][0]['message']['content']!r}, "
          f"confidence {r['bella']['confidence']:.4f}")
except Exception as e:  # noqa: BLE001
    print(f"- `serve`: no answer ({e})")
EOF_PY
  rm -rf "$W"
fi

if [ -n "$GEN_PID" ]; then
  wait "$GEN_PID"; rc=$?
  tail -n 6 "$OUT/make_real_size.log" | tee -a "$LOG" >&2
  [ $rc -ne 0 ] && { say "checkpoint generation failed"; exit 1; }
  echo "- checkpoint: \`$MODEL\` ($(du -sh "$MODEL" | cut -f1)); $(tail -n1 "$OUT/make_real_size.log")" >> "$SUMMARY"
fi
say "build and checkpoint ready"

TOP_FROM=$((LAYERS * 3 / 4))
TOP="language_model.layers.$TOP_FROM-$((LAYERS - 1))"
TOP_TARGETS="$TOP.*.q_proj,$TOP.*.k_proj,$TOP.*.v_proj,$TOP.*.o_proj"
# CPU mode: a 7B-wide prompt costs tens of seconds per particle set there; keep the dry run short
if [ "$MODE" = cpu ]; then PS=1,2; RUNS=1; WARM=0; else PS=1,4,8; RUNS=3; WARM=1; fi

# The steps below run in the order of what a lease most needs measured (a step that would not fit
# in the time left is skipped); --skip NAMES leaves out any of: train, peer, ask, top, quantize,
# parity.
skipped() { case ",$SKIP," in *",$1,"*) say "SKIPPED $1 (--skip)"; return 0 ;; esac; return 1; }
TRAIN=$(mktemp -d)
printf '{"question_id": "q0", "image": "%s", "question": "%s", "answers": ["red"]}\n' \
  "$REPO/$IMAGE" "$QUESTION" > "$TRAIN/train.jsonl"

# --- 2. one training step with P = 4 -------------------------------------------------------------
if [ -n "$BIN" ] && ! skipped train && fits 60 "training step"; then
  echo -e "\n## One training step, P = 4 (bella-vqa)\n" >> "$SUMMARY"
  t0=$SECONDS
  step train "${TIMEV[@]}" "$BIN" train --model "$MODEL" "${FLAGS[@]}" --data "$TRAIN/train.jsonl" \
    --out "$TRAIN/particles" --particles 4 --rank 8 --alpha 16 --batch-size 1 --max-steps 1 --epochs 1 \
    --gradient-checkpointing
  echo "- \`train --max-steps 1 --particles 4 --gradient-checkpointing\`: process wall $((SECONDS - t0)) s (load included);" \
    "$(grep -E 'Maximum resident' "$OUT/train.log" | sed 's/^\s*//')" >> "$SUMMARY"
  grep -iE "step|loss" "$OUT/train.log" | grep -v "Command being timed" | tail -n 5 | sed 's/^/    /' >> "$SUMMARY"
  rm -rf "$TRAIN/particles"
fi

# --- 3. the transformers + PEFT peer's training step ---------------------------------------------
ADAPTERS=$MODEL_ROOT/peft-$(basename "$MODEL")-from0
if [ "$HAVE_PY" = 1 ] && ! skipped peer && fits 75 "transformers + PEFT peer"; then
  echo -e "\n## transformers + PEFT on the same $DEVICE ($DTYPE)\n" >> "$SUMMARY"
  step peer-prepare "$PY" scripts/scale/peft_bench.py prepare --model "$MODEL" --adapters "$ADAPTERS" \
    --particles 8 --dtype "$DTYPE" --device "$DEVICE"
  step peer-train "$PY" scripts/scale/peft_bench.py train --model "$MODEL" --adapters "$ADAPTERS" \
    --particles 4 --dtype "$DTYPE" --device "$DEVICE" --runs 1 --warmup "$WARM" --json "$OUT/peer-train.json"
  "$PY" - "$OUT/peer-train.json" >> "$SUMMARY" <<'EOF_PY'
import json, sys
r = json.load(open(sys.argv[1]))
gpu = f", peak GPU memory {r['peak_gpu_bytes'] / 2**30:.1f} GiB" if "peak_gpu_bytes" in r else ""
print(f"- PEFT, 4 adapters trained in turn: step {r['step_s']:.2f} s, peak RSS "
      f"{r['peak_rss_with_load_bytes'] / 2**30:.1f} GiB{gpu}")
EOF_PY
fi

# --- 4. ask with P = 1/4/8, and the peer answering -----------------------------------------------
if [ -n "${BENCH:-}" ] && ! skipped ask && fits 120 "ask timings (every layer)"; then
  echo -e "\n## ask with P particles (bella-vqa, ask_latency bench)\n" >> "$SUMMARY"
  step bench-all "$BENCH" --model-dir "$MODEL" --particles "$PS" --modes batched --rounds 1 --runs "$RUNS" \
    --warmup "$WARM" --decode 15 --no-base "${FLAGS[@]}" --json "$OUT/bench-all.json"
  sed -n '/^###/,$p' "$OUT/bench-all.log" >> "$SUMMARY"
  if [ "$HAVE_PY" = 1 ] && [ -d "$ADAPTERS" ] && ! skipped peer && fits 90 "PEFT answering"; then
    step peer-answer "$PY" scripts/scale/peft_bench.py answer --model "$MODEL" --adapters "$ADAPTERS" \
      --particles "$PS" --mode sequential,batched --dtype "$DTYPE" --device "$DEVICE" --runs "$RUNS" \
      --warmup "$WARM" --json "$OUT/peer-answer.json"
    grep -E '^peer ' "$OUT/peer-answer.log" | sed 's/^/- /' >> "$SUMMARY"
  fi
fi

# --- 5. particles on the top quarter only --------------------------------------------------------
if [ -n "${BENCH:-}" ] && ! skipped top && fits 90 "ask timings (top quarter)"; then
  echo -e "\n## ask with particles on the top quarter only ($TOP)\n" >> "$SUMMARY"
  step bench-top "$BENCH" --model-dir "$MODEL" --particles "$PS" --modes batched --rounds 1 --runs "$RUNS" \
    --warmup "$WARM" --decode 15 --no-base --targets "$TOP_TARGETS" "${FLAGS[@]}" --json "$OUT/bench-top.json"
  sed -n '/^###/,$p' "$OUT/bench-top.log" | sed 's/^###/####/' >> "$SUMMARY"
fi

# --- 6. a q8_0 base -------------------------------------------------------------------------------
# The first load quantizes (on the CPU, one thread: q8_0 is quick, q4k's search takes minutes at
# this size) and caches the blocks; the ask after it reads the cache.
if [ -n "$BIN" ] && ! skipped quantize && fits 120 "q8_0 base"; then
  echo -e "\n## A q8_0 base ($DTYPE for the dense rest)\n" >> "$SUMMARY"
  for run in first cached; do
    t0=$SECONDS
    step "q8-ask-$run" "${TIMEV[@]}" "$BIN" ask --quiet --model "$MODEL" "${FLAGS[@]}" --quantize q8_0 \
      --image "$IMAGE" --json "$QUESTION"
    echo "- \`ask --quantize q8_0\` ($run load): process wall $((SECONDS - t0)) s;" \
      "$(grep -E 'Maximum resident' "$OUT/q8-ask-$run.log" | sed 's/^\s*//')" >> "$SUMMARY"
  done
fi
rm -rf "$TRAIN"

# --- 7. parity -----------------------------------------------------------------------------------
if [ -n "$BIN" ] && [ "$HAVE_PY" = 1 ] && ! skipped parity && fits 120 "parity"; then
  echo -e "\n## Parity against transformers\n" >> "$SUMMARY"
  step inspect "${TIMEV[@]}" "$BIN" inspect --model "$MODEL" "${FLAGS[@]}"
  grep -E "^(parameters|dtype)" "$OUT/inspect.log" | sed 's/^/    /' >> "$SUMMARY"
  step rust-logits "$BIN" logits --quiet --model "$MODEL" "${FLAGS[@]}" --image "$IMAGE" --prompt "$QUESTION" \
    --out "$OUT/rust-logits.safetensors"
  step rust-ask "$BIN" ask --quiet --model "$MODEL" "${FLAGS[@]}" --image "$IMAGE" --json "$QUESTION"
  sed -n '/^{/,$p' "$OUT/rust-ask.log" > "$OUT/rust-ask.json"
  step parity "$PY" scripts/scale/parity.py --model "$MODEL" --rust-logits "$OUT/rust-logits.safetensors" \
    --rust-ask "$OUT/rust-ask.json" --dtype "$DTYPE" --device "$DEVICE" --json "$OUT/parity.json"
  grep -v '^\s*$' "$OUT/parity.log" | grep -E '^(-|####)' >> "$SUMMARY"
  rm -f "$OUT/rust-logits.safetensors"   # 600 x 32064 f32: too big to bring back
fi

if [ -n "${SAMPLER_PID:-}" ]; then
  kill "$SAMPLER_PID" 2>/dev/null
  echo -e "\n## Peak GPU memory in use during each step (nvidia-smi, every 200 ms)\n" >> "$SUMMARY"
  "$PY" - "$OUT/steps.txt" "$OUT/gpu-memory.csv" >> "$SUMMARY" 2>> "$LOG" <<'EOF_PY'
import sys
from datetime import datetime
samples = []
for line in open(sys.argv[2]):
    try:
        stamp, mib = (x.strip() for x in line.split(","))
        samples.append((datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp(), float(mib)))
    except ValueError:
        continue
for line in open(sys.argv[1]):
    name, start, end = line.split()
    inside = [m for t, m in samples if float(start) <= t <= float(end)]
    if inside:
        print(f"- {name}: {max(inside) / 1024:.1f} GiB")
EOF_PY
fi
say "finished in $((SECONDS - START)) s"
echo -e "\n- total: $((SECONDS - START)) s" >> "$SUMMARY"
cat "$SUMMARY"
