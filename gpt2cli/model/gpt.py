"""GPT-2 (Radford et al. 2019) as plain modules, with RoPE and grouped-query attention as options.

With the default spec this is GPT-2 exactly: learned absolute positions, multi-head attention,
pre-LayerNorm blocks, GELU (tanh approximation), weight-tied output layer, and parameter names
that map one-to-one onto the published checkpoints (``transformer.h.0.attn.c_attn.weight`` ...;
HF stores the four projection weights transposed, as Conv1D).

The model knows nothing about parallelism: FSDP wraps each ``transformer.h[i]`` from outside,
activation checkpointing may wrap blocks too, and the forward pass is a plain loop over them.
The loss is computed by the caller (it upcasts the logits first).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpt2cli.model.attention import CausalSelfAttention
from gpt2cli.model.kv_cache import KVCache
from gpt2cli.model.loss import chunked_linear_cross_entropy
from gpt2cli.model.rope import RotaryEmbedding
from gpt2cli.specs import ModelSpec

INIT_STD = 0.02  # GPT-2's initializer_range


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.c_fc = nn.Linear(spec.n_embd, 4 * spec.n_embd, bias=spec.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * spec.n_embd, spec.n_embd, bias=spec.bias)
        self.dropout = nn.Dropout(spec.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(
            self.c_proj(self.gelu(self.c_fc(x)))
        )  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """One decoder layer: pre-LayerNorm attention and MLP, each added to the residual stream."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(spec.n_embd, eps=spec.layer_norm_eps, bias=spec.bias)
        self.attn = CausalSelfAttention(spec)
        self.ln_2 = nn.LayerNorm(spec.n_embd, eps=spec.layer_norm_eps, bias=spec.bias)
        self.mlp = MLP(spec)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        input_pos: torch.Tensor | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, input_pos, kv_len)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        layers: dict[str, nn.Module] = {"wte": _embedding(spec.vocab_size, spec.n_embd)}
        if spec.pos == "learned":
            layers["wpe"] = _embedding(spec.block_size, spec.n_embd)
        layers["drop"] = nn.Dropout(spec.dropout)
        layers["h"] = nn.ModuleList([Block(spec) for _ in range(spec.n_layer)])
        layers["ln_f"] = nn.LayerNorm(spec.n_embd, eps=spec.layer_norm_eps, bias=spec.bias)
        self.transformer = nn.ModuleDict(layers)
        # One rotary table for all blocks: the angles depend on the position only.
        self.rope = (
            RotaryEmbedding(spec.head_dim, spec.rope_base, learnable=spec.rope_learnable)
            if spec.pos == "rope"
            else None
        )
        self.lm_head = nn.Linear(spec.n_embd, spec.vocab_size, bias=False)
        self.tie_weights()
        # On the meta device there is nothing to fill; whoever materialises the model
        # (to_empty) calls init_weights() or loads a state dict.
        if not self.lm_head.weight.is_meta:
            self.init_weights()

    @classmethod
    def uninitialised(cls, spec: ModelSpec, device: torch.device | str = "cpu") -> GPT:
        """A GPT whose weights are allocated on ``device`` but hold whatever memory held: for
        loading a state dict into. It skips the random initialisation, which the weights would
        overwrite and which takes seconds for the large presets (27 s for gpt2-xl on a 2-core
        CPU). The rotary table, a buffer that no state dict holds, is computed."""
        with torch.device("meta"):
            model = cls(spec)
        model.to_empty(device=device)
        model.tie_weights()
        if model.rope is not None:
            model.rope.reset_parameters()
        return model

    # ------------------------------------------------------------------------------ weights

    def tie_weights(self) -> None:
        """Share the token embedding with the output layer (GPT-2; Press & Wolf 2017).

        ``Module.to_empty`` gives every module its own new tensor, which unties them, so
        :meth:`init_weights` calls this again after materialising a meta-device model."""
        if self.lm_head.weight is not self.transformer.wte.weight:
            self.lm_head.weight = self.transformer.wte.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 initialisation, separate from ``__init__`` so that a model built on the meta
        device can be materialised (``to_empty``) and initialised afterwards."""
        self.tie_weights()
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not self.lm_head:  # lm_head is wte
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()  # weight 1, bias 0
        # Every block adds two residual projections to the stream; scaling them by 1/sqrt(2L)
        # keeps the stream's variance from growing with depth (GPT-2 paper, section 2.3).
        residual_std = INIT_STD / math.sqrt(2 * self.spec.n_layer)
        for block in self.transformer.h:
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=residual_std)
        if self.rope is not None:
            self.rope.reset_parameters()

    def num_params(self, exclude_position_embeddings: bool = False) -> int:
        """Parameter count; the tied embedding/output matrix counts once."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if exclude_position_embeddings and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    # ---------------------------------------------------------------------------- KV cache

    def setup_kv_cache(
        self,
        batch_size: int,
        max_seq_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Preallocate a key/value cache in every attention layer for decoding up to
        ``max_seq_len`` positions (default: block_size). dtype and device default to the
        model's. From now on forward() needs ``input_pos``."""
        max_seq_len = max_seq_len or self.spec.block_size
        if max_seq_len > self.spec.block_size:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds block_size {self.spec.block_size}")
        weight = self.transformer.wte.weight
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(
                batch_size,
                max_seq_len,
                self.spec.kv_heads,
                self.spec.head_dim,
                dtype=dtype or weight.dtype,
                device=device or weight.device,
            )

    def clear_kv_cache(self) -> None:
        """Drop the caches (back to training/full-sequence mode) and free their memory."""
        for block in self.transformer.h:
            block.attn.kv_cache = None

    @property
    def has_kv_cache(self) -> bool:
        return self.transformer.h[0].attn.kv_cache is not None

    def kv_cache_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes the cache holds per token (per sequence): keys and values of every layer."""
        return kv_cache_bytes_per_token(self.spec, dtype_bytes)

    # ----------------------------------------------------------------------------- forward

    def _hidden_states(self, idx: torch.Tensor, input_pos: torch.Tensor | None, kv_len: int | None) -> torch.Tensor:
        """The final LayerNorm's output (B, T, n_embd): what the output layer turns into logits."""
        T = idx.shape[1]
        if T > self.spec.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.spec.block_size}")
        if input_pos is None:
            if self.has_kv_cache:
                raise ValueError("with a KV cache set up, pass input_pos (the positions of idx)")
            input_pos = torch.arange(T, device=idx.device)
        x = self.transformer.wte(idx)  # (B, T, C)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(input_pos)  # (T, C) broadcast over the batch
        x = self.transformer.drop(x)
        rope = self.rope(input_pos) if self.rope is not None else None  # (T, hs/2) cos and sin
        for block in self.transformer.h:
            x = block(x, rope, input_pos, kv_len)
        return self.transformer.ln_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        *,
        targets: torch.Tensor | None = None,
        reduction: str = "mean",
        loss_chunk: int = 0,
        kv_len: int | None = None,
        last_only: bool = False,
        logits_at: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """idx: (B, T) token ids; input_pos: (T,) their positions (default 0..T-1; required with
        a KV cache). Returns logits (B, T, vocab_size) in the compute dtype (``last_only``: of the
        last position only, (B, 1, vocab_size): a prompt's prefill needs no more, and the output
        layer over every prompt token cost T x d x V FLOPs and a (B, T, V) tensor) or, given targets
        (B, T), the fp32 cross-entropy over all of them (``reduction`` "mean" or "sum").

        The loss lives here, inside forward, so that torch.compile of the model fuses it with the
        output layer: computed outside, the logits leave the graph and are copied to fp32 and
        through log-softmax in separate passes (about 9 ms of a 47 ms GPT-2 step on an H100,
        docs/benchmarks.md). ``loss_chunk`` > 0 takes the output layer and the loss that many
        tokens at a time (gpt2cli.model.loss): the same value, without ever holding the whole
        (tokens x vocab) logits; for eager execution, where nothing fuses them.

        ``kv_len`` (with a KV cache): the cache slots in use once idx is written, i.e. the last
        position + 1; attention then reads only those instead of the whole preallocated buffer.
        For eager CPU decoding: each value is a new shape, so compiled decoding leaves it None, and
        so does CUDA, where an attention kernel may plan per shape (gpt2cli.generate).

        ``logits_at`` (rows, positions), two (N,) index tensors: the logits of those N positions
        only, (N, vocab_size). For scoring a few tokens of each sequence (HellaSwag's endings,
        gpt2cli.hellaswag) without the output layer over every position. An argument of forward,
        not a method of its own, so that wrappers (FSDP's hooks that gather the weights) apply."""
        x = self._hidden_states(idx, input_pos, kv_len)
        if logits_at is not None:
            rows, positions = logits_at
            return self.lm_head(x[rows, positions])
        if targets is not None and loss_chunk > 0:
            return chunked_linear_cross_entropy(x, self.lm_head.weight, targets, chunk_tokens=loss_chunk,
                                                reduction=reduction)
        if last_only and targets is None:
            x = x[:, -1:, :]
        logits = self.lm_head(x)  # (B, T, vocab_size)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


def _embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding, built on the meta device (loading, FSDP) without its normal_ init: there that
    normal_ is a Python decomposition whose first call imports torch._dynamo, 1.5 s of every
    `gpt2 generate` and `gpt2 eval`. Elsewhere built as before, so that the random stream, and
    with it every seeded run, stays the same."""
    if torch.empty(0).is_meta:
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


def kv_cache_bytes_per_token(spec: ModelSpec, dtype_bytes: int) -> int:
    """2 (keys and values) x n_layer x n_kv_head x head_dim x bytes per element."""
    return 2 * spec.n_layer * spec.kv_heads * spec.head_dim * dtype_bytes
