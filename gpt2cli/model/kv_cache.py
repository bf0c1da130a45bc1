"""A preallocated key/value cache for incremental decoding (the gpt-fast shape).

Each attention layer owns one cache of fixed size (batch, n_kv_head, max_seq_len, head_dim). Only
the key/value heads are stored, so grouped-query attention shrinks the cache by n_head/n_kv_head.
Static shapes keep decoding friendly to torch.compile and CUDA graphs: every step attends over
the whole buffer and a mask hides the positions not written yet.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        n_kv_head: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_len, head_dim)
        # Non-persistent: a cache is scratch space, never part of a checkpoint.
        self.register_buffer(
            "k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False
        )
        self.register_buffer(
            "v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False
        )

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.shape[2]

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv_head, T, head_dim) at positions input_pos (T,); return the whole
        cache for this batch, (B, n_kv_head, max_seq_len, head_dim) each."""
        batch = k.shape[0]
        if k.shape[2] != input_pos.shape[0]:
            raise ValueError(
                f"input_pos has {input_pos.shape[0]} positions for {k.shape[2]} new keys"
            )
        if batch > self.k_cache.shape[0]:
            raise ValueError(
                f"batch {batch} exceeds the cache's batch size {self.k_cache.shape[0]}"
            )
        self.k_cache[:batch, :, input_pos] = k.to(self.k_cache.dtype)
        self.v_cache[:batch, :, input_pos] = v.to(self.v_cache.dtype)
        return self.k_cache[:batch], self.v_cache[:batch]

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()
