#!/usr/bin/env bash
# Issue 6's speed table on one GPU, each part under its own time limit, results as JSON + logs:
#   7B-shaped block W3A16 LWC and W4A4 LWC+LET (reference eager vs compiled block step), and
#   SmolLM2-135M whole model W3A16 (paper scale: 128 x 2048, 20 epochs; and 2 epochs, reference
#   vs compiled, to check that both paths give the same perplexity).
# usage: bash benchmarks/gpu_suite.sh MODEL_DIR GGUF_FILE OUT_DIR [parts...]
#   parts: block-w3a16 model-w3a16 model-compare block-w4a4 (default, in that order), and
#          block-smollm2 (SmolLM2-shaped block: eager, compiled, compiled + CUDA graph; 1 and 16
#          steps per Lightning call; plain PyTorch loops for Lightning's overhead),
#          model-w3a16-graph (the whole-model run with train.cuda_graph),
#          block-70b-cache (70B-shaped block, compiled, caches on the GPU vs in pinned host memory)
# Smaller for a CPU smoke run: SHAPE=tiny NSAMPLES=4 SEQLEN=64 MODEL_EPOCHS=1 EVAL_WINDOWS=1 ...
set -u
MODEL=$1; GGUF=$2; OUT=$3; shift 3
PARTS=${*:-block-w3a16 model-w3a16 model-compare block-w4a4}
SHAPE=${SHAPE:-7b}; NSAMPLES=${NSAMPLES:-128}; SEQLEN=${SEQLEN:-2048}
MODEL_EPOCHS=${MODEL_EPOCHS:-20}; EVAL_WINDOWS=${EVAL_WINDOWS:-0}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
run() {  # name, seconds, speed.py arguments...
    local name=$1 limit=$2; shift 2
    echo "== $name (limit $limit s) $(date +%T)"
    timeout "$limit" python benchmarks/speed.py "$@" --nsamples "$NSAMPLES" --seqlen "$SEQLEN" \
        --output "$OUT/$name.json" > "$OUT/$name.log" 2>&1
    echo "   exit $? $(date +%T)"; grep -v "^block \|INFO\|Warning\|warn" "$OUT/$name.log" | tail -12
}
for part in $PARTS; do
    case $part in
    block-w3a16) run block-w3a16 ${LIMIT_BLOCK:-150} --shape "$SHAPE" --wbits 3 --epochs 2 --compare --compile block ;;
    block-w4a4) run block-w4a4 ${LIMIT_BLOCK:-150} --shape "$SHAPE" --wbits 4 --abits 4 --let --epochs 2 --compare --compile block ;;
    model-w3a16) run model-w3a16 ${LIMIT_MODEL:-250} --model "$MODEL" --gguf-file "$GGUF" --wbits 3 \
        --epochs "$MODEL_EPOCHS" --eval-windows "$EVAL_WINDOWS" --baselines --compile block ;;
    block-smollm2) run block-smollm2 ${LIMIT_BLOCK:-150} --shape smollm2 --wbits 3 --epochs 3 --compare \
        --compile block block+graph --steps-per-call 16 1 --plain-loop ;;
    block-70b-cache)
        run block-70b-gpu-cache ${LIMIT_BLOCK:-150} --shape 70b --wbits 3 --epochs 2 --compile block --cache-device accelerator
        run block-70b-host-cache ${LIMIT_BLOCK:-150} --shape 70b --wbits 3 --epochs 2 --compile block --cache-device cpu ;;
    model-w3a16-graph) run model-w3a16-graph ${LIMIT_MODEL:-250} --model "$MODEL" --gguf-file "$GGUF" --wbits 3 \
        --epochs "$MODEL_EPOCHS" --eval-windows "$EVAL_WINDOWS" --compile block+graph ;;
    model-compare) run model-compare ${LIMIT_COMPARE:-170} --model "$MODEL" --gguf-file "$GGUF" --wbits 3 \
        --epochs 2 --eval-windows "$EVAL_WINDOWS" --compare --compile block ;;
    *) echo "unknown part $part" ;;
    esac
done
