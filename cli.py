"""`omniquant` command line: calibrate | evaluate | export (LightningCLI's argument parser).

    omniquant calibrate --config configs/smollm2-135m/quickstart-w3a16.yaml --quant.wbits 4
    omniquant calibrate --config ... --print_config
    omniquant evaluate --model.name_or_path outputs/run/model --eval.datasets [wikitext2]
"""
from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser

from omniquant_pl.config import EvalConfig, ModelConfig, RunConfig
from omniquant_pl.errors import OmniQuantError
from omniquant_pl.sequencer import quiet_lightning


def build_parser() -> LightningArgumentParser:
    parser = LightningArgumentParser(prog="omniquant", description="OmniQuant calibration for Hugging Face causal LMs")
    commands = parser.add_subcommands(dest="command")

    calibrate = LightningArgumentParser(description="Quantize a model block by block with OmniQuant.")
    calibrate.add_argument("--config", action="config", help="YAML config (see configs/)")
    calibrate.add_class_arguments(RunConfig, None)
    calibrate.add_argument(
        "--trainer.callbacks", type=list[Callback] | None, default=None,
        help="extra Lightning/Calibration callbacks, run on every block's Trainer (class_path + init_args)",
    )
    commands.add_subcommand("calibrate", calibrate, help="calibrate and evaluate a quantized model")

    evaluate = LightningArgumentParser(description="Perplexity of a model (hub id, folder or saved OmniQuant output).")
    evaluate.add_argument("--config", action="config")
    evaluate.add_class_arguments(ModelConfig, "model")
    evaluate.add_class_arguments(EvalConfig, "eval")
    evaluate.add_argument("--accelerator", type=str, default="auto")
    evaluate.add_argument("--output", type=str | None, default=None, help="write eval.json here")
    commands.add_subcommand("evaluate", evaluate, help="perplexity of a model")

    export = LightningArgumentParser(description="Export to an inference engine format (not built yet).")
    export.add_argument("run_dir", type=str)
    commands.add_subcommand("export", export, help="export a calibrated model (not built yet)")
    return parser


def run_calibrate(args) -> dict:
    from omniquant_pl import calibrate
    from omniquant_pl.report import print_summary

    config = RunConfig(model=args.model, quant=args.quant, calib=args.calib, train=args.train,
                       eval=args.eval, output_dir=args.output_dir, save_model=args.save_model, resume=args.resume)
    results = calibrate(config, callbacks=args.trainer.callbacks)
    print_summary(results)
    print(f"results: {Path(config.output_dir) / 'results.json'}")
    return results


def run_evaluate(args) -> dict:
    import torch

    from omniquant_pl.eval.perplexity import perplexity_on_source
    from omniquant_pl.models import load_model_and_tokenizer
    from omniquant_pl.sequencer import resolve_device

    device = resolve_device(args.accelerator)
    model, tokenizer = load_model_and_tokenizer(args.model, device)
    model.to(device)
    report = {"model": args.model.name_or_path, "perplexity": {}}
    activations = (getattr(model.config, "omniquant", None) or {}).get("activations")
    if activations:  # a saved weight-activation model: run its activation quantizers again
        from omniquant_pl.arch import get_arch
        from omniquant_pl.arch.attention_hooks import BlockActivationQuantizers, use_quantized_attention
        from omniquant_pl.arch.registry import get_blocks

        spec = get_arch(model)
        use_quantized_attention(model)
        for block in get_blocks(model, spec):
            BlockActivationQuantizers(block, spec, activations["bits"])  # hooks stay on the modules
        report["activations"] = activations
    for dataset in args.eval.datasets:
        with torch.no_grad():
            result = perplexity_on_source(model, tokenizer, dataset, args.eval.seqlen, args.eval.max_windows,
                                          args.eval.batch_size, device)
        report["perplexity"][dataset] = result
        print(f"{dataset}: ppl {result['ppl']:.4f} ({result['windows']} windows of {result['seqlen']})")
    if args.output:
        from omniquant_pl.io import atomic_write_json

        atomic_write_json(report, Path(args.output))
    return report


def main(argv: list[str] | None = None) -> int:
    quiet_lightning()
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="jsonargparse")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    try:
        cfg = parser.parse_args(argv)
        init = parser.instantiate_classes(cfg)
        command = init.command
        sub = init[command]
        if command == "calibrate":
            run_calibrate(sub)
        elif command == "evaluate":
            print(json.dumps(run_evaluate(sub)["perplexity"], indent=2))
        elif command == "export":
            print("omniquant export is not built yet: the saved model in <output_dir>/model loads with "
                  "transformers' from_pretrained (fake-quantized weights).", file=sys.stderr)
            return 2
    except OmniQuantError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished blocks are saved in the output directory", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
