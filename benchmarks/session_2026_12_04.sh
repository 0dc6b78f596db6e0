#!/usr/bin/env bash
# The device calls of 2026-12-04 (one H200, 16 cores, 125 GiB host).
#   OUT=... bash benchmarks/session_2026_12_04.sh first  # CUDA tests touched that day (cut by its timeout: no
#       output), Qwen2.5-3B 8 x 1024 fp32 / bf16 / int8 state (no clipping; fp32 again with 14 host threads) and
#       Qwen2.5-7B 16 x 2048 with clipping, fp32 state, twice (the first run on the machine compiles the 7B layers).
#       Its 3B runs trained an *untied* model (3.40 B parameters): --fast-init did not tie the lm_head then.
#   OUT=... bash benchmarks/session_2026_12_04.sh tied   # CUDA tests (verbose, streamed to a file), then the 3B
#       runs again with the lm_head tied as Qwen2.5-3B has it (3.09 B parameters).
#   Second session of the day:
#   OUT=... bash benchmarks/session_2026_12_04.sh profile  # the host CPU, the AdamW kernel alone per moment storage
#       (16, 8 and 1 threads), and 3B runs with the workers' waits counted apart (fp32, int8; int8 with 8 host
#       threads and with OpenMP's passive wait policy).
#   OUT=... bash benchmarks/session_2026_12_04.sh dynamic  # the same after the kernels' dynamic schedule: kernel
#       alone, 3B fp32 / bf16 / int8, bf16 with a 0.5 ms GIL switch interval, then the CUDA tests (300 s at most).
#   Third session of the day:
#   BASELINE=old.cpp OUT=... bash benchmarks/session_2026_12_04.sh variants  # the kernels before (BASELINE) and after
#       the cheaper stochastic-rounding bits and one division for compact moments, and after with 512-bit vectors:
#       16 threads on 200 M params and 1 thread in cache; 3B bf16 / int8 runs with the engine's steady-state counters
#       (engine_per_step).
#   BASELINE=old.cpp OUT=... bash benchmarks/session_2026_12_04.sh many  # after a layer's updates went into one call
#       and the kernels to 512-bit vectors: the kernel before/after, 3B fp32 / bf16 / int8, then the CUDA tests.
#   OUT=... bash benchmarks/session_2026_12_04.sh final  # 256- against 512-bit vectors, twice; the CUDA tests the
#       'many' call's time limit left out.
#   Fourth session:
#   BEFORE=dir OUT=... bash benchmarks/session_2026_12_04.sh determinism  # the cast-on-GPU FP32 test with the engine
#       files in BEFORE (the tied rows added by CUDA's index_add_) twice, then with the tree's (add_rows_) twice; the
#       CUDA tests the earlier calls did not reach.
#   OLD=dir OUT=... bash benchmarks/session_2026_12_04.sh ab  # 3B fp32 state with the tree in OLD (an earlier commit)
#       and with this one, alternately, twice each; then recipes.bench at 3B 8 x 1024, fp32 and int8 state. $OUT ends
#       as one archive (the device returns 8 files at most).
#   OLD=dir OUT=... bash benchmarks/session_2026_12_04.sh closing  # the CUDA tests of the tied head's path (gradient
#       parity, Lightning, kept and compiled layers, resume), then 3B fp32 / bf16 / int8 state with this tree and fp32
#       with OLD's, alternately; $OUT ends as one archive.
#   Fifth session:
#   OUT=... bash benchmarks/session_2026_12_04.sh alltests  # every CUDA test of tests/test_gpu.py (verbose, to a file;
#       $GPU_TESTS_S seconds at most, default 500), after the chunked embedding-gradient download. Run again in the
#       sixth session (GPU_TESTS_S=330), after sharded streaming (the streamer's upload paths cut to a shard).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/session_2026_12_04}
mkdir -p "$OUT"
run3b() {  # NAME ARGS...: one plain-module run at the 3B shape, 10 steps (median after 2), under a timeout
  local name=$1
  shift
  timeout "${RUN3B_S:-70}" bash -c "source benchmarks/plain_run.sh; OUT=$OUT plain $name --model qwen2_3b --batch 8 --seq 1024 \
    --steps 10 --warmup 2 --fast-init $*"
}
kernels() {  # [LABEL]: builds the host kernels of the tree in the current directory (no timeout: a build killed by a
  # timeout leaves torch's build lock behind) and says whether they load
  python -c "from lightning_horizon.engine.host_kernels import host_kernels_available as a; print('${1:-}kernels', a())"
}
case ${1:-tied} in
  first)
    timeout 220 python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rA \
      -k "close_gives or gradient_parity or lightning_training or resume or dpo or reward or lora or two_processes" \
      2>&1 | grep -E "^(PASSED|FAILED|ERROR)|passed|failed|Error|assert" | tail -40 | tee "$OUT/gpu_tests.txt"
    for dtype in fp32 bf16 int8; do run3b "qwen2_3b_b8_$dtype" --state-dtype "$dtype"; done
    run3b qwen2_3b_b8_fp32_threads14 --strategy host_threads=14
    for run in cold warm; do
      timeout 80 bash -c "source benchmarks/plain_run.sh; OUT=$OUT plain ${run}_qwen2_7b_b16_clip_fp32 \
        --model qwen2_7b --batch 16 --seq 2048 --steps 4 --warmup 1 --clip 1.0 --fast-init"
    done ;;
  tied)
    timeout 200 python -m pytest -v -p no:cacheprovider -m gpu tests/test_gpu.py \
      -k "close_gives or gradient_parity or lightning_training or two_processes" > "$OUT/gpu_tests.txt" 2>&1
    grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/gpu_tests.txt" | tail -20
    for dtype in fp32 bf16 int8; do run3b "tied_qwen2_3b_b8_$dtype" --state-dtype "$dtype"; done ;;
  profile)
    { lscpu; numactl --hardware 2>&1; free -g; } > "$OUT/host.txt" 2>&1
    grep -E "^(Model name|CPU\(s\)|Thread|Core|Socket|NUMA node\(s\)|L3)" "$OUT/host.txt"
    for threads in 16 8; do
      timeout 90 python benchmarks/bench_adamw.py 200000000 --kernel-only --no-copy --states fp32,bf16,int8 \
        --threads "$threads" --repeats 5 2>&1 | tee -a "$OUT/bench_adamw.txt"
    done
    timeout 60 python benchmarks/bench_adamw.py 65536 --kernel-only --no-copy --states fp32,bf16,int8 --threads 1 \
      --repeats 201 2>&1 | tee -a "$OUT/bench_adamw.txt"
    for dtype in fp32 int8; do run3b "profile_qwen2_3b_b8_$dtype" --state-dtype "$dtype"; done
    run3b profile_qwen2_3b_b8_int8_threads8 --state-dtype int8 --strategy host_threads=8
    export OMP_WAIT_POLICY=PASSIVE
    run3b profile_qwen2_3b_b8_int8_passive --state-dtype int8
    unset OMP_WAIT_POLICY ;;
  dynamic)  # the kernels' blocks handed out dynamically; the int8 encode by a reciprocal; the kernel's own seconds
    # Build the host kernels first, with no timeout: a build killed by a timeout leaves torch's build lock behind.
    kernels
    timeout 60 python benchmarks/bench_adamw.py 200000000 --kernel-only --no-copy --states fp32,bf16,int8 \
      --threads 16 --repeats 5 2>&1 | tee -a "$OUT/bench_adamw.txt"
    for dtype in fp32 bf16 int8; do run3b "dynamic_qwen2_3b_b8_$dtype" --state-dtype "$dtype"; done
    run3b dynamic_qwen2_3b_b8_bf16_switch05ms --state-dtype bf16 --switch-interval 0.0005
    timeout "${GPU_TESTS_S:-300}" python -m pytest -v -p no:cacheprovider -m gpu tests/test_gpu.py \
      -k "${GPU_TESTS_K:-cuda or gpu or two_processes or synchronisation or depth}" > "$OUT/gpu_tests.txt" 2>&1
    grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/gpu_tests.txt" | tail -50 ;;
  variants)
    kernels
    # BASELINE: the kernels before this session's change (git show 53b40d4:cuda/host_kernels.cpp)
    V=(--variant="$BASELINE:base" --variant=base --variant=-mprefer-vector-width=512)
    python benchmarks/bench_kernel_variants.py "${V[@]}" --n 200000000 --threads 16 2>&1 | tee -a "$OUT/variants.txt"
    python benchmarks/bench_kernel_variants.py "${V[@]}" --n 65536 --threads 1 --repeats 301 2>&1 \
      | tee -a "$OUT/variants.txt"
    for dtype in bf16 int8; do run3b "variants_qwen2_3b_b8_$dtype" --state-dtype "$dtype"; done ;;
  many)
    kernels
    python benchmarks/bench_kernel_variants.py --variant="$BASELINE:base" --variant=base --n 200000000 --threads 16 \
      2>&1 | tee -a "$OUT/variants.txt"
    for dtype in fp32 bf16 int8; do run3b "many_qwen2_3b_b8_$dtype" --state-dtype "$dtype"; done
    timeout "${GPU_TESTS_S:-240}" python -m pytest -v -p no:cacheprovider -m gpu tests/test_gpu.py \
      > "$OUT/gpu_tests.txt" 2>&1
    grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/gpu_tests.txt" | tail -50 ;;
  final)
    kernels &
    for v in -mprefer-vector-width=256 base; do
      python benchmarks/bench_kernel_variants.py --variant=$v --build-only &
    done
    wait
    for repeat in 1 2; do
      python benchmarks/bench_kernel_variants.py --variant=-mprefer-vector-width=256 --variant=base --n 200000000 \
        --threads 16 2>&1 | tee -a "$OUT/variants.txt"
    done
    timeout "${GPU_TESTS_S:-170}" python -m pytest -v -p no:cacheprovider -m gpu tests/test_gpu.py \
      -k "host_kernels or masters_cast or kept_layers or compiled or lora or dpo or reward or nccl or two_processes" \
      > "$OUT/gpu_tests.txt" 2>&1
    grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/gpu_tests.txt" | tail -30 ;;
  determinism)
    kernels
    cast() {  # NAME: the cast-on-GPU test with FP32 compute, stopping at the first failure with its traceback
      timeout 90 python -m pytest -x -q -p no:cacheprovider -m gpu tests/test_gpu.py --tb=short \
        -k "masters_cast and fp32" > "$OUT/cast_$1.txt" 2>&1
      echo "$1: $(tail -1 "$OUT/cast_$1.txt")"
    }
    mkdir -p "$OUT/after"
    for f in gradients loss passes; do
      cp "lightning_horizon/engine/$f.py" "$OUT/after/"
      cp "$BEFORE/$f.py" lightning_horizon/engine/
    done
    cast before1
    cast before2
    cp "$OUT"/after/*.py lightning_horizon/engine/
    rm -r "$OUT/after"
    cast after1
    cast after2
    timeout "${GPU_TESTS_S:-300}" python -m pytest -v -p no:cacheprovider -m gpu tests/test_gpu.py \
      -k "rows_added or lora or dpo or reward or nccl or two_processes" > "$OUT/gpu_tests.txt" 2>&1
    grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/gpu_tests.txt" | tail -30 ;;
  ab)
    kernels &
    (cd "$OLD" && PYTHONPATH="$PYTHONPATH:$PWD" kernels 'old ') &
    wait
    for repeat in 1 2; do
      (cd "$OLD" && PYTHONPATH="$PYTHONPATH:$PWD" run3b "old_fp32_$repeat" --state-dtype fp32)
      run3b "new_fp32_$repeat" --state-dtype fp32
    done
    for dtype in fp32 int8; do
      timeout 150 python -m recipes.bench model=qwen2_3b data.batch_size=8 data.max_seq_len=1024 steps=8 warmup=2 \
        strategy.optimizer_state_dtype=$dtype hydra.run.dir="$OUT/bench_qwen2_3b_b8_$dtype" 2>&1 \
        | grep -E "tokens/s|^horizon|Error" | tail -5
    done
    tar czf /tmp/ab.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/ab.tgz "$OUT/" ;;
  closing)
    kernels &
    (cd "$OLD" && PYTHONPATH="$PYTHONPATH:$PWD" kernels 'old ') &
    wait
    timeout "${GPU_TESTS_S:-200}" python -m pytest -v --tb=short -p no:cacheprovider -m gpu tests/test_gpu.py \
      -k "gradient_parity or lightning_training or kept_layers or compiled or resume" > "$OUT/gpu_tests.txt" 2>&1
    grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/gpu_tests.txt" | tail -20
    old() { (cd "$OLD" && PYTHONPATH="$PYTHONPATH:$PWD" run3b "$@"); }
    RUN3B_S=110 run3b new_fp32_a --state-dtype fp32
    old old_fp32_a --state-dtype fp32
    run3b new_bf16 --state-dtype bf16
    run3b new_int8 --state-dtype int8
    run3b new_fp32_b --state-dtype fp32
    old old_fp32_b --state-dtype fp32
    tar czf /tmp/closing.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/closing.tgz "$OUT/" ;;
  alltests)
    kernels
    timeout "${GPU_TESTS_S:-500}" python -m pytest -v --tb=short -p no:cacheprovider -m gpu tests/test_gpu.py \
      --durations=10 > "$OUT/gpu_tests.txt" 2>&1
    grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/gpu_tests.txt" | tail -45 ;;
esac
