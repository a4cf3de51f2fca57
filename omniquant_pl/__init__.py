"""omniquant-pl: OmniQuant (LWC + LET) calibration as PyTorch Lightning, block by block."""
from __future__ import annotations

from omniquant_pl.callback import CalibrationCallback
from omniquant_pl.config import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig
from omniquant_pl.errors import OmniQuantError
from omniquant_pl.versions import OMNIQUANT_PL_VERSION as __version__


def calibrate(config: RunConfig, callbacks: list | None = None, model=None, tokenizer=None):
    """Run OmniQuant calibration with the default callbacks (fuse, perplexity, progress, plot) plus
    `callbacks` (an instance of a default's class replaces it); returns the RunResults also written to
    results.json."""
    from callbacks import with_defaults
    from omniquant_pl.preflight import check_run
    from omniquant_pl.sequencer import BlockSequencer

    callbacks = with_defaults(callbacks)
    check_run(config, model)  # everything that can be refused before the model loads
    for callback in callbacks:
        if isinstance(callback, CalibrationCallback):
            callback.check_config(config)
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
    "__version__",
    "calibrate",
]
