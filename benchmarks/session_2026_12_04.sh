#!/usr/bin/env bash
# One device call of 2026-12-04 (one H200): the CUDA tests touched by this session's changes, then the #14 table at
# Qwen2.5-3B 8 x 1024 (fp32 / bf16 / int8 state, no clipping; fp32 again with 14 host threads) and Qwen2.5-7B
# 16 x 2048 with clipping, fp32 state, twice (the first run on the machine compiles the 7B layers).
#   OUT=... bash benchmarks/session_2026_12_04.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/session_2026_12_04}
mkdir -p "$OUT"
source benchmarks/plain_run.sh
timeout 220 python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rA \
  -k "close_gives or gradient_parity or lightning_training or resume or dpo or reward or lora or two_processes" 2>&1 \
  | grep -E "^(PASSED|FAILED|ERROR)|passed|failed|Error|assert" | tail -40 | tee "$OUT/gpu_tests.txt"
for dtype in fp32 bf16 int8; do
  timeout 70 bash -c "source benchmarks/plain_run.sh; OUT=$OUT plain qwen2_3b_b8_$dtype --model qwen2_3b --batch 8 \
    --seq 1024 --steps 10 --warmup 2 --fast-init --state-dtype $dtype"
done
timeout 70 bash -c "source benchmarks/plain_run.sh; OUT=$OUT plain qwen2_3b_b8_fp32_threads14 --model qwen2_3b \
  --batch 8 --seq 1024 --steps 10 --warmup 2 --fast-init --strategy host_threads=14"
for run in cold warm; do
  timeout 80 bash -c "source benchmarks/plain_run.sh; OUT=$OUT plain ${run}_qwen2_7b_b16_clip_fp32 --model qwen2_7b \
    --batch 16 --seq 2048 --steps 4 --warmup 1 --clip 1.0 --fast-init"
done
