#!/usr/bin/env bash
# A GPU session's runs in priority order, each under its own time limit so that one overrun does
# not lose the rest; logs and JSON go under $OUT. From the repository root on the device machine:
#
#   COMMIT=<sha> bash bench/gpu_session.sh 1    # ~9 min: GPU correctness, then M1 end to end (ablations)
#   COMMIT=<sha> bash bench/gpu_session.sh 2    # ~9 min: host hot spots, cascade shapes, M2
#
# Phase 1 is what every session should run first: check_decode_gpu.py compares the engine's
# decode logits (graphs, compile, skinny GEMM, cascade, look-ahead) with the model's own forward.
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
    run 150 check python bench/check_decode_gpu.py
    run 400 e2e-M1 python bench/bench_e2e.py --models M1 --repeats 3 --skip-hf-batch --ablate-merge --ablate-graph-copies \
        --time-budget 330 --out "$OUT/e2e-M1-$COMMIT.json"
    ;;
2)
    run 150 cprofile python bench/cprofile_workload.py --only W-beam --out "$OUT/cprofile-M1-$COMMIT.json"
    run 120 cascade python bench/bench_cascade_shapes.py --only WS256,WBeamBatch \
        --out "$OUT/cascade-$COMMIT.json"
    run 250 e2e-M2 python bench/bench_e2e.py --models M2 --repeats 3 --skip-hf-batch --skip-decode \
        --only W-beam-batch --time-budget 200 --out "$OUT/e2e-M2-$COMMIT.json"
    ;;
*)
    echo "usage: bash bench/gpu_session.sh 1|2" >&2
    exit 2
    ;;
esac
