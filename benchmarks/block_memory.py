"""Memory of one block's training step, per learned freedom, for a Llama-2-7B-shaped block (hidden
4096, MLP 11008, 32 heads), at the paper's batch of one 2048-token window.

    python benchmarks/block_memory.py                  # every freedom set, fp32, on this machine
    python benchmarks/block_memory.py --device cuda    # the same on a GPU (peak allocated bytes)

Each freedom set runs in its own process, which builds the block, takes two AdamW steps and
reports (a) the exact bytes of the trainable parameters, their gradients and the optimizer state,
and (b) the measured peak: on a GPU `torch.cuda.max_memory_allocated`, on a CPU the growth of the
process's peak resident set over its size after the model was built. The whole-model part (the
cached inputs/targets of every window, the rest of the model) is the same for every freedom set and
is not counted here.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FREEDOM_SETS = {
    "lwc (the paper's)": {"lwc": True},
    "lwc + rounding": {"lwc": True, "rounding": True},
    "lwc + weights": {"lwc": True, "train_weights": True},
    "lwc + rounding + weights": {"lwc": True, "rounding": True, "train_weights": True},
}


def measure(freedoms: dict, device: str, seqlen: int, wbits: int, group_size: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from omniquant_pl.arch.registry import get_arch, get_blocks
    from omniquant_pl.block_module import BlockModule
    from omniquant_pl.block_step import block_loss, block_optimizers
    from omniquant_pl.calib.capture import capture_block_inputs
    from omniquant_pl.config import QuantConfig, TrainConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                         num_hidden_layers=1, vocab_size=256, max_position_embeddings=seqlen)
    model = LlamaForCausalLM(config).eval()
    spec = get_arch(model)
    windows = torch.randint(0, 256, (1, seqlen))
    captured = capture_block_inputs(model, spec, windows)
    block = get_blocks(model, spec)[0].to(device)
    inputs = captured.hidden_states.to(device)
    kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in captured.block_kwargs.items()}
    with torch.no_grad():
        target = block(inputs, **kwargs)
        target = (target[0] if isinstance(target, tuple) else target).detach()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    module = BlockModule(block, 0, spec, kwargs, QuantConfig(wbits=wbits, group_size=group_size, **freedoms),
                         TrainConfig()).to(device)
    optimizers = block_optimizers(module)
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    for _ in range(2):  # the second step holds the optimizer state: the peak
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=False)
        block_loss(module, inputs, target, None).backward()
        for optimizer in optimizers:
            optimizer.step()
    trainable = [p for p in module.parameters() if p.requires_grad]
    state = sum(t.numel() * t.element_size() for opt in optimizers for s in opt.state.values()
                for t in s.values() if torch.is_tensor(t))
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    block_bytes = sum(p.numel() * p.element_size() for p in block.parameters() if not p.requires_grad)
    return {"trainable_parameters": sum(p.numel() for p in trainable),
            "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
            "gradient_bytes": sum(p.numel() * p.element_size() for p in trainable),
            "optimizer_state_bytes": state, "frozen_block_bytes": block_bytes, "peak_step_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--wbits", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "block-memory-7b.json")
    args = parser.parse_args()
    if args.one:  # the child: one freedom set
        print(json.dumps(measure(FREEDOM_SETS[args.one], args.device, args.seqlen, args.wbits, args.group_size)))
        return
    from omniquant_pl.versions import software_versions

    rows = []
    for name in FREEDOM_SETS:
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--device", args.device, "--seqlen",
                               str(args.seqlen), "--wbits", str(args.wbits), "--group-size", str(args.group_size)],
                              capture_output=True, text=True, check=True)
        row = {"freedoms": name, **json.loads(proc.stdout.strip().splitlines()[-1])}
        rows.append(row)
        gib = 2**30
        print(f"{name:26s} trainable {row['trainable_bytes'] / gib:5.2f} GiB + grads {row['gradient_bytes'] / gib:5.2f}"
              f" + AdamW state {row['optimizer_state_bytes'] / gib:5.2f}; peak of the step {row['peak_step_bytes'] / gib:5.2f}"
              f" GiB (block weights {row['frozen_block_bytes'] / gib:.2f} GiB)", flush=True)
    report = {"block": "Llama-2-7B-shaped (hidden 4096, MLP 11008, 32 heads), fp32", "device": args.device,
              "batch": f"1 x {args.seqlen} tokens", "setting": f"W{args.wbits}A16g{args.group_size}",
              "versions": software_versions(), "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
