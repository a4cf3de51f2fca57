"""`omniquant` command line: calibrate | evaluate | compare | export (LightningCLI's argument parser).

    omniquant calibrate --config configs/smollm2-135m/quickstart-w3a16.yaml --quant.wbits 4
    omniquant calibrate --config ... --print_config
    omniquant evaluate --model.name_or_path outputs/run --eval.datasets [wikitext2] --eval.tasks [piqa]
    omniquant evaluate --model.name_or_path MODEL --baselines [fp,rtn] --quant.wbits 3
    omniquant compare outputs/run1 outputs/run2/eval.json --output outputs/comparison
    omniquant export outputs/run --format compressed-tensors
    omniquant export outputs/run --format gguf --gguf_type Q4_0
"""
from __future__ import annotations

import errno
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Literal

# Heavy imports (torch, Lightning, transformers) happen inside the functions that need them, so that
# `omniquant` and `omniquant --help` answer at once.
OVERVIEW = """usage: omniquant [-h] {calibrate,evaluate,compare,export} ...

OmniQuant calibration for Hugging Face causal LMs

commands:
  calibrate   calibrate and evaluate a quantized model
  evaluate    perplexity and zero-shot tasks of a model
  compare     compare evaluated runs side by side
  export      write a calibrated run as a real quantized model (compressed-tensors, GGUF)

`omniquant COMMAND --help` lists a command's options (all of a config's keys for calibrate)."""


def _help_formatter():
    """jsonargparse's help without its list of every known Callback subclass (~30 of Lightning's)."""
    from jsonargparse import DefaultHelpFormatter

    class HelpFormatter(DefaultHelpFormatter):
        def _get_help_string(self, action) -> str:
            return re.sub(r", known subclasses: [^)]*", "", super()._get_help_string(action))

    return HelpFormatter


def build_parser():
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.cli import LightningArgumentParser

    from omniquant_pl.config import EvalConfig, ModelConfig, QuantConfig, RunConfig

    # allow_abbrev=False, exit_on_error=False everywhere: `--quant.w 5` is refused like a YAML typo, not read as --quant.wbits
    parser = LightningArgumentParser(prog="omniquant", description="OmniQuant calibration for Hugging Face causal LMs",
                                     allow_abbrev=False, exit_on_error=False, formatter_class=_help_formatter())
    commands = parser.add_subcommands(dest="command")

    calibrate = LightningArgumentParser(description="Quantize a model block by block with OmniQuant.", allow_abbrev=False, exit_on_error=False,
                                        formatter_class=_help_formatter())
    calibrate.add_argument("--config", action="config", help="YAML config (see configs/)")
    calibrate.add_class_arguments(RunConfig, None)
    calibrate.add_argument(
        "--trainer.callbacks", type=list[Callback] | None, default=None,
        help="extra Lightning/Calibration callbacks, run on every block's Trainer (class_path + init_args; "
             "any lightning.pytorch.callbacks.Callback subclass, e.g. callbacks.fuse.FuseCallback)",
    )
    commands.add_subcommand("calibrate", calibrate, help="calibrate and evaluate a quantized model")

    evaluate = LightningArgumentParser(
        description="Perplexity and zero-shot tasks of a model (hub id, folder, saved OmniQuant model or output "
                    "directory), optionally with its FP/RTN baselines.", allow_abbrev=False, exit_on_error=False)
    evaluate.add_argument("--config", action="config")
    evaluate.add_class_arguments(ModelConfig, "model", skip={"streaming"})  # evaluate loads the whole model
    evaluate.add_class_arguments(EvalConfig, "eval", skip={"baselines"})
    evaluate.add_argument("--baselines", type=list[Literal["fp", "rtn"]], default=[],
                          help="evaluate a full-precision model as fp and/or rtn (RTN with --quant.*); "
                               "empty = the model as it is")
    evaluate.add_class_arguments(QuantConfig, "quant")
    evaluate.add_argument("--accelerator", type=str, default="auto")
    evaluate.add_argument("--output", type=str | None, default=None,
                          help="eval.json path (or folder for it); default: <run dir>/eval.json for an output directory")
    commands.add_subcommand("evaluate", evaluate, help="perplexity and zero-shot tasks of a model")

    compare = LightningArgumentParser(description="One table across runs: bits, method, perplexities, tasks, size.",
                                      allow_abbrev=False, exit_on_error=False)
    compare.add_argument("runs", type=str, nargs="+",
                         help="output directories (eval.json, else results.json) or eval.json files")
    compare.add_argument("--output", type=str, default="outputs/comparison",
                         help="folder for comparison.md, comparison.json and comparison.png")
    commands.add_subcommand("compare", compare, help="compare evaluated runs side by side")

    export = LightningArgumentParser(
        description="Write a calibrated run as a real quantized model: compressed-tensors (vLLM, transformers) "
                    "or GGUF (llama.cpp, Ollama).", allow_abbrev=False, exit_on_error=False)
    export.add_argument("run_dir", type=str, help="output directory of a finished calibrate run")
    export.add_argument("--format", type=str, default="compressed-tensors",
                        help="compressed-tensors (vLLM, transformers) or gguf (llama.cpp, Ollama)")
    export.add_argument("--output", type=str | None, default=None,
                        help="destination folder (default: <run_dir>/export/<format>[-<gguf type>])")
    export.add_argument("--gguf-type", "--gguf_type", dest="gguf_type", type=str | None, default=None,
                        help="GGUF type: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (exact for a run on that grid, groups of 32); "
                             "with --requantize any llama.cpp type (Q2_K, Q3_K_M, Q4_K_M, Q6_K, ...); F16/F32")
    export.add_argument("--requantize", action="store_true",
                        help="re-round the fused weights into --gguf-type with llama.cpp's quantizer (approximate)")
    export.add_argument("--dtype", type=Literal["float16", "bfloat16", "float32"], default="float16",
                        help="compressed-tensors: dtype of the tensors kept in floating point and of the scales")
    commands.add_subcommand("export", export, help="export a calibrated run to compressed-tensors or GGUF")
    return parser


def run_calibrate(args) -> dict:
    from omniquant_pl import RunConfig, calibrate
    from omniquant_pl.distributed import Processes
    from omniquant_pl.report import print_summary

    config = RunConfig(model=args.model, quant=args.quant, calib=args.calib, train=args.train,
                       eval=args.eval, output_dir=args.output_dir, save_model=args.save_model, resume=args.resume)
    results = calibrate(config, callbacks=args.trainer.callbacks)
    if Processes.from_env().is_rank_zero:  # under torchrun every process returns the same results
        print_summary(results)
        print(f"results: {Path(config.output_dir) / 'results.json'}")
    return results


def run_evaluate(args) -> dict:
    from rich.console import Console

    from callbacks.progress import ProgressCallback
    from omniquant_pl.eval.compare import rich_table, rows_of
    from omniquant_pl.eval.runner import check_writable, evaluate_target, report_path, resolve_target
    from omniquant_pl.io import atomic_write_json
    from omniquant_pl.plan import resolve_device
    from omniquant_pl.preflight import check_evaluation

    target = resolve_target(args.model)
    path = report_path(target.run_dir, args.output)
    check_evaluation(target.model, args.eval, args.accelerator)  # before the model loads
    check_writable(path)  # before the evaluation, not after it
    progress = ProgressCallback()
    try:
        report = evaluate_target(target, args.eval, args.baselines, args.quant, resolve_device(args.accelerator),
                                 progress=progress.evaluation_task)
    finally:
        progress.on_calibration_end(None, None)  # stops its bars
    console = Console()
    console.print(rich_table(rows_of(Path(args.model.name_or_path).name or args.model.name_or_path, report),
                             title=f"evaluate {args.model.name_or_path}"))
    for what, reason in report.get("skipped_eval", {}).items():
        console.print(f"skipped {what}: {reason}", markup=False)
    if path is not None:
        atomic_write_json(report, path)
        console.print(f"eval.json: {path}")
    return report


def run_compare(args) -> None:
    from rich.console import Console

    from omniquant_pl.eval.compare import compare, rich_table

    rows, written = compare(list(args.runs), args.output)
    console = Console()
    console.print(rich_table(rows))
    for kind, path in written.items():
        console.print(f"{kind}: {path}")


def run_export(args) -> dict:
    from omniquant_pl.export import ExportConfig, export_run
    from omniquant_pl.report import print_export

    options = ExportConfig(format=args.format, output=args.output, gguf_type=args.gguf_type,
                           requantize=args.requantize, dtype=args.dtype)
    report = export_run(args.run_dir, options)
    print_export(report)
    return report


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def disk_error_message(err: OSError, command: str | None, sub) -> str:
    """One line for a full or read-only disk; for calibrate, what is kept and how to go on."""
    where = f" writing {err.filename}" if err.filename else ""
    message = f"the disk is full or read-only ({os.strerror(err.errno)}{where}); free space"
    if command == "calibrate" and sub is not None:
        message += f", then continue with: {resume_command(sub.output_dir)} (finished blocks and results are kept)"
    return message


def resume_command(output_dir: str | Path) -> str:
    """The command that continues the calibration run in `output_dir`."""
    return f"omniquant calibrate --config {Path(output_dir) / 'config.yaml'} --resume true"


def interrupted_message(command: str | None, sub) -> str:
    """What Ctrl-C left behind and, for calibrate, the command that continues the run."""
    if command != "calibrate" or sub is None:
        return "interrupted"
    from omniquant_pl.checkpoint import existing_progress
    from omniquant_pl.errors import OmniQuantError

    output_dir = Path(sub.output_dir)
    try:
        finished = existing_progress(output_dir)
    except OmniQuantError:
        finished = 0
    if not finished:
        return f"interrupted before any block finished; nothing to resume in {output_dir}"
    return f"interrupted; {finished} finished blocks are saved in {output_dir}; continue with: {resume_command(output_dir)}"


def check_yaml_files(argv: list[str]) -> None:
    """Each --config file parses as YAML; else one line naming the file, the line and the problem."""
    import yaml

    from omniquant_pl.errors import OmniQuantError

    for path in config_files(argv):
        if not Path(path).is_file():
            continue  # the parser reports a missing file
        try:
            yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = ": ".join(filter(None, [getattr(err, "context", None), getattr(err, "problem", None)])) or str(err)
            raise OmniQuantError(f"config file '{path}' is not valid YAML{where}: {problem}; fix it there "
                                 "(indentation, a missing ':' or an unclosed bracket), see configs/ for examples") from None
        except UnicodeDecodeError:
            raise OmniQuantError(f"config file '{path}' is not UTF-8 text; give a YAML file") from None


def config_files(argv: list[str]) -> list[str]:
    """The --config files given, in order."""
    paths = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    return paths + [arg.removeprefix("--config=") for arg in argv if arg.startswith("--config=")]


def resume_named_folder(argv: list[str], sub) -> None:
    """`--config RUN/config.yaml --resume true` continues RUN, the folder the user named, even where
    the config's output_dir points elsewhere (a copied folder, a relative path from another working
    directory); an explicit --output_dir wins."""
    from omniquant_pl.resume import run_folder_named

    if not sub.resume or any(a == "--output_dir" or a.startswith("--output_dir=") for a in argv):
        return
    folder = run_folder_named([Path(p) for p in config_files(argv)], sub.output_dir)
    if folder is not None:
        logging.getLogger("omniquant_pl").info("resuming the run folder %s (its config.yaml names output_dir %s)",
                                               folder, sub.output_dir)
        sub.output_dir = str(folder)


def log_handler() -> logging.Handler:
    """One log style: rich's on a terminal (above the progress bars), the same columns in plain text
    for a file or a pipe (no wrapping at 80 columns, no colour codes)."""
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        return RichHandler(console=Console(stderr=True), show_path=False, markup=False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)-8s %(message)s", datefmt="%x %X"))
    return handler


OUT_OF_MEMORY = ("error: out of memory (a limit such as ulimit -v, or the machine's RAM); raise the limit, or for "
                 "calibrate use model.streaming: on and a smaller calib.nsamples")


def main(argv: list[str] | None = None) -> int:
    """The command line; running out of memory anywhere (importing torch included) is one line."""
    try:
        return run_command(argv)
    except MemoryError:
        print(OUT_OF_MEMORY, file=sys.stderr)
        return 2
    except OSError as err:  # the dynamic loader out of address space: libtorch cannot be mapped
        if "failed to map segment" not in str(err) and err.errno != errno.ENOMEM:
            raise
        print(OUT_OF_MEMORY, file=sys.stderr)
        return 2


def run_command(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv) in ([], ["-h"], ["--help"]):
        print(OVERVIEW)
        return 0
    from jsonargparse import ArgumentError

    from omniquant_pl.errors import OmniQuantError
    from omniquant_pl.trainer import quiet_lightning

    quiet_lightning()
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="jsonargparse")
    logging.basicConfig(level=logging.INFO, handlers=[log_handler()])
    parser = build_parser()
    try:
        check_yaml_files(sys.argv[1:] if argv is None else argv)
        cfg = parser.parse_args(argv)
        init = getattr(parser, "instantiate", parser.instantiate_classes)(cfg)  # renamed in jsonargparse 4.49
        command = init.command
        sub = init[command]
        if command == "calibrate":
            resume_named_folder(sys.argv[1:] if argv is None else argv, sub)
            run_calibrate(sub)
        elif command == "evaluate":
            run_evaluate(sub)
        elif command == "compare":
            run_compare(sub)
        elif command == "export":
            run_export(sub)
    except OmniQuantError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ArgumentError as err:  # a refused flag or value: one line, not the whole usage
        command = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), "")
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"error: {message} (omniquant {command} --help lists the options)".replace("  ", " "), file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in DISK_ERRORS:
            raise
        print(f"error: {disk_error_message(err, locals().get('command'), locals().get('sub'))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted_message(locals().get("command"), locals().get("sub")), file=sys.stderr)
        return 130

    return 0


if __name__ == "__main__":
    sys.exit(main())
