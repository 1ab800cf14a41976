#!/usr/bin/env bash
# GPU checks (issue 22) on a machine with one NVIDIA GPU and no network, in at most about 8 minutes.
#
#   bash tools/gpu_check.sh --fetch-wheels   # here, with the package registry: the wheels the GPU image lacks, into .whl/
#   bash tools/gpu_check.sh [OUT_DIR]        # there: install .whl/, run the GPU tests and benchmarks, JSON into OUT_DIR
#
# The GPU image (../shared/docs/env-notes.md) has torch, transformers, triton, pyarrow, numba and pytest but not
# pydantic or zstandard; raydistill runs from the working tree (PYTHONPATH), without Ray or DeepSpeed: the benchmarks
# call the GPU cores directly. Each step writes <OUT_DIR>/<step>.json (its last output line) and <step>.log; a failed
# step is recorded and the next one still runs. Figures go to docs/benchmarks.md with the GPU named.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 zstandard==0.25.0)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  ls -la .whl
  exit 0
fi

OUT_DIR="${1:-${OUT:-gpu-check}}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT_DIR/gpu.txt"

step() {  # step NAME TIMEOUT_S COMMAND...: run, keep its log, its last line as NAME.json
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  tail -n 1 "$OUT_DIR/$name.log" > "$OUT_DIR/$name.json"
  echo "$name: rc=$rc in $((SECONDS - t0)) s: $(head -c 400 "$OUT_DIR/$name.json")"
}

# 1. the GPU tests: fused loss head, packed attention and the Triton capture head, against the CPU-tested references
step tests 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu
# 2. training step: a 230M student (h1024 x 6 layers) at V = 151,936, 8k tokens/step, bf16
step train_230m 120 python3 tools/bench_train.py --device cuda --bf16 --vocab 151936 --hidden 1024 --layers 6 \
  --tokens 8192 --seq-len 2048 --steps 8 --warmup 2 --memory-steps 2
# 3. packed attention at seq_len 4096: dense mask against position ids (SDPA, FlexAttention, flash if installed)
step attention_4096 90 python3 tools/bench_attention.py --device cuda --seq-len 4096 --tokens 16384 --hidden 1024 \
  --layers 4 --steps 5
# 4. capture on a random 1.6B Llama-shaped teacher (h2048 x 24, untied, V = 151,936), 16k tokens per batch, bf16;
#    its head through the Triton kernels (gpu_kernels) and, same batches, through torch's ops
step capture_1p6b 150 python3 tools/bench_capture.py --random-teacher 2048x24 --vocab 151936 --no-ray \
  --batch-tokens 16384 --max-length 2048 --dtype bfloat16 --documents 64 --rounds 2
ls -la "$OUT_DIR"
