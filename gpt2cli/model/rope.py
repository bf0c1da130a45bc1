"""Rotary position embeddings (RoFormer, Su et al. 2021, https://arxiv.org/abs/2104.09864).

Each head's dimensions are taken as (even, odd) pairs ``(x[2i], x[2i+1])``; the pair is rotated by
the angle ``pos * theta_i`` with ``theta_i = base^(-2i / head_dim)``:

    x'[2i]   = x[2i] * cos(pos * theta_i) - x[2i+1] * sin(pos * theta_i)
    x'[2i+1] = x[2i] * sin(pos * theta_i) + x[2i+1] * cos(pos * theta_i)

Rotations keep norms, and the dot product of a query rotated for position m with a key rotated for
position n depends only on m - n: attention sees relative positions. Queries and keys are rotated,
values are not.
"""

from __future__ import annotations

import torch
from torch import nn


def rope_inv_freq(
    head_dim: int, base: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """theta_i = base^(-2i/head_dim) for i = 0 .. head_dim/2 - 1, in fp32: (head_dim/2,)"""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return base**-exponents


class RotaryEmbedding(nn.Module):
    """Turns positions into the (cos, sin) tables that :func:`apply_rope` rotates with.

    One instance serves every block (the angles depend on the position only). With
    ``learnable=True`` the frequencies are an ``nn.Parameter`` (trained, and saved in the
    state_dict); otherwise they are a non-persistent buffer that :meth:`reset_parameters`
    recomputes, so checkpoints hold no derived values and meta-device init works.
    """

    def __init__(self, head_dim: int, base: float, learnable: bool = False) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head size, got {head_dim}")
        self.head_dim = head_dim
        self.base = base
        # Computed on the CPU and moved to the device being built on: on the meta device (loading,
        # FSDP) the power is a Python decomposition whose first call imports torch._dynamo (1.5 s of
        # every command that loads a model). reset_parameters recomputes it where the model lands.
        inv_freq = rope_inv_freq(head_dim, base, device="cpu").to(torch.empty(0).device)
        if learnable:
            self.inv_freq = nn.Parameter(inv_freq)
        else:
            self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.inv_freq.copy_(rope_inv_freq(self.head_dim, self.base, device=self.inv_freq.device))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) integer positions -> (cos, sin), each (T, head_dim/2) in fp32."""
        # Angles in fp32, also when the model runs in bf16: at position 1000 a bf16 angle is off by
        # several radians. An elementwise product, so autocast leaves it alone.
        angles = positions.float()[:, None] * self.inv_freq.float()[None, :]  # (T, head_dim/2)
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the (even, odd) pairs of the last dimension of x: (B, H, T, D) -> (B, H, T, D).

    cos, sin: (T, D/2), broadcast over batch and heads. The rotation runs in fp32 and the result
    is cast back to x's dtype.
    """
    xf = x.float()
    x_even, x_odd = xf[..., 0::2], xf[..., 1::2]  # (B, H, T, D/2) each
    rotated_even = x_even * cos - x_odd * sin
    rotated_odd = x_even * sin + x_odd * cos
    # Interleave back into (even, odd) order: stack -> (B, H, T, D/2, 2) -> (B, H, T, D)
    return torch.stack((rotated_even, rotated_odd), dim=-1).flatten(-2).type_as(x)
