#!/usr/bin/env bash
# Issue 8's GPU checks in one run, for a session lent a GPU: the GPU tests of the deformable
# attention kernels, the end-to-end comparison with transformers (with a GPU profile), the
# training step against transformers', the kernel benchmark, the kernels' launch configurations
# and the models compiled by torch.compile, most important first. Meant for the device machines,
# whose python3 holds torch, Triton and transformers; detrkit runs from src/. Each step has its
# own time limit, so that one that hangs leaves time to the rest; every step's output is shown
# and kept in $OUT (default /tmp/gpu_check).
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
out=${OUT:-/tmp/gpu_check}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s"
}

step device 20 sh -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; \
    $python -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)'"
# The Triton kernels on the GPU (every test parametrised with them, and torch.compile of a module
# around them). The interpreter test is left out: it checks the same arithmetic on the CPU.
step tests 180 "$python" -m pytest -q -p no:cacheprovider tests/test_ms_deform_attn.py \
    -k "(triton or gpu) and not interpreter and not compile_for_an_h100"
step models 180 "$python" benchmarks/gpu.py --profile 8
step train 120 "$python" benchmarks/train_step.py --device cuda --repeats 10
step kernel 60 "$python" benchmarks/ms_deform_attn.py --device cuda
step tuning 180 "$python" benchmarks/ms_deform_attn_tuning.py
# Last, as it may not finish in the time left: compiling takes minutes per model and precision.
step compiled 300 "$python" benchmarks/gpu.py --compile --models deformable_detr detr
