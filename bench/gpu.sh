#!/usr/bin/env bash
# The GPU figures of issue #16 item 6, in one run: the device's matmul peak, jaxlm's train step at
# GPT-2 small's shape (bench/train.py's gpt2 config: 12 layers, 768 wide, seq 1024, bf16, cuDNN flash
# attention through model.attention=dot_product) at batch 16 and 32 with MFU against the device's
# nominal peak, the nanoGPT-style PyTorch reference on the same GPU with torch.compile, and a
# jax.profiler trace of jaxlm's step (op time by kind; the raw trace stays under /tmp/jaxlm-gpu-trace).
#
#     bash bench/gpu.sh [RESULT_DIR]     # default bench/results/<device>, e.g. bench/results/h200
#
# Needs jax with CUDA, flax, optax, orbax-checkpoint, torch, and jaxlm's other imports of the train
# step: grain, array_record, ml_collections (plus portpicker for grain); on a machine without
# network, bring those as wheels (`pip download --no-deps --python-version 3.12 ...`) and install
# them with `pip install --no-index --no-deps --target DIR`, DIR on PYTHONPATH.
# Figures only. Each part runs on even if another fails, so one bad part does not cost the others.
set -u
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # jaxlm from this checkout, installed or not
device=$($py -c "import jax; print(jax.devices()[0].device_kind.split()[-1].lower())" 2>/dev/null || echo gpu)
dir=${1:-bench/results/$device}
mkdir -p "$dir"
nominal=${NOMINAL:-h100}  # jaxlm.hardware's preset; the H200 has the H100's arithmetic (989 TFLOP/s dense bf16)
export PYTHONUNBUFFERED=1

part() {  # part NAME SECONDS COMMAND...: run one part under a time limit, log it, say how it ended
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$dir/$name.log" | grep -v "^WARNING\|^I0000\|^W0000"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
$py -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
# In order of what matters most, should the whole run be cut short.
part peak 60 $py bench/peak.py --seconds 0.5 --sizes 4096,8192 --no_model_shapes --out bench/results/peak.json
cp bench/results/peak.json "$dir/peak.json"
part train_gpt2_b16 180 $py bench/train.py --configs gpt2 --dtypes bfloat16 --nominal "$nominal" --steps 20 \
  --out "$dir/train_gpt2_b16.json"
# JAX in the PyTorch process (the shared FLOPs formula and config) must not take the GPU's memory.
part torch_gpt2 200 env XLA_PYTHON_CLIENT_PREALLOCATE=false $py bench/torch_baseline.py --configs gpt2 --device cuda \
  --compile --dtypes bfloat16 --nominal "$nominal" --steps 20 --out "$dir/torch_gpt2_b16.json"
part profile_gpt2 120 $py bench/profile_step.py --configs gpt2 --dtype bfloat16 --steps 3 --top 25 \
  --trace_dir /tmp/jaxlm-gpu-trace --out "$dir/profile_gpt2_bfloat16.json"
part train_gpt2_b32 150 $py bench/train.py --configs gpt2 --dtypes bfloat16 --nominal "$nominal" --steps 20 \
  --set data.batch_size=32 --out "$dir/train_gpt2_b32.json"
ls -la "$dir"
echo "trace (not kept in the results): $(find /tmp/jaxlm-gpu-trace -name '*.trace.json.gz' 2>/dev/null)"
