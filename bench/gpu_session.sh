#!/usr/bin/env bash
# A GPU session's runs in priority order, each under its own time limit so that one overrun does
# not lose the rest; logs and JSON go under $OUT. From the repository root on the device machine:
#
#   COMMIT=<sha> bash bench/gpu_session.sh 1    # ~7 min: GPU correctness (decode logits, beams,
#                                               #   look-ahead; the kernel tests on compiled kernels)
#   COMMIT=<sha> bash bench/gpu_session.sh 2    # ~7 min: M1 end to end (fused top-p ablated on the
#                                               #   sampling rows; decode with the KV write separate)
#   COMMIT=<sha> bash bench/gpu_session.sh 3    # ~8 min: decode-step folds (twice), W-beam timeline,
#                                               #   host hot spots, M2 W-beam-batch
#   COMMIT=<sha> bash bench/gpu_session.sh 4    # ~6 min: fused top-p sampling (kernel tests on the
#                                               #   GPU, kernel vs torch ops, W-sample end to end)
#   COMMIT=<sha> bash bench/gpu_session.sh 5    # ~8 min: beam search launched ahead (GPU check
#                                               #   against stepping; W-beam rows with it ablated)
#   COMMIT=<sha> bash bench/gpu_session.sh 6    # ~8 min: fewer launches per layer (rotary in the
#                                               #   kernels, SiLU in the down GEMM): kernel tests,
#                                               #   GPU checks, decode step with the rotary ablated
#   COMMIT=<sha> bash bench/gpu_session.sh 7    # ~8 min: M1 end to end, compiled prefill ablated
#   COMMIT=<sha> bash bench/gpu_session.sh 8    # ~2 min: the eager prefill with and without the
#                                               #   step's swaps, 512 and 4,096 tokens (item 37)
#   COMMIT=<sha> bash bench/gpu_session.sh 9    # ~7 min: issue #4's decode step, M1 (rotary
#                                               #   ablated) and M2, then phase 8's prefill profile
#   COMMIT=<sha> bash bench/gpu_session.sh 10   # ~6 min: the prefill profile at 16-4,096 tokens on
#                                               #   a fresh prefix cache; M1's decode step
#   COMMIT=<sha> bash bench/gpu_session.sh 11   # ~8 min: the compiled prefill: profile (eager,
#                                               #   eager with swaps, compiled), GPU checks
#   COMMIT=<sha> bash bench/gpu_session.sh 12   # ~7 min: host time of the prefill's launches;
#                                               #   GPU checks of the shared-prompt prefill
#   COMMIT=<sha> bash bench/gpu_session.sh 13   # ~5 min: M1 end to end, issue #7's workloads only
#   COMMIT=<sha> bash bench/gpu_session.sh 14   # ~3 min: no compilation after a workload's first
#                                               #   run (dynamo's recompile log, e2e order)
#   COMMIT=<sha> bash bench/gpu_session.sh 15   # ~5 min: where W-shared 256's time goes (profile
#                                               #   of a run; the cascade's parts timed alone)
#   COMMIT=<sha> bash bench/gpu_session.sh 16   # ~3 min: the cascade's merge, 8 heads a program:
#                                               #   kernel tests, the engine's shapes timed
#   COMMIT=<sha> bash bench/gpu_session.sh 17   # ~9 min: logits without the copy: GPU checks of
#                                               #   look-ahead and beams on graphs, the cascade's
#                                               #   kernel tests, #7's workloads end to end
#   COMMIT=<sha> bash bench/gpu_session.sh 18   # ~9 min: prefill chunks from CUDA graphs: GPU
#                                               #   check, #7's workloads with them ablated
#   COMMIT=<sha> bash bench/gpu_session.sh 19   # ~7 min: the same, twice, W-shared 256 with the
#                                               #   W-beam 8 and W-sample 64 (prefill replays counted)
#   COMMIT=<sha> bash bench/gpu_session.sh 21   # ~6 min: the prefill graphs' GPU check, #7's
#                                               #   workloads end to end
#   COMMIT=<sha> bash bench/gpu_session.sh 22   # ~8 min: the cascade's defaults taken apart (16-bit
#                                               #   partials, register caps), its GPU kernel tests,
#                                               #   #7's workloads end to end
#   COMMIT=<sha> bash bench/gpu_session.sh 23   # ~9 min: the cascade in the engine against HF
#                                               #   (fp32 and bf16; eager, graphs, compiled graphs),
#                                               #   #7's workloads end to end (item 55's groups)
#
# Phase 1 is what every session should run first. The kernel tests need SHAREDECODE_TEST_CUDA=1:
# without it the tests' conftest picks the Triton interpreter, which in triton 3.6 fails on them.
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
: "${OUT:?set OUT}" "${COMMIT:?set COMMIT}"

run() {  # run LIMIT_S NAME COMMAND...: the command's output, warnings left out, in $OUT/NAME.log
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | grep -v -i warn | tee "$OUT/$name.log" | tail -20
}

case "${1:-1}" in
1)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    run 200 check python bench/check_decode_gpu.py
    run 220 kernel-tests env SHAREDECODE_TEST_CUDA=1 python -m pytest -q -x -rf tests/kernels/test_paged_attention.py \
        tests/kernels/test_kv_cache_ops.py tests/kernels/test_skinny_matmul.py tests/kernels/test_fused_sampling.py
    ;;
2)
    run 480 e2e-M1 python bench/bench_e2e.py --models M1 --repeats 3 --skip-hf-batch --ablate-fused-top-p \
        --ablate-kv-write --time-budget 420 --out "$OUT/e2e-M1-$COMMIT.json"
    ;;
3)
    for i in 1 2; do
        run 150 "decode-folds-$i" python bench/bench_e2e.py --models M1 --only NO-WORKLOAD --ablate-merge \
            --ablate-kv-write --skip-hf-batch --out "$OUT/decode-folds-$COMMIT-$i.json"
    done
    run 120 timeline python bench/step_timeline.py --only "W-beam k=8" --repeats 3 \
        --out "$OUT/timeline-M1-$COMMIT.json"
    run 150 e2e-M2 python bench/bench_e2e.py --models M2 --repeats 3 --skip-hf-batch --skip-decode \
        --only W-beam-batch --time-budget 120 --out "$OUT/e2e-M2-$COMMIT.json"
    ;;
4)
    run 100 sampling-tests env SHAREDECODE_TEST_CUDA=1 python -m pytest -q -x -rf tests/kernels/test_fused_sampling.py
    run 120 sampling python bench/bench_sampling.py --out "$OUT/sampling-$COMMIT.json"
    run 240 e2e-sample python bench/bench_e2e.py --models M1 --repeats 3 --skip-hf-batch --skip-decode \
        --only W-sample --ablate-fused-top-p --time-budget 200 --out "$OUT/e2e-M1-sample-$COMMIT.json"
    ;;
5)
    run 60 beam-kernel-tests env SHAREDECODE_TEST_CUDA=1 python -m pytest -q -x -rf tests/kernels/test_beam_select.py
    run 200 check-beams python bench/check_decode_gpu.py --only beams
    run 330 e2e-beam python bench/bench_e2e.py --models M1 --repeats 3 --skip-hf-batch --skip-decode \
        --only W-beam --ablate-look-ahead --time-budget 300 --out "$OUT/e2e-M1-beam-$COMMIT.json"
    ;;
6)
    run 150 kernel-tests env SHAREDECODE_TEST_CUDA=1 python -m pytest -q -x -rf tests/kernels/test_rotary.py \
        tests/kernels/test_paged_attention.py tests/kernels/test_skinny_matmul.py tests/kernels/test_kv_cache_ops.py
    run 200 check python bench/check_decode_gpu.py
    run 150 decode-rotary python bench/bench_e2e.py --models M1 --only NO-WORKLOAD --ablate-rotary \
        --skip-hf-batch --out "$OUT/decode-rotary-$COMMIT.json"
    ;;
7)
    run 540 e2e-M1 python bench/bench_e2e.py --models M1 --repeats 3 --skip-hf-batch --ablate-compiled-prefill \
        --time-budget 480 --out "$OUT/e2e-M1-$COMMIT.json"
    ;;
8)
    run 150 profile-prefill python bench/profile_prefill.py --out "$OUT/profile-prefill-$COMMIT.json"
    ;;
9)
    run 150 decode-M1 python bench/bench_e2e.py --models M1 --only NO-WORKLOAD --ablate-rotary \
        --skip-hf-batch --out "$OUT/decode-M1-$COMMIT.json"
    run 170 decode-M2 python bench/bench_e2e.py --models M2 --only NO-WORKLOAD --skip-hf-batch \
        --out "$OUT/decode-M2-$COMMIT.json"
    run 150 profile-prefill python bench/profile_prefill.py --out "$OUT/profile-prefill-$COMMIT.json"
    ;;
10)
    run 200 profile-prefill python bench/profile_prefill.py --lengths 16 64 512 2048 4096 \
        --out "$OUT/profile-prefill-$COMMIT.json"
    run 300 decode-M1 python bench/bench_e2e.py --models M1 --only NO-WORKLOAD --skip-hf-batch \
        --out "$OUT/decode-M1-$COMMIT.json"
    ;;
11)
    run 240 profile-prefill python bench/profile_prefill.py --lengths 16 512 2048 4096 \
        --out "$OUT/profile-prefill-$COMMIT.json"
    run 170 check-beams python bench/check_decode_gpu.py --only beams
    run 170 check-shared python bench/check_decode_gpu.py --only shared
    ;;
12)
    run 90 host-launch python bench/host_launch.py --out "$OUT/host-launch-$COMMIT.json"
    run 260 check-shared python bench/check_decode_gpu.py --only shared
    run 200 check-plain python bench/check_decode_gpu.py --only plain
    ;;
13)
    run 290 e2e-M1 python bench/bench_e2e.py --models M1 --repeats 3 --skip-hf-batch --skip-decode \
        --only "W-beam k=8,W-sample n=64,W-shared 256,W-beam-batch" --time-budget 260 --out "$OUT/e2e-M1-$COMMIT.json"
    ;;
14)
    TORCH_LOGS=recompiles timeout 240 python bench/recompiles.py --runs 4 \
        --names "W-beam k=8,W-sample n=64,W-shared 256,W-beam-batch 16x8" > "$OUT/recompiles-$COMMIT.log" 2>&1
    grep -E "^==|Recompiling|- [0-9]" "$OUT/recompiles-$COMMIT.log" | cut -c1-300
    ;;
15)
    run 200 profile-shared python bench/profile_gpu.py --skip-decode --only W-shared \
        --out "$OUT/profile-M1-shared-$COMMIT.json"
    run 150 cascade python bench/bench_cascade_shapes.py --only WS256,WS256own,WSample64,WBeamBatch \
        --variants default,separate,prefix_part,own_part --out "$OUT/cascade-shapes-$COMMIT.json"
    ;;
16)
    run 100 kernel-tests env SHAREDECODE_TEST_CUDA=1 python -m pytest -q -x -rf tests/kernels/test_shared_prefix.py
    run 110 cascade python bench/bench_cascade_shapes.py --only WS256,WSample64,WBeamBatch,WKernel \
        --variants default,mh1,mh4,mh32,prefix_part,own_part --out "$OUT/cascade-shapes-$COMMIT.json"
    ;;
17)
    run 110 check-look-ahead python bench/check_decode_gpu.py --only look_ahead
    run 150 kernel-tests env SHAREDECODE_TEST_CUDA=1 python -m pytest -q -x -rf tests/kernels/test_shared_prefix.py
    run 290 e2e-M1 python bench/bench_e2e.py --models M1 --repeats 3 --skip-hf-batch --skip-decode \
        --only "W-beam k=8,W-sample n=64,W-shared 256,W-beam-batch" --time-budget 260 --out "$OUT/e2e-M1-$COMMIT.json"
    ;;
18)
    run 200 check-prefill-graphs python bench/check_decode_gpu.py --only prefill_graphs
    run 330 e2e-M1 python bench/bench_e2e.py --models M1 --repeats 3 --skip-hf-batch --skip-decode \
        --only "W-beam k=8,W-sample n=64,W-shared 256,W-beam-batch" --ablate-prefill-graphs --time-budget 300 \
        --out "$OUT/e2e-M1-$COMMIT.json"
    ;;
19)
    for i in 1 2; do
        run 200 e2e-M1-$i python bench/bench_e2e.py --models M1 --repeats 3 --skip-hf-batch --skip-decode \
            --only "W-beam k=8,W-sample n=64,W-shared 256" --ablate-prefill-graphs --time-budget 170 \
            --out "$OUT/e2e-M1-subset-$i-$COMMIT.json"
    done
    ;;
21)
    run 120 check-prefill-graphs python bench/check_decode_gpu.py --only prefill_graphs
    run 230 e2e-M1 python bench/bench_e2e.py --models M1 --repeats 3 --skip-hf-batch --skip-decode \
        --only "W-beam k=8,W-sample n=64,W-shared 256,W-beam-batch" --time-budget 200 \
        --out "$OUT/e2e-M1-subset-$COMMIT.json"
    ;;
22)
    run 150 cascade-shapes python bench/bench_cascade_shapes.py --out "$OUT/cascade-shapes-$COMMIT.json" \
        --only WKernel,WS256,WS32,WSample64,WBeamBatch \
        --variants default,old_default,fp32_partials,no_cap,ss2,prefix_part,own_part
    run 150 kernel-tests-shared-prefix env SHAREDECODE_TEST_CUDA=1 python -m pytest -q -x -rf \
        tests/kernels/test_shared_prefix.py
    run 230 e2e-M1 python bench/bench_e2e.py --models M1 --repeats 3 --skip-hf-batch --skip-decode \
        --only "W-beam k=8,W-sample n=64,W-shared 256,W-beam-batch" --time-budget 200 \
        --out "$OUT/e2e-M1-subset-$COMMIT.json"
    ;;
23)
    run 300 check-shared python bench/check_decode_gpu.py --only shared
    run 230 e2e-M1 python bench/bench_e2e.py --models M1 --repeats 3 --skip-hf-batch --skip-decode \
        --only "W-beam k=8,W-sample n=64,W-shared 256,W-beam-batch" --time-budget 200 \
        --out "$OUT/e2e-M1-subset-$COMMIT.json"
    ;;
*)
    echo "usage: bash bench/gpu_session.sh 1|2|3|4|5|6|7|8|9|10|11|12|13|14|15|16|17|18|19|21|22|23" >&2
    exit 2
    ;;
esac
