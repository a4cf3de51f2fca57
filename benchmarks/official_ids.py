"""The official-ids side-by-side protocol, shared by `quality.py --protocol official-ids` (ours) and
`official_omniquant.py` (the official code): its settings, the calibration ids' hash, and the
official code's reruns. No heavy imports: the official code runs in another environment
(transformers 4.35), where this module is imported too.
"""
from __future__ import annotations

import json
from pathlib import Path

# The official code (OpenGVLab/OmniQuant 95fae1b, fp32 on a CPU) measured on these ids in its first run;
# `official_ppl` is its WikiText-2 perplexity over the first 8 test windows (FP 19.27).
OFFICIAL_IDS_SHA256 = "7452374b9933b3d8"  # the 16 x 512 calibration ids of seed 2 both stacks trained on
OFFICIAL_IDS_SETTINGS = {
    "W3A16 lwc lr 5e-2": {"quant": {"wbits": 3}, "train": {"lwc_lr": 5e-2}, "official_ppl": 207.78},
    "W3A16 lwc lr 1e-2": {"quant": {"wbits": 3}, "train": {"lwc_lr": 1e-2}, "official_ppl": 478.93},
    "W4A4": {"quant": {"wbits": 4, "abits": 4, "let": True, "let_alpha": 0.75},
             "train": {"lwc_lr": 1e-2, "let_lr": 1e-3}, "official_ppl": 183.44},
    "W6A6": {"quant": {"wbits": 6, "abits": 6, "let": True, "let_alpha": 0.5},
             "train": {"lwc_lr": 1e-2, "let_lr": 5e-3}, "official_ppl": 21.98},
    # no official run: the W6A6 recipe at 4-bit weights
    "W4A8": {"quant": {"wbits": 4, "abits": 8, "let": True, "let_alpha": 0.5},
             "train": {"lwc_lr": 1e-2, "let_lr": 5e-3}, "official_ppl": None},
}
CALIBRATION = {"nsamples": 16, "seqlen": 512, "epochs": 2, "eval_windows": 8, "eval_seqlen": 2048}

# benchmarks/official_omniquant.py appends its runs here; quality.py reads them for its "official rerun" column
RERUNS_FILE = Path(__file__).resolve().parent / "results" / "official-omniquant-reruns-cpu.json"


def official_reruns(path: Path = RERUNS_FILE) -> dict[tuple[str, int], float]:
    """{(setting, calibration seed): perplexity} of the official code's reruns ({} before any)."""
    if not path.is_file():
        return {}
    runs = json.loads(path.read_text())["runs"]
    return {(run["setting"], run["calib_seed"]): run["ppl"] for run in runs}
