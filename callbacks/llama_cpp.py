"""Check a run in llama.cpp itself: export it to GGUF and score it next to llama.cpp's own quantizer.

`LlamaCppCheck` (name it in a config's ``trainer.callbacks``) writes, before calibration, llama.cpp's
own quantization of the still unquantized model to the same GGUF type (F32 GGUF, then
``llama_model_quantize``: what a user would otherwise run). After the run is saved it exports the
run exactly to that type, scores both files in llama.cpp on the same evaluation windows (the run's
first evaluation dataset that loads), generates a few tokens from the exported file, records
everything in results.json (``llama_cpp``); the run's summary prints it.
"""
from __future__ import annotations

import logging
from pathlib import Path

from omniquant_pl.callback import CalibrationCallback, CalibrationRun
from omniquant_pl.errors import ConfigError, OmniQuantError

log = logging.getLogger(__name__)

FOLDER = "llama-cpp"  # <output_dir>/llama-cpp/: llama.cpp's own quantization of the original model


class LlamaCppCheck(CalibrationCallback):
    """Export to `gguf_type` (an exact type for the run's grid, e.g. Q4_0) and compare in llama.cpp."""

    rank_zero_only = True

    def __init__(self, gguf_type: str = "Q4_0", prompt: str = "The three primary colors are",
                 max_tokens: int = 32, threads: int | None = None) -> None:
        self.gguf_type, self.prompt, self.max_tokens, self.threads = gguf_type.upper(), prompt, max_tokens, threads

    def reference_path(self, run: CalibrationRun) -> Path:
        return Path(run.output_dir) / FOLDER / f"llama.cpp-{self.gguf_type}.gguf"

    def check_config(self, config) -> None:
        """Before the model loads: llama-cpp-python is installed, the run's grid stores exactly as the
        type, and the model is loaded whole."""
        from omniquant_pl.export.gguf import plan
        from omniquant_pl.export.llama_cpp import require_llama_cpp

        require_llama_cpp()
        try:
            exact = plan(config.quant, self.gguf_type, requantize=False) == "exact"
        except ConfigError as err:
            raise ConfigError(f"LlamaCppCheck compares exact exports: {str(err).split('; calibrate with')[0]}; "
                              "calibrate on that grid (e.g. configs/smollm2-135m/quickstart.yaml)") from None
        if not exact:
            raise ConfigError(f"LlamaCppCheck compares exact exports, and {self.gguf_type} is not one; give an exact "
                              "type: Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 on its grid")
        if config.model.streaming is True:
            raise ConfigError("LlamaCppCheck needs the whole model in memory; it does not run with model.streaming on; "
                              "remove it from trainer.callbacks and run omniquant export afterwards")

    def on_calibration_start(self, run: CalibrationRun) -> None:
        """llama.cpp's own quantization of the original model, while the model is still unquantized."""
        from omniquant_pl.export.gguf import model_to_gguf

        if run.streamed is not None:  # model.streaming auto chose to stream
            raise ConfigError("LlamaCppCheck needs the whole model in memory, and this run streams it; set "
                              "model.streaming: off, or remove the callback and run omniquant export afterwards")
        path = self.reference_path(run)
        if path.is_file():  # a resumed run keeps the reference it made before
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("llama.cpp's own %s quantization of the original model -> %s", self.gguf_type, path)
        model_to_gguf(run.model, path, self.gguf_type, **_tokenizer_source(run))

    def on_run_end(self, run: CalibrationRun, results) -> None:
        from omniquant_pl.export import ExportConfig, export_run

        if not run.config.save_model:
            log.warning("LlamaCppCheck: the run saved no model (save_model: false); nothing to export")
            return
        destination = Path(run.output_dir) / "export" / f"gguf-{self.gguf_type.lower()}"
        if not any(destination.glob("*.gguf")):
            export_run(run.output_dir, ExportConfig(format="gguf", gguf_type=self.gguf_type, output=str(destination)))
        exported = next(destination.glob("*.gguf"))
        dataset, ids = _evaluation_ids(run)
        cfg = run.config.eval
        rows = {"llama.cpp quantizer": self.reference_path(run), "OmniQuant export": exported}
        report = {"gguf_type": self.gguf_type, "dataset": dataset, "seqlen": cfg.seqlen, "rows": {}}
        for name, path in rows.items():
            scored = _score(path, ids, cfg.seqlen, cfg.max_windows, self.threads)
            report["rows"][name] = {"file": str(path.relative_to(run.output_dir)), "file_bytes": path.stat().st_size,
                                    "ppl": scored["ppl"], "windows": scored["windows"]}
        report["generation"] = {"prompt": self.prompt, "text": _generate(exported, self.prompt, self.max_tokens,
                                                                          self.threads)}
        results.llama_cpp = report  # printed with the run's summary (omniquant_pl/report.py)


def _tokenizer_source(run: CalibrationRun) -> dict:
    """Where the GGUF tokenizer comes from: the GGUF the model was loaded from, else its folder."""
    from omniquant_pl.models import resolve_model_path

    folder = Path(resolve_model_path(run.config.model.name_or_path))
    if run.config.model.gguf_file:
        return {"tokenizer_gguf": folder / run.config.model.gguf_file}
    return {"tokenizer_folder": folder}


def _evaluation_ids(run: CalibrationRun):
    """(dataset, token ids) of the first evaluation dataset that loads."""
    from omniquant_pl.calib.data import load_text, tokenize_cached

    for dataset in run.config.eval.datasets:
        try:
            return dataset, tokenize_cached(run.tokenizer, load_text(dataset, "eval"))
        except OmniQuantError as err:
            log.warning("LlamaCppCheck: %s cannot be loaded (%s); trying the next dataset", dataset, err)
    raise OmniQuantError("LlamaCppCheck: none of eval.datasets loads; give one that does (e.g. pydoc)")


def _score(path: Path, ids, seqlen: int, max_windows: int, threads: int | None) -> dict:
    from omniquant_pl.eval.llama_cpp import gguf_perplexity

    log.info("llama.cpp scores %s", path.name)
    return gguf_perplexity(path, ids, seqlen, max_windows, threads)


def _generate(path: Path, prompt: str, max_tokens: int, threads: int | None) -> str:
    """Greedy continuation of `prompt` by llama.cpp from the exported file."""
    from omniquant_pl.eval.llama_cpp import load_gguf

    model = load_gguf(path, 256, threads)
    try:
        out = model.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
        return out["choices"][0]["text"]
    finally:
        del model
