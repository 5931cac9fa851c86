#!/usr/bin/env bash
# Every GPU check and benchmark in one run (device tool), by section (SECTIONS, comma-separated):
#   tests      the CUDA tests (tests/test_gpu.py)
#   paired     every loss, the TPA position budgets and the gradient-checkpointing modes (gc, gcx: casting again,
#              gcr, gcrx, gc2) timed against SFT on one model in interleaved rounds, batch 8, full depth
#   student    the same per process, with a profile of each step; b16: the checkpointing modes at batch 16
#   loss_head, rest   the loss head, and the padding, dump and reader sections
#   round      bench/round_cost.py: one on-policy round's rollout / dump / train cost, full depth (issue 19)
# Default: tests,paired, which fit one device call. Writes logs and JSON under $OUT (or ./gpu-out). Carry .whl
# (zarr, numcodecs, crc32c, transformers 5.24) where the machine lacks them.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
SECTIONS=${SECTIONS:-tests,paired}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
# the repository root is the package `alignti` (pip install -e . maps it; here a link does, without installing)
mkdir -p /tmp/site && ln -sfn "$PWD" /tmp/site/alignti && export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
has() { [[ ",$SECTIONS," == *",$1,"* ]]; }
if has tests; then
  timeout 150 python3 -m pytest tests/test_gpu.py -q -x -p no:cacheprovider 2>&1 | tail -8 | tee "$OUT/tests.log"
  echo "tests: $(( $(date +%s) - t0 )) s"
fi
if has paired; then  # every loss on one model, interleaved rounds: the ratios to SFT without between-process jitter
  timeout 150 python3 bench/scale.py --device cuda --batch-size 8 --rounds 9 --sections paired \
    --paired sft:1,kd:1,kd+iva:1,alignti:0.1,alignti:0.25,alignti:0.5,alignti:1,sft:1:gc,sft:1:gcx,sft:1:gcr,sft:1:gcrx,sft:1:gc2 \
    --json "$OUT/paired.json" 2>&1 \
    | grep -v Warning | tee "$OUT/paired.log"
  echo "paired: $(( $(date +%s) - t0 )) s"
fi
if has student; then
  ALIGNTI_BENCH_PROFILE=$OUT timeout 300 python3 bench/scale.py --device cuda --batch-size 8 --repeat 5 --sections student \
    --variants ${STUDENT_VARIANTS:-sft:1:nogc,sft:1:gc,sft:1:gcr,sft:1:gcr2,alignti:0.25:nogc,alignti:0.25:gcr} \
    --json "$OUT/scale.json" 2>&1 | grep -v Warning | tee "$OUT/scale.log"
  echo "student: $(( $(date +%s) - t0 )) s"
fi
if has b16; then
  timeout 100 python3 bench/scale.py --device cuda --batch-size 16 --repeat 3 --sections student \
    --variants sft:1:nogc,sft:1:gcr --json "$OUT/scale16.json" 2>&1 | grep -v Warning | tee "$OUT/scale16.log"
  echo "batch 16: $(( $(date +%s) - t0 )) s"
fi
if has loss_head; then
  timeout 80 python3 bench/loss_head.py --device cuda --tokens 4096 --losses sft,kd,alignti --json "$OUT/loss_head.json" \
    2>&1 | tail -6 | tee "$OUT/loss_head.log"
fi
if has rest; then
  timeout 280 python3 bench/scale.py --device cuda --batch-size 8 --repeat 2 --reader-samples 32 \
    --sections padding,dump,reader --json "$OUT/scale_rest.json" 2>&1 | grep -v Warning | tee "$OUT/scale_rest.log"
fi
if has round; then  # rollout, dump-teacher and train-student of one round on the same samples, interleaved rounds
  timeout 240 python3 bench/round_cost.py --device cuda --samples 16 --batch-size 8 --new-tokens 128 --repeat 3 \
    --json "$OUT/round_cost.json" 2>&1 | grep -v Warning | tee "$OUT/round_cost.log"
  echo "round: $(( $(date +%s) - t0 )) s"
fi
echo "total: $(( $(date +%s) - t0 )) s"
