"""Data-parallel calibration: `torchrun --nproc_per_node N` against one process, same config.

    python benchmarks/distributed.py                       # CPU: 2 gloo processes vs 1
    python benchmarks/distributed.py --nproc 4 --accelerator gpu --single-threads 8 --output distributed-4gpu.json

A random Llama (hidden 256, 4 layers by default) with the test suite's tokenizer is saved to a
temporary folder and calibrated with LWC+LET (W4A16 and W4A4, group 64) on CPython's documentation
text, by `cli.py calibrate` in one process (once per --single-threads value) and under torchrun
(Lightning's DDP strategy, one thread per process) with the same global batch. Reports each run's
wall time (the whole command: start-up, model load, calibration) and calibration time
(results.json), and how far the learned parameters and the per-block losses (final and per epoch)
of each run are from the first single-process run's. Prints a table and writes
benchmarks/results/<output> (no absolute paths inside).

The data-parallel run adds the same gradients in another order and batch shape, so it differs by
float rounding; a rounding-sized change can flip a weight's (or a 4-bit activation's) rounding and
grow over the steps. The control row measures that sensitivity: one process on a copy of the model
whose weights moved by about one float32 ulp.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tiny tokenizer lives beside the tests that use it

import torch
import yaml
from rich.console import Console
from rich.table import Table

from omniquant_pl.results import read_results
from omniquant_pl.versions import software_versions

BUSY_NOTE = ("other jobs shared the machine (load average {load:.1f} on {cpus} cores at the start): timings are "
             "noisy, and runs with more threads than free cores (the single process at 2 threads) lose most")


def save_random_llama(folder: Path, hidden: int, layers: int) -> None:
    from conftest import TINY_VOCAB, build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         max_position_embeddings=512, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)


def write_config(path: Path, model: Path, args: argparse.Namespace, abits: int) -> None:
    config = {
        "model": {"name_or_path": str(model)},
        "quant": {"wbits": 4, "abits": abits, "let": True, "group_size": 64},
        "calib": {"source": "pydoc", "nsamples": args.nsamples, "seqlen": args.seqlen},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "accelerator": args.accelerator,
                  "logger": "none"},
        "eval": {"datasets": [], "baselines": []},
        "save_model": False,
    }
    path.write_text(yaml.safe_dump(config))


def run(command: list[str], output_dir: Path, threads: int | None = None) -> dict:
    """Run one calibrate command; its wall time and results.json."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("OMP_NUM_THREADS", None)  # torchrun sets 1 per process
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    proc = subprocess.run([*command, "--output_dir", str(output_dir)], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command[:6])} ... failed:\n{proc.stderr[-3000:]}")
    results = read_results(output_dir / "results.json")
    return {"wall_seconds": wall, "calibration_seconds": results.calibration_seconds, "results": results,
            "output_dir": output_dir}


def perturbed_copy(model: Path, folder: Path) -> None:
    """The model with every weight moved by about one float32 ulp (w·(1 + 2^-23·N(0, 1))): the
    control, how far float rounding alone moves a calibration."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    llm = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        for param in llm.parameters():
            param.mul_(1 + 2.0**-23 * torch.randn_like(param))
    llm.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model).save_pretrained(folder)


def differences(reference: dict, other: dict) -> dict:
    """Largest differences of `other`'s learned parameters and losses (final and per epoch) to the reference's."""
    from safetensors.torch import load_file

    a, b = (load_file(run["output_dir"] / "learned_params.safetensors") for run in (reference, other))
    assert a.keys() == b.keys(), "the two runs learned different parameter sets"
    pairs = [(x, y) for s, p in zip(reference["results"].blocks, other["results"].blocks, strict=True)
             for x, y in [(s.final_loss, p.final_loss), *zip(s.epoch_losses, p.epoch_losses, strict=True)]]
    return {"learned_max_abs_diff": max((a[k] - b[k]).abs().max().item() for k in a),
            "learned_max_rel_diff": max(((a[k] - b[k]).abs() / a[k].abs().clamp(min=1e-12)).max().item() for k in a),
            "loss_max_rel_diff": max(abs(x - y) / abs(x) for x, y in pairs)}


def compare_once(tmp: Path, args: argparse.Namespace, abits: int) -> dict:
    """One quant setting: single-process runs (per thread count; on the perturbed model), the
    torchrun run, and each one's differences to the first single-process run."""
    runs = {}
    for model in ("model", "model-perturbed"):
        write_config(tmp / f"a{abits}-{model}.yaml", tmp / model, args, abits)
    calibrate = lambda model: [str(ROOT / "cli.py"), "calibrate", "--config", str(tmp / f"a{abits}-{model}.yaml")]
    for threads in args.single_threads:
        runs[f"1 process, {threads} thread(s)"] = run([sys.executable, *calibrate("model")],
                                                      tmp / f"a{abits}-single-{threads}", threads)
    runs[f"1 process, {args.single_threads[0]} thread(s), weights +-1 ulp"] = run(
        [sys.executable, *calibrate("model-perturbed")], tmp / f"a{abits}-perturbed", args.single_threads[0])
    runs[f"torchrun --nproc_per_node {args.nproc}"] = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
         *calibrate("model")], tmp / f"a{abits}-parallel")
    reference = next(iter(runs.values()))
    rows = [{"run": name, "wall_seconds": result["wall_seconds"], "calibration_seconds": result["calibration_seconds"],
             "final_losses": [block.final_loss for block in result["results"].blocks],
             **(differences(reference, result) if result is not reference else {})}
            for name, result in runs.items()]
    return {"quant": f"W4A{abits}g64 LWC+LET", "runs": rows}


def table_of(report: dict, args: argparse.Namespace) -> Table:
    table = Table(title=f"data-parallel calibration ({args.accelerator}, {args.layers} x hidden {args.hidden}, "
                        f"{args.nsamples} x {args.seqlen} windows, global batch {args.batch_size}, {args.epochs} epochs); "
                        "differences to the first row of each setting")
    for column in ("quant", "run", "wall s", "calib s", "last block loss", "learned max abs diff",
                   "learned max rel diff", "loss max rel diff"):
        table.add_column(column, justify="right" if column not in ("quant", "run") else "left")
    fmt = lambda row, key: f"{row[key]:.3g}" if key in row else "-"
    for setting in report["settings"]:
        for row in setting["runs"]:
            table.add_row(setting["quant"], row["run"], f"{row['wall_seconds']:.1f}", f"{row['calibration_seconds']:.1f}",
                          f"{row['final_losses'][-1]:.6g}", fmt(row, "learned_max_abs_diff"),
                          fmt(row, "learned_max_rel_diff"), fmt(row, "loss_max_rel_diff"))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel run")
    parser.add_argument("--single-threads", type=int, nargs="+", default=[1, 2],
                        help="torch threads of the single-process runs (one run each; the first is the reference)")
    parser.add_argument("--abits", type=int, nargs="+", default=[16, 4], help="activation bits (one setting each)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4, help="global batch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--output", default="distributed-cpu.json", help="file name under benchmarks/results/")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="omniquant-ddp-bench-") as tmp:
        tmp = Path(tmp)
        save_random_llama(tmp / "model", args.hidden, args.layers)
        perturbed_copy(tmp / "model", tmp / "model-perturbed")
        settings = [compare_once(tmp, args, abits) for abits in args.abits]
    report = {"versions": software_versions(),
        "what": "benchmarks/distributed.py: torchrun data-parallel calibration vs one process, same global batch",
        "setup": {**{k: v for k, v in vars(args).items() if k != "output"}, "calib": "pydoc",
                  "cpu_count": os.cpu_count(), "machine": platform.machine(),
                  "load_average_at_start": load_before, "torchrun_threads_per_process": 1},
        "settings": settings,
    }
    if load_before > (os.cpu_count() or 1):
        report["timing_note"] = BUSY_NOTE.format(load=load_before, cpus=os.cpu_count())
    console = Console(width=170)
    console.print(table_of(report, args))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.output).write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote benchmarks/results/{args.output}")


if __name__ == "__main__":
    main()
