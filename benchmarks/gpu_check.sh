#!/usr/bin/env bash
# Issue 8's GPU checks in one run, for a session lent a GPU: the GPU tests of the deformable
# attention kernels, the kernel benchmark, the end-to-end comparison with transformers and the
# training step against transformers'. Meant for the device machines, whose python3 holds torch,
# Triton and transformers; detrkit runs from src/. Every step's output is shown and kept in $OUT
# (default /tmp/gpu_check).
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
out=${OUT:-/tmp/gpu_check}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

step() {
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.txt"
}

step device nvidia-smi
step tests "$python" -m pytest -q -p no:cacheprovider tests/test_ms_deform_attn.py \
    -k "gpu or low_precision or interpreter or triton"
step kernel "$python" benchmarks/ms_deform_attn.py --device cuda
step models "$python" benchmarks/gpu.py
step train "$python" benchmarks/train_step.py --device cuda --repeats 10
