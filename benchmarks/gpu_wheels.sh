#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.sh installs on a GPU machine without network, into .whl/
# (ignored by git; carried to the device beside the tree). For CPython 3.12 on x86-64 Linux.
#
#   bash benchmarks/gpu_wheels.sh              # faiss-cpu (19 MB) + gguf
#   bash benchmarks/gpu_wheels.sh --faiss-gpu  # faiss-gpu-cu12 (48 MB) + gguf instead
#
# faiss-gpu-cu12 loads only where libcublas.so.12 exists (CUDA 12 libraries on the machine):
# nvidia-cublas-cu12 is some 400 MB, past what travels with the tree (64 MiB). A machine with
# CUDA 13 alone gets faiss-cpu, and the index step then compares faiss-cpu's IVF with exact
# search on the GPU, and says so in its result.
set -eu
rm -rf .whl && mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
FAISS="faiss-cpu==1.15.1"
[ "${1:-}" = "--faiss-gpu" ] && FAISS="faiss-gpu-cu12 nvidia-cuda-runtime-cu12"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
    -d .whl $FAISS gguf
ls -la .whl
