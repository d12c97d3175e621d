#!/usr/bin/env bash
# The GPU check: one script for a person with one GPU and a few minutes (about 5 on an H100/H200,
# start-up included, so that a second try fits in a 15-minute lease).
#
#   bash benchmarks/gpu_check.sh                        # on the GPU machine, from the repository root
#   GPU_CHECK_ON_CPU=1 bash benchmarks/gpu_check.sh     # the same plumbing on CPU with the tiny model (a dry run)
#   GPU_CHECK_ONLY=sampler,gpu_tests bash benchmarks/gpu_check.sh   # some steps only (a second try)
#
# Needs, importable by `python` (checked first; a missing one is named and nothing runs):
#   torch (CUDA), lightning, transformers, torchmetrics, pyarrow, pytest (in the GPU image), and the
#   wheels ../shared/gpu/README.md says how to download: hydra-core==1.3.8, omegaconf==2.3.1,
#   antlr4-python3-runtime==4.9.3, math-verify==0.9.0, latex2sympy2_extended==1.11.0, torchao==0.18.0
#   (gpu=l4's AdamW8bit and stochastic rounding). bitsandbytes==0.50.2 (and peft, in the GPU image) is
#   imported first too, but only the memory_qlora_l4 step needs it: when it does not import, that
#   step alone fails, saying so. vLLM is not needed (it cannot be installed beside that machine's
#   torch 2.11); the steps use the HF engine.
# And SHARED (default ../shared): a folder with tokenizers/qwen2.5/, data/gsm8k/train.jsonl and
# gpu/make_architectures.py, which every script called here reads (exported as RLVR_SHARED, which
# rlvr's own configs read). A missing SHARED stops the check before any step.
#
# Steps, each logged to $OUT/NAME.log (default OUT=/tmp/gpu_check), each with its own time limit:
#   memory_l4        benchmarks/memory.py --cuda: gpu=l4, Qwen2.5-Math-1.5B, 1,024 new tokens, two updates under
#                    an L4's cap (21.5 GiB: its 22.5 usable less ~1 GiB of CUDA context, which stays outside the
#                    cap), against the peak memory.py computes on CPU;
#   memory_qlora_l4  the same with adapter=qlora (bitsandbytes NF4 base, PEFT LoRA) on the Qwen2.5-Math-1.5B
#                    architecture under the same cap: the figure memory.py models with its NF4 stand-in;
#   memory_baseline  the same for the first H200 run's configuration (48.4 GiB measured then);
#   breakdown_l4     benchmarks/step_breakdown.py: gpu=l4's training side under the 21.5 GiB cap, HF engine;
#   breakdown_h100   gpu=h100 with 16 prompts x 8 x 256 tokens, HF engine: the configuration that ran at
#                    202 tokens/s;
#   sampler          the HF engine's sampler per decoding step against the one that ran at 202 tokens/s;
#   gpu_tests        tests/test_gpu.py: device-side sampling with no host sync, gpu=h100 trains and resumes.
# Then one summary. Exits 0 only when every step ran and exited 0. Record the output in
# benchmarks/RESULTS.md with the GPU's name.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
SHARED=${SHARED:-../shared}
ONLY=${GPU_CHECK_ONLY:-}
L4_CAP_GIB=21.5

for need in tokenizers/qwen2.5 data/gsm8k/train.jsonl gpu/make_architectures.py; do
    if [[ ! -e "$SHARED/$need" ]]; then
        echo "error: SHARED=$SHARED has no $need; point SHARED at a copy of ../shared (see ../shared/gpu/README.md)" >&2
        exit 2
    fi
done
SHARED=$(cd "$SHARED" && pwd)
export RLVR_SHARED=$SHARED TOKENIZERS_PARALLELISM=false PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
mkdir -p "$OUT"; : > "$OUT/summary.txt"
began=$(date +%s)

python - <<'EOF' || exit 3
import importlib, importlib.util, sys
# pure-Python wheels: found is enough; compiled against torch: imported (a build for another torch fails here)
found = {"lightning": "lightning", "transformers": "transformers", "torchmetrics": "torchmetrics", "pyarrow": "pyarrow",
         "pytest": "pytest", "hydra": "hydra-core==1.3.8", "omegaconf": "omegaconf==2.3.1",
         "antlr4": "antlr4-python3-runtime==4.9.3", "math_verify": "math-verify==0.9.0",
         "latex2sympy2_extended": "latex2sympy2_extended==1.11.0"}
imported = {"torch": "torch", "torchao": "torchao==0.18.0"}
optional = {"bitsandbytes": "bitsandbytes==0.50.2", "peft": "peft"}  # the memory_qlora_l4 step's only
def broken(modules, load):
    out = []
    for module, wheel in modules.items():
        try:
            if load:
                importlib.import_module(module)
            elif importlib.util.find_spec(module) is None:
                raise ModuleNotFoundError(f"no module named {module}")
        except Exception as error:  # not installed, or built against another torch
            out.append(f"{wheel} ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
    return out
missing = broken(found, load=False) + broken(imported, load=True)
for wheel in broken(optional, load=True):
    print(f"note: cannot import {wheel}: the memory_qlora_l4 step will fail; the others run", file=sys.stderr)
if missing:
    print("error: cannot import: " + "; ".join(missing) + ". Install the wheels (../shared/gpu/README.md).", file=sys.stderr)
    sys.exit(1)
EOF

if [[ -n "${GPU_CHECK_ON_CPU:-}" ]]; then  # plumbing only: tiny model on CPU, a few tokens; memory computed
    L4=(--gpu cpu --model tiny); H100=(--gpu cpu --model tiny); CAP=()
    SIZE=(--batch-size 4 --n 4 --max-new-tokens 16 --steps 2)
    L4_SIZE=("${SIZE[@]}"); H100_SIZE=("${SIZE[@]}")
    # memory computed on fake tensors, plain AdamW (torchao's fake-tensor step takes minutes on a CPU)
    MEM_L4=(--only gpu=a100,model=qwen2.5-0.5b,tokens=32); MEM_BASE=(--only gpu=h100,model=qwen2.5-0.5b,tokens=32)
    MEM_QLORA=(--only gpu=a100,model=qwen2.5-0.5b,tokens=32,adapter=qlora)
    SLOW=6  # time limits x6: a shared 2-core CPU, not a GPU
    SAMPLER=(--device cpu --steps 2 --rows 16 --vocab 4096)
else
    step_arch() { python "$SHARED/gpu/make_architectures.py" "$SHARED/tokenizers/qwen2.5"; }
    if [[ -z "$ONLY" || ",$ONLY," == *,breakdown_* ]]; then
        step_arch > "$OUT/architectures.log" 2>&1 || { tail -20 "$OUT/architectures.log"; exit 4; }
    fi
    DATA="data.source=$SHARED/data/gsm8k/train.jsonl"
    # grpo.micro_batch_tokens=null: else the profile's token budget wins over the row count
    L4=(--gpu l4 --model-name /tmp/q15 --data gsm8k "$DATA" rollout.generate_batch_size=16 grpo.micro_batch_size=4
        grpo.micro_batch_tokens=null)
    H100=(--gpu h100 --model-name /tmp/q15 --data gsm8k "$DATA" rollout.generate_batch_size=16 grpo.micro_batch_size=16
          grpo.micro_batch_tokens=null)
    CAP=(--mem-cap-gib "$L4_CAP_GIB")
    L4_SIZE=(--batch-size 4 --n 4 --max-new-tokens 1024 --steps 2)
    H100_SIZE=(--batch-size 16 --n 8 --max-new-tokens 256 --steps 2)
    MEM_L4=(--cuda --mem-cap-gib "$L4_CAP_GIB" --only gpu=l4,model=qwen2.5-math-1.5b,tokens=1024); MEM_BASE=(--cuda --baseline)
    MEM_QLORA=(--cuda --mem-cap-gib "$L4_CAP_GIB" --only gpu=l4,model=qwen2.5-math-1.5b,tokens=1024,adapter=qlora)
    SAMPLER=(--device cuda --steps 20)
    SLOW=1
fi

failed=()
step() {  # name, time limit in s, command...: run (unless GPU_CHECK_ONLY leaves it out), log, record its exit
    local name=$1 limit=$2; shift 2
    if [[ -n "$ONLY" && ",$ONLY," != *",$name,"* ]]; then return; fi
    local t0; t0=$(date +%s)
    limit=$(( limit * SLOW ))
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    (( rc == 124 )) && echo "(stopped at its ${limit} s limit)" >> "$OUT/$name.log"
    echo "== $name: exit $rc, $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
    (( rc == 0 )) || failed+=("$name")
}

step memory_l4 120 python benchmarks/memory.py "${MEM_L4[@]}"
step memory_qlora_l4 180 bash -c 'python -c "import bitsandbytes, peft; print(\"bitsandbytes\", bitsandbytes.__version__, \"peft\", peft.__version__)" \
    || { echo "error: adapter=qlora needs bitsandbytes==0.50.2 and peft importable (../shared/gpu/README.md)"; exit 5; }
    exec python benchmarks/memory.py "$@"' memory_qlora_l4 "${MEM_QLORA[@]}"
step memory_baseline 90 python benchmarks/memory.py "${MEM_BASE[@]}"
step breakdown_l4 180 python benchmarks/step_breakdown.py --engines hf --no-raw "${CAP[@]}" "${L4_SIZE[@]}" "${L4[@]}"
step breakdown_h100 240 python benchmarks/step_breakdown.py --engines hf --no-raw "${H100_SIZE[@]}" "${H100[@]}"
step sampler 60 python benchmarks/sampler.py "${SAMPLER[@]}"
step gpu_tests 180 python -m pytest -m gpu -q -rs tests/test_gpu.py

echo
if [[ -n "${GPU_CHECK_ON_CPU:-}" ]]; then device="CPU (dry run)"; else
    device=$(python -c 'import torch; print(torch.cuda.get_device_name())' 2>&1 | tail -1); fi
echo "GPU check: $device, $(( $(date +%s) - began )) s"
cat "$OUT/summary.txt"
for name in memory_l4 memory_qlora_l4 memory_baseline; do
    [[ -f "$OUT/$name.log" ]] || continue
    echo "-- $name"; grep -E "^(profile|l4|a100|h100|bitsandbytes|error|note)|^peak_gib" "$OUT/$name.log" || tail -5 "$OUT/$name.log"
done
for name in breakdown_l4 breakdown_h100; do
    [[ -f "$OUT/$name.log" ]] || continue
    echo "-- $name"; sed -n '/ on gpu=/,$p' "$OUT/$name.log" | grep -v "^$" || tail -5 "$OUT/$name.log"
done
for name in sampler gpu_tests; do
    [[ -f "$OUT/$name.log" ]] || continue
    echo "-- $name"; tail -5 "$OUT/$name.log"
done
if (( ${#failed[@]} )); then
    echo "FAILED: ${failed[*]} (logs in $OUT)"
    exit 1
fi
echo "all steps passed"
