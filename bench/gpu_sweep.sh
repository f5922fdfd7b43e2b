#!/usr/bin/env bash
# A/B of the levers on jaxlm's GPU step at GPT-2 small's shape (issue #16 item 6), one fresh process
# per variant so XLA flags apply: bench/train.py --configs gpt2 at bf16, the variant's config overrides
# and XLA flags, tokens/s and MFU against the nominal peak. The default run first, so every other
# row compares with a figure from the same machine and session. Written for a short lease: about 40 s
# per variant on an H200 (most of it compilation), each under its own time limit.
#
#     bash bench/gpu_sweep.sh [RESULT_DIR]      # default bench/results/<device>/sweep
#     CONFIG=tiny DTYPE=float32 STEPS=3 bash bench/gpu_sweep.sh /tmp/s   # the script itself, on a CPU
#
# Variants are lines of VARIANTS below: a name, then `--set key=value` flags and/or `XLA_FLAGS=...`.
set -u
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # jaxlm from this checkout, installed or not
export PYTHONUNBUFFERED=1
device=$($py -c "import jax; print(jax.devices()[0].device_kind.split()[-1].lower())" 2>/dev/null || echo gpu)
dir=${1:-bench/results/$device/sweep}
config=${CONFIG:-gpt2}
dtype=${DTYPE:-bfloat16}
steps=${STEPS:-20}
nominal=${NOMINAL:-h100}
limit=${LIMIT:-120}
mkdir -p "$dir"

VARIANTS="default
fuse_qkv --set model.fuse_qkv=on
scan_layers --set model.scan_layers=true
batch32 --set data.batch_size=32
no_command_buffers XLA_FLAGS=--xla_gpu_enable_command_buffer=
no_triton_gemm XLA_FLAGS=--xla_gpu_enable_triton_gemm=false
xla_attention --set model.attention=xla"

while read -r name rest; do
  flags=() xla=""
  for word in $rest; do
    case $word in
      XLA_FLAGS=*) xla=${word#XLA_FLAGS=} ;;
      *) flags+=("$word") ;;
    esac
  done
  echo "=== $name: ${flags[*]:-} ${xla:+XLA_FLAGS=$xla}"
  t0=$SECONDS
  # XLA reads a value that does not start with "--" as a file name: join only what is there.
  flags_env=$(echo "${XLA_FLAGS:-} $xla" | xargs)
  env ${flags_env:+XLA_FLAGS="$flags_env"} timeout "$limit" $py bench/train.py --configs "$config" --dtypes "$dtype" \
    --nominal "$nominal" --steps "$steps" --no_measure_peak "${flags[@]}" --out "$dir/$name.json" 2>&1 |
    grep -E "tok/s|Error|error" | grep -v "^tok/s\|^config"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
done <<<"$VARIANTS"
$py - "$dir" <<'EOF'
import glob, json, os, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    r = json.load(open(path))["results"][0]
    rows.append((os.path.basename(path)[:-5], r["tokens_per_s"], r.get("mfu_nominal"), r["step"]["median_s"]))
base = dict((n, t) for n, t, _, _ in rows).get("default")
for name, tps, mfu, step in rows:
    ratio = f"{tps / base:.3f}x" if base else "-"
    mfu_s = f"{mfu:.1%}" if mfu else "-"
    print(f"{name:<20} {tps:>12,.0f} tok/s  {step * 1e3:7.1f} ms  MFU {mfu_s:>6}  vs default {ratio}")
EOF
