"""Int8 weight-only quantization; applied to a finished model from outside, for sampling and scoring.

Every ``nn.Linear`` of the model (the attention and MLP projections and the output layer) is
replaced by an :class:`Int8Linear`: its weight stored as int8 with one scale per output row
(symmetric, per channel: ``scale = max|w_row| / 127``, ``w ~ int8 * scale``), activations left in
the compute dtype. The weights then take a quarter of their fp32 bytes (half of bf16), which is
what a decode step at batch 1 spends its time reading. The scheme is gpt-fast's ``int8``
(``WeightOnlyInt8QuantHandler``); a weight's error is at most half a step of its row's scale.

The output layer is tied to the token embedding: it gets an int8 copy, and the embedding (read one
row per token) stays in the compute dtype.

Speed comes from ``torch.compile``. On the CPU one row (a batch-1 decode step) is then computed
as a fused multiply-and-sum, which inductor turns into a single pass over the int8 weight, a byte
per value. Other products convert the int8 weight to float and multiply (``F.linear``); eager CPU
decode steps (up to 8 rows) do it a cache-sized block of output rows at a time. Those read the
int8 bytes too, but the conversion costs more than the saved reads gain (0.7x fp32 at batch 1,
0.3x compiled at batch 8 on the CPU measured), so there int8 only saves memory
(docs/benchmarks.md, "Int8 weight-only decoding").
"""

from __future__ import annotations

from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn

from gpt2cli.specs import Quantize

QUANTIZE_CHOICES: tuple[str, ...] = get_args(Quantize)
# Rows up to which a compiled CPU product takes the fused multiply-and-sum (see forward). At 8 rows
# it ran at half the speed of F.linear with a dequantized weight (docs/benchmarks.md).
CPU_FUSED_MAX_ROWS = 1
# Eager CPU products of up to this many rows (decode steps) dequantize the weight this many output
# rows at a time into one small float block (256 x 3,072 fp32 = 3 MiB, which stays in cache) instead
# of writing a float copy of the whole weight to memory and reading it back.
CPU_BLOCKED_MAX_ROWS = 8
DEQUANTIZE_BLOCK = 256


class Int8Linear(nn.Module):
    """``y = x @ (int8 weight * row scales).T + bias``. Buffers: ``weight_int8`` (out, in) int8,
    ``scales`` (out,) in the compute dtype, ``bias`` (out,) or None."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        weight_int8, scales = quantize_per_row(linear.weight.detach())
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(weight_int8, scales.to(linear.weight.dtype), bias)

    @property
    def weight(self) -> torch.Tensor:
        """The weight the int8 values stand for, (out, in) in the scales' dtype: what a caller
        that needs the matrix itself (the chunked loss of the output layer) multiplies by."""
        return self.weight_int8.to(self.scales.dtype) * self.scales.unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        on_cpu, compiling = x.device.type == "cpu", torch.compiler.is_compiling()
        if on_cpu and compiling and rows <= CPU_FUSED_MAX_ROWS:
            # One row: inductor fuses this into one reduction over the int8 weight; through
            # F.linear it would first write the float weight out (tens of times slower).
            y = (x.unsqueeze(-2) * self.weight_int8.to(x.dtype)).sum(-1)
        elif on_cpu and not compiling and rows <= CPU_BLOCKED_MAX_ROWS:
            y = self._blockwise_product(x)
        else:
            y = F.linear(x, self.weight_int8.to(x.dtype))
        y = y * self.scales.to(y.dtype)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def _blockwise_product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ int8 weight.T without the scales, DEQUANTIZE_BLOCK output rows at a time."""
        x2 = x.reshape(-1, self.in_features)
        out_t = torch.empty(self.out_features, x2.shape[0], dtype=x.dtype, device=x.device)
        block = torch.empty(min(DEQUANTIZE_BLOCK, self.out_features), self.in_features, dtype=x.dtype,
                            device=x.device)
        for start in range(0, self.out_features, DEQUANTIZE_BLOCK):
            w = block[: min(DEQUANTIZE_BLOCK, self.out_features - start)]
            w.copy_(self.weight_int8[start : start + w.shape[0]])
            torch.mm(w, x2.t(), out=out_t[start : start + w.shape[0]])
        return out_t.t().reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_per_row(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (int8 values, fp32 scales) with weight ~ values * scales[:, None].
    Computed in fp32 whatever the weight's dtype; an all-zero row gets scale 1 (values 0)."""
    w = weight.float()
    max_abs = w.abs().amax(dim=1)
    scales = torch.where(max_abs > 0, max_abs / 127.0, torch.ones_like(max_abs))
    values = torch.round(w / scales.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return values, scales


def quantize_int8(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` of ``model`` (in place) by an :class:`Int8Linear` built from its
    current weight; returns how many were replaced. Quantize before casting the model to bf16:
    the scales are computed from the values at hand, and fp32 ones round less."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear.from_linear(child))
                replaced += 1
    return replaced


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (the tied embedding once), as held now."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total
