"""omniquant-pl: OmniQuant (LWC + LET) calibration as PyTorch Lightning, block by block."""
from __future__ import annotations

from omniquant_pl.config import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig
from omniquant_pl.errors import OmniQuantError
from omniquant_pl.hooks import CalibrationCallback

__version__ = "0.1.0"


def calibrate(config: RunConfig, callbacks: list | None = None, model=None, tokenizer=None) -> dict:
    """Run OmniQuant calibration; returns the results dict also written to results.json."""
    from omniquant_pl.preflight import check_run
    from omniquant_pl.sequencer import BlockSequencer

    check_run(config, model)  # everything that can be refused before the model loads
    return BlockSequencer(config, callbacks=callbacks, model=model, tokenizer=tokenizer).run()


__all__ = [
    "CalibConfig",
    "CalibrationCallback",
    "EvalConfig",
    "ModelConfig",
    "OmniQuantError",
    "QuantConfig",
    "RunConfig",
    "TrainConfig",
    "calibrate",
]
