"""One peer quantizer on one setting, run inside that peer's own virtual environment (peers.py makes
it); never imported by the project. It reads the model folder and the calibration token ids that
peers.py wrote, quantizes with the peer's public API at its documented defaults (scaled to the data),
and writes every block linear's fake-quantized (de-quantized) weight plus a report:

    python peer_quantize.py --method gptq --wbits 4 --group-size 64 --model DIR --calib ids.pt --out DIR

Methods: gptq, awq (llm-compressor), autoround (auto-round), all on the same asymmetric integer grid
as ours (a zero point per channel or group).
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import time
from importlib import metadata
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, choices=("gptq", "awq", "autoround"))
    parser.add_argument("--wbits", type=int, required=True)
    parser.add_argument("--group-size", type=int, default=0, help="0 = per output channel")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calib", type=Path, required=True, help="calibration token ids, (n, seqlen) int64")
    parser.add_argument("--check", type=Path, required=True, help="one evaluation window, (1, seqlen) int64")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--autoround-iters", type=int, default=200, help="its default")
    parser.add_argument("--autoround-batch-size", type=int, default=8, help="its default")
    parser.add_argument("--autoround-lr", type=float, default=None, help="its default: 1/iters")
    return parser.parse_args()


def window_nll(model, window: torch.Tensor) -> float:
    """The window's mean next-token NLL (the project's perplexity protocol, one window)."""
    with torch.no_grad():
        logits = model(input_ids=window, use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:]).item()


def llm_compressor(model, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    weights = QuantizationArgs(num_bits=args.wbits, type="int", symmetric=False,
                               strategy="group" if args.group_size else "channel",
                               group_size=args.group_size or None)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if args.method == "gptq":  # defaults: block_size 128, dampening 0.01, static activation order
        recipe = [GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    else:  # AWQ's scale search (its default mappings for the Llama family), then the quantizer
        from llmcompressor.modifiers.transform import AWQModifier

        recipe = [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    if not torch.cuda.is_available():  # AWQ pins its activation cache for GPU copies, which fails without a GPU
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None  # pinning only speeds copies up
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=len(ids))
    return {"llmcompressor": metadata.version("llmcompressor"), "recipe": [str(r) for r in recipe]}


def fake_quantized_llm_compressor(model) -> dict[str, torch.Tensor]:
    """Every quantized linear's weight as the format stores it, de-quantized (fake_quantize of the
    weight with its attached scale, zero point and activation-order index)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    weights = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None or not hasattr(module, "weight_scale"):
            continue
        args = scheme.weights
        g_idx = getattr(module, "weight_g_idx", None)
        weight = module.weight.detach()
        if g_idx is not None and args.actorder is not None:  # groups in activation order: re-gather
            weight = weight[:, torch.argsort(g_idx)]
            values = fake_quantize(weight, module.weight_scale, module.weight_zero_point, args)
            values = values[:, torch.argsort(torch.argsort(g_idx))]
        else:
            values = fake_quantize(weight, module.weight_scale, module.weight_zero_point, args)
        weights[f"{name}.weight"] = values.float().contiguous()
    return weights


def autoround(model, tokenizer, ids: torch.Tensor, args: argparse.Namespace) -> tuple[dict, dict]:
    """auto-round's SignRound (its defaults: iters 200, lr 1/iters, batch 8, min-max tuning; iters
    and batch as given), on our token ids; the de-quantized weights of the layers it quantized."""
    from auto_round import AutoRound

    rounder = AutoRound(model, tokenizer=tokenizer, bits=args.wbits, group_size=args.group_size or -1, sym=False,
                        dataset=[window.unsqueeze(0) for window in ids], nsamples=len(ids), seqlen=ids.shape[1],
                        iters=args.autoround_iters, batch_size=args.autoround_batch_size, device_map="cpu",
                        **({"lr": args.autoround_lr} if args.autoround_lr is not None else {}))
    rounder.quantize()
    weights = {f"{name}.weight": module.weight.detach().float().contiguous() for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and ".layers." in name}
    return {"auto-round": metadata.version("auto-round"), "iters": args.autoround_iters,
            "batch_size": args.autoround_batch_size, "lr": args.autoround_lr or 1 / args.autoround_iters,
            "sym": False}, weights


def levels_per_group(weight: torch.Tensor, group_size: int) -> int:
    rows = weight.reshape(-1, group_size or weight.shape[1])
    return max(len(torch.unique(row)) for row in rows[:64])


def main() -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = torch.load(args.calib, weights_only=True)
    check = torch.load(args.check, weights_only=True)
    fp_nll = window_nll(model, check)
    started, cpu_started = time.perf_counter(), time.process_time()
    if args.method == "autoround":
        used, weights = autoround(model, tokenizer, ids, args)
    else:
        used = llm_compressor(model, ids, args)
        weights = fake_quantized_llm_compressor(model)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    blocks = {k: v for k, v in weights.items() if ".layers." in k}
    # every other block parameter too: AWQ divides the norms before q/k/v and gate/up by its scales
    blocks.update({name: param.detach().float().contiguous() for name, param in model.named_parameters()
                   if ".layers." in name and name not in blocks})
    levels = max(levels_per_group(w, args.group_size) for w in weights.values())
    if levels > 2**args.wbits:
        raise SystemExit(f"{args.method}: {levels} distinct values in a group of a {args.wbits}-bit weight")
    save_file(blocks, str(args.out / "weights.safetensors"))
    report = {"method": args.method, "wbits": args.wbits, "group_size": args.group_size, "used": used,
              "versions": {name: metadata.version(name) for name in ("torch", "transformers")},
              "fp_check_window_nll": fp_nll, "quantized_linears": len(weights), "max_levels_per_group": levels,
              "seconds": seconds, "cpu_seconds": cpu_seconds,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    assert math.isfinite(fp_nll)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "used"}))


if __name__ == "__main__":
    main()
