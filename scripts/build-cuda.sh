#!/usr/bin/env bash
# Builds bella-vqa with the GPU backend (`--features cuda`) on a machine WITHOUT a CUDA toolkit or
# GPU, for a GPU machine that has no Rust toolchain (such as a short device lease): CUDA's nvcc,
# headers and libraries come from PyPI's nvidia-* wheels, the driver's libcuda.so.1 is replaced at
# link time by a stub of the functions cudarc calls, and the binaries are stripped and
# xz-compressed into .gpu/ (git-ignored) to be carried there:
#
#   bash scripts/build-cuda.sh            # CUDA 13.0, compute capability 9.0 (H100/H200)
#   CUDA_VERSION=12.8 CUDA_COMPUTE_CAP=80 bash scripts/build-cuda.sh
#
# There: `xz -d` them, and run scripts/gpu-check.sh with BELLA_BIN/BELLA_BENCH set to them (it adds
# the machine's CUDA libraries to LD_LIBRARY_PATH); eval/SCALE.md ("The GPU") has the command. The GPU machine's driver must support the CUDA
# version built against (a 580 driver runs CUDA 13.0). Needs python3 with pip (registry access),
# gcc, xz and ~1.3 GB in ~/.cache/bella-vqa/ for the wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_VERSION=${CUDA_VERSION:-13.0}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
MAJOR=${CUDA_VERSION%%.*}
CACHE=${BELLA_VQA_CACHE:-$HOME/.cache/bella-vqa}
ROOT=$CACHE/cuda-$CUDA_VERSION
if [ "$MAJOR" -ge 13 ]; then SUFFIX=; LIBDIR=nvidia/cu$MAJOR; else SUFFIX=-cu$MAJOR; LIBDIR=nvidia; fi
if [ ! -x "$ROOT/$LIBDIR/bin/nvcc" ] && [ ! -x "$ROOT/nvidia/cuda_nvcc/bin/nvcc" ]; then
  mkdir -p "$ROOT/wheels"
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$ROOT/wheels" \
    "nvidia-cuda-nvcc$SUFFIX==$CUDA_VERSION.*" "nvidia-cuda-runtime$SUFFIX==$CUDA_VERSION.*" \
    "nvidia-cuda-crt$SUFFIX==$CUDA_VERSION.*" "nvidia-nvvm$SUFFIX==$CUDA_VERSION.*" \
    "nvidia-cuda-cccl$SUFFIX==$CUDA_VERSION.*" "nvidia-cuda-nvrtc$SUFFIX==$CUDA_VERSION.*" \
    "nvidia-cublas$SUFFIX==$MAJOR.*" "nvidia-curand$SUFFIX"
  for w in "$ROOT"/wheels/*.whl; do python3 -m zipfile -e "$w" "$ROOT"; done
fi
C=$ROOT/$LIBDIR
chmod +x "$C"/bin/* "$C"/nvvm/bin/* 2>/dev/null || true
# The unversioned names the linker looks for, and a stub of the driver API (never run: the GPU
# machine's own libcuda.so.1 is loaded there).
for l in cudart cublas cublasLt curand nvrtc; do
  f=$(cd "$C/lib" && ls "lib$l.so."* | sort | head -n1)
  ln -sf "$f" "$C/lib/lib$l.so"
done
mkdir -p "$C/stubs"
CUDARC=$(cargo metadata --format-version 1 --locked --features cuda 2>/dev/null |
  python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc").rsplit("/", 1)[0])')
grep -ohE '^\s*fn cu[A-Za-z0-9_]+\(' "$CUDARC/src/driver/sys/mod.rs" | sed -E 's/^\s*fn //; s/\(//' |
  sort -u | awk '{print "void " $1 "(void) {}"}' > "$C/stubs/libcuda.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$C/stubs/libcuda.so" "$C/stubs/libcuda.c"
export PATH=$C/bin:$PATH CUDA_HOME=$C CUDA_PATH=$C CUDA_ROOT=$C
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR_CUDA:-$CACHE/target-cuda}
export RUSTFLAGS="-L native=$C/stubs -L native=$C/lib" LIBRARY_PATH=$C/stubs:$C/lib
cargo build --locked --release --features cuda --bin bella-vqa
cargo bench --locked --features cuda --bench ask_latency --no-run
BENCH=$(ls -t "$CARGO_TARGET_DIR"/release/deps/ask_latency-* | grep -v '\.d$' | head -n1)
mkdir -p .gpu
for pair in "bella-vqa:$CARGO_TARGET_DIR/release/bella-vqa" "ask_latency:$BENCH"; do
  name=${pair%%:*}; strip -o ".gpu/$name" "${pair#*:}"; xz -T0 -9 -f ".gpu/$name"
done
# A tokenizer make_real_size.py already trained (minutes on a small CPU), for it to reuse there.
RS=${BELLA_REAL_SIZE_DIR:-$CACHE/real-size}
if [ -f "$RS/llava-1.5-7b-hf-L2/tokenizer.json" ] && [ -f "$RS/.llava-1.5-7b-hf-L2.seed" ]; then
  mkdir -p .gpu/real-size/llava-1.5-7b-hf-L2
  cp "$RS/.llava-1.5-7b-hf-L2.seed" .gpu/real-size/
  cp "$RS/llava-1.5-7b-hf-L2/tokenizer.json" .gpu/real-size/llava-1.5-7b-hf-L2/
fi
ls -la .gpu
