#!/usr/bin/env bash
# The GPU check: one script for a person with one GPU and ten minutes (about 6 on an H100).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   GPU_CHECK_ON_CPU=1 bash benchmarks/gpu_check.sh   # the same plumbing on CPU with the tiny model (a dry run)
#
# It needs rlvr's dependencies importable (on the offline GPU machine: the wheels in .whl/, see
# ../shared/gpu/README.md, plus torchao==0.18.0 for gpu=l4's AdamW8bit: add it to the pip download
# line) and a copy of ../shared's Qwen2.5 tokenizer and GSM8K train split (SHARED, default ../shared). It builds random-init Qwen2.5-0.5B and Qwen2.5-Math-1.5B from their real configs
# (nothing downloads), then runs and prints, with logs under $OUT (default /tmp/gpu_check):
#   1. the memory benchmark on CUDA (benchmarks/memory.py --cuda): the training side's measured peak
#      for gpu=l4 with Qwen2.5-Math-1.5B at 1,024 new tokens, and the first H200 run's configuration;
#   2. the step breakdown for gpu=l4 (Qwen2.5-Math-1.5B, 1,024 new tokens) under a 24 GiB cap
#      (torch.cuda.set_per_process_memory_fraction), and for gpu=h100 (16 prompts x 8 x 256 tokens,
#      the configuration measured at 202 tokens/s before), both with the HF engine (vLLM is not there);
#   3. the HF engine's sampler per decoding step against the one that ran at 202 tokens/s
#      (benchmarks/sampler.py --device cuda);
#   4. the GPU-marked tests (tests/test_gpu.py: device-side sampling, gpu=h100 trains and resumes);
# and one table at the end. Record the table in benchmarks/RESULTS.md with the GPU's name.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
SHARED=${SHARED:-../shared}
mkdir -p "$OUT"; : > "$OUT/summary.txt"
export TOKENIZERS_PARALLELISM=false PYTHONPATH="${PYTHONPATH:-}:$PWD"
began=$(date +%s)

if [[ -n "${GPU_CHECK_ON_CPU:-}" ]]; then  # plumbing only: tiny model on CPU, a few tokens; memory computed
    L4=(--gpu cpu --model tiny); H100=(--gpu cpu --model tiny); CAP=()
    SIZE=(--batch-size 4 --n 4 --max-new-tokens 16 --steps 2)
    L4_SIZE=("${SIZE[@]}"); H100_SIZE=("${SIZE[@]}")
    MEM_ARGS=(); GPU_TESTS=(-m gpu -q); SAMPLER=(--device cpu --steps 2)
else
    python "$SHARED/gpu/make_architectures.py" "$SHARED/tokenizers/qwen2.5" > "$OUT/architectures.log" 2>&1 \
        || { tail -20 "$OUT/architectures.log"; exit 1; }
    DATA="data.source=$SHARED/data/gsm8k/train.jsonl"
    L4=(--gpu l4 --model-name /tmp/q15 --data gsm8k "$DATA" rollout.generate_batch_size=8 grpo.micro_batch_size=4)
    H100=(--gpu h100 --model-name /tmp/q15 --data gsm8k "$DATA" rollout.generate_batch_size=16 grpo.micro_batch_size=16)
    CAP=(--mem-cap-gib 24)
    L4_SIZE=(--batch-size 8 --n 8 --max-new-tokens 1024 --steps 2)
    H100_SIZE=(--batch-size 16 --n 8 --max-new-tokens 256 --steps 3)
    MEM_ARGS=(--cuda); GPU_TESTS=(-m gpu -q); SAMPLER=(--device cuda --steps 20)
fi

step() {  # name, command...: run, log to $OUT/name.log, keep the last lines
    local name=$1; shift
    local t0; t0=$(date +%s)
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc, $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
    return 0
}

step memory_l4 python benchmarks/memory.py "${MEM_ARGS[@]}" --only gpu=l4,model=qwen2.5-math-1.5b,tokens=1024
step memory_baseline python benchmarks/memory.py "${MEM_ARGS[@]}" --baseline
step breakdown_l4 python benchmarks/step_breakdown.py --engines hf --no-raw "${CAP[@]}" "${L4_SIZE[@]}" "${L4[@]}"
step breakdown_h100 python benchmarks/step_breakdown.py --engines hf --no-raw "${H100_SIZE[@]}" "${H100[@]}"
step sampler python benchmarks/sampler.py "${SAMPLER[@]}"
step gpu_tests python -m pytest "${GPU_TESTS[@]}" -rs tests/test_gpu.py

echo
echo "GPU check: $(python -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)")'), $(( $(date +%s) - began )) s"
cat "$OUT/summary.txt"
for name in memory_l4 memory_baseline; do
    echo "-- $name"; grep -E "^(profile|l4|h100) |^peak_gib" "$OUT/$name.log" || tail -5 "$OUT/$name.log"
done
for name in breakdown_l4 breakdown_h100; do
    echo "-- $name"; sed -n '/ on gpu=/,$p' "$OUT/$name.log" | grep -v "^$" || tail -5 "$OUT/$name.log"
done
echo "-- sampler"; tail -5 "$OUT/sampler.log"
echo "-- gpu_tests"; tail -3 "$OUT/gpu_tests.log"
