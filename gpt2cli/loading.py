"""Turn anything a user may call a model into a :class:`~gpt2cli.model.GPT`.

``gpt2 generate``, ``gpt2 eval`` and ``gpt2 export`` accept the same CKPT argument, resolved here
in this order:

1. a ``.safetensors`` file written by ``gpt2 export --format safetensors`` (weights + our spec);
2. any other existing file: a gpt2 checkpoint (``ckpt.pt``, ``best.pt``, ``step-N.pt``), read only
   through :func:`gpt2cli.checkpoint.load_checkpoint` (``weights_only``, digest-checked);
3. a folder with ``config.json`` and GPT-2 weights: a Hugging Face GPT-2 folder;
4. a folder holding our ``model.safetensors`` export;
5. a run folder: its ``best.pt``, else its ``ckpt.pt``;
6. a name that is no local path (``gpt2``, ``openai-community/gpt2``): a Hugging Face hub name,
   read from the local HF cache (or downloaded when the hub is reachable).

Everything that goes wrong is a :class:`~gpt2cli.errors.UserError` naming the path. Models come
back in fp32, in eval mode, on the requested device.

The safetensors export format: one file whose tensors are our state dict without the tied
``lm_head.weight``, and whose header metadata holds ``gpt2cli_format`` (``gpt2cli-safetensors``),
``format_version`` and ``spec`` (the ModelSpec as JSON).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from gpt2cli import checkpoint as ckpt
from gpt2cli.errors import UserError
from gpt2cli.model import GPT
from gpt2cli.specs import ModelSpec, spec_from_json, spec_to_json

SAFETENSORS_FORMAT = "gpt2cli-safetensors"
SAFETENSORS_VERSION = "1"
SAFETENSORS_NAME = "model.safetensors"
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".json")


class LoadedModel(NamedTuple):
    """What :func:`load_model` returns: the model, its spec and where it came from, in words."""

    model: GPT
    spec: ModelSpec
    source: str


# ------------------------------------------------------------------------------------ entry


def load_model(source: str | os.PathLike, device: torch.device | str = "cpu") -> LoadedModel:
    """Load CKPT (checkpoint file, run folder, HF GPT-2 folder or hub name, safetensors export)
    as an fp32 :class:`GPT` in eval mode on ``device`` (auto, cpu, cuda, cuda:N, mps or a
    torch.device; one this machine lacks is a UserError, found before anything is read)."""
    from gpt2cli.parallel.base import resolve_device

    device = resolve_device(device)
    kind, where, run_dir = _resolve(source)
    if kind == "safetensors":
        return load_safetensors(where, device)
    if kind == "hf":
        return _load_hf(str(where), device)
    return _load_checkpoint_file(Path(where), device, run_dir=run_dir)


def model_spec_of(source: str | os.PathLike) -> ModelSpec:
    """The ModelSpec of what :func:`load_model` would load from ``source``, reading as little as
    it can: a safetensors header, a config.json, a checkpoint's spec without its tensors (memory-
    mapped, so the digest is left to the load itself)."""
    kind, where, _ = _resolve(source)
    if kind == "safetensors":
        return model_spec_from_json(_our_metadata(Path(where)).get("spec"), repr(str(where)))
    if kind == "hf":
        from gpt2cli.model.hf import hf_gpt2_spec

        return hf_gpt2_spec(str(where))
    _refuse_foreign_file(Path(where))
    record = ckpt.load_checkpoint(where, verify=False)
    return model_spec_from_json(record.get("spec"), repr(str(where)))


def _resolve(source: str | os.PathLike) -> tuple[str, Path | str, Path | None]:
    """What CKPT names, in the order of the module docstring: (kind, where, run folder), kind one
    of ``safetensors`` (our export file), ``hf`` (a folder or hub name) or ``checkpoint`` (a file,
    with the run folder it was picked from, if any)."""
    text = str(source)
    if not text.strip():
        raise UserError("no checkpoint given", "pass a checkpoint file, a run folder or a GPT-2 model")
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix == ".safetensors":
            if (path.parent / "config.json").is_file() and not _is_our_safetensors(path):
                return "hf", str(path.parent), None
            return "safetensors", path, None
        return "checkpoint", path, None
    if path.is_dir():
        from gpt2cli.model.hf import is_hf_gpt2_dir

        if is_hf_gpt2_dir(path):
            return "hf", str(path), None
        if (path / SAFETENSORS_NAME).is_file():
            return "safetensors", path / SAFETENSORS_NAME, None
        if (path / "config.json").is_file():
            return "hf", str(path), None  # loading it reports what the folder lacks
        return "checkpoint", ckpt.model_checkpoint_in(path), path
    if path.exists():
        raise UserError(f"{text!r} is neither a file nor a folder", "pass a checkpoint file or a run folder")
    if _looks_like_a_path(text):
        raise UserError(f"checkpoint {text!r} does not exist", "check the path")
    return "hf", text, None


def refuse_nonfinite_weights(model: torch.nn.Module, source: str) -> None:
    """A UserError if any weight is NaN or inf. Such a model samples nothing but its first token
    (every logit NaN), and exits 0 doing it; a safetensors file or an HF folder carries no digest
    that would have caught such values. (``gpt2 eval`` scores such a model instead: its NaN loss
    is the answer there.)"""
    for name, tensor in model.named_parameters():  # a tied weight once
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(
                f"the weights of {source} hold NaN or inf ({bad:,} of {tensor.numel():,} values of {name})",
                "use another checkpoint: an earlier one of its run, kept with --keep N",
            )


def _looks_like_a_path(text: str) -> bool:
    """A missing path is reported as such rather than tried as a hub name."""
    return (
        text.lower().endswith(_FILE_SUFFIXES)
        or text.startswith((".", "/", "~"))
        or text.count("/") > 1
        or "\\" in text
        or Path(text).parent.is_dir() and str(Path(text).parent) not in ("", ".")  # runs/missing
    )


# ------------------------------------------------------------------------------- checkpoints


def model_spec_from_json(text: Any, where: str) -> ModelSpec:
    """The ModelSpec stored in a checkpoint: a TrainSpec's ``model`` section or a bare ModelSpec.

    Only the model section is validated, so a checkpoint whose other settings this version of
    gpt2 no longer knows still loads for generation, evaluation and export."""
    if not isinstance(text, str):
        raise UserError(f"{where} holds no spec", "it was not written by gpt2")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UserError(f"the spec stored in {where} is not JSON ({exc})", "the file is damaged") from exc
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    return spec_from_json(ModelSpec, json.dumps(data))


def _load_checkpoint_file(path: Path, device: torch.device | str, run_dir: Path | None = None) -> LoadedModel:
    _refuse_foreign_file(path)
    record = ckpt.load_checkpoint(path)
    where = repr(str(path))
    spec = model_spec_from_json(record.get("spec"), where)
    state = record.get("model")
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {where} holds no model weights", "pass a ckpt.pt or best.pt")
    model = build_model(spec, state, where, device)
    details = [path.name] if run_dir is not None else []
    if isinstance(record.get("step"), int):
        details.append(f"step {record['step']}")
    if isinstance(record.get("val_loss"), float):
        details.append(f"val loss {record['val_loss']:.4f}")
    what = f"run folder {str(run_dir)!r}" if run_dir is not None else f"checkpoint {where}"
    source = f"{what} ({', '.join(details)})" if details else what
    return LoadedModel(model, spec, source)


def _refuse_foreign_file(path: Path) -> None:
    """A file that is not even a torch.save archive gets a plainer message than 'damaged'."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise UserError(f"cannot read {str(path)!r}: {exc.strerror}", "check the path and its permissions") from exc
    if head[:2] != b"PK" and head[:1] != b"\x80":  # zip archive (torch >= 1.6) or legacy pickle
        raise UserError(
            f"{str(path)!r} is not a gpt2 checkpoint (not a file written by torch.save)",
            "pass a ckpt.pt or best.pt, a run folder, a Hugging Face GPT-2 folder or a .safetensors export",
        )


def build_model(spec: ModelSpec, state: dict[str, torch.Tensor], where: str,
                device: torch.device | str = "cpu") -> GPT:
    """A GPT of ``spec`` holding ``state`` (our parameter names; the tied lm_head may be absent)."""
    model = GPT.uninitialised(spec, "cpu")
    expected = model.state_dict()
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
    if "lm_head.weight" not in state and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = "; ".join(
            f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys
        )
        raise UserError(f"the weights in {where} do not match its spec: {detail}", "the file is damaged or foreign")
    for key, tensor in expected.items():
        if not isinstance(state[key], torch.Tensor) or state[key].shape != tensor.shape:
            shape = tuple(state[key].shape) if isinstance(state[key], torch.Tensor) else type(state[key]).__name__
            raise UserError(
                f"{key} has shape {shape} in {where}, its spec implies {tuple(tensor.shape)}",
                "the file is damaged or foreign",
            )
    with torch.no_grad():
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.tie_weights()
    return model.to(device).eval()


# ------------------------------------------------------------------------------- Hugging Face


def _load_hf(name: str, device: torch.device | str) -> LoadedModel:
    from gpt2cli.model.hf import load_hf_gpt2

    model = load_hf_gpt2(name, device=device)
    kind = "folder" if Path(name).expanduser().is_dir() else "hub model"
    return LoadedModel(model.eval(), model.spec, f"Hugging Face GPT-2 {kind} {name!r}")


# ------------------------------------------------------------------------------- safetensors


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # bad header, truncated file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read {str(path)!r}: {first}", "the file is damaged or not safetensors") from exc


def _is_our_safetensors(path: Path) -> bool:
    try:
        return _read_metadata(path).get("gpt2cli_format") == SAFETENSORS_FORMAT
    except UserError:
        return False


def _our_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a file written by :func:`save_safetensors` (a UserError otherwise)."""
    where = repr(str(path))
    meta = _read_metadata(path)
    if meta.get("gpt2cli_format") != SAFETENSORS_FORMAT:
        raise UserError(
            f"{where} is not a gpt2 safetensors export (no gpt2 spec in its metadata)",
            "pass a file written by `gpt2 export --format safetensors`, or a Hugging Face folder",
        )
    if meta.get("format_version") != SAFETENSORS_VERSION:
        raise UserError(
            f"{where} has export format version {meta.get('format_version')!r}, this gpt2 reads {SAFETENSORS_VERSION}",
            "export it again with this version of gpt2",
        )
    return meta


def load_safetensors(path: str | os.PathLike, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a file written by :func:`save_safetensors`."""
    from gpt2cli.parallel.base import resolve_device

    device = resolve_device(device)
    path = Path(path)
    where = repr(str(path))
    spec = model_spec_from_json(_our_metadata(path).get("spec"), where)
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read weights from {where}: {first}", "the file is damaged") from exc
    model = build_model(spec, state, where, device)
    return LoadedModel(model, spec, f"safetensors export {where}")


def save_safetensors(model: GPT, path: str | os.PathLike) -> Path:
    """Write ``model`` as one safetensors file with its spec in the header (any variant:
    RoPE, GQA, no biases). :func:`load_model` reads it back."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {
        name: t.detach().to("cpu").contiguous()
        for name, t in model.state_dict().items()
        if name != "lm_head.weight"  # tied to transformer.wte.weight; restored on load
    }
    metadata = {
        "format": "pt",
        "gpt2cli_format": SAFETENSORS_FORMAT,
        "format_version": SAFETENSORS_VERSION,
        "spec": spec_to_json(model.spec),
    }
    if path.is_dir():
        raise UserError(f"{str(path)!r} is a folder", "pass the path of the .safetensors file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder should be, no permission
        raise UserError(
            f"cannot create the folder {str(path.parent)!r}: {exc.strerror or type(exc).__name__}",
            "choose another path, or check its permissions",
        ) from exc
    data = save(tensors, metadata=metadata)
    ckpt.atomic_write_bytes(path, lambda f: f.write(data))
    return path


# ------------------------------------------------------------------------------------ export


def export_model(source: str | os.PathLike, out: str | os.PathLike, fmt: str = "hf",
                 overwrite: bool = False) -> tuple[Path, LoadedModel]:
    """`gpt2 export`: load ``source`` and write it as a Hugging Face GPT-2 folder (``hf``) or a
    safetensors file with our spec (``safetensors``). Returns the written path and the model."""
    if fmt not in ("hf", "safetensors"):
        raise UserError(f"unknown export format {fmt!r}", "use --format hf or --format safetensors")
    if not str(out).strip():  # Path("") is the current folder: never write there by accident
        raise UserError("OUT is empty", "give the folder or file to write (. for the current folder)")
    out_path = Path(out).expanduser()
    _check_parents(out_path)
    if fmt == "hf":
        target = out_path
        if target.exists() and not target.is_dir():
            raise UserError(f"{str(target)!r} is a file", "--format hf writes a folder; pass a folder path")
        if target.is_dir() and any(target.iterdir()) and not overwrite:
            raise UserError(f"folder {str(target)!r} is not empty", "choose another OUT or pass --overwrite")
    else:
        if out_path.exists() and not out_path.is_dir() and out_path.suffix != ".safetensors":
            raise UserError(
                f"{str(out_path)!r} is a file",
                "--format safetensors writes OUT.safetensors, or model.safetensors inside the folder OUT; "
                "pass such a path",
            )
        target = out_path / SAFETENSORS_NAME if out_path.is_dir() or not out_path.suffix else out_path
        if target.suffix != ".safetensors":
            raise UserError(f"{str(target)!r} does not end in .safetensors", "name the file OUT.safetensors")
        if target.exists() and not target.is_file():
            raise UserError(f"{str(target)!r} is not a file", "choose another OUT")
        if target.exists() and not overwrite:
            raise UserError(f"{str(target)!r} exists", "choose another OUT or pass --overwrite")
    loaded = load_model(source)
    if fmt == "hf":
        from gpt2cli.model.hf import export_hf

        _check_hf_exportable(loaded.spec)
        export_hf(loaded.model, target)
    else:
        save_safetensors(loaded.model, target)
    return target, loaded


def _check_parents(out: Path) -> None:
    """OUT must lie in a folder: a file where a parent folder should be is refused before the
    model is loaded (instead of failing in mkdir later)."""
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{str(parent)!r} is a file, not a folder", "choose another OUT")
            return


def _check_hf_exportable(spec: ModelSpec) -> None:
    """Refuse before anything is written (export_hf checks the same)."""
    if spec.pos != "learned" or spec.kv_heads != spec.n_head or not spec.bias:
        what = ", ".join(
            w for w, bad in (
                (f"pos={spec.pos}", spec.pos != "learned"),
                (f"attn={spec.attn}", spec.kv_heads != spec.n_head),
                ("bias=false", not spec.bias),
            ) if bad
        )
        raise UserError(
            f"this model ({what}) cannot be exported to the Hugging Face GPT-2 format, which has only "
            "learned positions, multi-head attention and biases",
            "use --format safetensors, which keeps every variant",
        )
