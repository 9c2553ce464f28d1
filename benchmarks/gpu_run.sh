#!/usr/bin/env bash
# The one prepared GPU check (device machine, repository root): GPU tests, the serving and quantized-base rows
# (bitsandbytes must be among the wheels in .whl/ for the latter), then the GPU performance protocol.
# PERF_ARGS adds perf.py options, e.g. PERF_ARGS="--before .old" (the pre-change row) or "--methods full lora sam
# frozen sam_restrict50" (the floor, and SAM with fewer restricted sides: benchmarks/gpu_perf.py).
# Wheels of the peft this project needs travel in .whl/ (the image's own may be older); the pre-change sam_peft
# package for the `sam_before` row travels in .old/. Results land in $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="$PWD:/tmp/site" || exit 1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
  timeout 150 python3 -m pytest -q -p no:cacheprovider -W ignore::FutureWarning tests/test_gpu.py 2>&1 | tail -25
  timeout 60 python3 benchmarks/host_overhead.py --device cuda --rounds 100
  timeout 90 python3 benchmarks/serving.py --device cuda --rounds 7 --json "$OUT/serving-cuda.json"
  timeout 200 python3 benchmarks/quantized.py --device cuda --batch-size 4 --seq 512 --json "$OUT/quantized-cuda.json"
  python3 benchmarks/perf.py --device cuda --json "$OUT/perf-gpu.json" --markdown "$OUT/benchmarks-gpu.md" \
    --profile-dir "$OUT" ${PERF_ARGS:-}
} 2>&1 | tee "$OUT/log.txt"
