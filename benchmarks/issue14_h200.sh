#!/usr/bin/env bash
# The host-format measurements of issue #14 on one GPU (reported figures: one H200, 16 cores, 125 GiB host).
# Each run writes its JSON under $OUT (default benchmarks/out/issue14).
#   bash benchmarks/issue14_h200.sh speed3b   # Qwen2.5-3B 8 x 1024, plain LightningModule, fp32/bf16/int8 state (+ bench)
#   bash benchmarks/issue14_h200.sh mem7b     # Qwen2.5-7B 16 x 2048 with clipping: host bytes/param per state dtype
#   bash benchmarks/issue14_h200.sh q14b      # Qwen2.5-14B shape, int8 state, clipping: trains on the 125 GiB host
#   bash benchmarks/issue14_h200.sh upload3b  # Qwen2.5-3B 8 x 1024, plain module: BF16 weight copy vs FP32 masters
#                                             # cast on the GPU vs packed on the CPU (fp32 state, --fast-init)
#   bash benchmarks/issue14_h200.sh cast7b    # Qwen2.5-7B 16 x 2048, clipping, fp32 state, no weight copy (masters
#                                             # cast on the GPU): host bytes/param and speed
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/issue14}
mkdir -p "$OUT"
source benchmarks/plain_run.sh
case ${1:-speed3b} in
  speed3b)
    for dtype in fp32 bf16 int8; do
      plain "qwen2_3b_b8_$dtype" --model qwen2_3b --batch 8 --seq 1024 --steps 10 --warmup 3 --state-dtype "$dtype"
    done
    python -m recipes.bench model=qwen2_3b data.batch_size=8 data.max_seq_len=1024 steps=10 warmup=3 \
      strategy.optimizer_state_dtype=int8 hydra.run.dir="$OUT/bench_qwen2_3b_b8_int8" 2>&1 | grep -E "tokens/s|^horizon" ;;
  mem7b)
    for dtype in ${DTYPES:-fp32 bf16 int8}; do
      plain "qwen2_7b_b16_clip_$dtype" --model qwen2_7b --batch 16 --seq 2048 --steps 4 --warmup 1 --clip 1.0 \
        --state-dtype "$dtype" --fast-init
    done ;;
  upload3b)
    for mode in copy cast pack; do
      case $mode in
        copy) settings="weight_copy=true" ;;
        cast) settings="weight_copy=false" ;;
        pack) settings="weight_copy=false cast_on_gpu=false" ;;
      esac
      plain "qwen2_3b_b8_$mode" --model qwen2_3b --batch 8 --seq 1024 --steps 10 --warmup 2 --fast-init \
        --strategy $settings
    done ;;
  cast7b)
    plain qwen2_7b_b16_clip_cast --model qwen2_7b --batch 16 --seq 2048 --steps 5 --warmup 1 --clip 1.0 --fast-init \
      --strategy weight_copy=false ;;
  q14b)
    plain qwen2_14b_b4_clip_int8 --model qwen2_14b --batch 4 --seq 1024 --steps 7 --warmup 2 --clip 1.0 \
      --state-dtype int8 ;;
esac
