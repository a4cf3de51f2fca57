"""Each block's Lightning Trainer, its logger, and fitting with retries on a non-finite loss."""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from omniquant_pl.block_module import BlockModule
from omniquant_pl.config import TrainConfig
from omniquant_pl.distributed import Processes, trainer_placement
from omniquant_pl.errors import NonFiniteLossError
from omniquant_pl.plan import RunPlan
from omniquant_pl.results import BlockResult

log = logging.getLogger(__name__)


def quiet_lightning() -> None:
    """One Trainer per block would repeat Lightning's start-up banners 30+ times: keep warnings only."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # blocks calibrate in eval mode
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")  # caches are in memory
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")


def block_logger(kind: str, output_dir: Path, index: int):
    """train.logger of block `index`'s Trainer: logs/block_XXX/ (CSV or TensorBoard), or none."""
    if kind == "none":
        return False
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(output_dir, name="logs", version=f"block_{index:03d}")
    return CSVLogger(output_dir, name="logs", version=f"block_{index:03d}")


class BlockTrainers:
    """Makes each block's Trainer from the run's plan, and fits a BlockModule with retries."""

    def __init__(self, plan: RunPlan, train: TrainConfig, processes: Processes, callbacks: list[Callback],
                 output_dir: Path, experts: bool) -> None:
        self.plan, self.train, self.processes = plan, train, processes
        self.callbacks, self.output_dir, self.experts = callbacks, output_dir, experts

    def make(self, index: int, batches_per_epoch: int) -> L.Trainer:
        import torch

        device = torch.device(self.plan.device)
        return L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            # one device, or Lightning's DDP strategy over torchrun's processes (experts that
            # receive no tokens on a process leave their parameters without a gradient there)
            **trainer_placement(self.processes, device, find_unused_parameters=self.experts),
            precision=self.plan.precision,
            max_epochs=self.train.epochs,
            logger=block_logger(self.train.logger, self.output_dir, index),
            callbacks=list(self.callbacks),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=batches_per_epoch,  # Lightning batches (chunks of steps): once per epoch
        )

    def fit_with_retries(self, index: int, module: BlockModule, loader, initial_state: dict,
                         result: BlockResult, attempts: int = 3) -> None:
        """Fit; on a non-finite loss restore the initial parameters and retry at half the lr."""
        for attempt in range(attempts):
            module.epoch_losses = []
            self.make(index, len(loader)).fit(module, train_dataloaders=loader)
            if all(math.isfinite(loss) for loss in module.epoch_losses):
                return
            module.load_learned_state(initial_state)
            module.lr_scale *= 0.5
            result.nonfinite_retries.append(
                {"attempt": attempt + 1, "epoch_losses": module.epoch_losses, "next_lr_scale": module.lr_scale})
            log.warning("block %d: non-finite loss; restored the initial parameters, retrying at lr x%.3g",
                        index, module.lr_scale)
        raise NonFiniteLossError(
            f"block {index}: the loss stayed non-finite after {attempts} attempts (lr down to x{module.lr_scale:.3g}); "
            "use train.precision: 32-true, or lower train.lwc_lr / train.let_lr. Finished blocks are saved; "
            "resume with --resume true"
        )
