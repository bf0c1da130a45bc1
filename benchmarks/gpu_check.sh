#!/usr/bin/env bash
# Everything that needs a GPU, in one run (benchmarks/gpu_check.py; its results land in $OUT).
# The GPU machine lacks pydantic: its wheels travel in .whl/ (an ignored folder of the checkout).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH="$PWD"
if ls .whl/*.whl >/dev/null 2>&1; then
    S=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --target "$S" .whl/*.whl || exit 1
    export PYTHONPATH="$S:$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
exec python3 benchmarks/gpu_check.py "$@"
