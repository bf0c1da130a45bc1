"""Output layer + cross-entropy in chunks of tokens, gradients computed in the same pass.

The plain loss, ``F.cross_entropy(h @ W.T, targets)``, holds three (tokens x vocab) fp32 tensors
at its peak: the logits, the log-softmax kept for backward and the logits' gradient. With
GPT-2's 50,257-token vocabulary that is 0.6 MB per token, which is most of a small model's
training memory (docs/benchmarks.md, scaling). Here the tokens go through in chunks: for each
chunk the logits are formed, the loss summed, and, when a gradient is wanted, the logits'
gradient (softmax minus one-hot) turned at once into the gradients of the hidden states and of
the weight, after which the chunk's logits are dropped. Backward only scales those stored
gradients by the incoming one. The matmuls are the same three as the plain path's, so no
arithmetic is added; what is saved is memory and passes over it.

The eager path of choice (CPU, or a GPU without torch.compile). Under torch.compile the plain
path is better: the compiler fuses the loss with the output layer by itself.
"""

from __future__ import annotations

import torch


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                reduction: str, want_grad: bool) -> torch.Tensor:
        n = hidden.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad else None
        w = weight.to(hidden.dtype)  # once, not per chunk (a no-op when the dtypes agree)
        for start in range(0, n, chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            logits = (h @ w.t()).float()  # (c, V)
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            # log-sum-exp by hand, in place: one exp pass serves both the loss and the softmax
            # (torch.logsumexp allocates a shifted copy and its exp is then done a second time).
            top = logits.amax(dim=-1)
            shifted_exp = logits.sub_(top[:, None]).exp_()  # exp(logit - max), in (0, 1]
            total = shifted_exp.sum(dim=-1)
            loss += (top + total.log() - target_logit).sum()
            if want_grad:
                # d loss_i / d logits_i = softmax_i - onehot(t_i); computed in place over the logits.
                probs = shifted_exp.div_(total[:, None])
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                g = probs.to(h.dtype)
                grad_hidden[start : start + chunk] = g @ w
                grad_weight += (g.t() @ h).float()
        scale = 1.0 / n if reduction == "mean" else 1.0
        if want_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.scale = scale
            ctx.weight_dtype = weight.dtype
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        factor = grad_loss * ctx.scale
        return (grad_hidden * factor.to(grad_hidden.dtype), (grad_weight * factor).to(ctx.weight_dtype),
                None, None, None, None)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                 chunk_tokens: int, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets`` (fp32), without ever holding the
    whole (tokens x vocab) logits. hidden: (N, d) or (B, T, d); weight: (V, d); targets: N ids."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, not {chunk_tokens}")
    # Decided out here: inside Function.forward grad mode is always off. Without a gradient to
    # come (evaluation), the per-chunk gradient work is skipped.
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                            chunk_tokens, reduction, want_grad)
