#!/usr/bin/env bash
# The GPU checks and benchmarks behind benchmarks/RESULTS.md, on one machine with an NVIDIA GPU (the reported figures:
# one H200, 16 cores, 125 GiB host memory). Each bench writes bench.json under benchmarks/out/<name>/.
#   bash benchmarks/run_h200.sh [tests|bench|moe|kernels|all]   (default: all; ~25 minutes for all)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
what=${1:-all}

bench() {  # bench NAME ARGS...: one recipes.bench run, its table printed
  local name=$1
  shift
  python -m recipes.bench "$@" hydra.run.dir="$OUT/$name" 2>&1 | grep -E "^(horizon|lightning|system|ceilings|model)|tokens/s" || echo "$name: failed"
}

if [[ $what == tests || $what == all ]]; then
  python -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider
fi
if [[ $what == bench || $what == all ]]; then
  bench b8 model=qwen2_3b data.batch_size=8 data.max_seq_len=1024 steps=8 warmup=2
  bench b8_fsdp model=qwen2_3b data.batch_size=8 data.max_seq_len=1024 steps=6 warmup=2 system=fsdp
  bench b8_deepspeed model=qwen2_3b data.batch_size=8 data.max_seq_len=1024 steps=6 warmup=2 system=deepspeed
  bench b32 model=qwen2_3b data.batch_size=32 data.max_seq_len=1024 steps=6
  bench b32_eager model=qwen2_3b data.batch_size=32 data.max_seq_len=1024 steps=6 strategy.compile_layers=false strategy.keep_activations=0
  bench q7b16 model=qwen2_7b data.batch_size=16 data.max_seq_len=2048 steps=5 warmup=2 strategy.weight_copy=false
  bench q7b16_nokeep model=qwen2_7b data.batch_size=16 data.max_seq_len=2048 steps=5 warmup=2 strategy.weight_copy=false strategy.keep_activations=0
  bench q7acc model=qwen2_7b data.batch_size=8 data.max_seq_len=2048 steps=4 warmup=1 strategy.weight_copy=false strategy.num_grad_slabs=2 trainer.gradient_clip_val=1.0 trainer.accumulate_grad_batches=4
fi
if [[ $what == moe || $what == all ]]; then
  for sparse in true false; do
    bench moe64_$sparse model=qwen3_30b_a3b model.num_hidden_layers=4 data.batch_size=1 data.max_seq_len=64 steps=8 strategy.sparse_experts=$sparse
    bench moe8k_$sparse model=qwen3_30b_a3b model.num_hidden_layers=4 data.batch_size=8 data.max_seq_len=1024 steps=6 strategy.sparse_experts=$sparse
  done
fi
if [[ $what == kernels || $what == all ]]; then
  python benchmarks/bench_adamw.py 200000000   # includes DeepSpeedCPUAdam when deepspeed is importable
  python benchmarks/bench_host_threads.py
  python benchmarks/bench_layer_compile.py --shape 7b --batch 16 --seq 2048 --repeats 4
  python benchmarks/bench_layer_compile.py --shape 3b --batch 8 --seq 1024 --repeats 6
fi
