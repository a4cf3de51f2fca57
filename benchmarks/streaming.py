"""Host memory of a streamed calibration (model.streaming on) against a full load, on one model.

    python benchmarks/streaming.py                          # ~4.8 GB random Llama (24 x 2048/5632), CPU
    python benchmarks/streaming.py --layers 4 --keep        # smaller, keep the folders to look at

Writes a random-weight Llama (hidden 2048, MLP 5632, 32 heads / 4 kv heads, vocab 32000, fp32:
TinyLlama's shapes with 24 layers) as one safetensors shard per block plus one for the rest, then
runs the same short W4A16 calibration (4 x 128 tokens of pydoc text, 1 epoch, perplexity of one
128-token window, FP baseline included) in child processes: a full load, a streamed run, and the
streamed run again under an address-space cap (RLIMIT_DATA) below the model's size; a full load
under the same cap shows that the cap binds. Each child reports its peak RSS (ru_maxrss) and wall
time; the parent checks that every run's learned parameters, saved model tensors and perplexities
are identical. Prints a table and writes benchmarks/results/streaming-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omniquant_pl.versions import software_versions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # conftest.build_tokenizer: a small offline tokenizer

GiB = 2**30


def write_random_llama(folder: Path, args) -> int:
    """A random Llama saved block by block (never whole in memory); returns its bytes on disk."""
    import torch
    from accelerate import init_empty_weights
    from conftest import build_tokenizer
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=4,
                         max_position_embeddings=2048, tie_word_embeddings=False, dtype="float32")
    with init_empty_weights():
        names = {name: p.shape for name, p in LlamaForCausalLM(config).named_parameters()}
    generator = torch.Generator().manual_seed(0)
    total, shards = args.layers + 1, {}

    def tensor(name: str, shape) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return 1 + 0.1 * torch.randn(shape, generator=generator)
        return 0.02 * torch.randn(shape, generator=generator)

    groups = [("", [n for n in names if ".layers." not in n])]
    groups += [(f"model.layers.{i}.", [n for n in names if n.startswith(f"model.layers.{i}.")]) for i in range(args.layers)]
    for number, (_, group) in enumerate(groups, start=1):
        shard = f"model-{number:05d}-of-{total:05d}.safetensors"
        save_file({name: tensor(name, names[name]) for name in group}, folder / shard, {"format": "pt"})
        shards.update(dict.fromkeys(group, shard))
    size = sum((folder / f).stat().st_size for f in set(shards.values()))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": shards}, indent=2))
    config.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return size


def run_child(args) -> None:
    """One calibration in this process; prints its measurements as the last line of JSON."""
    if args.cap_bytes:
        resource.setrlimit(resource.RLIMIT_DATA, (args.cap_bytes, args.cap_bytes))
    import torch

    from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig, calibrate

    torch.set_num_threads(os.cpu_count() or 1)
    config = RunConfig(
        model=ModelConfig(args.model_dir, streaming=args.child == "streamed"),
        quant=QuantConfig(wbits=4, abits=16, group_size=128),
        calib=CalibConfig(source="pydoc", nsamples=args.nsamples, seqlen=args.seqlen),
        train=TrainConfig(epochs=1, batch_size=1, report_losses=False, keep_best=False, logger="none"),
        eval=EvalConfig(datasets=["pydoc"], seqlen=args.seqlen, max_windows=1, baselines=["fp"]),
        output_dir=args.output_dir,
    )
    started = time.perf_counter()
    results = calibrate(config)
    print(json.dumps({
        "seconds": time.perf_counter() - started,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "streaming": results.plan.streaming,
        "ppl": {method: table["pydoc"].ppl for method, table in results.perplexity.items()},
    }))


def launch(kind: str, model_dir: Path, output_dir: Path, args, cap: int = 0) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--model-dir", str(model_dir), "--output-dir",
               str(output_dir), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--cap-bytes", str(cap)]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["?"]
        error = last[0].replace(str(model_dir.parent), "<workdir>")[:300]  # no absolute paths in the report
        return {"ok": False, "returncode": proc.returncode, "error": error,
                "seconds": time.perf_counter() - started}
    return {"ok": True, **json.loads(proc.stdout.strip().splitlines()[-1])}


def same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of the safetensors files in folder/file `a` equals `b`'s (one tensor in memory at a time)."""
    import torch
    from safetensors import safe_open

    def index(path: Path) -> dict[str, Path]:
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        found = {}
        for file in files:
            with safe_open(str(file), "pt") as handle:
                found.update(dict.fromkeys(handle.keys(), file))
        return found

    left, right = index(a), index(b)
    if left.keys() != right.keys():
        return False
    for name in left:
        with safe_open(str(left[name]), "pt") as x, safe_open(str(right[name]), "pt") as y:
            if not torch.equal(x.get_tensor(name), y.get_tensor(name)):
                return False
    return True


def table(report: dict) -> str:
    rows = [(f"model: {report['model']['shape']}, {report['model']['disk_gib']:.2f} GiB on disk "
             f"({report['model']['shards']} shards); cap = RLIMIT_DATA {report['cap_gib']:.2f} GiB"),
            f"{'run':<16} {'ok':<4} {'peak RSS GiB':>12} {'wall s':>8} {'ppl fp':>10} {'ppl omniquant':>14}  same as full"]
    for name, run in report["runs"].items():
        ppl = run.get("ppl", {})
        rows.append(f"{name:<16} {run['ok']!s:<4} {run.get('peak_rss_bytes', 0) / GiB:>12.2f} {run['seconds']:>8.1f} "
                    f"{ppl.get('fp', float('nan')):>10.3f} {ppl.get('omniquant', float('nan')):>14.3f}  "
                    f"{run.get('identical_to_full', run.get('error', ''))}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--cap-share", type=float, default=0.7, help="memory cap of the capped runs / model size")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder (removed)")
    parser.add_argument("--keep", action="store_true", help="keep the model and the run folders")
    parser.add_argument("--output", type=Path, default=RESULTS / "streaming-cpu.json")
    parser.add_argument("--child", choices=["full", "streamed"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cap-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="omq-streaming-"))
    model_dir = work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    size = write_random_llama(model_dir, args)
    print(f"wrote {size / GiB:.2f} GiB in {time.perf_counter() - started:.0f} s", flush=True)
    cap = int(args.cap_share * size)
    runs = {}
    try:
        for name, kind, limit in (("full", "full", 0), ("streamed", "streamed", 0),
                                  ("streamed-capped", "streamed", cap), ("full-capped", "full", cap)):
            runs[name] = launch(kind, model_dir, work / name, args, limit)
            print(name, json.dumps(runs[name]), flush=True)
        for name, run in runs.items():
            if name != "full" and run["ok"]:
                run["identical_to_full"] = (
                    same_tensors(work / name / "learned_params.safetensors", work / "full" / "learned_params.safetensors")
                    and same_tensors(work / name / "model", work / "full" / "model"))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report = {"versions": software_versions(),
        "model": {"shape": f"Llama {args.layers} x hidden {args.hidden} / MLP {args.intermediate}, 32/4 heads, "
                           f"vocab {args.vocab}, float32", "disk_bytes": size, "disk_gib": size / GiB,
                  "shards": args.layers + 1},
        "calibration": f"W4A16 g128 LWC, pydoc {args.nsamples} x {args.seqlen} tokens, 1 epoch, batch 1, "
                       f"perplexity on 1 x {args.seqlen} tokens (fp baseline and omniquant)",
        "cap_bytes": cap, "cap_gib": cap / GiB, "cap": "resource.RLIMIT_DATA in the child",
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return report


if __name__ == "__main__":
    main()
