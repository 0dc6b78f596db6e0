#!/usr/bin/env bash
# Data-parallel scaling on one host of several H200s (device kinds nvidia-h200-x2, -x4, -x8): the plain
# LightningModule of benchmarks/plain_module.py on 1, 2, 4 and 8 processes (as many as the host has GPUs), each
# process with BATCH x SEQ tokens per step, with the node's collectives on the host (the defaults) and on the GPUs
# (sharded_streaming=true grad_reduce=device). Written 2026-12-04 for the first several-GPU machine; not yet run.
#   OUT=... [MODEL=qwen2_7b BATCH=16 SEQ=2048 STEPS=6 CLIP=1.0 RUN_S=420] bash benchmarks/scaling_h200.sh
# Each run writes $OUT/<model>_n<N>_<mode>.json (tokens per step and tokens/s count every process's rows; engine
# counters and RSS are rank 0's); the last line of each is printed. Host memory per node: benchmarks/dp_host_memory.py.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/scaling}
MODEL=${MODEL:-qwen2_7b} BATCH=${BATCH:-16} SEQ=${SEQ:-2048} STEPS=${STEPS:-6} CLIP=${CLIP:-1.0}
mkdir -p "$OUT"
gpus=$(nvidia-smi -L | wc -l)
for n in 1 2 4 8; do
  [ "$n" -le "$gpus" ] || break
  for mode in host device; do
    if [ "$mode" = device ]; then
      [ "$n" -gt 1 ] || continue  # one process has no node collectives
      flags="--strategy sharded_streaming=true grad_reduce=device"
    else
      flags=""
    fi
    timeout "${RUN_S:-420}" bash -c "source benchmarks/plain_run.sh; OUT=$OUT plain ${MODEL}_n${n}_$mode \
      --model $MODEL --batch $BATCH --seq $SEQ --steps $STEPS --warmup 2 --clip $CLIP --fast-init --devices $n $flags"
  done
done
