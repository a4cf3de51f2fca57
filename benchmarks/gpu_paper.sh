#!/usr/bin/env bash
# SmolLM2-135M at the paper's scale on one GPU (128 x 2048 WikiText-2 calibration windows,
# seed 2, whole 147-window WikiText-2 test split), FP and RTN measured in the same runs.
# usage: bash benchmarks/gpu_paper.sh MODEL_DIR GGUF_FILE OUT_DIR BUDGET_SECONDS
#   1. W3A16 (LWC, 20 epochs), compiled step recorded as a CUDA graph, alone on the GPU: the timing
#      judged against the official code's 1,120 s and the <= 150 s goal.
#   2. Then, side by side on the same GPU in what is left of BUDGET_SECONDS: W6A6 and W4A4
#      (LWC+LET), W3A16g64 (LWC). Their epochs are sized from part 1's measured ms/step so that
#      they end in time (capped at the paper's 20); the JSON says how many ran. Their times are
#      not speed results (they share the GPU).
# Smaller for a CPU smoke run: NSAMPLES=2 SEQLEN=64 EPOCHS=1 EVAL_WINDOWS=1 COMPILE=off ...
# On the lent GPU machine (no network; its image lacks gguf): the 98 MB GGUF travels in two calls
# (`split -b 50M` into two git-ignored folders; the first call copies its half to /root, the second,
# sent within 30 s, joins them), the gguf wheel is installed with `pip install --no-index --target`,
# and a copy of ../shared/data/wikitext2 travels too, read through OMNIQUANT_DATA_DIR.
# LET_EXTRA=--no-let-up-down runs W6A6/W4A4 with the paper's LET alone (quant.let_up_down off).
set -u
MODEL=$1; GGUF=$2; OUT=$3; BUDGET=$4
NSAMPLES=${NSAMPLES:-128}; SEQLEN=${SEQLEN:-2048}; EPOCHS=${EPOCHS:-20}; EVAL_WINDOWS=${EVAL_WINDOWS:-0}
COMPILE=${COMPILE:-block+graph}; SLOWDOWN=${SLOWDOWN:-4}  # assumed cost of LET + shared GPU vs part 1
LET_EXTRA=${LET_EXTRA:-}  # e.g. LET_EXTRA=--no-let-up-down for the paper's LET alone
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
started=$(date +%s)
speed() {  # name, seconds, speed.py arguments...
    local name=$1 limit=$2; shift 2
    echo "== $name (limit $limit s) $(date +%T)"
    timeout "$limit" python benchmarks/speed.py --model "$MODEL" --gguf-file "$GGUF" --nsamples "$NSAMPLES" \
        --seqlen "$SEQLEN" --eval-windows "$EVAL_WINDOWS" --baselines --output "$OUT/$name.json" \
        --work-dir "outputs/gpu-paper/$name" "$@" \
        > "$OUT/$name.log" 2>&1
    echo "   $name exit $? $(date +%T)"
}
speed w3a16 $((BUDGET - 60)) --wbits 3 --epochs "$EPOCHS" --compile "$COMPILE"
grep -E "^block|perplexity|ppl" "$OUT/w3a16.log" | tail -4
left=$((BUDGET - ($(date +%s) - started) - 15))
# epochs that fit: 30 blocks x NSAMPLES steps at part 1's all-in ms/step x SLOWDOWN, after ~45 s of load and eval
ms=$(python -c "import json;print(json.load(open('$OUT/w3a16.json'))['rows'][0]['ms_per_step'])" 2>/dev/null || echo 8)
fit=$(python -c "print(max(1, min($EPOCHS, int(($left - 45) * 1000 / (30 * $NSAMPLES * $ms * $SLOWDOWN)))))")
echo "== side by side: $left s left, part 1 $ms ms/step -> $fit epochs (LET), $((fit * 2 > EPOCHS ? EPOCHS : fit * 2)) (LWC)"
if [ "$left" -gt 90 ]; then
    speed w6a6 "$left" --wbits 6 --abits 6 --let $LET_EXTRA --epochs "$fit" --compile "$COMPILE" &
    speed w4a4 "$left" --wbits 4 --abits 4 --let $LET_EXTRA --epochs "$fit" --compile "$COMPILE" &
    speed w3a16g64 "$left" --wbits 3 --group-size 64 --epochs $((fit * 2 > EPOCHS ? EPOCHS : fit * 2)) \
        --compile "$COMPILE" &
    wait
fi
for name in w6a6 w4a4 w3a16g64; do [ -f "$OUT/$name.log" ] && grep -E "^block" "$OUT/$name.log" | tail -2; done
tar czf "$OUT/logs.tar.gz" -C "$OUT" $(cd "$OUT" && ls *.log) && rm -f "$OUT"/*.log
echo "done in $(($(date +%s) - started)) s"
