"""Every setting of gpt2, typed, documented and validated in one place.

The specs are pydantic models (``extra="forbid"``, frozen). They are the single source of truth
for defaults: the CLI reads its help text and defaults from here, config files are validated
against them, and a resolved spec is stored as JSON beside every run and inside every checkpoint.

This module imports no torch, so ``--help`` and validation stay fast.

Precedence when a spec is built (:func:`build_spec`): field defaults < ``--config FILE`` <
explicit command-line flags < ``--set section.field=value``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gpt2cli.errors import UserError
from gpt2cli.presets import (
    DEFAULT_PRESET_CPU,
    FALLBACK_LR,
    FINETUNE_LR_SCALE,
    PRESETS,
    RECOMMENDED_LR,
    preset_names,
)

SpecT = TypeVar("SpecT", bound=BaseModel)


def _annotation_types(annotation: Any) -> set[Any]:
    """The types an annotation names, through unions, optionals and Annotated."""
    args = get_args(annotation)
    if not args:
        return {annotation}
    return set().union(*(_annotation_types(a) for a in args))


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_true_or_false_for_a_number(cls, value: Any, info: Any) -> Any:
        """pydantic reads true as 1 for an int field: --set train.steps=true would train one step."""
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            types = _annotation_types(cls.model_fields[info.field_name].annotation)
            if bool not in types and types & {int, float}:
                raise ValueError(f"must be a number, not {str(value).lower()}")
        return value


DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps."
GPT2_VOCAB_SIZE = 50257  # the GPT-2 BPE's tokens: gpt2cli.tokenizer.VOCAB_SIZE, here without importing tiktoken


def _check_device(value: str) -> str:
    """The one device check of every spec with a device field (train, eval, generate), so that a
    typo like ``tpu`` is a one-line settings error, never a torch traceback."""
    if not DEVICE_RE.match(value):
        raise ValueError(f"must be {DEVICE_HELP.rstrip('.')}, got {value!r}")
    return value


Device = Annotated[str, AfterValidator(_check_device)]
# Weight-only quantization of the linear layers for sampling and scoring (gpt2cli.quantize).
Quantize = Literal["none", "int8"]


# --------------------------------------------------------------------------------------- model


class ModelSpec(_Spec):
    """The network: GPT-2 by default, with RoPE and grouped-query attention as options."""

    preset: str | None = Field(
        None,
        description="Named size the other fields start from (tiny, nano, mini, gpt2, gpt2-medium, "
        "gpt2-large, gpt2-xl); explicit fields override it.",
    )
    vocab_size: int = Field(GPT2_VOCAB_SIZE, gt=0, description="Vocabulary size (GPT-2 BPE: 50257).")
    block_size: int = Field(1024, gt=0, description="Context length: the most positions the model sees.")
    n_layer: int = Field(12, gt=0, description="Number of decoder blocks.")
    n_head: int = Field(12, gt=0, description="Number of query heads per attention layer.")
    n_embd: int = Field(768, gt=0, description="Width of the residual stream; divisible by n_head.")
    attn: Literal["mha", "gqa", "mqa"] = Field(
        "mha",
        description="Attention: mha (every head has its own keys/values), gqa (n_kv_head shared "
        "key/value heads), mqa (one key/value head).",
    )
    n_kv_head: int | None = Field(
        None,
        gt=0,
        description="Key/value heads; divides n_head. Defaults: mha -> n_head, mqa -> 1, "
        "gqa -> the divisor of n_head between 1 and n_head closest to n_head/4 (gqa with 1 is mqa).",
    )
    pos: Literal["learned", "rope"] = Field(
        "learned", description="Positions: learned absolute embeddings (GPT-2) or rotary (RoFormer)."
    )
    rope_base: float = Field(10000.0, gt=1.0, description="RoPE base: theta_i = base^(-2i/head_dim).")
    rope_learnable: bool = Field(False, description="Make the rotary frequencies trainable parameters.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on embeddings, attention and residuals.")
    bias: bool = Field(True, description="Biases in Linear and LayerNorm layers, as GPT-2 has.")
    layer_norm_eps: float = Field(1e-5, gt=0.0, description="LayerNorm epsilon (GPT-2: 1e-5).")

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any) -> Any:
        """Expand the preset (explicit fields win), then write the number of key/value heads
        into the spec so that the resolved spec says it."""
        if not isinstance(data, dict):
            return data
        name = data.get("preset")
        if name is not None:
            if name not in PRESETS:
                raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
            data = {**PRESETS[name], **data}
        if data.get("n_kv_head") is not None:
            if data.get("attn") == "gqa" and data["n_kv_head"] == 1:
                # One group of all query heads is multi-query attention: named so, whether a user
                # asked for it or a checkpoint of an older version stored it under gqa.
                return {**data, "attn": "mqa"}
            return data
        n_head = data.get("n_head", cls.model_fields["n_head"].default)
        attn = data.get("attn", "mha")
        if not isinstance(n_head, int) or n_head <= 0:
            return data  # the field validator reports it
        if attn == "mqa":
            kv = 1
        elif attn == "gqa":
            # Groups of several query heads and more than one group (1 < K < H): K = 1 is mqa.
            divisors = [d for d in range(2, n_head) if n_head % d == 0]
            if not divisors:
                return data  # no such K (n_head prime or < 4): the check below says what to use
            kv = min(divisors, key=lambda d: (abs(d - n_head / 4), -d))
        else:
            kv = n_head
        return {**data, "n_kv_head": kv}

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        kv = self.n_kv_head
        if kv is None:  # attn=gqa and no K with 1 < K < n_head divides n_head
            raise ValueError(
                f"attn=gqa needs a kv-head count between 1 and n_head that divides n_head ({self.n_head}), "
                f"and {self.n_head} has none; use attn=mqa (one kv head) or attn=mha"
            )
        if self.n_head % kv:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({kv})")
        if self.attn == "mha" and kv != self.n_head:
            raise ValueError(
                f"attn=mha needs n_kv_head == n_head ({self.n_head}), got {kv}; use attn=gqa for fewer kv heads"
            )
        if self.attn == "mqa" and kv != 1:
            raise ValueError(f"attn=mqa needs n_kv_head == 1, got {kv}")
        if self.attn == "gqa" and kv == self.n_head:
            raise ValueError(
                f"attn=gqa needs fewer kv heads than n_head ({self.n_head}); use attn=mha for equal counts"
            )
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"pos=rope needs an even head size, got {self.head_dim} (n_embd / n_head)")
        if self.rope_learnable and self.pos != "rope":
            raise ValueError("rope_learnable needs pos=rope")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        assert self.n_kv_head is not None
        return self.n_kv_head

    def shape_fields(self) -> dict[str, Any]:
        """The fields that decide parameter shapes (a resume must keep them)."""
        keys = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "pos",
                "rope_learnable", "bias")
        return {k: getattr(self, k) for k in keys}


# ---------------------------------------------------------------------------------------- data


class PrepareSpec(_Spec):
    """`gpt2 data`: turn a text corpus into GPT-2 token files."""

    sources: list[str] = Field(
        default_factory=list,
        description="Files, folders, globs, saved datasets or a Hugging Face dataset name; "
        "empty = the embedded tiny Shakespeare corpus.",
    )
    out: str | None = Field(
        None,
        description="Output folder for the token files and meta.json; default: data/<name of the first "
        "source> (data/tinyshakespeare for the embedded corpus).",
    )
    text_column: str = Field("text", description="Column holding the text in JSONL, parquet and datasets.")
    subset: str | None = Field(None, description="Hugging Face dataset configuration (subset) name.")
    split: str = Field("train", description="Hugging Face dataset split to read.")
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of documents for validation (by position for one document)."
    )
    max_docs: int | None = Field(None, gt=0, description="Read at most this many non-empty documents.")
    max_tokens: int | None = Field(None, gt=0, description="Stop after about this many tokens.")
    num_proc: int | None = Field(
        None, gt=0, description="Parallel tokenizer workers (threads; tiktoken releases the GIL); default: all cores."
    )
    errors: Literal["strict", "replace"] = Field(
        "strict", description="Non-UTF-8 text: strict stops with the file's name, replace substitutes U+FFFD."
    )
    overwrite: bool = Field(False, description="Replace an existing output folder.")


class DataSpec(_Spec):
    """Where training and evaluation read tokens from."""

    dir: str | None = Field(
        None,
        description="A folder written by `gpt2 data`; default: the embedded corpus, prepared on first use.",
    )
    train_split: str = Field("train", description="Split the model trains on.")
    val_split: str = Field("val", description="Split used for evaluation during training.")


# ----------------------------------------------------------------------------------- optimizer


# Adam moves each weight by about lr per step: far above any learning rate that trains (GPT-2
# uses 6e-4), and low enough that the optimizer's arithmetic cannot overflow (lr 1e38 did).
MAX_LR = 10.0
# The share of a wsd run that decays: 20%, where Hägele et al. 2024 ("Scaling Laws and
# Compute-Optimal Training Beyond Fixed Training Durations") found it matching cosine.
DEFAULT_DECAY_FRACTION = 0.2
# Muon's momentum (Nesterov), as in Keller Jordan's Muon and torch.optim.Muon.
DEFAULT_MUON_MOMENTUM = 0.95


def default_min_lr(lr: float) -> float:
    """lr / 10, rounded to 15 significant digits: 3e-4 / 10 is 2.9999999999999997e-05 in binary,
    which spec.json and --dry-run would show as such."""
    return float(f"{lr / 10:.15g}")


class OptimSpec(_Spec):
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "adam", "muon"] = Field(
        "adamw",
        description="Optimizer (weight decay only on 2-D weights). muon: Muon for the blocks' matrices, its "
        "steps scaled to AdamW's size so lr and weight decay carry over, and AdamW for embeddings, biases and "
        "norms; needs torch 2.9 or newer.",
    )
    lr: float = Field(
        6e-4, gt=0.0, le=MAX_LR, allow_inf_nan=False,
        description=f"Peak learning rate, at most {MAX_LR:g}; in gpt2 train the default depends on the preset "
        "(nano 2e-3, gpt2 6e-4), a tenth of that when fine-tuning (run.init).",
    )
    min_lr: float | None = Field(
        None, ge=0.0, allow_inf_nan=False,
        description="Where the decay ends, at most lr; default lr / 10. Reached one step past the last "
        "(the last step is one decay step above it); with schedule wsd, at the last step.",
    )
    warmup: int | None = Field(
        None, ge=0,
        description="Linear warm-up steps; default: 5% of the steps, fixed when the run starts (a resume "
        "with a larger budget keeps it).",
    )
    schedule: Literal["cosine", "linear", "constant", "wsd"] = Field(
        "cosine", description="Decay from lr to min_lr after warm-up; wsd (warm-up, stable, decay) holds lr "
        "and decays linearly over the last decay_fraction of the steps, so a run can be extended from any "
        "checkpoint before its decay.",
    )
    decay_fraction: float | None = Field(
        None, gt=0.0, le=1.0, allow_inf_nan=False,
        description="With schedule wsd: the share of the steps, at the end, that decays from lr to min_lr; "
        f"default {DEFAULT_DECAY_FRACTION:g}.",
    )
    weight_decay: float = Field(0.1, ge=0.0, description="Decoupled weight decay on 2-D weights (AdamW).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas (beta1, beta2).")
    eps: float = Field(1e-8, gt=0.0, description="Adam epsilon.")
    grad_clip: float = Field(1.0, ge=0.0, description="Clip the global gradient norm to this; 0 = off.")
    muon_momentum: float | None = Field(
        None, ge=0.0, lt=1.0,
        description=f"With optimizer muon: its (Nesterov) momentum; default {DEFAULT_MUON_MOMENTUM:g}.",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_min_lr(cls, data: Any) -> Any:
        """min_lr defaults to lr / 10, derived only from a valid lr: an invalid one is reported
        once, for lr, not a second time for a min_lr the user never set."""
        if isinstance(data, dict) and data.get("min_lr") is None:
            lr = data.get("lr", cls.model_fields["lr"].default)
            if isinstance(lr, bool) or not isinstance(lr, (int, float, str)):
                return data
            try:
                value = float(lr)
            except ValueError:
                return data
            if math.isfinite(value) and value > 0:
                return {**data, "min_lr": default_min_lr(value)}
        return data

    @model_validator(mode="after")
    def _check(self) -> OptimSpec:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {list(self.betas)}")
        assert self.min_lr is not None
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self


# ---------------------------------------------------------------------------------------- train

# Seeds are 32-bit, as in NumPy: the trainer derives per-step seeds from them (seed x 1,000,003 +
# rank x 7,919 + step), which must stay within the 64 bits torch.manual_seed takes.
MAX_SEED = 2**32 - 1
DEFAULT_STEPS = 200  # the default run: nano on tiny Shakespeare, about 4 minutes on a 2-core CPU
# Tokens per chunk of the output layer + loss when it runs eagerly (gpt2cli.model.loss): 512 x
# 50,257 fp32 logits = 103 MB per chunk, large enough for efficient matmuls.
DEFAULT_LOSS_CHUNK = 512


class TrainingSpec(_Spec):
    """The training loop: budget, batch arithmetic, precision, device."""

    steps: int | None = Field(
        None, gt=0, description=f"Optimizer steps to run; default {DEFAULT_STEPS} unless tokens is set."
    )
    tokens: int | None = Field(None, gt=0, description="Train on this many tokens (sets steps from the global batch).")
    batch_size: int = Field(16, gt=0, description="Sequences per process per micro-step.")
    seq_len: int | None = Field(None, gt=0, description="Tokens per sequence; default: the model's block_size.")
    grad_accum: int = Field(1, gt=0, description="Micro-steps per optimizer step.")
    batch_tokens: int | None = Field(
        None, gt=0,
        description="Global batch in tokens; sets grad_accum from batch_size, seq_len and world size.",
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Compute precision: auto = bf16 autocast on CUDA with bf16, else fp32."
    )
    compile: bool | None = Field(None, description="torch.compile the model; default: on for CUDA, off otherwise.")
    loss_chunk: int | None = Field(
        None, ge=0,
        description="Output layer and loss in chunks of this many tokens, gradients in the same pass, so the "
        "(tokens x vocab) logits are never held whole; 0 = off. Default: "
        f"{DEFAULT_LOSS_CHUNK} without compile off CUDA; 0 with compile (the compiler fuses the loss) "
        "and on CUDA (faster there; set it to save memory).",
    )
    device: Device = Field("auto", description=DEVICE_HELP)
    seed: int = Field(1337, ge=0, le=MAX_SEED, description="Seed for initialisation, data order and dropout.")
    log_every: int = Field(10, gt=0, description="Steps between metric rows (the only host syncs).")
    profile: int = Field(
        0, ge=0,
        description="Record this many steps (after the first two) with torch.profiler: RUN/profile/trace.json "
        "(a Chrome trace for ui.perfetto.dev) and RUN/profile/top-ops.txt (ops by device time); 0 = off.",
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="A NaN/inf loss or gradient: stop before the optimizer step, or skip the step."
    )
    max_nonfinite_skips: int = Field(
        5, gt=0,
        description="With on_nonfinite=skip: skip at most this many non-finite steps in a row; the next one "
        "in a row stops the run.",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainingSpec:
        if self.steps is not None and self.tokens is not None:
            raise ValueError("give steps or tokens, not both")
        if self.batch_tokens is not None and self.grad_accum != 1:
            raise ValueError("give grad_accum or batch_tokens, not both")
        return self


class EvalSpec(_Spec):
    """Evaluation during training."""

    every: int = Field(100, gt=0, description="Steps between evaluations (and best.pt updates).")
    tokens: int = Field(16384, gt=0, description="Validation tokens per evaluation: the split's first tokens // seq_len windows, "
                        "at least one.")
    batch_size: int | None = Field(None, gt=0, description="Sequences per eval batch; default: the train batch size.")
    patience: int | None = Field(
        None, gt=0,
        description="Stop early once the val loss has not improved for this many evaluations in a row "
        "(a checkpoint is written there; best.pt holds the best model). Default: off.",
    )
    hellaswag: str | None = Field(
        None,
        description="Also score HellaSwag at every evaluation (acc and acc_norm, in metrics.jsonl): val for "
        "its validation set (downloaded once into the cache), a .jsonl file or a URL. Default: off.",
    )
    hellaswag_examples: int | None = Field(
        None, gt=0,
        description="With eval.hellaswag: the examples each evaluation scores, from the start of the file; "
        "default: all of them.",
    )

    @model_validator(mode="after")
    def _check_hellaswag(self) -> EvalSpec:
        if self.hellaswag_examples is not None and self.hellaswag is None:
            raise ValueError("eval.hellaswag_examples needs eval.hellaswag (the HellaSwag data to score)")
        return self


class ParallelSpec(_Spec):
    """How many processes train, and how the model is spread over them."""

    strategy: Literal["single", "ddp", "fsdp"] = Field(
        "single", description="single device, DDP (replicated) or FSDP (sharded with fully_shard)."
    )
    nproc: int | None = Field(None, gt=0, description="Processes per node on any device (gloo on CPU).")
    gpus: int | None = Field(None, gt=0, description="CUDA GPUs per node (one process each, NCCL).")
    nnodes: int = Field(1, gt=0, description="Number of nodes (torchrun rendezvous).")
    node_rank: int | None = Field(None, ge=0, description="This node's rank when nnodes > 1 (else from rendezvous).")
    rdzv_endpoint: str | None = Field(None, description="host:port of the c10d rendezvous for multi-node runs.")
    rdzv_id: str = Field("gpt2", description="Rendezvous id shared by every node of one job.")
    max_restarts: int = Field(0, ge=0, description="Elastic restarts after a worker fails (each resumes).")
    dist_timeout: float = Field(300.0, gt=0, description="Seconds a collective may wait before the job fails.")
    fsdp_reshard_after_forward: bool = Field(True, description="FSDP: free gathered weights after forward.")
    fsdp_cpu_offload: bool = Field(False, description="FSDP on CUDA: keep sharded parameters and optimizer state in CPU memory.")
    activation_checkpointing: bool = Field(False, description="Recompute block activations in backward to save memory.")

    @model_validator(mode="after")
    def _check(self) -> ParallelSpec:
        # Several processes under strategy single are refused in TrainSpec, after the check of
        # gpus against the device, so that --gpus on the CPU hears that first.
        if self.nproc is not None and self.gpus is not None and self.nproc != self.gpus:
            raise ValueError(f"nproc ({self.nproc}) and gpus ({self.gpus}) disagree; give one of them")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (host:port of the rendezvous)")
        if self.nnodes == 1 and (self.node_rank is not None or self.rdzv_endpoint):
            given = "--node-rank (node_rank)" if self.node_rank is not None else "--rdzv-endpoint (rdzv_endpoint)"
            # A node that forgot --nnodes would otherwise train a job of its own, unnoticed.
            raise ValueError(f"{given} is for runs over several nodes; add --nnodes N, or drop it")
        if self.strategy != "fsdp":
            # FSDP settings would be silently ignored under another strategy.
            if self.fsdp_cpu_offload:
                raise ValueError(f"--fsdp-cpu-offload (fsdp_cpu_offload) is an FSDP setting and does nothing under "
                                 f"--strategy {self.strategy}; use --strategy fsdp or --no-fsdp-cpu-offload")
            if not self.fsdp_reshard_after_forward:
                raise ValueError(
                    f"--no-fsdp-reshard-after-forward (fsdp_reshard_after_forward) is an FSDP setting and does "
                    f"nothing under --strategy {self.strategy}; use --strategy fsdp or --fsdp-reshard-after-forward"
                )
        return self

    @property
    def procs_per_node(self) -> int:
        return self.gpus or self.nproc or 1


class RunSpec(_Spec):
    """The run folder: where outputs go, how often checkpoints are written, resume."""

    out: str | None = Field(None, description="Run folder; default: runs/<preset>-<attn>-<pos>-<time>.")
    runs_dir: str = Field("runs", description="Parent of auto-named run folders.")
    resume: str | None = Field(
        None, description="auto (the run's latest complete checkpoint, if any), a run folder or a checkpoint file."
    )
    init: str | None = Field(
        None,
        description="Fine-tune: start from these weights (a checkpoint, run folder, safetensors export, "
        "Hugging Face GPT-2 folder or hub name such as gpt2); the model's shape comes from them, the "
        "optimizer, schedule and data order start fresh. A resumed run continues from its checkpoint.",
    )
    save_every: int | None = Field(None, gt=0, description="Steps between ckpt.pt writes; default: eval.every.")
    keep: int = Field(0, ge=0, description="Also keep the last K step checkpoints (step-N.pt).")
    quiet: bool = Field(False, description="Print only errors and the final summary.")
    tensorboard: bool = Field(
        False,
        description="Also write the metrics as TensorBoard events into RUN/tensorboard/ (view with "
        "tensorboard --logdir runs); needs the tensorboard package (pip install tensorboard).",
    )
    wandb: bool = Field(
        False,
        description="Also log the metrics to Weights & Biases (a resume continues the same W&B run); needs "
        "the wandb package (pip install wandb) and wandb login, or WANDB_MODE=offline (wandb sync later).",
    )
    wandb_project: str | None = Field(None, description="W&B project; default: $WANDB_PROJECT, else gpt2.")
    wandb_name: str | None = Field(None, description="W&B run name; default: the run folder's name.")


class TrainSpec(_Spec):
    """Everything `gpt2 train` needs; stored as spec.json in the run folder and in checkpoints."""

    model: ModelSpec = Field(
        default_factory=lambda: ModelSpec(preset=DEFAULT_PRESET_CPU),
        description="The network; fields not given come from the preset (default: nano).",
    )
    data: DataSpec = Field(default_factory=DataSpec, description="Token data for training and evaluation.")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="Optimizer and learning-rate schedule.")
    train: TrainingSpec = Field(default_factory=TrainingSpec, description="Budget, batch, precision, device.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Evaluation during training.")
    parallel: ParallelSpec = Field(default_factory=ParallelSpec, description="Processes and sharding.")
    run: RunSpec = Field(default_factory=RunSpec, description="Run folder, checkpoints, resume.")

    @model_validator(mode="before")
    @classmethod
    def _default_preset(cls, data: Any) -> Any:
        """A model section without a preset starts from the default training preset, so that
        `--n-layer 2` means "nano with two layers", not "GPT-2 124M with two layers". A ModelSpec
        object is taken as built (on its own, a ModelSpec without a preset is GPT-2's shape).
        Without an explicit learning rate, the preset's recommended one is written into the spec,
        for a dict and an object alike."""
        if not isinstance(data, dict):
            return data
        model = data.get("model", {})
        if isinstance(model, dict) and "preset" not in model:
            model = {"preset": DEFAULT_PRESET_CPU, **model}
            data = {**data, "model": model}
        optim = data.get("optim", {})
        if isinstance(optim, OptimSpec):
            return data  # built with its own lr
        preset = model.preset if isinstance(model, ModelSpec) else model.get("preset") if isinstance(model, dict) else None
        if isinstance(optim, dict) and optim.get("lr") is None:
            lr = RECOMMENDED_LR.get(preset or "", FALLBACK_LR)
            run = data.get("run", {})
            if (run.init if isinstance(run, RunSpec) else run.get("init") if isinstance(run, dict) else None):
                lr *= FINETUNE_LR_SCALE
            data = {**data, "optim": {**optim, "lr": lr}}
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        seq_len = self.train.seq_len
        if seq_len is not None and seq_len > self.model.block_size:
            raise ValueError(
                f"train.seq_len ({seq_len}) exceeds model.block_size ({self.model.block_size})"
            )
        p, device = self.parallel, self.train.device
        # Checked here rather than in ParallelSpec, so that --gpus with --device cpu is told that
        # --gpus needs CUDA GPUs before it is told to pick a strategy.
        if p.gpus and device not in ("auto", "cuda"):
            if device.startswith("cuda"):
                raise ValueError(
                    f"--gpus {p.gpus} puts one process on each CUDA GPU itself; it takes --device auto or cuda, "
                    f"not {device}"
                )
            raise ValueError(
                f"--gpus needs CUDA GPUs, not --device {device}; for {p.gpus} processes on the CPU use "
                f"--strategy ddp --nproc {p.gpus} --device cpu"
            )
        if p.fsdp_cpu_offload and device in ("cpu", "mps"):
            # --device auto is checked where the device is resolved (gpt2cli.parallel.check_cpu_offload).
            raise ValueError(f"--fsdp-cpu-offload (parallel.fsdp_cpu_offload) needs a CUDA device, not --device "
                             f"{device}: it moves FSDP's shards from GPU memory to the CPU; drop it")
        if self.optim.name == "muon" and p.strategy == "fsdp":
            raise ValueError("--optimizer muon does not run under --strategy fsdp: its Newton-Schulz step needs "
                             "whole matrices and FSDP holds shards; use --strategy ddp, or --optimizer adamw")
        if self.eval.hellaswag is not None and self.model.vocab_size < GPT2_VOCAB_SIZE:
            raise ValueError(f"eval.hellaswag needs the GPT-2 vocabulary ({GPT2_VOCAB_SIZE:,} tokens) that its text "
                             f"is encoded with; model.vocab_size is {self.model.vocab_size:,}")
        world = p.procs_per_node * p.nnodes
        if p.strategy == "single" and world > 1:
            given = [f"--gpus {p.gpus}" if p.gpus else f"--nproc {p.nproc}" if p.nproc else None,
                     f"--nnodes {p.nnodes}" if p.nnodes > 1 else None]
            message = (f"{world} processes ({', '.join(g for g in given if g)}) need --strategy ddp or "
                       "--strategy fsdp")
            if p.gpus:
                message += f"; without CUDA GPUs use --strategy ddp --nproc {p.gpus} --device cpu"
            raise ValueError(message)
        return self

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.block_size

    @property
    def save_every(self) -> int:
        return self.run.save_every or self.eval.every

    @property
    def eval_batch_size(self) -> int:
        return self.eval.batch_size or self.train.batch_size


# ------------------------------------------------------------------------------ eval, generate


# EvaluateSpec fields that only one task reads: setting one for the other task is refused.
LOSS_TASK_FIELDS = ("data", "split", "tokens", "seq_len")
DOWNSTREAM_TASK_FIELDS = ("task_data", "examples")  # hellaswag, lambada


class EvaluateSpec(_Spec):
    """`gpt2 eval`: score checkpoints on the same token windows, or on the same examples of a downstream task."""

    checkpoints: list[str] = Field(default_factory=list, description="Checkpoint files, run folders or HF GPT-2 folders.")
    task: Literal["loss", "hellaswag", "lambada"] = Field(
        "loss",
        description="What to score: loss (loss, perplexity and bits per byte on token windows), hellaswag "
        "(accuracy at choosing the right one of 4 endings, scored completion style as llm.c does) or lambada "
        "(accuracy and perplexity of a passage's last word, as lm-evaluation-harness's lambada_openai).",
    )
    data: str | None = Field(None, description="Token folder from `gpt2 data`; default: the embedded corpus.")
    split: str = Field("val", description="Split to score.")
    tokens: int | None = Field(
        None, gt=0,
        description="Score the split's first tokens // seq_len windows, at least one (so a value below "
        "seq_len still scores one full window); default: the whole split.",
    )
    task_data: str | None = Field(
        None,
        description="--task hellaswag or lambada: the task's .jsonl file or URL; default (or val): its "
        "published set (HellaSwag's validation set, 10,042 examples; OpenAI's LAMBADA test set, 5,153), "
        "downloaded once into the cache.",
    )
    examples: int | None = Field(
        None, gt=0, description="--task hellaswag or lambada: how many examples to score, from the start of the file; "
        "default: all of them."
    )
    batch_size: int = Field(8, gt=0, description="Windows per batch (--task hellaswag or lambada: examples, all "
                            "their endings).")
    seq_len: int | None = Field(None, gt=1, description="Window length; default: the model's block_size.")
    device: Device = Field("auto", description=DEVICE_HELP)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Compute precision.")
    quantize: Quantize = Field(
        "none",
        description="Score the models with int8 weight-only linear layers (as gpt2 generate --quantize "
        "int8 samples from them): what the quantization costs in loss.",
    )
    format: Literal["table", "json"] = Field("table", description="Output format.")

    @model_validator(mode="after")
    def _check_task_fields(self) -> EvaluateSpec:
        other = DOWNSTREAM_TASK_FIELDS if self.task == "loss" else LOSS_TASK_FIELDS
        given = [name for name in other if name in self.model_fields_set and getattr(self, name) is not None]
        if given:
            # As typed on the command line, with the field a file or --set names.
            names = " and ".join(f"--{name.replace('_', '-')} ({name})" for name in given)
            raise ValueError(f"{names} {'does' if len(given) == 1 else 'do'} not apply to task {self.task}; "
                             f"leave {'it' if len(given) == 1 else 'them'} out or use the other --task")
        return self


class GenerateSpec(_Spec):
    """`gpt2 generate`: sampling settings."""

    max_new_tokens: int = Field(200, gt=0, description="Tokens to sample after the prompt.")
    temperature: float = Field(0.8, ge=0.0, allow_inf_nan=False, description="Softmax temperature; 0 = greedy.")
    top_k: int | None = Field(
        200, ge=0, description="Sample from the k most likely tokens only; 0 (or null) = no limit."
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False,
                                description="Nucleus sampling: smallest set with this mass.")
    seed: int = Field(1337, ge=0, le=MAX_SEED, description="Sampling seed: same seed and settings give the same text.")
    num_samples: int = Field(1, gt=0, description="Samples decoded together as one batch.")
    stop: list[str] = Field(default_factory=list, description="Strings that end a sample (repeatable).")
    ignore_eos: bool = Field(False, description="Keep sampling after <|endoftext|>.")
    device: Device = Field("auto", description=DEVICE_HELP)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Compute precision.")
    compile: bool = Field(False, description="torch.compile the decoding step.")
    quantize: Quantize = Field(
        "none",
        description="Weight-only quantization of the linear layers: int8 = int8 weights with one scale per "
        "output row (a quarter of the fp32 bytes, half of bf16). Faster only with --compile.",
    )
    sync_every: int | None = Field(
        None,
        gt=0,
        description="Decode steps queued on the device before their tokens are read back (text "
        "streams in groups this long; a few steps past the end are computed, never shown). "
        "Default: 16 on a GPU, 1 on the CPU.",
    )

    @field_validator("top_k")
    @classmethod
    def _top_k_zero_is_no_limit(cls, value: int | None) -> int | None:
        """0 means no limit wherever it comes from (--top-k, --set, a config file): stored as None."""
        return None if value == 0 else value

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("a stop string must not be empty; give the text that should end a sample")
        return value


class CompareSpec(_Spec):
    """`gpt2 compare`: side-by-side table of runs."""

    runs: list[str] = Field(
        default_factory=list, description="Run folders, or parent folders of runs (a sweep's folder)."
    )
    metric: Literal["val_loss", "val_ppl", "train_loss", "hellaswag_acc_norm"] = Field(
        "val_loss",
        description="Metric that ranks the runs and that --target refers to: val_loss, val_ppl, train_loss "
        "(lower is better) or hellaswag_acc_norm (higher is better; runs trained with --hellaswag).",
    )
    target: float | None = Field(
        None, allow_inf_nan=False,
        description="Report the tokens and wall time each run took to first reach this metric value.",
    )
    plot: str | None = Field(
        None, description="Write val and train loss (and HellaSwag acc_norm, where logged) against tokens to "
        "this PNG or SVG file."
    )
    plot_vs: str | None = Field(
        None,
        description="With --plot, add a panel: the ranking metric (best val loss by default) of every column "
        "against this numeric spec field (e.g. lr), mean ± std, one line per value of the other fields "
        "that differ.",
    )
    format: Literal["table", "markdown", "json", "csv"] = Field("table", description="Output format.")
    group_by: str | None = Field(
        None,
        description="Group runs by these spec fields (dotted paths or unique field names, "
        "comma-separated, e.g. model.pos or pos,attn) and show mean ± std (n).",
    )
    group_seeds: bool = Field(
        True,
        description="Show runs whose specs differ only by train.seed as one column (mean ± std); "
        "off: one column per run.",
    )
    chart: bool = Field(True, description="With the table format and no --plot, draw a loss chart in the terminal.")

    @model_validator(mode="after")
    def _check_target(self) -> CompareSpec:
        # A value the metric can take: a perplexity is at least 1, an accuracy lies in [0, 1], a
        # loss is not negative. Any other target could never be reached (and a log-scale plot of
        # perplexity has no place for its line).
        lowest, highest = {"val_ppl": (1.0, None), "hellaswag_acc_norm": (0.0, 1.0)}.get(self.metric, (0.0, None))
        t = self.target
        if t is not None and (t < lowest or (highest is not None and t > highest)):
            allowed = f"between {lowest:g} and {highest:g}" if highest is not None else f"at least {lowest:g}"
            raise ValueError(f"--target {t:g} is not a value of {self.metric}, which is {allowed}")
        return self


# -------------------------------------------------------------------------- building a spec


def read_config_file(path: str | Path, flag: str = "--config") -> dict[str, Any]:
    """Read a TOML, YAML or JSON file into a dict (the format is chosen by its extension);
    ``flag`` is the option that named it, for the error messages."""
    p = Path(path)
    what = "config file" if flag == "--config" else f"{flag} file"
    if p.is_dir():
        raise UserError(f"{what} {str(p)!r} is a folder", f"give {flag} a .toml, .yaml or .json file")
    if not p.is_file():
        raise UserError(f"{what} {str(p)!r} does not exist", f"check the {flag} path")
    suffix = p.suffix.lower()
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {str(p)!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                        f"{exc.start:,})", f"give {flag} a text file") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {str(p)!r}: {exc.strerror or exc}", "check its permissions") from None
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise UserError(
                f"config file {str(p)!r} has an unknown type {suffix!r}", "use .toml, .yaml, .yml or .json"
            )
    except UserError:
        raise
    except Exception as exc:  # parse errors of three libraries
        raise UserError(f"cannot parse config file {str(p)!r}: {exc}".replace("\n", " "), "fix its syntax") from exc
    if not isinstance(data, dict):
        raise UserError(f"config file {str(p)!r} must hold a mapping of sections", "see docs/specs.md")
    return data


def parse_set(assignment: str) -> tuple[list[str], Any]:
    """Parse ``section.field=value`` (or ``field=value``); the value is read as YAML (numbers,
    booleans, lists, null)."""
    import yaml

    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"--set {assignment!r} is not of the form section.field=value (gpt2 train) or field=value",
                        "e.g. --set optim.lr=3e-4, or --set top_k=50 for gpt2 generate")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return base with override merged in, recursing into nested dicts."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {path[-1]: value}
    for key in reversed(path[:-1]):
        out = {key: out}
    return out


def build_spec(
    spec_cls: type[SpecT],
    *,
    config_file: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
    flag_names: dict[str, str] | None = None,
    set_prefix: str | None = None,
) -> SpecT:
    """Build and validate a spec: defaults < config file < flags < ``--set`` assignments.

    ``flags`` is nested like the spec (``{"optim": {"lr": 3e-4}}``); entries whose value is None
    count as "not given" and are dropped, so a flag's absence never overrides a file. ``base``
    (a stored spec, when resuming) sits under the file. ``flag_names`` maps dotted field paths to
    the flags that set them, so errors name what the user typed. ``set_prefix``: for a spec
    without sections (generate, eval, ...), ``--set PREFIX.field=value`` means ``field=value``.
    """
    layers = _named_layers(config_file=config_file, flags=flags, sets=sets, base=base, set_prefix=set_prefix)
    # An error names the route the offending value came by: the flag, the --set, or the file.
    # A flag name alone would send the user looking for a flag they never typed.
    names: dict[str, str] = {}
    for route, tree in layers:
        for path in _leaf_paths(tree):
            flag = (flag_names or {}).get(path) if route == _FLAG_ROUTE else None
            names[path] = f"{flag} ({{path}})" if flag else route
    try:
        return spec_cls.model_validate(_merge_layers(layers))
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, names), "see --help or docs/specs.md") from exc


def _leaf_paths(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted paths of a nested dict's leaves (a section's dict is not a leaf)."""
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        paths.extend(_leaf_paths(value, path + ".") if isinstance(value, dict) and value else [path])
    return paths


# Settings that say one thing two ways: a budget in steps or in tokens, a global batch by
# accumulation or in tokens. A layer that sets one of a pair replaces the other from the layers
# below it (a --steps over a config file's tokens, a --tokens on resuming a run of --steps), as it
# replaces the same setting; both in one layer stay an error.
ALTERNATIVES = (("train", "steps", "tokens"), ("train", "grad_accum", "batch_tokens"))


def _layer(lower: dict[str, Any], upper: dict[str, Any]) -> dict[str, Any]:
    """``upper`` merged over ``lower``, each of ALTERNATIVES that ``upper`` sets replacing its other."""
    merged = deep_merge(lower, upper)
    for section, one, other in ALTERNATIVES:
        given = upper.get(section)
        below = merged.get(section)
        if not isinstance(given, dict) or not isinstance(below, dict):
            continue
        for setting, replaced in ((one, other), (other, one)):
            if given.get(setting) is not None and replaced not in given and replaced in below:
                merged[section] = {k: v for k, v in below.items() if k != replaced}
    return merged


def layer_settings(
    *,
    config_file: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
    set_prefix: str | None = None,
) -> dict[str, Any]:
    """The nested settings before validation: base < config file < flags < ``--set``. Without a
    base, what the user set by any route (`gpt2 train` reads its resume and preset from this).
    ``set_prefix``: a leading ``PREFIX.`` of a ``--set`` key is dropped (see :func:`build_spec`)."""
    return _merge_layers(_named_layers(config_file=config_file, flags=flags, sets=sets, base=base,
                                       set_prefix=set_prefix))


# How an error names a setting of each layer ({path}: its dotted path); a flag's own name, where
# known, replaces _FLAG_ROUTE.
_FLAG_ROUTE = "{path}"


def _named_layers(*, config_file: str | Path | None, flags: dict[str, Any] | None, sets: list[str] | tuple[str, ...],
                  base: dict[str, Any] | None, set_prefix: str | None) -> list[tuple[str, dict[str, Any]]]:
    """The given layers, lowest first, each with how its settings are named in an error. Every
    --set is one layer together: two of one pair of ALTERNATIVES stay an error, as two flags do."""
    layers: list[tuple[str, dict[str, Any]]] = []
    if base:
        layers.append(("{path} (stored in the resumed run)", base))
    if config_file:
        # replace, not format, fills {path} in: a file name may hold braces of its own
        layers.append((f"{{path}} (in {config_file})", read_config_file(config_file)))
    layers.append((_FLAG_ROUTE, drop_none(flags or {})))
    assigned: dict[str, Any] = {}
    for assignment in sets:
        path, value = parse_set(assignment)
        if set_prefix is not None and len(path) > 1 and path[0] == set_prefix:
            path = path[1:]
        assigned = deep_merge(assigned, _nest(path, value))
    layers.append(("--set {path}", assigned))
    return layers


def _merge_layers(layers: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for _, tree in layers:
        merged = _layer(merged, tree)
    return merged


def drop_none(tree: dict[str, Any]) -> dict[str, Any]:
    """Remove None leaves (and sections left empty) from a nested dict."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            sub = drop_none(value)
            if sub:
                out[key] = sub
        elif value is not None:
            out[key] = value
    return out


def validate_spec(spec_cls: type[SpecT], data: dict[str, Any], flag_names: dict[str, str] | None = None) -> SpecT:
    """Validate, turning pydantic's report into one user-facing line."""
    try:
        return spec_cls.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, flag_names), "see --help or docs/specs.md") from exc


def format_validation_error(exc: ValidationError, names: dict[str, str] | None = None) -> str:
    """One line naming every offending field, e.g. ``--n-head (model.n_head): must be > 0``.
    ``names`` maps a dotted field path to how it is named: a flag (``--n-head``), or a template
    with ``{path}`` in it (``{path} (in run.toml)``)."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        name = (names or {}).get(loc)
        if name is not None:
            loc = name.replace("{path}", loc, 1) if "{path}" in name else f"{name} ({loc})"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid settings: " + "; ".join(parts)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"pos": "rope"}}`` -> ``{"model.pos": "rope"}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = tuple(value) if isinstance(value, list) else value
    return flat


def spec_to_json(spec: BaseModel) -> str:
    """The canonical JSON of a resolved spec (what spec.json and checkpoints hold)."""
    return spec.model_dump_json(indent=2)


def spec_from_json(spec_cls: type[SpecT], text: str | bytes, source: str | None = None) -> SpecT:
    """Read a resolved spec (spec.json, a checkpoint's spec, what `gpt2 train --spec` runs).

    Text that is not a JSON object (a TOML or YAML settings file handed to ``--spec``) is refused
    as such, not as a spec from another version of gpt2. ``source`` names the file in errors.
    """
    what = repr(source) if source else "the file"
    try:
        return spec_cls.model_validate_json(text)
    except ValidationError as exc:
        errors = exc.errors()
        if any(e["type"] == "json_invalid" or (e["type"] == "model_type" and not e["loc"]) for e in errors):
            raise UserError(
                f"{what} is not a JSON spec as written by gpt2 ({_json_problem(errors)})",
                "--spec runs a spec.json written by gpt2 train as is; pass TOML, YAML or JSON settings files "
                "with --config",
            ) from exc
        raise UserError(format_validation_error(exc), "the stored spec does not match this version of gpt2") from exc


def _json_problem(errors: list[Any]) -> str:
    for e in errors:
        if e["type"] == "json_invalid":
            return e["msg"].replace("Invalid JSON: ", "", 1)
    return "not a JSON object"
