#!/usr/bin/env bash
# Every GPU check and benchmark in one run (device tool): CUDA tests, loss head and bench/scale.py at full
# depth. Writes logs and JSON under $OUT (or ./gpu-out). Carry .whl (zarr, numcodecs, crc32c, transformers
# 5.24) where the machine lacks them.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
# the repository root is the package `alignti` (pip install -e . maps it; here a link does, without installing)
mkdir -p /tmp/site && ln -sfn "$PWD" /tmp/site/alignti && export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
timeout 130 python3 -m pytest tests/test_gpu.py -q -x -p no:cacheprovider 2>&1 | tail -8 | tee "$OUT/tests.log"
echo "tests: $(( $(date +%s) - t0 )) s"
timeout 80 python3 bench/loss_head.py --device cuda --tokens 4096 --losses sft,kd,alignti --json "$OUT/loss_head.json" \
  2>&1 | tail -6 | tee "$OUT/loss_head.log"
echo "loss head: $(( $(date +%s) - t0 )) s"
timeout 280 python3 bench/scale.py --device cuda --batch-size 8 --repeat 2 --reader-samples 32 \
  --sections padding,student,dump,reader --json "$OUT/scale.json" 2>&1 | grep -v Warning | tee "$OUT/scale.log"
echo "total: $(( $(date +%s) - t0 )) s"
