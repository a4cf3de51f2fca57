"""Rerun the official OmniQuant code on the official-ids protocol, on the ids ours calibrates on.

The official code (OpenGVLab/OmniQuant, commit 95fae1b) is not part of this project: bring a
checkout and an environment it runs in (transformers 4.35, which still has the per-layer rotary
embedding its Llama layer copies). Three lines of it are changed, at run time, in a temporary copy,
so that it runs in fp32 on a CPU as the official-ids protocol runs it:

- `quantize/int_linear.py`: the weight buffer is a detached tensor. On a GPU the `qlayer.float()`
  of the fp16 model makes that copy; on an fp32 model it keeps the Parameter and the temporary
  quantized weight cannot be assigned.
- `quantize/omniquant.py`: `qlayer.half()` after training becomes `qlayer.float()` (fp32 inputs on
  a CPU have no autocast to mix with a half layer), and the log line's CUDA memory query reads 0.

Everything else is the official code: its Catcher, its per-block training loop, its LWC and LET,
its fusing. W4A4/W6A6 (LET) run on an exactly equivalent multi-head copy of SmolLM2 (k/v repeated
per query head), because its LET cannot run on grouped-query attention; the LET activation scales
are the per-channel |x| maxima of each linear's input over the calibration windows (its
generate_act_scale_shift.py, on these windows). transformers 4.35 builds the rotary cos/sin tables
in the dtype a model is loaded in: the grouped-query model, loaded in float16 as the official code
loads it, rotates with float16-rounded tables; the multi-head copy, built here in fp32, with exact ones.

    # ours' environment: write the fp16-rounded model, calibration ids per seed, test ids
    python benchmarks/quality.py --protocol official-ids --official-inputs /tmp/official-inputs --calib-seeds 2 3 4 5
    # an environment with torch and transformers==4.35.2 ("numpy<2", safetensors):
    python benchmarks/official_omniquant.py --checkout OmniQuant --inputs /tmp/official-inputs \\
        --setting "W3A16 lwc lr 5e-2" --calib-seeds 2 3 4 5

Each run's perplexity (WikiText-2 test, first 8 windows of 2048, as ours) and per-block epoch losses
are merged into benchmarks/results/official-omniquant-reruns-cpu.json, which quality.py's
official-ids table reads as its "official rerun" column.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from official_ids import CALIBRATION, OFFICIAL_IDS_SETTINGS, RERUNS_FILE
from torch import nn

COMMIT = "95fae1b"
# (file, text, replacement): each must match exactly once, or this is not the code it was written for
PATCHES = (
    ("quantize/int_linear.py", "self.register_buffer('weight',org_module.weight)",
     "self.register_buffer('weight',org_module.weight.detach())"),
    ("quantize/int_linear.py", "self.register_buffer('bias',org_module.bias)",
     "self.register_buffer('bias',org_module.bias.detach())"),
    ("quantize/omniquant.py", "qlayer.half()", "qlayer.float()"),
    ("quantize/omniquant.py", "torch.cuda.max_memory_allocated(lm._device) / 1024**2", "0"),
)


def patched_copy(checkout: Path, into: Path) -> Path:
    """The official code's quantize/, models/ and utils.py with PATCHES applied."""
    for name in ("quantize", "models"):
        shutil.copytree(checkout / name, into / name)
    shutil.copy(checkout / "utils.py", into / "utils.py")
    for relative, text, replacement in PATCHES:
        path = into / relative
        source = path.read_text()
        if source.count(text) != 1:
            sys.exit(f"{checkout}: {relative} does not contain {text!r} exactly once; check out commit {COMMIT}")
        path.write_text(source.replace(text, replacement))
    return into


class EpochLosses(logging.Handler):
    """Collects the official loop's 'layer I iter E loss:L' log lines as {block: [loss per epoch]}."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: dict[int, list[float]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        words = record.getMessage().split()
        if len(words) >= 5 and words[0] == "layer" and words[2] == "iter":
            self.losses.setdefault(int(words[1]), []).append(float(words[4].removeprefix("loss:")))


def multi_head_copy(model: nn.Module) -> nn.Module:
    """The same model with every k/v head repeated for each query head of its group (exactly equivalent)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    groups = config.num_attention_heads // config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    state = model.state_dict()
    for key, weight in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            # (kv_heads * head_dim, hidden) -> (kv_heads, head_dim, hidden) -> (kv_heads * groups * head_dim, hidden)
            state[key] = weight.view(-1, head_dim, weight.shape[1]).repeat_interleave(groups, dim=0).flatten(0, 1)
    config = type(config).from_dict({**config.to_dict(), "num_key_value_heads": config.num_attention_heads})
    copy = AutoModelForCausalLM.from_config(config).float().eval()
    copy.load_state_dict(state, strict=False)
    copy.tie_weights()
    return copy


@torch.no_grad()
def input_maxima(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel |x| maxima of every linear's input over the windows (the official LET's act_scales)."""
    maxima: dict[str, torch.Tensor] = {}

    def record(module, inputs, output, name):
        rows = inputs[0].reshape(-1, inputs[0].shape[-1]).abs().amax(dim=0).float()
        maxima[name] = torch.maximum(maxima[name], rows) if name in maxima else rows

    hooks = [module.register_forward_hook(functools.partial(record, name=name))
             for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for window in ids:
        model(window[None])
    for hook in hooks:
        hook.remove()
    return maxima


@torch.no_grad()
def perplexity(model: nn.Module, test_ids: torch.Tensor, windows: int, seqlen: int) -> float:
    """The official main.py's WikiText-2 evaluation over the first `windows` windows."""
    nlls = []
    for index in range(windows):
        batch = test_ids[:, index * seqlen:(index + 1) * seqlen]
        logits = model.lm_head(model.model(batch)[0])
        loss = nn.functional.cross_entropy(logits[0, :-1].float(), batch[0, 1:])
        nlls.append(loss * seqlen)
    return torch.exp(torch.stack(nlls).sum() / (windows * seqlen)).item()


def run_one(omniquant, inputs: Path, label: str, seed: int) -> dict:
    from transformers import AutoModelForCausalLM

    setting = OFFICIAL_IDS_SETTINGS[label]
    quant, train = setting["quant"], setting["train"]
    let = quant.get("let", False)
    wbits, abits = quant["wbits"], quant.get("abits", 16)
    # the official code loads fp16 weights (torch_dtype=float16); the protocol computes in fp32
    model = AutoModelForCausalLM.from_pretrained(inputs / "model-fp16", torch_dtype=torch.float16).float().eval()
    if let:
        model = multi_head_copy(model)
    for param in model.parameters():
        param.requires_grad = False
    ids = torch.load(inputs / f"calib-ids-seed{seed}.pt", weights_only=True)  # (nsamples, seqlen)
    act_scales = input_maxima(model, ids) if let else None
    args = types.SimpleNamespace(
        net="llama-smollm2", nsamples=len(ids), batch_size=1, deactive_amp=True, epochs=CALIBRATION["epochs"],
        aug_loss=False, let=let, lwc=True, resume=None, alpha=quant.get("let_alpha", 0.5),
        let_lr=train.get("let_lr", 5e-3), lwc_lr=train["lwc_lr"], wd=0, real_quant=False,
        output_dir=tempfile.mkdtemp(prefix="official-omniquant-"), wbits=wbits, abits=abits,
        weight_quant_params={"n_bits": wbits, "per_channel_axes": [0], "symmetric": False,
                             "dynamic_method": "per_channel", "group_size": None, "lwc": True,
                             "disable_zero_point": False},
        p_quant_params={"n_bits": 16, "metric": "fix0to1"},
    )
    act_params = {"n_bits": abits, "per_channel_axes": [], "symmetric": False, "dynamic_method": "per_token"}
    args.act_quant_params = args.q_quant_params = args.k_quant_params = args.v_quant_params = act_params
    lm = types.SimpleNamespace(model=model, device=torch.device("cpu"), _device="cpu", seqlen=ids.shape[1])
    logger = logging.getLogger(f"official-omniquant.{label}.{seed}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    losses = EpochLosses()
    logger.addHandler(losses)
    logger.addHandler(logging.StreamHandler())  # the official loop's per-block progress
    torch.manual_seed(seed)
    started = time.perf_counter()
    model = omniquant(lm, args, [(window[None], None) for window in ids], act_scales, None, logger)
    seconds = time.perf_counter() - started
    shutil.rmtree(args.output_dir, ignore_errors=True)
    ppl = perplexity(model, torch.load(inputs / "test-ids.pt", weights_only=True), CALIBRATION["eval_windows"], CALIBRATION["eval_seqlen"])
    return {"setting": label, "calib_seed": seed, "ppl": ppl, "calibration_seconds": round(seconds, 1),
            "model": "multi-head copy" if let else "grouped-query (as released)",
            "epoch_losses": {str(block): values for block, values in sorted(losses.losses.items())}}


def merge(runs: list[dict], path: Path) -> None:
    """Add runs to the results file, replacing earlier runs of the same setting and seed."""
    report = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    fresh = {(run["setting"], run["calib_seed"]) for run in runs}
    kept = [run for run in report["runs"] if (run["setting"], run["calib_seed"]) not in fresh]
    report.update({
        "official": f"OpenGVLab/OmniQuant {COMMIT}, fp32 on a CPU (benchmarks/official_omniquant.py's three patches)",
        "protocol": "official-ids protocol: 16 x 512 wiki.valid.tokens windows per calibration seed (seed 2 = the ids of the first official run), "
                    "2 epochs, batch 1, AdamW wd 0, fp16-rounded weights; WikiText-2 test, first 8 windows of 2048",
        "runs": sorted(kept + runs, key=lambda run: (run["setting"], run["calib_seed"])),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(report, indent=2))
    temporary.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, required=True, help=f"OpenGVLab/OmniQuant at {COMMIT}")
    parser.add_argument("--inputs", type=Path, required=True, help="written by quality.py --official-inputs")
    parser.add_argument("--setting", action="append", choices=list(OFFICIAL_IDS_SETTINGS), required=True)
    parser.add_argument("--calib-seeds", nargs="+", type=int, default=[2])
    parser.add_argument("--output", type=Path, default=RERUNS_FILE)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch:
        sys.path.insert(0, str(patched_copy(args.checkout.resolve(), Path(scratch))))
        from quantize.omniquant import omniquant
        for label in args.setting:
            for seed in args.calib_seeds:
                if not (args.inputs / f"calib-ids-seed{seed}.pt").is_file():
                    sys.exit(f"{args.inputs}: no ids for seed {seed}; rerun quality.py --official-inputs with --calib-seeds {seed}")
                run = run_one(omniquant, args.inputs, label, seed)
                merge([run], args.output)
                print(f"{label} seed {seed}: official {run['ppl']:.2f} ({run['calibration_seconds']:.0f} s)", flush=True)
    print(f"wrote {args.output.relative_to(Path.cwd()) if args.output.is_relative_to(Path.cwd()) else args.output.name}")


if __name__ == "__main__":
    main()
