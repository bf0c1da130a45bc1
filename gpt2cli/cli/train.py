"""`gpt2 train`: flags -> TrainSpec -> (torchrun re-invocation |) gpt2cli.train.train -> report."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from gpt2cli.cli.common import PRECEDENCE_HELP, ConfigOpt, SetOpt, err, out
from gpt2cli.errors import EXIT_INTERRUPTED, StoppedBySignal, UserError
from gpt2cli.presets import matching_preset
from gpt2cli.specs import (
    DataSpec,
    EvalSpec,
    ModelSpec,
    OptimSpec,
    ParallelSpec,
    RunSpec,
    TrainingSpec,
    TrainSpec,
    build_spec,
    default_min_lr,
    layer_settings,
    spec_from_json,
    spec_to_json,
)

# Help panels.
M, D, OPT, T, E, P, R = "Model", "Data", "Optimizer", "Training", "Evaluation", "Parallelism", "Run folder"

# flag -> (spec section, field). One table drives the flags dict, error messages and docs.
FLAG_FIELDS: dict[str, tuple[str, str]] = {
    "--preset": ("model", "preset"), "--attn": ("model", "attn"), "--kv-heads": ("model", "n_kv_head"),
    "--pos": ("model", "pos"), "--rope-base": ("model", "rope_base"), "--rope-learnable": ("model", "rope_learnable"),
    "--n-layer": ("model", "n_layer"), "--n-head": ("model", "n_head"), "--n-embd": ("model", "n_embd"),
    "--block-size": ("model", "block_size"), "--dropout": ("model", "dropout"),
    "--data": ("data", "dir"),
    "--optimizer": ("optim", "name"), "--lr": ("optim", "lr"), "--min-lr": ("optim", "min_lr"),
    "--warmup": ("optim", "warmup"), "--schedule": ("optim", "schedule"),
    "--decay-fraction": ("optim", "decay_fraction"),
    "--weight-decay": ("optim", "weight_decay"), "--betas": ("optim", "betas"), "--grad-clip": ("optim", "grad_clip"),
    "--muon-momentum": ("optim", "muon_momentum"),
    "--steps": ("train", "steps"), "--tokens": ("train", "tokens"), "--batch-size": ("train", "batch_size"),
    "--seq-len": ("train", "seq_len"), "--grad-accum": ("train", "grad_accum"),
    "--batch-tokens": ("train", "batch_tokens"), "--dtype": ("train", "dtype"), "--compile": ("train", "compile"),
    "--loss-chunk": ("train", "loss_chunk"), "--profile": ("train", "profile"), "--device": ("train", "device"), "--seed": ("train", "seed"),
    "--log-every": ("train", "log_every"),
    "--on-nonfinite": ("train", "on_nonfinite"), "--max-nonfinite-skips": ("train", "max_nonfinite_skips"),
    "--eval-every": ("eval", "every"), "--eval-tokens": ("eval", "tokens"), "--eval-batch-size": ("eval", "batch_size"),
    "--patience": ("eval", "patience"), "--hellaswag": ("eval", "hellaswag"),
    "--hellaswag-examples": ("eval", "hellaswag_examples"),
    "--strategy": ("parallel", "strategy"), "--gpus": ("parallel", "gpus"), "--nproc": ("parallel", "nproc"),
    "--nnodes": ("parallel", "nnodes"), "--node-rank": ("parallel", "node_rank"),
    "--rdzv-endpoint": ("parallel", "rdzv_endpoint"), "--rdzv-id": ("parallel", "rdzv_id"),
    "--max-restarts": ("parallel", "max_restarts"), "--dist-timeout": ("parallel", "dist_timeout"),
    "--fsdp-reshard-after-forward": ("parallel", "fsdp_reshard_after_forward"),
    "--fsdp-cpu-offload": ("parallel", "fsdp_cpu_offload"),
    "--activation-checkpointing": ("parallel", "activation_checkpointing"),
    "--out": ("run", "out"), "--runs-dir": ("run", "runs_dir"), "--resume": ("run", "resume"), "--init": ("run", "init"),
    "--save-every": ("run", "save_every"), "--keep": ("run", "keep"), "--quiet": ("run", "quiet"),
    "--tensorboard": ("run", "tensorboard"), "--wandb": ("run", "wandb"), "--wandb-project": ("run", "wandb_project"),
    "--wandb-name": ("run", "wandb_name"),
}
FLAG_FOR_FIELD = {f"{section}.{name}": flag for flag, (section, name) in FLAG_FIELDS.items()}
_SECTIONS = {"model": ModelSpec, "data": DataSpec, "optim": OptimSpec, "train": TrainingSpec, "eval": EvalSpec,
             "parallel": ParallelSpec, "run": RunSpec}


def h(flag: str) -> str:
    """Help text of a flag: the description of the spec field it sets."""
    section, name = FLAG_FIELDS[flag]
    return _SECTIONS[section].model_fields[name].description or ""


def register(app: typer.Typer) -> None:
    app.command(
        "train",
        help="Train a model (single device, DDP or FSDP), with evaluation, checkpoints and exact resume. "
        + PRECEDENCE_HELP,
        no_args_is_help=False,
    )(train)


def _parse_betas(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise UserError(f"--betas {text!r} is not two numbers", "write e.g. --betas 0.9,0.95") from None
    if len(values) != 2:
        raise UserError(f"--betas {text!r} is not two numbers", "write e.g. --betas 0.9,0.95")
    return values


def train(
    # model
    init: Annotated[str | None, typer.Option(metavar="CKPT", help=h("--init"), rich_help_panel=M, show_default=False)] = None,
    preset: Annotated[str | None, typer.Option(help=h("--preset"), rich_help_panel=M, show_default=False)] = None,
    attn: Annotated[str | None, typer.Option(help=h("--attn"), rich_help_panel=M, show_default=False)] = None,
    kv_heads: Annotated[int | None, typer.Option("--kv-heads", help=h("--kv-heads"), rich_help_panel=M)] = None,
    pos: Annotated[str | None, typer.Option(help=h("--pos"), rich_help_panel=M)] = None,
    rope_base: Annotated[float | None, typer.Option(help=h("--rope-base"), rich_help_panel=M)] = None,
    rope_learnable: Annotated[bool | None, typer.Option("--rope-learnable/--no-rope-learnable", help=h("--rope-learnable"), rich_help_panel=M)] = None,
    n_layer: Annotated[int | None, typer.Option(help=h("--n-layer"), rich_help_panel=M)] = None,
    n_head: Annotated[int | None, typer.Option(help=h("--n-head"), rich_help_panel=M)] = None,
    n_embd: Annotated[int | None, typer.Option(help=h("--n-embd"), rich_help_panel=M)] = None,
    block_size: Annotated[int | None, typer.Option(help=h("--block-size"), rich_help_panel=M)] = None,
    dropout: Annotated[float | None, typer.Option(help=h("--dropout"), rich_help_panel=M)] = None,
    # data
    data: Annotated[str | None, typer.Option(help=h("--data"), rich_help_panel=D)] = None,
    # optimizer
    optimizer: Annotated[str | None, typer.Option(help=h("--optimizer"), rich_help_panel=OPT)] = None,
    lr: Annotated[float | None, typer.Option(help=h("--lr"), rich_help_panel=OPT)] = None,
    min_lr: Annotated[float | None, typer.Option(help=h("--min-lr"), rich_help_panel=OPT)] = None,
    warmup: Annotated[int | None, typer.Option(help=h("--warmup"), rich_help_panel=OPT)] = None,
    schedule: Annotated[str | None, typer.Option(help=h("--schedule"), rich_help_panel=OPT)] = None,
    decay_fraction: Annotated[float | None, typer.Option(help=h("--decay-fraction"), rich_help_panel=OPT)] = None,
    weight_decay: Annotated[float | None, typer.Option(help=h("--weight-decay"), rich_help_panel=OPT)] = None,
    betas: Annotated[str | None, typer.Option(help=h("--betas") + " Written 0.9,0.95.", rich_help_panel=OPT)] = None,
    grad_clip: Annotated[float | None, typer.Option(help=h("--grad-clip"), rich_help_panel=OPT)] = None,
    muon_momentum: Annotated[float | None, typer.Option(help=h("--muon-momentum"), rich_help_panel=OPT)] = None,
    # training
    steps: Annotated[int | None, typer.Option(help=h("--steps"), rich_help_panel=T)] = None,
    tokens: Annotated[int | None, typer.Option(help=h("--tokens"), rich_help_panel=T)] = None,
    batch_size: Annotated[int | None, typer.Option(help=h("--batch-size"), rich_help_panel=T)] = None,
    seq_len: Annotated[int | None, typer.Option(help=h("--seq-len"), rich_help_panel=T)] = None,
    grad_accum: Annotated[int | None, typer.Option(help=h("--grad-accum"), rich_help_panel=T)] = None,
    batch_tokens: Annotated[int | None, typer.Option(help=h("--batch-tokens"), rich_help_panel=T)] = None,
    dtype: Annotated[str | None, typer.Option(help=h("--dtype"), rich_help_panel=T)] = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help=h("--compile"), rich_help_panel=T)] = None,
    loss_chunk: Annotated[int | None, typer.Option(help=h("--loss-chunk"), rich_help_panel=T)] = None,
    profile: Annotated[int | None, typer.Option(metavar="N", help=h("--profile"), rich_help_panel=T)] = None,
    device: Annotated[str | None, typer.Option(help=h("--device"), rich_help_panel=T)] = None,
    seed: Annotated[int | None, typer.Option(help=h("--seed"), rich_help_panel=T)] = None,
    log_every: Annotated[int | None, typer.Option(help=h("--log-every"), rich_help_panel=T)] = None,
    on_nonfinite: Annotated[str | None, typer.Option(help=h("--on-nonfinite"), rich_help_panel=T)] = None,
    max_nonfinite_skips: Annotated[int | None, typer.Option(help=h("--max-nonfinite-skips"), rich_help_panel=T)] = None,
    # evaluation
    eval_every: Annotated[int | None, typer.Option(help=h("--eval-every"), rich_help_panel=E)] = None,
    eval_tokens: Annotated[int | None, typer.Option(help=h("--eval-tokens"), rich_help_panel=E)] = None,
    eval_batch_size: Annotated[int | None, typer.Option(help=h("--eval-batch-size"), rich_help_panel=E)] = None,
    patience: Annotated[int | None, typer.Option(help=h("--patience"), rich_help_panel=E)] = None,
    hellaswag: Annotated[str | None, typer.Option(metavar="val|FILE|URL", help=h("--hellaswag"), rich_help_panel=E,
                                                  show_default=False)] = None,
    hellaswag_examples: Annotated[int | None, typer.Option(help=h("--hellaswag-examples"), rich_help_panel=E)] = None,
    # parallelism
    strategy: Annotated[str | None, typer.Option(help=h("--strategy"), rich_help_panel=P)] = None,
    gpus: Annotated[int | None, typer.Option(help=h("--gpus"), rich_help_panel=P)] = None,
    nproc: Annotated[int | None, typer.Option(help=h("--nproc"), rich_help_panel=P)] = None,
    nnodes: Annotated[int | None, typer.Option(help=h("--nnodes"), rich_help_panel=P)] = None,
    node_rank: Annotated[int | None, typer.Option(help=h("--node-rank"), rich_help_panel=P)] = None,
    rdzv_endpoint: Annotated[str | None, typer.Option(help=h("--rdzv-endpoint"), rich_help_panel=P)] = None,
    rdzv_id: Annotated[str | None, typer.Option(help=h("--rdzv-id"), rich_help_panel=P)] = None,
    max_restarts: Annotated[int | None, typer.Option(help=h("--max-restarts"), rich_help_panel=P)] = None,
    dist_timeout: Annotated[float | None, typer.Option(help=h("--dist-timeout"), rich_help_panel=P)] = None,
    fsdp_reshard_after_forward: Annotated[bool | None, typer.Option("--fsdp-reshard-after-forward/--no-fsdp-reshard-after-forward", help=h("--fsdp-reshard-after-forward"), rich_help_panel=P)] = None,
    fsdp_cpu_offload: Annotated[bool | None, typer.Option("--fsdp-cpu-offload/--no-fsdp-cpu-offload", help=h("--fsdp-cpu-offload"), rich_help_panel=P)] = None,
    activation_checkpointing: Annotated[bool | None, typer.Option("--activation-checkpointing/--no-activation-checkpointing", help=h("--activation-checkpointing"), rich_help_panel=P)] = None,
    # run folder
    out_dir: Annotated[str | None, typer.Option("--out", help=h("--out"), rich_help_panel=R)] = None,
    runs_dir: Annotated[str | None, typer.Option(help=h("--runs-dir"), rich_help_panel=R)] = None,
    resume: Annotated[str | None, typer.Option(help=h("--resume"), rich_help_panel=R)] = None,
    save_every: Annotated[int | None, typer.Option(help=h("--save-every"), rich_help_panel=R)] = None,
    keep: Annotated[int | None, typer.Option(help=h("--keep"), rich_help_panel=R)] = None,
    quiet: Annotated[bool | None, typer.Option("--quiet/--no-quiet", "-q", help=h("--quiet"), rich_help_panel=R)] = None,
    tensorboard: Annotated[bool | None, typer.Option("--tensorboard/--no-tensorboard", help=h("--tensorboard"), rich_help_panel=R)] = None,
    wandb: Annotated[bool | None, typer.Option("--wandb/--no-wandb", help=h("--wandb"), rich_help_panel=R)] = None,
    wandb_project: Annotated[str | None, typer.Option(help=h("--wandb-project"), rich_help_panel=R, show_default=False)] = None,
    wandb_name: Annotated[str | None, typer.Option(help=h("--wandb-name"), rich_help_panel=R, show_default=False)] = None,
    # spec plumbing
    config: ConfigOpt = None,
    set_: SetOpt = None,
    spec_file: Annotated[str | None, typer.Option("--spec", help="A resolved spec.json to run exactly as is (what the torchrun launcher passes); other settings are refused.", rich_help_panel=R)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved spec, model size and batch arithmetic; train nothing.")] = False,
    # sweeps (gpt2cli/sweep.py, docs/compare.md)
    sweep: Annotated[list[str] | None, typer.Option("--sweep", metavar="KEY=V1,V2|FILE", help="Train a grid: KEY is a flag name (pos, attn, lr, kv-heads) or a dotted spec path; FILE (TOML/YAML/JSON) lists variants. Repeatable, one axis each. One run folder per point inside --out, then the comparison.", rich_help_panel="Sweep")] = None,
    seeds: Annotated[int | None, typer.Option("--seeds", help="Train every point with N seeds (--seed, --seed + 1, ...); the comparison shows mean ± std.", rich_help_panel="Sweep")] = None,
) -> None:
    values: dict[str, Any] = {
        "--init": init, "--preset": preset, "--attn": attn, "--kv-heads": kv_heads, "--pos": pos, "--rope-base": rope_base,
        "--rope-learnable": rope_learnable, "--n-layer": n_layer, "--n-head": n_head, "--n-embd": n_embd,
        "--block-size": block_size, "--dropout": dropout, "--data": data, "--optimizer": optimizer, "--lr": lr,
        "--min-lr": min_lr, "--warmup": warmup, "--schedule": schedule,
        "--decay-fraction": decay_fraction, "--weight-decay": weight_decay,
        "--betas": _parse_betas(betas), "--grad-clip": grad_clip,
        "--muon-momentum": muon_momentum, "--steps": steps, "--tokens": tokens,
        "--batch-size": batch_size, "--seq-len": seq_len, "--grad-accum": grad_accum,
        "--batch-tokens": batch_tokens, "--dtype": dtype, "--compile": compile, "--loss-chunk": loss_chunk,
        "--profile": profile, "--device": device,
        "--seed": seed, "--log-every": log_every, "--on-nonfinite": on_nonfinite,
        "--max-nonfinite-skips": max_nonfinite_skips, "--eval-every": eval_every, "--eval-tokens": eval_tokens,
        "--eval-batch-size": eval_batch_size, "--patience": patience,
        "--hellaswag": hellaswag, "--hellaswag-examples": hellaswag_examples, "--strategy": strategy, "--gpus": gpus, "--nproc": nproc,
        "--nnodes": nnodes, "--node-rank": node_rank, "--rdzv-endpoint": rdzv_endpoint, "--rdzv-id": rdzv_id,
        "--max-restarts": max_restarts, "--dist-timeout": dist_timeout,
        "--fsdp-reshard-after-forward": fsdp_reshard_after_forward, "--fsdp-cpu-offload": fsdp_cpu_offload,
        "--activation-checkpointing": activation_checkpointing, "--out": out_dir, "--runs-dir": runs_dir,
        "--resume": resume, "--save-every": save_every, "--keep": keep, "--quiet": quiet, "--tensorboard": tensorboard,
        "--wandb": wandb, "--wandb-project": wandb_project, "--wandb-name": wandb_name,
    }
    if spec_file is not None:
        extra = [f for f, v in values.items() if v is not None] + (["--config"] if config else []) + (["--set"] if set_ else [])
        if extra:
            raise UserError(f"--spec runs a resolved spec as is; it cannot be combined with {', '.join(extra)}",
                            "edit the spec file instead")
        spec = _read_spec_file(spec_file)
    else:
        # A sweep checks its points (where a setting may apply to some points only).
        spec = resolve_train_spec(values, config, set_ or [], refuse_unused=not (sweep or seeds is not None))
    if sweep or seeds is not None:
        from gpt2cli.cli.compare import train_sweep

        train_sweep(spec, values, config, set_ or [], sweep or [], seeds, spec_file=spec_file, dry_run=dry_run)
        return
    run(spec, dry_run=dry_run)


def _read_spec_file(path: str) -> TrainSpec:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"spec file {path!r} does not exist", "pass a spec.json written by gpt2 train")
    return spec_from_json(TrainSpec, p.read_bytes(), source=path)


def resolve_train_spec(values: dict[str, Any], config: str | None, sets: list[str],
                       refuse_unused: bool = True) -> TrainSpec:
    """Flags -> nested dict -> TrainSpec: defaults < config file < flags < --set. The base layer,
    under the config file, is the stored spec when resuming (so `gpt2 train --out RUN --resume auto`
    continues with the run's own settings) and otherwise the device's default preset. Resume, run
    folder, device and preset are read from all three given layers, wherever the user put them.
    ``refuse_unused``: a typed setting that does nothing for this spec (--rope-base without --pos
    rope) is an error; a sweep turns that off (--rope-base with --sweep pos=learned,rope is meant
    for its rope points)."""
    flags: dict[str, dict[str, Any]] = {}
    for flag, value in values.items():
        if value is not None:
            section, name = FLAG_FIELDS[flag]
            flags.setdefault(section, {})[name] = value
    given = layer_settings(config_file=config, flags=flags, sets=sets)  # what the user set, by any route
    run_given, model_given = given.get("run", {}), given.get("model", {})
    base = _stored_spec_for_resume(run_given.get("resume"), run_given.get("out"))
    if base is not None:
        base = _drop_stored_layout(base, given.get("parallel", {}))
        base = _drop_stored_derived(base, given)
    init = run_given.get("init")
    stored_init = (base or {}).get("run", {}).get("init")
    if base is not None and init is not None and str(init) != str(stored_init):
        # A resume takes its weights from the checkpoint: another --init would be recorded in
        # spec.json as where the run started, and would not be.
        started = f"started from --init {stored_init}" if stored_init else "started without --init"
        raise UserError(f"--init {init}: the run being resumed {started}, and a resume continues from its checkpoint",
                        "drop --init to resume, or fine-tune into a new --out")
    if base is None and init is not None:
        fields = _model_of_init(str(init), model_given).model_dump()
        base = {"model": {**fields, "preset": fields["preset"] or matching_preset(fields)}}
    if base is None and "preset" not in model_given:
        device, gpus = given.get("train", {}).get("device"), given.get("parallel", {}).get("gpus")
        base = {"model": {"preset": _default_preset(device, gpus)}}
    spec = build_spec(TrainSpec, config_file=config, flags=flags, sets=sets, base=base, flag_names=FLAG_FOR_FIELD)
    if refuse_unused:
        _refuse_settings_without_effect(spec, layer_settings(flags=flags, sets=sets))
    return spec


# (section, field) typed on the command line -> what must hold for it to do anything, and the flag
# that makes it hold. Only flags and --set: a config file (a run's spec.json, say) holds every field.
_NEEDS: dict[tuple[str, str], tuple[Any, str]] = {
    ("model", "rope_base"): (lambda s: s.model.pos == "rope", "--pos rope"),
    ("train", "max_nonfinite_skips"): (lambda s: s.train.on_nonfinite == "skip", "--on-nonfinite skip"),
    ("optim", "decay_fraction"): (lambda s: s.optim.schedule == "wsd", "--schedule wsd"),
    ("optim", "muon_momentum"): (lambda s: s.optim.name == "muon", "--optimizer muon"),
}


def _refuse_settings_without_effect(spec: TrainSpec, typed: dict[str, dict[str, Any]]) -> None:
    for (section, name), (holds, needs) in _NEEDS.items():
        if name in typed.get(section, {}) and not holds(spec):
            flag = FLAG_FOR_FIELD.get(f"{section}.{name}", f"{section}.{name}")
            raise UserError(f"{flag} ({section}.{name}) does nothing without {needs}", f"drop it, or add {needs}")


def _model_of_init(init: str, model_given: dict[str, Any]) -> ModelSpec:
    """The model of the weights --init names (read without their tensors, where the format allows):
    the run's model starts from it. A preset would name another model: refused."""
    from gpt2cli.loading import model_spec_of

    if "preset" in model_given:
        raise UserError(
            f"--preset {model_given['preset']} and --init {init} both choose the model",
            "drop --preset: with --init the model's shape comes from the weights",
        )
    source = model_spec_of(init)
    fixed = {**source.shape_fields(), "attn": source.attn}
    changed = [f"{FLAG_FOR_FIELD.get(f'model.{k}', 'model.' + k)} {v} (the weights: {fixed[k]})"
               for k, v in model_given.items() if k in fixed and v != fixed[k]]
    if changed:
        raise UserError(
            f"--init {init}: the model settings change the shape of its weights: {', '.join(changed)}",
            "drop them: with --init the model's shape comes from the weights (--dropout may change)",
        )
    return source


# How many processes a run had and where they met: not carried over to a one-process resume.
_PROCESS_LAYOUT = ("nproc", "gpus", "nnodes", "node_rank", "rdzv_endpoint")
_FSDP_ONLY = ("fsdp_cpu_offload", "fsdp_reshard_after_forward")


def _drop_stored_layout(stored: dict[str, Any], parallel_given: dict[str, Any]) -> dict[str, Any]:
    """A resume may change the strategy and the number of processes (docs/training.md). When the
    user names another strategy, the stored spec's settings of the old one stay behind unless given
    again: its process count under --strategy single (a 2-process DDP run resumes on one process,
    not "2 processes need --strategy ddp"), FSDP's settings under any other strategy."""
    strategy = parallel_given.get("strategy")
    stored_parallel = stored.get("parallel")
    if strategy is None or not isinstance(stored_parallel, dict):
        return stored
    drop = (_PROCESS_LAYOUT if strategy == "single" else ()) + (_FSDP_ONLY if strategy != "fsdp" else ())
    kept = {k: v for k, v in stored_parallel.items() if k not in drop or k in parallel_given}
    return {**stored, "parallel": kept}


def _drop_stored_derived(stored: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """What the stored spec holds only as the default of another setting, or as a way to show the
    run, does not override that default when a resume changes the setting: a min_lr that is the
    old lr / 10 follows a new --lr (not "min_lr exceeds lr"), and --quiet is asked for each time."""
    stored = {section: dict(values) if isinstance(values, dict) else values for section, values in stored.items()}
    optim, optim_given = stored.get("optim"), given.get("optim", {})
    if isinstance(optim, dict) and "lr" in optim_given and "min_lr" not in optim_given:
        lr, min_lr = optim.get("lr"), optim.get("min_lr")
        if isinstance(lr, (int, float)) and min_lr == default_min_lr(lr):
            del optim["min_lr"]
    run_section = stored.get("run")
    if isinstance(run_section, dict) and "quiet" not in given.get("run", {}):
        run_section.pop("quiet", None)
    return stored


def _default_preset(device: str | None, gpus: int | None) -> str:
    from gpt2cli.presets import DEFAULT_PRESET_CPU, DEFAULT_PRESET_CUDA

    if device == "cpu" or device == "mps":
        return DEFAULT_PRESET_CPU
    if gpus or (device or "").startswith("cuda"):
        return DEFAULT_PRESET_CUDA
    import torch

    return DEFAULT_PRESET_CUDA if torch.cuda.is_available() else DEFAULT_PRESET_CPU


def _stored_spec_for_resume(resume: str | None, out_dir: str | None) -> dict[str, Any] | None:
    """The spec.json of the run being resumed, minus what must not carry over (resume, out)."""
    if resume is None:
        return None
    if resume == "auto":
        folder = Path(out_dir) if out_dir else None
    else:
        target = Path(resume)
        folder = target if target.is_dir() else target.parent
    if folder is None:
        return None
    # spec.json appears once the run has started; a multi-process run stopped before that holds
    # only the launcher's launch-spec.json, which is the same spec (and says how many processes).
    from gpt2cli.parallel.launch import LAUNCH_SPEC_NAME

    found = [folder / name for name in ("spec.json", LAUNCH_SPEC_NAME) if (folder / name).is_file()]
    if not found:
        return None
    try:
        stored = json.loads(found[0].read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {found[0]}: {exc}", "the run folder is damaged") from exc
    stored.get("run", {}).pop("resume", None)
    return stored


def run(spec: TrainSpec, dry_run: bool = False) -> None:
    # Imported here, not at the top: they import torch, which `--help` and flag errors do without.
    from gpt2cli.checkpoint import atomic_write_bytes
    from gpt2cli.fsutil import FolderLock
    from gpt2cli.metrics import STATUS_NAME, read_status
    from gpt2cli.parallel.launch import (
        LAUNCH_SPEC_NAME,
        check_gpus,
        check_rendezvous,
        launch,
        needs_launch,
        take_worker_error,
        under_torchrun,
    )
    from gpt2cli.torchrun import JOB_FAILURE_FILE
    from gpt2cli.train import (
        check_requirements,
        plan_batches,
        refuse_existing_run,
        take_run_folder,
    )

    p = spec.parallel
    world = p.procs_per_node * p.nnodes
    if not under_torchrun():
        check_gpus(p)
        check_rendezvous(p)
        _check_device(spec)
        check_requirements(spec)
    plan = plan_batches(spec, int(os.environ.get("WORLD_SIZE", world)))
    if dry_run:
        _print_dry_run(spec, plan)
        return
    if needs_launch(p):
        from gpt2cli.train import resolve_run_dir

        run_dir = resolve_run_dir(spec, 1) if spec.run.out or spec.run.resume else None
        # The outermost folder this launch creates (run_dir or a parent), to remove if refused.
        if run_dir is None:
            from gpt2cli.train import auto_run_name, claim_new_folder

            base = Path(spec.run.runs_dir) / auto_run_name(spec)
            made_here = _outermost_missing(base)
            run_dir = claim_new_folder(base)  # base, or base-2, ...: never another launch's folder
            if made_here is None or made_here == base:
                made_here = run_dir
        else:
            refuse_existing_run(spec, run_dir)
            made_here = _outermost_missing(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
        # Workers resume by themselves after an elastic restart: resume=auto in the run folder.
        resume = spec.run.resume if spec.run.resume is not None else ("auto" if p.max_restarts else None)
        child = spec.model_copy(update={"run": spec.run.model_copy(update={"out": str(run_dir), "resume": resume})})
        # Held for the whole launch (see _Trainer.lock_run_folder); with several nodes rank 0 takes
        # it, as only its node writes the folder.
        lock = FolderLock(run_dir)
        if p.nnodes == 1:
            take_run_folder(lock)
        spec_path = run_dir / LAUNCH_SPEC_NAME
        before = spec_path.read_bytes() if spec_path.is_file() else None  # put back if this launch is refused
        # Atomic: on a shared filesystem every node's launcher writes this same file.
        atomic_write_bytes(spec_path, lambda f: f.write(spec_to_json(child).encode()))
        if not spec.run.quiet and p.nnodes > 1:  # one node: rank 0's header says it ("ddp x2 on cpu")
            err.print(f"launching {p.procs_per_node} processes under torchrun ({p.strategy}, {p.nnodes} nodes) "
                      f"-> {run_dir}")
        # What the workers of this launch write, told from what a previous session left (a resume).
        spec_stamp, status_stamp = _stamp(run_dir / "spec.json"), _stamp(run_dir / STATUS_NAME)
        (run_dir / JOB_FAILURE_FILE).unlink(missing_ok=True)
        try:
            code, signum = launch(p, spec_path, debug="--debug" in sys.argv, run_locked=lock.held)
        finally:
            failure = _take_job_failure(run_dir)
        # The workers passed their checks and wrote spec.json (again, on a resume).
        began = _stamp(run_dir / "spec.json") not in (None, spec_stamp)
        # With several nodes the others' launchers still read the reports: they stay.
        error = take_worker_error(run_dir, remove=p.nnodes == 1)
        if error is not None or (signum is not None and not began):
            # Refused, or stopped, before the run began: leave the folder as it was, and like one
            # process no folder at all if this launch made it.
            if made_here is not None and p.nnodes == 1 and not began:
                shutil.rmtree(made_here, ignore_errors=True)
            elif before is not None:
                atomic_write_bytes(spec_path, lambda f: f.write(before))
        if error is not None:  # a worker's UserError (bad resume, non-finite loss, ...): once, with its code
            sys.stderr.write(error["error"] + "\n")
            raise typer.Exit(int(error.get("exit_code", 2)))
        # A status.json from before this launch (the session a resume continues) says nothing of it.
        recorded = (read_status(run_dir) or {}) if _stamp(run_dir / STATUS_NAME) != status_stamp else {}
        status = recorded.get("status")
        # Workers exit 0 after an interrupt (a non-zero exit would make torchrun restart them);
        # the launcher turns the recorded status into the documented exit code.
        if status == "interrupted":
            raise typer.Exit(EXIT_INTERRUPTED)
        if signum is not None and code == 0 and status in ("completed", "early-stopped"):
            # The signal came during the last step: too late to stop a run that then finished
            # (rank 0 has said so).
            raise CompletedDespiteSignal()
        if signum is not None:  # stopped, but no checkpoint was committed on the way out
            name = signal.Signals(signum).name
            if began:
                message = f"Stopped by {name}; continue with --resume auto."
            elif made_here is not None and p.nnodes == 1:
                message = f"Stopped by {name} before the run began; nothing was written."
            else:
                message = f"Stopped by {name} before the run began; {run_dir} is as it was."
            raise StoppedBySignal(message, 128 + signum)
        if code != 0:  # a worker died or failed without an error line of its own
            _report_job_failure(run_dir, code, recorded, began, failure)
        raise typer.Exit(code)
    _train_here(spec)


def _outermost_missing(path: Path) -> Path | None:
    """The outermost folder that making ``path`` creates (it or a parent), or None if it exists."""
    return next((f for f in reversed([path, *path.parents]) if not f.exists()), None)


def _stamp(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


class CompletedDespiteSignal(typer.Exit):
    """Exit 0: the run completed, though a SIGINT/SIGTERM came during its last step (a sweep
    stops after it)."""

    def __init__(self) -> None:
        super().__init__(0)


def _take_job_failure(run_dir: Path) -> str:
    """The line torchrun's agent left on which worker failed (gpt2cli.torchrun), removed."""
    from gpt2cli.torchrun import JOB_FAILURE_FILE

    try:
        what = (run_dir / JOB_FAILURE_FILE).read_text(encoding="utf-8").strip()
        (run_dir / JOB_FAILURE_FILE).unlink()
    except OSError:
        what = ""
    return what


def _report_job_failure(run_dir: Path, code: int, recorded: dict[str, Any], began: bool, what: str) -> None:
    """One line for a job that failed without a worker's own error (a worker killed, say), and
    status.json "failed" where the run had left it "running"."""
    from gpt2cli.train import write_status

    line = f"the job failed: {what or f'torchrun exited with code {code}'}"
    if recorded.get("status") == "running":
        with contextlib.suppress(OSError, KeyError, TypeError):
            write_status(run_dir, "failed", int(recorded["step"]), int(recorded["total_steps"]), error=line)
    hint = ("continue with --resume auto (from the last checkpoint); --max-restarts N restarts failed workers"
            if began else "see the output above")
    sys.stderr.write(f"Error: {line} ({hint})\n")


def _check_device(spec: TrainSpec) -> None:
    """What needs the resolved device (--device auto), before the launcher creates anything:
    --fsdp-cpu-offload refused off CUDA; more CPU processes than cores only warned about."""
    p, device = spec.parallel, spec.train.device
    oversubscribed = p.gpus is None and p.procs_per_node > (os.cpu_count() or 1) and device in ("cpu", "auto")
    if not (p.fsdp_cpu_offload or oversubscribed):
        return
    from gpt2cli.parallel import check_cpu_offload, resolve_device

    resolved = resolve_device(device)
    if p.fsdp_cpu_offload:
        check_cpu_offload(resolved, device)
    if oversubscribed and resolved.type == "cpu":
        from rich.text import Text

        # A warning, not an error: oversubscribing works (and tests multi-process code on a laptop).
        # Plain Text and soft_wrap, as TrainProgress.message: one line on stderr, even with --quiet.
        cores = os.cpu_count() or 1
        err.print(Text(
            f"warning: --nproc {p.procs_per_node} starts more processes than this machine has CPU cores ({cores}); "
            "they take turns on the cores, which works but is slow",
            style="yellow"), soft_wrap=True)


def _train_here(spec: TrainSpec) -> None:
    from gpt2cli.cli.progress import TrainProgress
    from gpt2cli.parallel.launch import under_torchrun
    from gpt2cli.train import train as train_workflow

    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    reporter = TrainProgress(quiet=spec.run.quiet) if rank == 0 else None
    try:
        result = train_workflow(spec, reporter=reporter)
    except UserError as exc:
        if world > 1:
            exc.message = f"[rank {rank}] {exc.message}"
            from gpt2cli.parallel.launch import report_to_launcher

            if report_to_launcher(rank, exc.exit_code, exc.render()):
                # The launcher prints it once and exits with its code; exiting 0 keeps torchrun from
                # restarting the job or printing a traceback for an error that would only repeat.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
        raise
    except Exception as exc:
        error = collective_error(exc, rank, spec.parallel.dist_timeout) if world > 1 else None
        if error is not None:
            # Exit at once: interpreter shutdown would wait on the broken process group's pending work.
            sys.stderr.write(error.render() + "\n")
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(error.exit_code)
        raise
    if result.status == "interrupted" and not under_torchrun():
        raise typer.Exit(EXIT_INTERRUPTED)


# A peer's socket closed under a collective: that process is gone (crashed, killed), not slow.
_PEER_DIED = ("connection reset", "connection closed", "broken pipe", "remote process exited")


def collective_failure(exc: BaseException) -> str | None:
    """Why a collective failed, from the backend's error text: "peer died" (gloo's "Connection
    reset by peer" / "Connection closed by peer", at once when a peer exits), "timeout" (it waited
    --dist-timeout: a peer hung), or None (not a failed collective)."""
    text = f"{type(exc).__name__} {exc}".lower()
    if any(marker in text for marker in _PEER_DIED):
        return "peer died"
    if "timed out" in text or "timeout" in text:
        return "timeout"
    return None


def collective_error(exc: BaseException, rank: int, dist_timeout: float) -> UserError | None:
    """The one line (exit 1) for a worker whose collective failed, or None for any other error."""
    failure = collective_failure(exc)
    if failure == "peer died":
        return UserError(
            f"[rank {rank}] another process died (connection reset during a collective: {_first_line(exc)})",
            "see the other ranks' messages for why it stopped",
            exit_code=1,
        )
    if failure == "timeout":
        return UserError(
            f"[rank {rank}] a collective did not finish within --dist-timeout {dist_timeout:g} s: another "
            f"process died or hung ({_first_line(exc)})",
            "see the other ranks' messages; raise --dist-timeout only if steps are merely slow",
            exit_code=1,
        )
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def _print_dry_run(spec: TrainSpec, plan) -> None:
    from gpt2cli.modelinfo import model_stats
    from gpt2cli.train import describe_schedule, preview_resume

    stats = model_stats(spec.model, seq_len=plan.seq_len, world_size=plan.world_size)
    summary = {
        "params": stats["params"],
        "non_embedding_params": stats["non_embedding_params"],
        "flops_per_token": stats["flops_per_token"],
        "world_size": plan.world_size,
        "batch_size": plan.batch_size,
        "seq_len": plan.seq_len,
        "grad_accum": plan.grad_accum,
        "global_batch_sequences": plan.global_batch,
        "tokens_per_step": plan.tokens_per_step,
        "steps": plan.total_steps,
        "total_tokens": plan.tokens_per_step * plan.total_steps,
    }
    # A resume's refusals (another batch, data, a budget spent) come before anything is printed.
    resume_line = preview_resume(spec, plan) if spec.run.resume is not None else None
    out.print_json(spec_to_json(spec))
    out.print(
        f"model: {summary['params']:,} parameters ({summary['non_embedding_params']:,} without embeddings)\n"
        f"batch: {plan.batch_size} sequences x {plan.seq_len} tokens x {plan.grad_accum} accumulation x "
        f"{plan.world_size} process(es) = {plan.tokens_per_step:,} tokens per step\n"
        f"budget: {plan.total_steps:,} steps = {summary['total_tokens']:,} tokens\n"
        f"lr: {describe_schedule(spec, plan.total_steps)}"
    )
    if resume_line is not None:
        out.print(resume_line, soft_wrap=True)
