"""The learned integers as data: codes, scale and zero point of each quantized linear.

A `QuantizedWeight` is what a run's weight quantizer decided for one linear: the fused weight the
run evaluated is exactly `dequantize()` = (codes - zero) · scale, computed in fp32. Fusing writes
that value into the model, and every exporter reads the codes from here (per block, under
`<output_dir>/quantized/`), never re-deriving a grid from float weights.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from omniquant_pl.errors import OmniQuantError
from omniquant_pl.io import atomic_save_safetensors
from omniquant_pl.quant.primitives import dequantize_codes

CODES_DIR = "quantized"
OPTIONAL_PARTS = ("zero", "minimum", "super_scale", "super_min")
FORMAT_TAG = "omniquant-codes-v1"


@dataclass(frozen=True)
class QuantizedWeight:
    """One linear's weight on its integer grid.

    codes: (out, in) uint8 in [0, 2^b - 1] (asymmetric) or int8 in [-(2^(b-1) - 1), 2^(b-1) - 1]
    (symmetric; from -2^(b-1) on the gguf grid); scale: (out, in // group_size) fp32 (on gguf grids
    an fp16 value, negative for Q4_0-style rows whose largest-magnitude weight is positive); zero:
    same shape, uint8 in [0, 2^b - 1] for asymmetric min-max grids, else None; minimum: same shape,
    an fp16 value in fp32, for the asymmetric gguf grid (x = q·s + m), else None. Both None:
    symmetric.

    llama.cpp's K-quants (quant/kquant_grid.py) are two-level: a super-block of 256 weights holds
    fp16 factors d (and dmin) and small integer sub-block scales sc (and mins mn). Their scale and
    minimum are the products d·sc and -dmin·mn (exact in fp32); super_scale (out, in // 256) holds d
    and super_min dmin (None for the symmetric Q3_K and Q6_K), so the integers sc = scale / d and
    mn = -minimum / dmin are recovered exactly for packing.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    minimum: torch.Tensor | None = None
    super_scale: torch.Tensor | None = None
    super_min: torch.Tensor | None = None

    @property
    def symmetric(self) -> bool:
        return self.zero is None and self.minimum is None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def group_size(self) -> int:
        """Input columns per scale (in_features for per-channel grids)."""
        return self.codes.shape[1] // self.scale.shape[1]

    def offset(self) -> torch.Tensor | float:
        """(out, groups, 1) zero point or minimum in fp32, or 0.0 for symmetric grids."""
        value = self.minimum if self.minimum is not None else self.zero
        return 0.0 if value is None else value.float().unsqueeze(-1)

    def problems(self) -> list[str]:
        """What makes these codes impossible for their grid (empty when they are valid): codes or zero
        points outside the bit range, scales or minima that are not finite, mismatched shapes."""
        found = []
        low, high = ((0, 2**self.bits - 1) if not self.symmetric else (-(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1))
        codes = self.codes.to(torch.int32)
        if codes.numel() and (codes.min() < low or codes.max() > high):
            found.append(f"codes span {codes.min().item()}..{codes.max().item()}, outside {low}..{high} of "
                         f"{self.bits} bits")
        if self.zero is not None and self.zero.numel():
            zero = self.zero.to(torch.int32)
            if zero.min() < 0 or zero.max() > 2**self.bits - 1:
                found.append(f"zero points span {zero.min().item()}..{zero.max().item()}, outside 0..{2**self.bits - 1}")
        for name in ("scale", "minimum", "super_scale", "super_min"):
            value = getattr(self, name)
            if value is not None and not torch.isfinite(value).all():
                found.append(f"non-finite {name}s")
        if self.codes.ndim != 2 or self.scale.ndim != 2 or self.codes.shape[0] != self.scale.shape[0] or (
                self.scale.shape[1] == 0 or self.codes.shape[1] % self.scale.shape[1]):
            found.append(f"codes of shape {tuple(self.codes.shape)} do not fit scales of shape {tuple(self.scale.shape)}")
        return found

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(codes - zero)·scale, or codes·scale + minimum, in fp32 (the fake-quant arithmetic),
        then cast to `dtype`."""
        out, _ = self.shape
        groups = self.scale.shape[1]
        codes = self.codes.float().view(out, groups, self.group_size)  # (out, groups, group_size)
        rule = "gguf_asym" if self.minimum is not None else "minmax_asym"  # symmetric: q·s either way
        values = dequantize_codes(codes, self.scale.unsqueeze(-1), self.offset(), rule)
        return values.reshape(self.shape).to(dtype)

    def map_rows(self, function: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedWeight:
        """The same weight with `function` applied to every per-row tensor (a row permutation, say)."""
        def apply(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else function(value)

        return replace(self, codes=apply(self.codes), scale=apply(self.scale), zero=apply(self.zero),
                       minimum=apply(self.minimum), super_scale=apply(self.super_scale),
                       super_min=apply(self.super_min))

    def to_state(self, prefix: str) -> dict[str, torch.Tensor]:
        state = {f"{prefix}.codes": self.codes, f"{prefix}.scale": self.scale}
        for name in OPTIONAL_PARTS:
            if getattr(self, name) is not None:
                state[f"{prefix}.{name}"] = getattr(self, name)
        return state

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str, bits: int) -> QuantizedWeight:
        return cls(state[f"{prefix}.codes"], state[f"{prefix}.scale"], state.get(f"{prefix}.zero"), bits,
                   **{name: state.get(f"{prefix}.{name}") for name in OPTIONAL_PARTS[1:]})


def codes_path(output_dir: Path, index: int) -> Path:
    return Path(output_dir) / CODES_DIR / f"block_{index:03d}.safetensors"


def save_block_codes(output_dir: Path, index: int, weights: dict[str, QuantizedWeight]) -> Path:
    """Write one block's codes atomically (one file per block: no rewrite of earlier blocks)."""
    state: dict[str, torch.Tensor] = {}
    for name, weight in weights.items():
        state.update(weight.to_state(name))
    bits = {name: weight.bits for name, weight in weights.items()}
    path = codes_path(output_dir, index)
    atomic_save_safetensors(state, path, {"format": FORMAT_TAG, "bits": json.dumps(bits)})
    return path


def load_block_codes(output_dir: Path, index: int) -> dict[str, QuantizedWeight]:
    """One block's codes by linear name; a one-line error if the file is missing or unreadable."""
    from safetensors import safe_open

    path = codes_path(output_dir, index)
    if not path.is_file():
        raise OmniQuantError(
            f"{path} is missing: the run has no stored integer codes for block {index} (runs from before "
            "codes were stored, or an unfinished run); re-run calibrate --resume true to finish it"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (a safe_open handle)
    except Exception as err:  # safetensors raises several types for a damaged file
        raise OmniQuantError(f"cannot read {path} ({type(err).__name__}): the file is damaged; delete it and re-run the "
                             "same calibrate command with --resume true to rebuild it") from err
    if meta.get("format") != FORMAT_TAG:
        raise OmniQuantError(f"{path} is not an omniquant codes file (format {meta.get('format')!r}); delete it and "
                             "re-run the same calibrate command with --resume true to rebuild it")
    bits = json.loads(meta["bits"])
    return {name: QuantizedWeight.from_state(state, name, int(b)) for name, b in bits.items()}
