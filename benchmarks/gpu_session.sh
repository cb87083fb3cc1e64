#!/usr/bin/env bash
# The GPU checks and measurements, in parts that each fit one device call (≤ 10 min).
# Run from the repository root on the lent GPU, e.g. through the device tool:
#
#   bash benchmarks/gpu_session.sh session         # all that a 15-minute loan allows (< 9 min):
#                                                  # env, tests, then 1B and 8B vs transformers
#                                                  # eager at batch 1/8/64 (3 timed runs each)
#   bash benchmarks/gpu_session.sh env tests       # versions; kernels + graphs, compiled (~3 min)
#   bash benchmarks/gpu_session.sh 1b              # the 1B table, transformers eager + static
#   bash benchmarks/gpu_session.sh 8b              # the 8B table
#   bash benchmarks/gpu_session.sh kernels ablation profile  # per kernel; graphs off; a step
#   bash benchmarks/gpu_session.sh nodes           # CUDA compute + CPU attention nodes (~2 min)
#   bash benchmarks/gpu_session.sh spec            # speculative decoding on and off (~2 min)
#
# Each part's log (and the bench JSON) goes to $OUT. Uses the image's python3 with shardlm
# from src/ (nothing to install; server extras are not needed).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/shardlm-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
TABLE=(--batch-sizes 1,8,64 --input-len 128 --output-len 256 --dtype bfloat16)

bench() { $PY -m shardlm.entrypoints.cli bench "$@"; }

for part in "$@"; do
    echo "== $part ($(date -u +%FT%TZ))"
    case $part in
    env)
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
        $PY -c 'import torch, triton, transformers as t; print(torch.__version__, triton.__version__, t.__version__)'
        ;;
    tests)  # every CUDA path: kernels, graphs (through the AttentionBackend interface), a
            # CUDA compute rank beside CPU attention nodes over pinned gloo (the NCCL link
            # test skips itself: it needs a GPU per rank)
        SHARDLM_KERNEL_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider -x \
            tests/test_kernels.py tests/test_cuda_graphs.py tests/test_kv_quant.py \
            tests/test_qwen3.py -k "not qwen3 or fused or triton" &&
        $PY -m pytest -q -p no:cacheprovider -x -rs tests/test_node_overlap.py -k "cuda or nccl"
        ;;
    session)
        bash "$0" env tests || exit 1
        bench --shape llama-1b "${TABLE[@]}" --repeats 3 --compare-hf eager --hf-output-len 64 \
            --json "$OUT/bench_1b.json"
        bench --shape llama-8b "${TABLE[@]}" --repeats 3 --compare-hf eager --hf-output-len 32 \
            --json "$OUT/bench_8b.json"
        ;;
    nodes)  # CUDA compute rank, attention nodes on the CPU over pinned gloo, m = 1, 2, 3
        $PY benchmarks/node_overlap.py --device cuda --attention-device cpu --beta 1 \
            --hidden 1024 --contexts 1024 8192 --decode-steps 8
        ;;
    kvquant)  # decode tokens/s at long context, kv_cache_dtype auto vs int8 vs fp8
        $PY benchmarks/kv_quant.py --device cuda --dtype bfloat16 --shape llama-1b \
            --context 4096 32768 --batch 8 --steps 32
        ;;
    spec)  # speculative decoding: n-gram and the built-in draft, on and off, batch 1 and 8
        $PY benchmarks/speculative.py --device cuda --dtype bfloat16 --batches 1 8
        ;;
    1b)
        bench --shape llama-1b "${TABLE[@]}" --compare-hf eager,static --hf-output-len 64 \
            --json "$OUT/bench_1b.json"
        ;;
    8b)
        bench --shape llama-8b "${TABLE[@]}" --compare-hf eager,static --hf-output-len 32 \
            --json "$OUT/bench_8b.json"
        ;;
    ablation)  # the same table without graphs, then without the Triton kernels
        bench --shape llama-1b "${TABLE[@]}" --enforce-eager --json "$OUT/bench_1b_eager.json"
        bench --shape llama-1b "${TABLE[@]}" --attention-backend torch \
            --json "$OUT/bench_1b_torch.json"
        ;;
    kernels)  # each Triton kernel against the PyTorch code it replaces
        $PY benchmarks/kernels.py
        # structured outputs' cost (needs xgrammar: pip install 'shardlm[structured]')
        $PY benchmarks/structured.py --device cuda --dtype bfloat16 --random-model
        ;;
    profile)
        $PY benchmarks/decode_profile.py --shape llama-1b --batch 1
        $PY benchmarks/decode_profile.py --shape llama-1b --batch 64
        $PY benchmarks/decode_profile.py --shape llama-8b --batch 1
        $PY benchmarks/host_overhead.py --shape llama-1b --dtype bfloat16
        ;;
    *)
        echo "unknown part $part (session, env, tests, 1b, 8b, nodes, spec, kernels, ablation, profile)"
        exit 2
        ;;
    esac 2>&1 | tee "$OUT/$part.log"
done
