#!/usr/bin/env bash
# The whole GPU check in one call on the GPU machine (no network): build stock llama.cpp with CUDA from the
# pinned source, build the plugin, make the test models, check the plugin against stock (same binary, same
# process kind), and time llama-bench with and without the plugin, interleaved.
# Prepare here first: bash scripts/device-bundle.sh; then run `MK_COMMIT=<sha> bash scripts/gpu-check.sh` with
# .device carried. Results go to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
W=/tmp/mk; mkdir -p $W
exec > >(tee "$OUT/gpu-check.log") 2>&1
stamp() { echo "[$(date +%T)] $*"; }

stamp "GPU"; nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv
python3 -m pip install -q --no-index --no-deps --target $W/site .device/wheels/*.whl
export PYTHONPATH=$PWD/bridge:$PWD/.device:$W/site
export LLAMA_MEGAKERNEL_CACHE=$PWD/.device/cache

stamp "llama.cpp (pinned, CUDA, sm_90, with llama-megakernel's patches)"
tar -xzf .device/llama.cpp.tar.gz -C $W
export LLAMA_CPP_DIR=$(ls -d $W/llama.cpp-*)
# The patched build carries both routes: the hook (default) and interception (LLAMA_MEGAKERNEL_ROUTE=intercept);
# without the plugin it is stock llama.cpp (the patches are additive).
python3 -m llama_megakernel patch apply $LLAMA_CPP_DIR || { echo "patch CLI failed, falling back to patch(1)";
  for p in patches/0c1e5709/0*.patch; do patch -s -p1 -d $LLAMA_CPP_DIR -i $PWD/$p; done; }
python3 -m llama_megakernel patch status $LLAMA_CPP_DIR
if [ ! -x $W/build/bin/llama-bench ]; then
  cmake -S $LLAMA_CPP_DIR -B $W/build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release > $W/cmake.log
  cmake --build $W/build --target llama-bench llama-quantize llama-completion -j16 > $W/build.log 2>&1 || { tail -50 $W/build.log; exit 1; }
fi
export LLAMA_CPP_LIB_PATH=$W/build/bin

stamp "plugin"
cmake -S . -B $W/plugin -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_MK_CUDA=ON > $W/plugin-cmake.log
cmake --build $W/plugin > $W/plugin-build.log 2>&1 || { tail -30 $W/plugin-build.log; exit 1; }
export LLAMA_MEGAKERNEL_PLUGIN=$W/plugin/libggml-megakernel.so

stamp "models"
M=$W/models; mkdir -p $M
for spec in "llama tiny" "llama smollm2-135m"; do
  set -- $spec
  [ -f $M/$1-$2-f.gguf ] || python3 -m llama_megakernel make-model $1 $2 F32 $M/$1-$2-f.gguf | tail -1
  [ -f $M/$1-$2-q4_0.gguf ] || $W/build/bin/llama-quantize $M/$1-$2-f.gguf $M/$1-$2-q4_0.gguf Q4_0 > /dev/null 2>&1
done

stamp "checks"
python3 scripts/gpu_checks.py --models $M --bin $W/build/bin --out "$OUT/gpu-check.json"
stamp "done"
