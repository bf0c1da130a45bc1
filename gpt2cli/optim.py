"""The optimizer of a training run, built from the spec for a finished (possibly wrapped) model.

- ``adamw`` / ``adam``: one optimizer, weight decay only on 2-D weights (matrices and embeddings).
- ``muon``: Muon (Jordan et al. 2024, torch.optim.Muon) for the matrices of the decoder blocks:
  the momentum of each matrix's gradient is orthogonalised by Newton-Schulz iterations before it is
  applied. Its learning rate is scaled per matrix the way Moonshot's "Muon is Scalable for LLM
  Training" (Liu et al. 2025) does (``0.2 * sqrt(max(rows, cols))``), so that the updates have
  AdamW's RMS and the run's lr and weight decay carry over from AdamW unchanged. Everything Muon
  is not meant for (the token and position embeddings, the output layer tied to them, biases,
  LayerNorm gains, learnable RoPE frequencies) stays with AdamW.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from gpt2cli.errors import UserError
from gpt2cli.specs import DEFAULT_MUON_MOMENTUM, TrainSpec

# The first torch release with torch.optim.Muon.
MUON_TORCH = "2.9"


class OptimizerSet:
    """Several optimizers stepped as one: what the training loop, the gradient scaler and the
    checkpoint code see. ``param_groups`` holds every optimizer's groups (the same dicts), so a
    step's learning rate set on them reaches each optimizer; iterating gives the optimizers, which
    is how torch.distributed.checkpoint's optimizer state functions take several."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self, closure: Any = None) -> None:
        for optimizer in self.optimizers:
            optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)


def check_optimizer(spec: TrainSpec) -> None:
    """What --optimizer needs of this torch, said before anything is written."""
    if spec.optim.name == "muon" and not hasattr(torch.optim, "Muon"):
        raise UserError(f"--optimizer muon needs torch {MUON_TORCH} or newer (torch.optim.Muon); this is "
                        f"torch {torch.__version__}", "upgrade torch, or use --optimizer adamw")


def muon_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The weights of the model's linear layers that are not an embedding: for GPT, the attention
    and MLP matrices of every block (the output layer is the token embedding, tied)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.requires_grad and id(module.weight) not in embeddings:
            found.setdefault(id(module.weight), module.weight)
    return list(found.values())


def _adam(params: list[nn.Parameter], spec: TrainSpec, device: torch.device, decoupled: bool) -> torch.optim.Optimizer:
    o = spec.optim
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": o.weight_decay if decoupled else 0.0},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps}
    if device.type == "cuda":
        kwargs["fused"] = True
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return cls([g for g in groups if g["params"]], **kwargs)


def build_optimizer(
    model: nn.Module, spec: TrainSpec, device: torch.device
) -> torch.optim.Optimizer | OptimizerSet:
    """AdamW/Adam (fused on CUDA), or Muon for the block matrices with AdamW for the rest."""
    o = spec.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name != "muon":
        return _adam(params, spec, device, decoupled=o.name == "adamw")
    check_optimizer(spec)
    matrices = muon_matrices(model)
    in_muon = {id(p) for p in matrices}
    momentum = o.muon_momentum if o.muon_momentum is not None else DEFAULT_MUON_MOMENTUM
    muon = torch.optim.Muon(matrices, lr=o.lr, weight_decay=o.weight_decay, momentum=momentum,
                            nesterov=True, adjust_lr_fn="match_rms_adamw")
    rest = _adam([p for p in params if id(p) not in in_muon], spec, device, decoupled=True)
    return OptimizerSet([muon, rest])


def keep_settings_of(optimizer: torch.optim.Optimizer | OptimizerSet,
                     built: torch.optim.Optimizer | OptimizerSet) -> None:
    """Give ``optimizer``'s groups the settings (every key but the parameters) of ``built``, the
    same optimizer freshly built from the spec: loading a checkpoint's optimizer state replaces
    the groups' settings with the ones it was saved with."""
    loaded, wanted = optimizer.param_groups, built.param_groups
    if len(loaded) != len(wanted):
        raise RuntimeError(f"optimizer groups differ after loading: {len(loaded)} vs {len(wanted)}")
    for group, fresh in zip(loaded, wanted, strict=True):
        for key, value in fresh.items():
            if key != "params":
                group[key] = value
