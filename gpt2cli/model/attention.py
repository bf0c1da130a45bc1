"""Causal self-attention with n_kv_head key/value heads (MHA, GQA and MQA in one module).

Grouped-query attention (Ainslie et al. 2023, https://arxiv.org/abs/2305.13245): the n_head query
heads are split into n_kv_head groups and every query head of group g attends with the key/value
head g. n_kv_head == n_head is plain multi-head attention (GPT-2), n_kv_head == 1 multi-query
attention. Fewer key/value heads shrink c_attn and, above all, the KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpt2cli.model.kv_cache import KVCache
from gpt2cli.model.rope import apply_rope
from gpt2cli.specs import ModelSpec

# torch >= 2.5 broadcasts key/value groups inside SDPA; older versions need the heads repeated.
SDPA_HAS_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)


def grouped_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """scaled_dot_product_attention where k, v may have fewer heads than q.

    q: (B, n_head, T, hs); k, v: (B, n_kv_head, S, hs) with n_kv_head dividing n_head.
    Returns (B, n_head, T, hs). Query head h uses key/value head h // (n_head / n_kv_head).
    """
    n_head, n_kv_head = q.shape[1], k.shape[1]
    if n_kv_head == n_head:
        # Plain MHA: no GQA flag, so that every SDPA kernel (flash, memory-efficient) stays eligible.
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal
        )
    if SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=True
        )
    group = n_head // n_kv_head
    k = k.repeat_interleave(group, dim=1)  # (B, n_head, S, hs)
    v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal
    )


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.n_head = spec.n_head
        self.n_kv_head = spec.kv_heads
        self.head_dim = spec.head_dim
        self.dropout = spec.dropout
        # One fused projection to [q | k | v]; with n_kv_head == n_head this is GPT-2's c_attn,
        # head-major inside each part, so the published weights load as they are.
        self.c_attn = nn.Linear(
            spec.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=spec.bias
        )
        self.c_proj = nn.Linear(self.n_head * self.head_dim, spec.n_embd, bias=spec.bias)
        self.resid_dropout = nn.Dropout(spec.dropout)
        # Set by GPT.setup_kv_cache for decoding; None while training.
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        input_pos: torch.Tensor | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape  # batch, sequence length, n_embd
        q, k, v = self.c_attn(x).split(
            [
                self.n_head * self.head_dim,
                self.n_kv_head * self.head_dim,
                self.n_kv_head * self.head_dim,
            ],
            dim=-1,
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        dropout_p = self.dropout if self.training else 0.0
        if self.kv_cache is None:
            y = grouped_sdpa(q, k, v, is_causal=True, dropout_p=dropout_p)  # (B, nh, T, hs)
        else:
            if input_pos is None:
                raise ValueError("attention with a KV cache needs input_pos")
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, S, hs), S = cache length
            if kv_len is not None:  # only the slots written so far (eager decoding; a view)
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
            k, v = k.to(q.dtype), v.to(q.dtype)
            # No mask where none is needed: at CPU decode steps SDPA without one was 1.1-2.4x
            # faster than the masked call, arange and compare included (docs/benchmarks.md).
            if kv_len is not None and T == 1:
                # One new token at position kv_len - 1: every key read is at or before it.
                y = grouped_sdpa(q, k, v, dropout_p=dropout_p)
            elif kv_len is not None and T == kv_len:
                # A prefill from position 0: plain causal attention.
                y = grouped_sdpa(q, k, v, is_causal=True, dropout_p=dropout_p)
            else:
                # Query at position p sees every cached key at a position <= p; slots not
                # written yet lie beyond p and stay hidden.
                key_pos = torch.arange(k.shape[2], device=x.device)
                mask = key_pos[None, :] <= input_pos[:, None]  # (T, S), True = attend
                y = grouped_sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = (
            y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        )  # heads side by side
        return self.resid_dropout(self.c_proj(y))
