"""Typed results: what a run measured (results.json, checkpoint.json) and what a saved model says
about its quantization (``config.omniquant``), written and read back through the same classes.

Every file carries `schema_version`. Files written before it existed (version 1) still load: their
run-wide settings (device, precision, compile, ...) sat at the top level, and are read into the
plan; keys a class does not know are kept in `extra`, so reading and writing again loses nothing.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from omniquant_pl.errors import OmniQuantError
from omniquant_pl.plan import RunPlan

SCHEMA_VERSION = 2


def _known(cls, data: dict) -> tuple[dict, dict]:
    """(the fields of dataclass `cls` in `data`, everything else)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}, {k: v for k, v in data.items() if k not in names}


@dataclass
class Perplexity:
    """Perplexity of one model on one text source."""

    ppl: float
    windows: int
    seqlen: int | None = None
    source: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> Perplexity:
        return cls(**_known(cls, data)[0])


@dataclass
class EvalResults:
    """Perplexities and task accuracies by method (fp, rtn, omniquant) and what could not be evaluated."""

    perplexity: dict[str, dict[str, Perplexity]] = field(default_factory=dict)  # method -> dataset -> result
    zeroshot: dict[str, dict[str, dict]] = field(default_factory=dict)  # method -> task -> lm-eval metrics
    skipped: dict[str, str] = field(default_factory=dict)  # dataset or "tasks" -> why it was skipped

    def to_dict(self) -> dict:
        """results.json's keys: perplexity always; zeroshot and skipped_eval where there are any."""
        data = {"perplexity": {m: {d: asdict(p) for d, p in table.items()} for m, table in self.perplexity.items()}}
        if self.zeroshot:
            data["zeroshot"] = self.zeroshot
        if self.skipped:
            data["skipped_eval"] = self.skipped
        return data

    @classmethod
    def from_dict(cls, data: dict) -> EvalResults:
        return cls({m: {d: Perplexity.from_dict(p) for d, p in table.items()}
                    for m, table in (data.get("perplexity") or {}).items()},
                   dict(data.get("zeroshot") or {}), dict(data.get("skipped_eval") or {}))

    def ppl(self, method: str, dataset: str) -> float | None:
        result = self.perplexity.get(method, {}).get(dataset)
        return None if result is None else result.ppl


@dataclass
class BlockResult:
    """One calibrated block: losses (train.loss of the block output to the FP block's), time and
    what the run did along the way."""

    block: int
    rtn_loss: float | None = None  # round-to-nearest weights (and activations), identity LET
    init_loss: float | None = None  # the learned parameters' initial values
    final_loss: float | None = None  # what the block ends with (after keep_best)
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    trained_loss: float | None = None  # keep_best kept other parameters: the trained ones' loss
    restored: str | None = None  # keep_best kept "initial" or "rtn"
    compiled_step: bool | None = None
    cuda_graph_step: bool | None = None
    expert_tokens: list[int] | None = None  # mixtures of experts: calibration tokens per expert
    nonfinite_retries: list[dict] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None and v != []}
        return {"block": self.block, **data, **self.extra}

    @classmethod
    def from_dict(cls, data: dict) -> BlockResult:
        known, extra = _known(cls, data)
        return cls(**known, extra=extra)


@dataclass
class RunResults:
    """results.json of a calibration run (and the results kept in checkpoint.json)."""

    config: dict = field(default_factory=dict)  # the run's RunConfig as a dict
    quant_tag: str = ""
    model_type: str = ""
    plan: RunPlan | None = None
    versions: dict[str, str] = field(default_factory=dict)  # the stack that calibrated the blocks
    blocks: list[BlockResult] = field(default_factory=list)
    evaluation: EvalResults = field(default_factory=EvalResults)
    calibration_source: str | None = None
    calibration_ids_sha256: str | None = None
    model_fingerprint: str | None = None  # fingerprint.model_fingerprint of the weights calibrated
    resumed_at_block: int | None = None
    resumed_with_versions: list[dict] = field(default_factory=list)
    calibration_seconds: float = 0.0  # training time of every block, over all sessions
    session_seconds: float | None = None  # this session's block loop
    total_seconds: float | None = None  # this session, load to save
    peak_accelerator_memory_bytes: int | None = None
    peak_host_memory_bytes: int | None = None
    loss_plot: str | None = None
    saved_model: str | None = None
    llama_cpp: dict | None = None  # callbacks.llama_cpp.LlamaCppCheck: the run's GGUF next to llama.cpp's own
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def perplexity(self) -> dict[str, dict[str, Perplexity]]:
        return self.evaluation.perplexity

    @property
    def zeroshot(self) -> dict[str, dict[str, dict]]:
        return self.evaluation.zeroshot

    @property
    def finished_blocks(self) -> int:
        return len(self.blocks)

    def to_dict(self) -> dict:
        """The results.json layout: optional values that were never set are left out."""
        data: dict[str, Any] = {"schema_version": self.schema_version}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("schema_version", "extra", "evaluation") or value is None:
                continue
            if f.name == "resumed_with_versions" and not value:
                continue
            data[f.name] = value
        data["plan"] = self.plan.to_dict() if self.plan is not None else None
        data["blocks"] = [block.to_dict() for block in self.blocks]
        data.update(self.evaluation.to_dict())
        return {**{k: v for k, v in data.items() if v is not None}, **self.extra}

    @classmethod
    def from_dict(cls, data: dict) -> RunResults:
        data = dict(data)
        version = data.pop("schema_version", 1)
        if version > SCHEMA_VERSION:
            raise ValueError(f"results written by a newer omniquant-pl (schema {version}; this one reads up to "
                             f"{SCHEMA_VERSION}): upgrade omniquant-pl")
        evaluation = EvalResults.from_dict(data)
        for key in ("perplexity", "zeroshot", "skipped_eval"):
            data.pop(key, None)
        plan = data.pop("plan", None)
        if version == 1:  # run-wide settings sat at the top level; the plan did not exist
            for key in ("device", "precision", "cache_device", "compile", "streaming", "processes"):
                data.setdefault("extra_v1", {})[key] = data.pop(key, None)
        known, extra = _known(cls, data)
        extra.update(extra.pop("extra_v1", {}))
        blocks = [BlockResult.from_dict(block) for block in known.pop("blocks", [])]
        return cls(**known, blocks=blocks, evaluation=evaluation,
                   plan=RunPlan.from_dict(plan) if plan else None, schema_version=SCHEMA_VERSION,
                   extra={k: v for k, v in extra.items() if v is not None})


def read_results(path: Path) -> RunResults:
    """A results.json (any schema version so far); a damaged or foreign file is a one-line error."""
    try:
        return RunResults.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as err:
        raise OmniQuantError(f"{path} is not a readable results.json ({type(err).__name__}: {str(err)[:80]})") from None


@dataclass
class ActivationQuant:
    """Activation quantization a saved weight-activation model applies at inference."""

    bits: int
    granularity: str = "per-token"
    symmetric: bool = False
    dynamic: bool = True
    targets: list[str] = field(default_factory=lambda: ["linear inputs", "attention q/k/v"])


@dataclass
class SavedModelMeta:
    """``config.omniquant`` of a saved model: the weights hold the fake-quantized values; with
    `activations` the inputs of every linear and q/k/v of attention are quantized per token."""

    method: str
    wbits: int
    abits: int = 16
    group_size: int = 0
    symmetric: bool = False
    grid: str = "minmax"
    fake_quant: bool = True
    activations: ActivationQuant | None = None
    rotate: str = "none"  # quant.rotate: folded into the weights (nothing to re-apply on load)
    rotate_seed: int = 0
    rotate_online: str = "none"  # quant.rotate_online: the loader rotates those linear inputs (rotate.py)
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def of_run(cls, quant) -> SavedModelMeta:
        """The metadata of a run with QuantConfig `quant`."""
        learned = (("lwc", quant.lwc), ("let", quant.let), ("rounding", getattr(quant, "rounding", False)),
                   ("weights", getattr(quant, "train_weights", False)))
        method = "omniquant-" + "+".join(m for m, on in learned if on)
        return cls(method=method, wbits=quant.wbits, abits=quant.abits, group_size=quant.group_size,
                   symmetric=quant.symmetric, grid=quant.grid, rotate=getattr(quant, "rotate", "none"),
                   rotate_seed=getattr(quant, "rotate_seed", 0), rotate_online=getattr(quant, "rotate_online", "none"),
                   activations=ActivationQuant(quant.abits) if quant.abits < 16 else None)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> SavedModelMeta | None:
        """None for a model without OmniQuant metadata; older files (no schema_version) load too."""
        if not data:
            return None
        known, _ = _known(cls, data)
        activations = known.pop("activations", None)
        known.pop("schema_version", None)
        return cls(**known, activations=ActivationQuant(**_known(ActivationQuant, activations)[0]) if activations
                   else None)

    def quant_config(self):
        """The QuantConfig this model was quantized with (the settings that shape evaluation)."""
        from omniquant_pl.config import QuantConfig

        return QuantConfig(wbits=self.wbits, abits=self.abits, group_size=self.group_size, symmetric=self.symmetric,
                           grid=self.grid)
