"""How far each GGUF file's block weights are from the float file's, weighted by the importance matrix:

    python benchmarks/gguf_weight_error.py --types Q5_K_M Q4_K_M     # files of benchmarks/gguf_mixes.py

For every block tensor, E = Σ_rows Σ_j E[x_j²]·(Q(w)_j − w_j)², with E[x_j²] from llama-imatrix's own
file (``in_sum2 / counts``, the calibration windows' statistics) and Q(w) the file's de-quantized values
(gguf-py); summed per stored type, for llama.cpp's quantizer, llama.cpp with the importance matrix, and
ours (each gguf_mixes.py work dir file). E is what the importance-matrix quantizer minimizes
(with its own extra weighting); ours minimizes block outputs' error instead, so a lower E is not a
lower perplexity. A tensor whose E is 0.0 holds the float weights exactly.
"""
from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def block_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (stored type, de-quantized values (rows, columns)) of every 2-D block tensor."""
    import gguf
    from gguf.quants import dequantize

    return {t.name: (t.tensor_type.name, dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1, int(t.shape[0])))
            for t in gguf.GGUFReader(str(path)).tensors if t.name.startswith("blk.") and len(t.shape) > 1}


def importance(path: Path) -> dict[str, np.ndarray]:
    """tensor name -> per-column E[x²] from a llama-imatrix GGUF file."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    return {name[:-len(".in_sum2")]: np.asarray(t.data, dtype=np.float64)
            / float(np.asarray(tensors[name[:-len(".in_sum2")] + ".counts"].data)[0])
            for name, t in tensors.items() if name.endswith(".in_sum2")}


def weighted_errors(path: Path, reference: dict, weights: dict) -> dict[str, dict[str, float]]:
    """stored type -> {"error": E summed, "tensors": count, "exact": tensors equal to the float ones}."""
    totals: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"error": 0.0, "tensors": 0, "exact": 0})
    for name, (kind, values) in block_tensors(path).items():
        difference = values - reference[name][1]
        totals[kind]["error"] += float((difference ** 2 * weights[name][None, :]).sum())
        totals[kind]["tensors"] += 1
        totals[kind]["exact"] += int(not difference.any())
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=["Q5_K_M"])
    parser.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "gguf-mixes")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "gguf-weight-error-smollm2-135m.json")
    args = parser.parse_args()
    from omniquant_pl.io import atomic_write_json

    reference = block_tensors(args.work_dir / "fp-F32.gguf")
    weights = importance(args.work_dir / "imatrix.gguf")
    rows = []
    for type_name in args.types:
        files = {"llama.cpp": args.work_dir / f"llama-cpp-{type_name}.gguf",
                 "llama.cpp + imatrix": args.work_dir / f"llama-cpp-imatrix-{type_name}.gguf",
                 "OmniQuant": next((args.work_dir / f"omniquant-{type_name.lower()}" / "export" / "gguf").glob("*.gguf"))}
        for method, path in files.items():
            by_type = weighted_errors(path, reference, weights)
            rows.append({"type": type_name, "method": method, "by_stored_type": by_type,
                         "error": sum(v["error"] for v in by_type.values())})
            shown = ", ".join(f"{k} {v['error']:.1f} ({v['exact']}/{v['tensors']} exact)" for k, v in sorted(by_type.items()))
            print(f"{type_name} {method}: {rows[-1]['error']:.1f}  [{shown}]", flush=True)
    report = {"benchmark": "gguf-weight-error", "command": "python benchmarks/gguf_weight_error.py --types "
              + " ".join(args.types), "model": "SmolLM2-135M (the Q4_1 GGUF de-quantized), files of gguf_mixes.py",
              "rows": rows}
    atomic_write_json(report, args.output)
    print(f"json: {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")


if __name__ == "__main__":
    main()
