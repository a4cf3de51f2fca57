"""How much of a block's output the largest tokens hold: SmolLM2-135M's massive activations.

    python benchmarks/token_sizes.py            # seed 2's 16 x 512 calibration windows (the official-ids protocol's)

For each block, over every token of the calibration windows: the share of the summed per-token
mean square of the FP block's output held by the largest token of each window, how many of those
are the window's first token (the attention sink), and the largest token's size over the median
token's. Plain MSE weighs a token's error by roughly its size, so a share near 1 means the block
loss is that few tokens' error (train.loss relative_mse weighs tokens alike). Prints a table and
writes benchmarks/results/token-sizes-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import SMOLLM2, official_ids_calibration_file

from omniquant_pl.calib.data import calibration_windows
from omniquant_pl.models import load_model_and_tokenizer
from omniquant_pl.versions import software_versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-seed", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "token-sizes-cpu.json")
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(SMOLLM2, torch.device("cpu"))
    calib_file = official_ids_calibration_file(ROOT / "outputs" / "bench-official-ids")
    windows = calibration_windows(tokenizer, str(calib_file), 16, 512, args.calib_seed)[0]  # (16, 512)
    rows = []
    with torch.no_grad():
        hidden_states = model(input_ids=windows, output_hidden_states=True).hidden_states
    for block, output in enumerate(hidden_states[1:]):
        size = output.float().pow(2).mean(-1)  # (windows, tokens): each token's mean square
        largest, position = size.max(-1)  # (windows,)
        rows.append({
            "block": block,
            "largest_token_per_window_share": (largest.sum() / size.sum()).item(),
            "largest_is_first_token": int((position == 0).sum()),
            "largest_over_median": (size.max() / size.median()).item(),
        })
    table = Table(title=f"SmolLM2-135M FP block outputs, {windows.shape[0]} x {windows.shape[1]} windows "
                        f"(calibration seed {args.calib_seed})")
    for column in ("block", "share of Σ size held by each window's largest token",
                   "largest token is the first", "largest / median token"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["block"]), f"{row['largest_token_per_window_share']:.3f}",
                      f"{row['largest_is_first_token']} of {windows.shape[0]}", f"{row['largest_over_median']:.0f}")
    Console().print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"versions": software_versions(),
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 de-quantized)", "calib_seed": args.calib_seed,
        "windows": list(windows.shape), "size": "per-token mean square of the FP block output", "blocks": rows,
    }, indent=2))
    print(f"wrote {args.output.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
