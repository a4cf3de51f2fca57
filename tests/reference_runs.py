"""Fixed-seed calibrations whose every number is kept in tests/data/reference_runs.json.

The file was written before the engine's restructure (`python tests/reference_runs.py`); the test
in test_reference_runs.py recomputes the runs and compares: bit for bit on the stack and CPU that
wrote the file, to a tight tolerance elsewhere (other CPU kernels round differently). A change of
engine structure must leave every learned parameter, code, loss and perplexity unchanged.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "data" / "reference_runs.json"


def _runs() -> dict:
    """name: (builder name, QuantConfig kwargs, TrainConfig kwargs)."""
    return {
        "llama-w3g16-lwc": ("llama", {"wbits": 3, "group_size": 16}, {"epochs": 3, "shuffle": True, "lwc_lr": 5e-2}),
        "llama-w4a4-lwc-let": ("llama", {"wbits": 4, "abits": 4, "let": True}, {"epochs": 2, "let_lr": 1e-2}),
        "opt-w4-lwc-let": ("opt", {"wbits": 4, "let": True, "group_size": 16}, {"epochs": 2, "keep_best_rtn": True}),
    }


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def stack() -> dict:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def compute(tmp: Path) -> dict:
    """Every reference run in `tmp`: its block losses, perplexities and the digests of its
    learned parameters and codes."""
    from conftest import TINY_BUILDERS, build_tokenizer
    from safetensors.torch import load_file

    from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig, calibrate

    tokenizer = build_tokenizer()
    runs = {}
    for name, (builder, quant, train) in _runs().items():
        out = tmp / name
        config = RunConfig(model=ModelConfig("in-memory"), quant=QuantConfig(**quant),
                           calib=CalibConfig(source="pydoc", nsamples=4, seqlen=32),
                           train=TrainConfig(batch_size=2, **train),
                           eval=EvalConfig(datasets=["pydoc"], seqlen=32, max_windows=2, baselines=["fp", "rtn"]),
                           output_dir=str(out), save_model=False)
        results = calibrate(config, model=TINY_BUILDERS[builder](), tokenizer=tokenizer)
        learned = load_file(out / "learned_params.safetensors")
        codes = {}
        for path in sorted((out / "quantized").glob("block_*.safetensors")):
            codes.update({f"{path.stem}/{key}": _digest(value) for key, value in load_file(path).items()})
        runs[name] = {
            "blocks": [{key: getattr(block, key) for key in ("rtn_loss", "init_loss", "final_loss", "epoch_losses")}
                       for block in results.blocks],
            "perplexity": {method: {ds: r.ppl for ds, r in table.items()}
                           for method, table in results.perplexity.items()},
            "learned": {key: _digest(value) for key, value in sorted(learned.items())},
            "codes": codes,
        }
    return runs


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(HERE))
    with tempfile.TemporaryDirectory() as tmp:
        runs = compute(Path(tmp))
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps({"stack": stack(), "runs": runs}, indent=1) + "\n")
    print(f"wrote {REFERENCE.relative_to(HERE.parent)}")
