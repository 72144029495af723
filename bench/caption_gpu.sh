#!/usr/bin/env bash
# audiodata caption device check: one script for one `run`, at most ~290 s of wall time, all under $OUT.
#
# Captions/s of the listen step (Qwen2-Audio-7B-shaped) and the write step (Qwen2-7B-shaped), random
# weights in bf16 built on the GPU from configs (no download), at batch 1, 8 and 32:
#   1. listen, transformers (the step's TransformersListener, 128-token answers, 10 s clips, 3 questions)
#   2. write, transformers (the step's TransformersWriter, 64-token captions)
#   3. listen and 4. write through vLLM's offline engine (dummy weights) where `import vllm` works;
#      else each says why not.
# Each step is its own process (bench/caption_gpu.py) under a time limit, writing its JSON after
# every batch size, so a step cut short keeps what it measured; the summary ends the log.
# Without a GPU it runs the same steps with the tiny models' shapes on CPU (how it is tested off the
# device; under two minutes).
#
#   bash bench/caption_gpu.sh            # OUT=/tmp/caption_gpu by default
set -uo pipefail
OUT=${OUT:-/tmp/caption_gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${CAPTION_GPU_BUDGET:-290}  # seconds this script may use in all
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec > >(tee -a "$OUT/caption_gpu.log") 2>&1

left() { echo $((BUDGET - SECONDS)); }
step() { echo; echo "=== [$SECONDS s] $*"; }
# A step's time limit: its share, or what is left less what the later steps need, at least $3 s.
limit() { local t=$(( $(left) - $2 )); [ "$t" -gt "$1" ] && t=$1; [ "$t" -lt "$3" ] && t=$3; echo "$t"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
if VLLM=$($PY -c "import vllm; print(vllm.__version__)" 2>&1); then
    echo "vllm $VLLM"; HAVE_VLLM=1
else
    echo "vllm: not importable here: $(echo "$VLLM" | tail -1)"; HAVE_VLLM=0
fi

# Shares of the budget (seconds): with vLLM its engines' start-up needs about a minute each.
if [ "$HAVE_VLLM" = 1 ]; then SHARES="95 55 70 60"; else SHARES="150 110 10 10"; fi
read -r S_LISTEN S_WRITE S_VLISTEN S_VWRITE <<<"$SHARES"
phase() {  # phase STEP ENGINE SHARE RESERVE
    local t; t=$(limit "$3" "$4" 20)
    step "$1 / $2 (at most $t s)"
    timeout --kill-after=5 "$t" $PY bench/caption_gpu.py --step "$1" --engine "$2" --json "$OUT/$1_$2.json" \
        --seconds $(( t - 10 ))
    echo "$1 / $2 exit $?"
}
phase listen transformers "$S_LISTEN" $(( S_WRITE + S_VLISTEN + S_VWRITE ))
phase write transformers "$S_WRITE" $(( S_VLISTEN + S_VWRITE ))
phase listen vllm "$S_VLISTEN" "$S_VWRITE"
phase write vllm "$S_VWRITE" 0

step "summary"
$PY bench/caption_gpu.py --summary "$OUT"/listen_*.json "$OUT"/write_*.json | tee "$OUT/summary.txt"
echo "done in $SECONDS s"
