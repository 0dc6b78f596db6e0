#!/usr/bin/env bash
# LoRA with the base held in BF16 (issue #16) on one GPU (reported figures: one H200, 16 cores, 125 GiB host).
# Each part fits one device call; JSON under $OUT (default benchmarks/out/issue16), progress on stderr unbuffered.
# The LoRA runs draw the random base on all cores (--fast-init: Hugging Face's serial draw takes minutes at 32B) and
# dump every thread's stack to NAME.stderr every 120 s (where a slow run spends its time).
#   bash benchmarks/issue16_h200.sh lora7b    # Qwen2.5-7B 8 x 1024, LoRA r=16 on every linear layer, beside SFT's figure
#   bash benchmarks/issue16_h200.sh lora32b   # Qwen2.5-32B shape (65 GB in BF16), LoRA r=16: trains on the 125 GiB host
#   bash benchmarks/issue16_h200.sh gpu       # the CUDA tests (LoRA first), each test's result printed as it ends
#   bash benchmarks/issue16_h200.sh dpo3b     # Qwen2.5-3B DPO, 4 pairs x 1024 (8 rows), then SFT 8 x 1024 beside it
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/issue16}
mkdir -p "$OUT"
source benchmarks/plain_run.sh
case ${1:-lora7b} in
  lora7b) plain qwen2_7b_b8_lora16 --model qwen2_7b --batch 8 --seq 1024 --steps 6 --warmup 2 --lora 16 --fast-init --stack-dump-after 120 ;;
  lora32b) plain qwen2_32b_b4_lora16 --model qwen2_32b --batch 4 --seq 1024 --steps 6 --warmup 2 --lora 16 --fast-init --stack-dump-after 120 ;;
  dpo3b) plain qwen2_3b_dpo4 --model qwen2_3b --batch 4 --seq 1024 --steps 8 --warmup 2 --dpo --fast-init
         plain qwen2_3b_b8 --model qwen2_3b --batch 8 --seq 1024 --steps 8 --warmup 2 --fast-init ;;
  gpu) opts=(-m gpu tests/test_gpu.py -rA -p no:cacheprovider -v --durations=0 -o faulthandler_timeout=180)
       python -u -m pytest "${opts[@]}" -k lora
       python -u -m pytest "${opts[@]}" -k "not lora" ;;
esac
