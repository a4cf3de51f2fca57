"""The paper-scale SmolLM2-135M table: FP / RTN / ours beside the official code's numbers.

    python benchmarks/paper_table.py            # reads benchmarks/results/paper-smollm2-135m-*-<card>.json

Each JSON comes from `bash benchmarks/gpu_paper.sh` (or `benchmarks/speed.py --model ... --baselines`):
128 x 2048 WikiText-2 validation windows (seed 2), whole WikiText-2 test split (147 x 2048).
The official column is the official OmniQuant code on one H100 with the same model, data and
protocol (128 x 2048 WikiText-2 windows, the whole test split). Prints the markdown table and writes it beside the JSON files.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = ["W3A16", "W3A16g64", "W2A16g64", "W6A6", "W4A4"]
# official OmniQuant code, H100 (its reference run): FP, RTN, OmniQuant perplexity, calibration seconds
OFFICIAL = {
    "W3A16": {"fp": 21.97, "rtn": 748.9, "omniquant": 65.99, "seconds": 1120},
    "W3A16g64": {"fp": 21.97, "rtn": 78.85},
    "W2A16g64": {"fp": 21.97, "rtn": 1.05e6},
    "W6A6": {"fp": 21.97, "rtn": 28.30},
    "W4A4": {"fp": 21.97, "rtn": 2122},
}


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if value >= 1e4 else f"{value:.2f}"


def table(card: str) -> str:
    lines = [
        "| setting | epochs | FP | RTN (official) | RTN (ours) | official OmniQuant | **ours** | ours − official | "
        "calibration s (official, H100) | calibration s (ours) | peak GPU GiB (ours) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for setting in SETTINGS:
        path = RESULTS / f"paper-smollm2-135m-{setting}-{card}.json"
        if not path.is_file():
            continue
        report = json.loads(path.read_text())
        row = report["rows"][0]
        ppl, official = row["perplexity"], OFFICIAL[setting]
        gap = (f"{100 * (ppl['omniquant'] / official['omniquant'] - 1):+.1f} %" if "omniquant" in official else "—")
        seconds = f"{row['calibration_seconds']:.0f}" + ("" if report.get("run_alone_on_gpu") else " (shared GPU)")
        epochs = f"{report['epochs']}" + (" + aug" if "aug" in report["setting"] else "")
        lines.append(
            f"| {setting}{' LWC+LET' if 'LET' in report['setting'] else ' LWC'} | {epochs} | {fmt(ppl.get('fp'))} | "
            f"{fmt(official['rtn'])} | {fmt(ppl.get('rtn'))} | {fmt(official.get('omniquant'))} | "
            f"**{fmt(ppl['omniquant'])}** | {gap} | {official.get('seconds', '—')} | {seconds} | {row['peak_gpu_gib']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", default="h200", help="file-name suffix of the runs (h100, h200)")
    args = parser.parse_args(argv)
    text = table(args.card)
    print(text)
    (RESULTS / f"paper-smollm2-135m-{args.card}.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
