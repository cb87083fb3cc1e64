#!/usr/bin/env bash
# The peer for benchmarks/vs_llama_cpp.py: llama.cpp as vendored in llama-cpp-python 0.3.36's
# source distribution, built from source in its own place (never in shardlm's .venv, never in
# CI). Idempotent: each step is skipped when its result is already there.
#
#   bash benchmarks/setup_llama_cpp.sh [PREFIX]          # PREFIX defaults to /work/llamacpp-venv
#   WITH_PYTHON=1 bash benchmarks/setup_llama_cpp.sh      # also pip-install llama-cpp-python itself
#
# Leaves in PREFIX:
#   bin/python                      a venv with gguf-py (vendored), numpy, safetensors, torch 2.13.0
#                                   (CPU) and sentencepiece: what convert_hf_to_gguf.py imports
#   src/llama_cpp_python-0.3.36/    the unpacked sdist (vendor/llama.cpp/convert_hf_to_gguf.py)
#   llama.cpp-build/bin/            llama-bench and llama-batched-bench (Release, GGML_NATIVE, CPU)
# Needs python3 (>= 3.10) with venv, cmake >= 3.14 and a C++17 compiler. The build takes about
# 10 minutes on 2 cores (JOBS=2 by default).
set -euo pipefail

VERSION=0.3.36
PREFIX=${1:-/work/llamacpp-venv}
JOBS=${JOBS:-2}
SRC_ROOT=$PREFIX/src
SDIST=$SRC_ROOT/llama_cpp_python-$VERSION.tar.gz
SRC=$SRC_ROOT/llama_cpp_python-$VERSION
LLAMA=$SRC/vendor/llama.cpp
BUILD=$PREFIX/llama.cpp-build

for tool in python3 cmake c++; do
    command -v "$tool" >/dev/null || { echo "setup_llama_cpp: $tool not found" >&2; exit 1; }
done

# 1. The venv (outside the repository).
if [ ! -x "$PREFIX/bin/python" ]; then
    python3 -m venv "$PREFIX"
fi
PY=$PREFIX/bin/python

# 2. The source distribution, unpacked.
mkdir -p "$SRC_ROOT"
if [ ! -f "$LLAMA/convert_hf_to_gguf.py" ]; then
    if [ ! -f "$SDIST" ]; then
        "$PY" -m pip download "llama-cpp-python==$VERSION" --no-deps --no-binary :all: \
            -d "$SRC_ROOT"
    fi
    tar -xzf "$SDIST" -C "$SRC_ROOT"
fi

# 3. The converter's imports. torch first and pinned: an unpinned one pulls CUDA wheels.
if ! "$PY" -c "import gguf, numpy, safetensors, torch, sentencepiece" 2>/dev/null; then
    "$PY" -m pip install "${TORCH:-torch==2.13.0}"
    "$PY" -m pip install numpy safetensors sentencepiece "transformers<6" "$LLAMA/gguf-py"
fi

# 4. llama.cpp's own benchmark tools, built straight from the vendored tree.
if [ ! -x "$BUILD/bin/llama-bench" ] || [ ! -x "$BUILD/bin/llama-batched-bench" ]; then
    cmake -S "$LLAMA" -B "$BUILD" -G Ninja \
        -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=ON \
        -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_BUILD_TOOLS=ON
    cmake --build "$BUILD" -j "$JOBS" --target llama-bench llama-batched-bench
fi

# 5. Optional: the Python bindings themselves (a second ~10-minute build of the same sources).
#    vs_llama_cpp.py does not use them; this step was not exercised when the script was written.
if [ "${WITH_PYTHON:-0}" = 1 ] && ! "$PY" -c "import llama_cpp" 2>/dev/null; then
    CMAKE_BUILD_PARALLEL_LEVEL=$JOBS "$PY" -m pip install "$SDIST"
fi

"$BUILD/bin/llama-bench" --help >/dev/null
echo "llama.cpp ready: $BUILD/bin (converter: $LLAMA/convert_hf_to_gguf.py, python: $PY)"
