"""Human-readable summary of a run: per-block losses and perplexities as a rich table."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}"


def summary_tables(results: dict[str, Any]) -> list[Table]:
    blocks = Table(title=f"{results.get('quant_tag', '')} per-block loss (MSE to the FP block output)")
    for column in ("block", "RTN loss", "init loss", "final loss", "final/RTN", "seconds"):
        blocks.add_column(column, justify="right")
    for m in results.get("blocks", []):
        ratio = m["final_loss"] / m["rtn_loss"] if m.get("rtn_loss") and "final_loss" in m else None
        blocks.add_row(
            str(m["block"]), _fmt(m.get("rtn_loss")), _fmt(m.get("init_loss")), _fmt(m.get("final_loss")),
            _fmt(ratio), f"{m.get('seconds', 0):.1f}",
        )
    measured = [m for m in results.get("blocks", []) if "final_loss" in m]
    if measured:
        rtn, init, final = (sum(m[k] for m in measured) for k in ("rtn_loss", "init_loss", "final_loss"))
        blocks.add_section()
        blocks.add_row("total", _fmt(rtn), _fmt(init), _fmt(final), _fmt(final / rtn if rtn else None),
                       f"{sum(m.get('seconds', 0) for m in measured):.1f}")
    ppl = Table(title="perplexity")
    ppl.add_column("method")
    datasets = sorted({d for table in results.get("perplexity", {}).values() for d in table})
    for dataset in datasets:
        ppl.add_column(dataset, justify="right")
    for method, table in results.get("perplexity", {}).items():
        ppl.add_row(method, *[_fmt(table[d]["ppl"]) if d in table else "-" for d in datasets])
    return [blocks, ppl]


def print_summary(results: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    for table in summary_tables(results):
        console.print(table)
    console.print(timing_line(results))


def timing_line(results: dict[str, Any]) -> str:
    """Calibration and wall time; after a resume, which numbers span all sessions and which this one."""
    calibration = results.get("calibration_seconds", 0.0)
    total = results.get("total_seconds", 0.0)
    if "resumed_at_block" not in results:
        return f"calibration: {calibration:.1f} s; total (load, calibration, evaluation, save): {total:.1f} s"
    return (f"calibration: {calibration:.1f} s over all sessions (this session resumed at block "
            f"{results['resumed_at_block']} and calibrated for {results.get('session_seconds', 0.0):.1f} s); "
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
