#!/usr/bin/env bash
# The speed table on one GPU, each part under its own time limit, results as JSON + logs.
# usage: bash benchmarks/gpu_suite.sh MODEL_DIR GGUF_FILE OUT_DIR [parts...]
# Parts, the default list in order of what is still owed:
#   model-compare      the same at 2 epochs: reference (eager), compiled, compiled + CUDA graph, each
#                      with WikiText-2 perplexity (the fast paths must match the reference's quality)
#   block-smollm2      SmolLM2-shaped block: eager, compiled, compiled + CUDA graph; 1 and 16 steps
#                      per Lightning call; plain PyTorch loops for Lightning's overhead
#   block-70b-cache    70B-shaped block, compiled, caches on the GPU vs in pinned host memory
# Measured already (session 2), by name: block-w3a16 and block-w4a4 (7B-shaped block, reference vs
# compiled), model-w3a16 (whole model, compiled, 20 epochs, with FP/RTN baselines); session 5,
# model-w3a16-graph (whole model with the CUDA-graph step, 62 s on an H200: benchmarks/gpu_paper.sh).
# Smaller for a CPU smoke run: SHAPE=tiny NSAMPLES=4 SEQLEN=64 MODEL_EPOCHS=1 EVAL_WINDOWS=1 ...
set -u
MODEL=$1; GGUF=$2; OUT=$3; shift 3
PARTS=${*:-model-compare block-smollm2 block-70b-cache}
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
    block-smollm2) run block-smollm2 ${LIMIT_SMOLLM2:-100} --shape smollm2 --wbits 3 --epochs 3 --compare \
        --compile block block+graph --steps-per-call 16 1 --plain-loop ;;
    block-70b-cache)
        run block-70b-gpu-cache ${LIMIT_70B:-90} --shape 70b --wbits 3 --epochs 2 --compile block --cache-device accelerator
        run block-70b-host-cache ${LIMIT_70B:-90} --shape 70b --wbits 3 --epochs 2 --compile block --cache-device cpu ;;
    model-w3a16-graph) run model-w3a16-graph ${LIMIT_MODEL:-240} --model "$MODEL" --gguf-file "$GGUF" --wbits 3 \
        --epochs "$MODEL_EPOCHS" --eval-windows "$EVAL_WINDOWS" --compile block+graph ;;
    model-compare) run model-compare ${LIMIT_COMPARE:-240} --model "$MODEL" --gguf-file "$GGUF" --wbits 3 \
        --epochs 2 --eval-windows "$EVAL_WINDOWS" --compare --compile block block+graph ;;
    *) echo "unknown part $part" ;;
    esac
done
