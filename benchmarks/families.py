"""Every architecture entry, calibrated end to end on a tiny random model (CPU, under a minute).

    python benchmarks/families.py                  # all families
    python benchmarks/families.py --only falcon-40b mixtral

Each family's tiny model comes from the test suite's builders (a transformers config class, random
weights), is calibrated W4A4 with LWC+LET (weight-only W4A16 for a model without a table entry)
on CPython's documentation text, and is scored on it: FP, RTN and OmniQuant perplexity and each
block's RTN -> initial -> final loss. Random tiny models have no language to lose, so perplexity
only shows the pipeline runs; the block losses show the calibration does its job. Writes
benchmarks/results/families-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model builders live beside the tests that use them

from rich.console import Console
from rich.table import Table

from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig, calibrate
from omniquant_pl.versions import software_versions


def _builders() -> dict:
    """family label -> (builder of the tiny model, weight-only?)."""
    from conftest import tiny_llama, tiny_opt
    from test_falcon import tiny_falcon
    from test_gemma3 import tiny_gemma3
    from test_generic_arch import tiny_gpt_neox
    from test_moe import tiny_moe
    from test_phi3 import tiny_phi3

    return {
        "llama": (tiny_llama, False),
        "opt": (tiny_opt, False),
        "phi3": (tiny_phi3, False),
        "phi3-partial-rotary": (lambda: tiny_phi3(partial_rotary_factor=0.75), False),
        "falcon-7b": (lambda: tiny_falcon("7b"), False),
        "falcon-40b": (lambda: tiny_falcon("40b"), False),
        "falcon-rw": (lambda: tiny_falcon("rw"), False),
        "mixtral": (lambda: tiny_moe("mixtral"), False),
        "qwen3_moe": (lambda: tiny_moe("qwen3_moe"), False),
        "gemma3_text": (tiny_gemma3, False),
        "gpt_neox (generic)": (tiny_gpt_neox, True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=None, help="family labels to run (default: all)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "families-cpu.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from conftest import build_tokenizer

    tokenizer = build_tokenizer()
    builders = _builders()
    unknown = sorted(set(args.only or []) - set(builders))
    if unknown:
        sys.exit(f"unknown families {unknown}; choose from {', '.join(builders)}")
    rows = []
    for label in args.only or list(builders):
        build, weight_only = builders[label]
        quant = QuantConfig(wbits=4, group_size=16) if weight_only else QuantConfig(wbits=4, abits=4, let=True,
                                                                                   group_size=16)
        with tempfile.TemporaryDirectory() as out:
            cfg = RunConfig(model=ModelConfig("in-memory"), quant=quant,
                            calib=CalibConfig(source="pydoc", nsamples=8, seqlen=64),
                            train=TrainConfig(epochs=2, batch_size=1),
                            eval=EvalConfig(datasets=["pydoc"], seqlen=64, max_windows=4, baselines=["fp", "rtn"]),
                            output_dir=out, save_model=False)
            started = time.perf_counter()
            results = calibrate(cfg, model=build(), tokenizer=tokenizer)
        ppl = {method: results.perplexity[method]["pydoc"].ppl for method in ("fp", "rtn", "omniquant")}
        blocks = [{key: getattr(block, key) for key in ("block", "rtn_loss", "init_loss", "final_loss", "expert_tokens")
                   if getattr(block, key) is not None} for block in results.blocks]
        rows.append({"family": label, "setting": quant.tag, "ppl": ppl, "blocks": blocks,
                     "seconds": time.perf_counter() - started})
        for block in blocks:
            experts = f", tokens per expert {block['expert_tokens']}" if "expert_tokens" in block else ""
            print(f"{label} {quant.tag} block {block['block']}: rtn {block['rtn_loss']:.4g} -> init "
                  f"{block['init_loss']:.4g} -> final {block['final_loss']:.4g}{experts}", flush=True)

    table = Table(title="Tiny random model per family: pydoc perplexity and summed block losses")
    for column in ("family", "setting", "FP", "RTN", "OmniQuant", "block loss RTN", "block loss final", "s"):
        table.add_column(column, justify="left" if column in ("family", "setting") else "right")
    for row in rows:
        table.add_row(row["family"], row["setting"], *(f"{row['ppl'][m]:.2f}" for m in ("fp", "rtn", "omniquant")),
                      f"{sum(b['rtn_loss'] for b in row['blocks']):.4g}",
                      f"{sum(b['final_loss'] for b in row['blocks']):.4g}", f"{row['seconds']:.0f}")
    Console(width=max(Console().width, 120)).print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"versions": software_versions(), "device": "cpu", "calibration": "pydoc 8 x 64, 2 epochs, batch 1",
                                       "evaluation": "pydoc, 4 windows of 64", "rows": rows}, indent=2))
    print(f"wrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")


if __name__ == "__main__":
    main()
