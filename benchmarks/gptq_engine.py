"""GPTQ-layout exports scored by an engine that serves them: each run is exported with
``omniquant export RUN --format gptq``, then its perplexity is measured twice on the same WikiText-2
windows, (1) by the project's evaluate (the packed integers de-quantized in float32) and (2) by
transformers with GPTQModel's own kernels reading the packed file, in GPTQModel's environment (made
under --cache on first use; never a project dependency; on this CPU GPTQModel picks its torch kernel).

    python benchmarks/gptq_engine.py outputs/freedoms-ablation/w3a16g64-rounding outputs/freedoms-ablation/w2a16g64-rounding

Runs need a saved model (calibrate with save_model true; a finished run gets one with
``omniquant calibrate --config RUN/config.yaml --save_model true --resume true``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
from rich.console import Console
from rich.table import Table

from omniquant_pl.versions import software_versions

ENVIRONMENT = ["gptqmodel==7.7.0", "optimum", "transformers==5.25.0"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--engine-dtype", default="float32", help="activations in GPTQModel (float16, the dtype vLLM "
                        "runs GPTQ in, is very slow on a CPU)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("OMNIQUANT_CACHE",
                                                                          Path.home() / ".cache" / "omniquant_pl")) / "peers")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "gptq-engine-smollm2-135m-cpu.json")
    return parser.parse_args()


def environment(cache: Path) -> Path:
    """GPTQModel's virtual environment (made on first use, CPU-only build of its kernels); its python."""
    folder = cache / "envs" / "gptqmodel"
    python = folder / "bin" / "python"
    marker = folder / "installed.json"
    if not marker.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, *ENVIRONMENT], check=True, env=dict(os.environ, BUILD_CUDA_EXT="0"))
        marker.write_text(json.dumps({"packages": ENVIRONMENT}))
    return python


def exported(run: Path) -> Path:
    folder = run / "export" / "gptq"
    if not (folder / "export.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "cli.py"), "export", str(run), "--format", "gptq"], check=True)
    return folder


def score_here(folder: Path, windows: torch.Tensor) -> float:
    """Perplexity with the project's loader (packed integers de-quantized) and perplexity function."""
    from omniquant_pl.config import ModelConfig
    from omniquant_pl.eval.perplexity import evaluate_perplexity
    from omniquant_pl.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(ModelConfig(str(folder), dtype="float32"), torch.device("cpu"))
    return evaluate_perplexity(model, windows.reshape(-1), windows.shape[1], windows.shape[0], 1, "cpu")[0]


def main() -> None:
    args = parse_args()
    from omniquant_pl.calib.data import load_text, tokenize_cached
    from omniquant_pl.eval.perplexity import evaluation_windows
    from omniquant_pl.models import load_model_and_tokenizer

    python = environment(args.cache)
    rows = []
    windows_path = args.cache / "data" / f"gptq-engine-windows-{args.eval_windows}.pt"
    windows = None
    for run in args.runs:
        folder = exported(run)
        report = json.loads((folder / "export.json").read_text())
        if windows is None:
            from omniquant_pl.config import ModelConfig

            _, tokenizer = load_model_and_tokenizer(ModelConfig(str(folder)), torch.device("cpu"))
            windows = evaluation_windows(tokenize_cached(tokenizer, load_text("wikitext2", "eval")), 2048, args.eval_windows)
            windows_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(windows, windows_path)
        run_ppl = json.loads((run / "results.json").read_text())["perplexity"]["omniquant"]["wikitext2"]["ppl"]
        here = score_here(folder, windows)
        out = args.cache / "runs" / f"gptq-engine-{run.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        proc = subprocess.run([str(python), str(ROOT / "benchmarks" / "gptq_engine_score.py"), "--model", str(folder),
                               "--windows", str(windows_path), "--out", str(out), "--dtype", args.engine_dtype],
                              capture_output=True, text=True, check=False, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
        if proc.returncode != 0:
            raise SystemExit(f"GPTQModel failed on {folder}:\n{proc.stderr[-3000:]}")
        engine = json.loads(out.read_text())
        rows.append({"run": run.name, "quant": report["quant"], "checkpoint_format": report["checkpoint_format"],
                     "weight_bytes": report["weight_bytes"], "run_ppl": run_ppl, "evaluate_ppl": here,
                     "gptqmodel_ppl": engine["ppl"], "gptqmodel_kernel": engine["kernel"],
                     "gptqmodel_dtype": engine["dtype"], "gptqmodel_seconds": round(time.perf_counter() - started, 1),
                     "gptqmodel_versions": engine["versions"]})
    result = {"benchmark": "gptq-engine", "eval": f"wikitext2 test, first {args.eval_windows} windows of 2048",
              "command": "python benchmarks/gptq_engine.py " + " ".join(str(r) for r in args.runs),
              "rows": rows, "versions": software_versions()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    table = Table(title=f"GPTQ exports: perplexity ({result['eval']})")
    for column in ("run", "quant", "format", "run's model", "evaluate", "GPTQModel", "kernel"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["run"], r["quant"], r["checkpoint_format"], f"{r['run_ppl']:.2f}" if r["run_ppl"] else "-",
                      f"{r['evaluate_ppl']:.2f}", f"{r['gptqmodel_ppl']:.2f}", f"{r['gptqmodel_kernel']} ({r['gptqmodel_dtype']})")
    Console().print(table)
    print(f"results: {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")


if __name__ == "__main__":
    main()
