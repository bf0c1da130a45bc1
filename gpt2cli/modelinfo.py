"""Size, compute and memory of a model spec, computed on the meta device (nothing is allocated).

The numbers behind `gpt2 info`:

- ``params``: every parameter, the tied embedding/output matrix once.
- ``non_embedding_params``: without the token and position embeddings (Kaplan et al. 2020).
- ``flops_per_token``: training FLOPs per token, 6N + 12·L·T·d (PaLM appendix B; nanoGPT's
  ``estimate_mfu``): N = ``flops_params``, the parameters without position embeddings (the tied
  token embedding stays in: it is the output layer's matmul; a position lookup is no matmul), 6N
  for the matmuls of forward (2N) and backward (4N), 12·L·T·d for attention scores and weighted
  values over T positions. N is neither ``params`` (which counts the position embeddings) nor
  Kaplan et al.'s non-embedding count (which also leaves out the output layer).
- ``kv_cache_bytes_per_token``: 2·L·n_kv_head·head_dim·bytes, what decoding keeps per token.
- ``memory``: a per-process training estimate (see :func:`training_memory`).
"""

from __future__ import annotations

from typing import Any

import torch

from gpt2cli.errors import UserError
from gpt2cli.model.gpt import GPT, kv_cache_bytes_per_token
from gpt2cli.specs import ModelSpec

FP32_BYTES = 4
BF16_BYTES = 2
# Activations kept for backward per token and layer, in bytes at 16-bit precision, with a fused
# attention kernel (no T x T score matrix stored): Korthikanti et al. 2022, "Reducing Activation
# Recomputation in Large Transformer Models", eq. 2 without the 5·a·s/h attention-matrix term.
ACTIVATION_BYTES_PER_TOKEN_LAYER_PER_WIDTH = 34


def model_stats(
    spec: ModelSpec, seq_len: int | None = None, world_size: int = 1, batch_size: int = 1
) -> dict[str, Any]:
    """Parameters, FLOPs per token, KV-cache bytes and per-process training memory for ``spec``
    at sequence length ``seq_len`` (default: block_size) and ``world_size`` processes."""
    seq_len = spec.block_size if seq_len is None else seq_len
    if not 0 < seq_len <= spec.block_size:
        raise UserError(
            f"seq_len {seq_len} must be between 1 and block_size ({spec.block_size})",
            "lower --seq-len or raise --block-size" if seq_len > 0 else "pass --seq-len 1 or more",
        )
    if world_size < 1:
        raise UserError(
            f"world_size must be at least 1, got {world_size}", "pass --world-size 1 or more"
        )
    if batch_size < 1:
        raise UserError(
            f"batch_size must be at least 1, got {batch_size}", "pass a positive batch size"
        )

    with torch.device("meta"):
        model = GPT(spec)
    params = model.num_params()
    params_no_pos = model.num_params(exclude_position_embeddings=True)
    embedding = model.transformer.wte.weight.numel()
    non_embedding = params_no_pos - embedding
    block_params = sum(p.numel() for p in model.transformer.h[0].parameters())

    flops_per_token = 6 * params_no_pos + 12 * spec.n_layer * seq_len * spec.n_embd
    return {
        "params": params,
        "non_embedding_params": non_embedding,
        "embedding_params": params - non_embedding,
        "params_per_block": block_params,
        "flops_params": params_no_pos,  # the N of 6N in flops_per_token
        "seq_len": seq_len,
        "flops_per_token": flops_per_token,
        "flops_per_sequence": flops_per_token * seq_len,
        "kv_cache_bytes_per_token": {
            "fp32": kv_cache_bytes_per_token(spec, FP32_BYTES),
            "bf16": kv_cache_bytes_per_token(spec, BF16_BYTES),
        },
        # What the same shape would cache with one key/value head per query head: the GQA saving.
        "kv_cache_bytes_per_token_mha": {
            "fp32": 2 * spec.n_layer * spec.n_head * spec.head_dim * FP32_BYTES,
            "bf16": 2 * spec.n_layer * spec.n_head * spec.head_dim * BF16_BYTES,
        },
        "memory": training_memory(spec, params, block_params, seq_len, world_size, batch_size),
    }


def training_memory(
    spec: ModelSpec,
    params: int,
    block_params: int,
    seq_len: int,
    world_size: int,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Rough training memory per process, in bytes, for single, DDP and FSDP.

    Assumes fp32 parameters, fp32 gradients and AdamW (two fp32 moments per parameter), and bf16
    autocast activations for ``batch_size`` sequences of ``seq_len`` tokens. Not counted: the
    allocator's fragmentation, CUDA context, temporary buffers of kernels.

    - single: everything in one process.
    - ddp: the same, plus DDP's gradient buckets (a second copy of the gradients, unless
      ``gradient_as_bucket_view``).
    - fsdp: parameters, gradients and optimizer state divided by the world size, plus the full
      parameters being gathered: the root (embeddings, final norm) for the whole step and about
      two blocks at a time (the current one and the prefetched next).
    """
    activations = _activation_bytes(spec, seq_len, batch_size)
    weights = FP32_BYTES * params
    optimizer = 2 * FP32_BYTES * params

    def breakdown(
        params_b: int, grads_b: int, optim_b: int, extra_b: int, extra_name: str
    ) -> dict[str, int]:
        parts = {
            "params": params_b,
            "grads": grads_b,
            "optimizer": optim_b,
            extra_name: extra_b,
            "activations": activations,
        }
        return {**parts, "total": sum(parts.values())}

    root_params = params - spec.n_layer * block_params
    gathered = FP32_BYTES * (root_params + 2 * block_params) if world_size > 1 else 0
    shard = _ceil_div
    return {
        "world_size": world_size,
        "batch_size": batch_size,
        "assumptions": "fp32 params and grads, AdamW fp32 moments, bf16 activations",
        "single": breakdown(weights, weights, optimizer, 0, "buffers"),
        "ddp": breakdown(weights, weights, optimizer, weights, "buffers"),
        "fsdp": breakdown(
            shard(weights, world_size),
            shard(weights, world_size),
            shard(optimizer, world_size),
            gathered,
            "buffers",
        ),
    }


def _activation_bytes(spec: ModelSpec, seq_len: int, batch_size: int) -> int:
    tokens = seq_len * batch_size
    per_layer = ACTIVATION_BYTES_PER_TOKEN_LAYER_PER_WIDTH * tokens * spec.n_embd
    # Logits: bf16 from the head, their fp32 upcast for the loss, and the fp32 gradient.
    logits = tokens * spec.vocab_size * (BF16_BYTES + 2 * FP32_BYTES)
    return spec.n_layer * per_layer + logits


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
