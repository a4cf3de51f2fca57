"""PNG plot of the per-block loss: OmniQuant (final) vs RTN, written at the end of calibration."""
from __future__ import annotations

import logging
from pathlib import Path

from omniquant_pl.callback import CalibrationCallback

log = logging.getLogger(__name__)


class LossPlotCallback(CalibrationCallback):
    """Writes ``<output_dir>/block_losses.png`` (needs matplotlib: ``pip install -e .[plots]``)."""

    rank_zero_only = True  # data-parallel runs: rank 0 alone writes

    def __init__(self, filename: str = "block_losses.png") -> None:
        self.filename = filename

    def on_calibration_end(self, run, results) -> None:
        blocks = [b for b in results.blocks if b.final_loss is not None]
        if not blocks:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log.info("matplotlib is not installed: no %s (pip install matplotlib)", self.filename)
            return
        index = [b.block for b in blocks]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.plot(index, [b.rtn_loss for b in blocks], "o-", label="RTN")
        ax.plot(index, [b.init_loss for b in blocks], ".--", label="initial", alpha=0.6)
        ax.plot(index, [b.final_loss for b in blocks], "o-", label="OmniQuant (final)")
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_ylabel(f"{run.config.train.loss} to the FP block output")
        ax.set_title(f"{results.quant_tag} per-block loss")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        path = Path(run.output_dir) / self.filename
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        results.loss_plot = str(path)
