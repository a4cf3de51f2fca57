"""Human-readable summary of a run: per-block losses and perplexities as a rich table."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from omniquant_pl.results import EvalResults, RunResults


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}"


def summary_tables(results: RunResults) -> list[Table]:
    blocks = Table(title=f"{results.quant_tag} per-block loss ({results.config['train']['loss']} to the FP block output)")
    for column in ("block", "RTN loss", "init loss", "final loss", "final/RTN", "seconds"):
        blocks.add_column(column, justify="right")
    for m in results.blocks:
        ratio = m.final_loss / m.rtn_loss if m.rtn_loss and m.final_loss is not None else None
        blocks.add_row(str(m.block), _fmt(m.rtn_loss), _fmt(m.init_loss), _fmt(m.final_loss), _fmt(ratio),
                       f"{m.seconds:.1f}")
    measured = [m for m in results.blocks if m.final_loss is not None and m.rtn_loss is not None]
    if measured:
        rtn, init, final = (sum(getattr(m, k) for m in measured) for k in ("rtn_loss", "init_loss", "final_loss"))
        blocks.add_section()
        blocks.add_row("total", _fmt(rtn), _fmt(init), _fmt(final), _fmt(final / rtn if rtn else None),
                       f"{sum(m.seconds for m in measured):.1f}")
    return [blocks, perplexity_table(results.evaluation)]


def perplexity_table(evaluation: EvalResults, title: str = "perplexity") -> Table:
    """Perplexity by method and dataset, with a row for every dataset or task set that was skipped."""
    table = Table(title=title)
    table.add_column("method")
    datasets = list(dict.fromkeys(d for by_dataset in evaluation.perplexity.values() for d in by_dataset))
    for dataset in datasets:
        table.add_column(f"{dataset} ({_windows(evaluation, dataset)})", justify="right")
    for method, by_dataset in evaluation.perplexity.items():
        table.add_row(method, *[_fmt(by_dataset[d].ppl) if d in by_dataset else "-" for d in datasets])
    for what, reason in evaluation.skipped.items():
        table.add_row(f"skipped {what}", reason[:100], *[""] * max(len(datasets) - 1, 0))
    return table


def _windows(evaluation: EvalResults, dataset: str) -> str:
    shapes = {(r.windows, r.seqlen) for by_dataset in evaluation.perplexity.values() for d, r in by_dataset.items()
              if d == dataset}
    return ", ".join(f"{w}×{s}" if s else f"{w} windows" for w, s in sorted(shapes, key=str))


def llama_cpp_lines(results: RunResults) -> list:
    """The llama.cpp check (callbacks.llama_cpp): a table of both files' perplexity, the relative
    difference, and the exported file's generation."""
    report = results.llama_cpp
    windows = next(iter(report["rows"].values()))["windows"]
    table = Table(title=f"llama.cpp, {report['gguf_type']}: perplexity on {report['dataset']} "
                        f"({windows} x {report['seqlen']} tokens)")
    for column in ("file", "MB", "perplexity"):
        table.add_column(column, justify="left" if column == "file" else "right")
    fp = results.evaluation.ppl("fp", report["dataset"])
    if fp is not None:
        table.add_row("full precision (torch)", "", _fmt(fp))
    for name, row in report["rows"].items():
        table.add_row(name, f"{row['file_bytes'] / 1e6:.1f}", f"{row['ppl']:.3f}")
    ours, theirs = (report["rows"][k]["ppl"] for k in ("OmniQuant export", "llama.cpp quantizer"))
    return [table, f"OmniQuant vs llama.cpp's own {report['gguf_type']}: {100 * (ours / theirs - 1):+.1f} % perplexity",
            f"llama.cpp, from the exported file: {report['generation']['prompt']}{report['generation']['text']}"]


def print_summary(results: RunResults, console: Console | None = None) -> None:
    console = console or Console()
    for table in summary_tables(results):
        console.print(table)
    console.print(timing_line(results))
    for line in llama_cpp_lines(results) if results.llama_cpp else []:
        console.print(line, markup=False) if isinstance(line, str) else console.print(line)


def timing_line(results: RunResults) -> str:
    """Calibration and wall time; after a resume, which numbers span all sessions and which this one."""
    calibration, total = results.calibration_seconds, results.total_seconds or 0.0
    if results.resumed_at_block is None:
        return f"calibration: {calibration:.1f} s; total (load, calibration, evaluation, save): {total:.1f} s"
    return (f"calibration: {calibration:.1f} s over all sessions (this session resumed at block "
            f"{results.resumed_at_block} and calibrated for {results.session_seconds or 0.0:.1f} s); "
            f"this session's total: {total:.1f} s")


def export_table(report: dict[str, Any]) -> Table:
    """What an export wrote: format, files, size, exact or approximate, engines."""
    table = Table(title=f"export {report.get('run_dir', '')} ({report.get('quant', '')}) -> {report['format']}",
                  show_header=False)
    table.add_column("what")
    table.add_column("value")
    rows = [
        ("output", report.get("output", "")),
        ("file", report.get("file", "")),
        ("type", report.get("gguf_type") or report.get("compression_format", "")),
        ("integers", "the run's, bit for bit" if report.get("exact") else "re-rounded: approximate (see notes)"),
        ("values", "the run's exactly" if report.get("values_exact") else "see notes"),
        ("size", f"{(report.get('file_bytes') or report.get('weight_bytes') or 0) / 2**20:.1f} MiB"),
        ("tensor types", ", ".join(f"{k}: {v}" for k, v in report.get("tensor_types", {}).items())),
        ("vs fp16", f"{report['size_vs_fp16']:.3f}x" if "size_vs_fp16" in report else ""),
        ("loads in", report.get("engines", "")),
    ]
    for name, value in rows:
        if value:
            table.add_row(name, str(value))
    for note in report.get("notes", []):
        table.add_row("note", note)
    return table


def print_export(report: dict[str, Any], console: Console | None = None) -> None:
    (console or Console()).print(export_table(report))
