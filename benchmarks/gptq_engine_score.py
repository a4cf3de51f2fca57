"""Perplexity of a GPTQ checkpoint as transformers runs it with GPTQModel's kernels, run inside the
GPTQModel environment that gptq_engine.py makes (never imported by the project):

    python gptq_engine_score.py --model EXPORT_DIR --windows windows.pt --out score.json

windows.pt holds the evaluation windows, (n, 2048) int64; the score is exp of the mean next-token
NLL over them (the project's perplexity protocol).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from importlib import metadata
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--windows", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, device_map="cpu", dtype=getattr(torch, args.dtype)).eval()
    loaded = time.perf_counter() - started
    kernel = type(model.model.layers[0].self_attn.q_proj).__name__
    windows = torch.load(args.windows, weights_only=True)  # (n, seqlen)
    nlls = []
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits.float()  # (1, seqlen, vocab)
            nlls.append(torch.nn.functional.cross_entropy(logits[0, :-1], window[1:]).item())
    args.out.write_text(json.dumps({
        "ppl": math.exp(sum(nlls) / len(nlls)), "window_nll": nlls, "kernel": kernel, "dtype": args.dtype,
        "load_seconds": round(loaded, 1), "versions": {p: metadata.version(p) for p in ("gptqmodel", "transformers", "torch")},
    }, indent=2))


if __name__ == "__main__":
    main()
