#!/usr/bin/env bash
# clap-train device check: one script for one `run`, about 300 s of wall time, everything under $OUT.
#
#   1. throughput (bench/clap_throughput.py): HTSAT-tiny + RoBERTa-base-sized text tower, bf16,
#      batch 128 and 256, eager and with the Swin stages under torch.compile (clap-train's default
#      on CUDA): samples/s, MFU from counted FLOPs, GPU busy from torch.profiler and NVML,
#      model-only and (compiled) fed by the real loader; a kernel table per variant at batch 256.
#      The 2026-11-26 run spent ~100 s of its 210 in compilation and the compiled loader-fed part
#      was cut off; the model-only rows are now written before the loader-fed part starts;
#   2. clap-train bf16 smoke run (a few steps, --compile when time allows, evaluation, checkpoint);
#   3. loader alone: samples/s with 1 worker and with cores-1 workers.
#
# Needs no network: the shards are prebuilt from tests/data (out/clap_bench_shards, carried) and
# the wheels torch's image lacks are carried in .whl. Without a GPU it runs the same steps at
# CPU size (tiny model, small batches, eager), which is how it is tested off the device.
#
#   bash bench/clap_gpu.sh            # OUT=/tmp/clap_gpu by default
set -uo pipefail
OUT=${OUT:-/tmp/clap_gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${CLAP_GPU_BUDGET:-295}  # seconds this script may use in all
SHARDS=${CLAP_BENCH_SHARDS:-out/clap_bench_shards}
PATTERN="$SHARDS/{000000..000003}.tar"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/clap_gpu.log") 2>&1

left() { echo $((BUDGET - SECONDS)); }
step() { echo; echo "=== [$SECONDS s] $*"; }
# A stage's time limit: what is left less what the later stages need, at least $2 seconds.
limit() { local t=$(( $(left) - $1 )); [ "$t" -lt "$2" ] && t=$2; echo "$t"; }

if ! $PY -c "import webdataset, soundfile, braceexpand" 2>/dev/null; then
    step "installing carried wheels"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/webdataset-*.whl .whl/braceexpand-*.whl .whl/soundfile-*.whl .whl/cffi-*.whl .whl/pycparser-*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -f "$SHARDS/000000.tar" ] || { echo "no shards at $SHARDS (carry out/clap_bench_shards)"; exit 1; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
CORES=$(nproc)
WORKERS=$(( CORES > 1 ? CORES - 1 : 1 ))
echo "cores $CORES, loader workers $WORKERS"
if [ "$GPU" = 1 ]; then
    MODEL=htsat-tiny-roberta; BATCHES="128 256"; STEPS=20; WARMUP=5; LOADER_STEPS=30; PREC=bf16
    VARIANTS="eager compile@256,128"; LOADER_VARIANTS="compile"
    SMOKE_MODEL=htsat-tiny-roberta; SMOKE_BATCH=32; SMOKE_SAMPLES=128; LOADER_BATCH=64
else
    MODEL=tiny; BATCHES="4 8"; STEPS=2; WARMUP=1; LOADER_STEPS=3; PREC=fp32
    VARIANTS="eager"; LOADER_VARIANTS="eager"
    SMOKE_MODEL=tiny; SMOKE_BATCH=4; SMOKE_SAMPLES=8; LOADER_BATCH=4
fi

step "1. throughput ($MODEL, batches $BATCHES, $PREC, variants $VARIANTS, $WORKERS loader workers)"
timeout "$(limit 65 60)" \
    $PY bench/clap_throughput.py --model $MODEL --batch-sizes $BATCHES --steps $STEPS --warmup $WARMUP \
    --precision $PREC --variants $VARIANTS --loader-variants $LOADER_VARIANTS --train-data "$PATTERN" --workers $WORKERS \
    --loader-steps $LOADER_STEPS --json "$OUT/throughput.json" --profile "$OUT/profile"
echo "throughput exit $?"

# The smoke run compiles too (the default on CUDA) when the time left allows a fresh compilation.
COMPILE=--compile; [ "$GPU" = 1 ] && [ "$(left)" -lt 150 ] && COMPILE=--no-compile
[ "$GPU" = 1 ] || COMPILE=--no-compile
step "2. clap-train smoke ($SMOKE_MODEL, $PREC, $COMPILE)"
TEXT_ARGS=()
if [ "$GPU" = 1 ]; then
    # A RoBERTa-base-shaped encoder saved locally: exercises the from_pretrained(path) route offline.
    $PY - <<'EOF'
from transformers import RobertaConfig, RobertaModel
from clap_model.text import byte_tokenizer
tok = byte_tokenizer()
cfg = RobertaConfig(vocab_size=len(tok), max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                    bos_token_id=0, eos_token_id=2)
RobertaModel(cfg).save_pretrained("/tmp/roberta-random")
tok.save_pretrained("/tmp/roberta-random")
print("saved /tmp/roberta-random")
EOF
    TEXT_ARGS=(--text-model /tmp/roberta-random)
fi
rm -rf "/tmp/smoke-$SMOKE_MODEL"
timeout "$(limit 35 20)" $PY -m clap_model.main --train-data "$PATTERN" --val-data "$PATTERN" \
    --model $SMOKE_MODEL "${TEXT_ARGS[@]}" --epochs 1 --train-num-samples $SMOKE_SAMPLES --batch-size $SMOKE_BATCH \
    --workers $WORKERS --precision $PREC --warmup 2 --log-every 2 --grad-clip-norm 1.0 $COMPILE --out "/tmp/smoke-$SMOKE_MODEL"
echo "smoke exit $?"
ls -la "/tmp/smoke-$SMOKE_MODEL"/*.pt 2>/dev/null
step "3. loader alone: samples/s per worker"
for w in $(printf "1\n%s\n" "$WORKERS" | sort -un); do
    timeout "$(limit 3 10)" $PY bench/clap_loader.py --train-data "$PATTERN" --workers $w \
        --batches $(( w * 3 + 1 )) --batch-size $LOADER_BATCH --json "$OUT/loader_w$w.json" | grep samples_per
done

step "done"
