"""Hugging Face GPT-2 weights in and out, without importing transformers.

A HF GPT-2 folder holds ``config.json`` and the weights as ``model.safetensors`` (or a sharded
``model.safetensors.index.json``, or the older ``pytorch_model.bin``). The tensor names are ours
(``transformer.h.0.attn.c_attn.weight`` ...) with two differences: the four projections are HF
``Conv1D`` layers, whose weights are stored transposed ((in, out) instead of nn.Linear's
(out, in)), and the published OpenAI checkpoints drop the ``transformer.`` prefix and carry the
causal-mask buffers ``h.N.attn.bias`` / ``h.N.attn.masked_bias``, which are not weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from gpt2cli.errors import UserError
from gpt2cli.fsutil import fsync_dir, remove_stale_staging, staging_path
from gpt2cli.model.gpt import GPT
from gpt2cli.specs import ModelSpec, validate_spec

# Weights of HF Conv1D layers, stored (in_features, out_features).
CONV1D_SUFFIXES = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
# Causal-mask buffers in old checkpoints: "h.0.attn.bias" (not "h.0.attn.c_attn.bias").
_MASK_BUFFER = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")
# GELU variants that are the tanh approximation our MLP computes.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_EOT_TOKEN = 50256  # <|endoftext|>, GPT-2's bos and eos
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# -------------------------------------------------------------------------------- import


def is_hf_gpt2_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder with a config.json and GPT-2-style weights."""
    folder = Path(path)
    return (folder / "config.json").is_file() and _weights_file(folder) is not None


def hf_config_to_spec(config: dict[str, Any]) -> ModelSpec:
    """Map a HF GPT-2 config.json onto a ModelSpec (preset None); refuse what we cannot represent."""
    model_type = config.get("model_type")
    if model_type != "gpt2":
        raise UserError(
            f"config.json has model_type {model_type!r}, not 'gpt2'",
            "only GPT-2 weights can be imported",
        )
    n_embd = config.get("n_embd", 768)
    unsupported = {
        "activation_function": (
            config.get("activation_function", "gelu_new"),
            lambda v: v in _TANH_GELUS,
        ),
        "n_inner": (config.get("n_inner"), lambda v: v is None or v == 4 * n_embd),
        "scale_attn_weights": (config.get("scale_attn_weights", True), lambda v: v is True),
        "scale_attn_by_inverse_layer_idx": (
            config.get("scale_attn_by_inverse_layer_idx", False),
            lambda v: not v,
        ),
        "add_cross_attention": (config.get("add_cross_attention", False), lambda v: not v),
        "tie_word_embeddings": (config.get("tie_word_embeddings", True), lambda v: v is True),
    }
    for key, (value, ok) in unsupported.items():
        if not ok(value):
            raise UserError(
                f"this GPT-2 config has {key}={value!r}, which gpt2's model cannot represent",
                "only standard GPT-2 checkpoints (tanh GELU, 4x MLP, tied embeddings) can be imported",
            )
    fields = {
        "vocab_size": config.get("vocab_size", 50257),
        "block_size": config.get("n_positions", config.get("n_ctx", 1024)),
        "n_layer": config.get("n_layer", 12),
        "n_head": config.get("n_head", 12),
        "n_embd": n_embd,
        "attn": "mha",
        "pos": "learned",
        "bias": True,
        "layer_norm_eps": config.get("layer_norm_epsilon", 1e-5),
        # One dropout rate for the three GPT-2 has (they are all 0.1 in the published configs).
        "dropout": config.get("resid_pdrop", 0.1),
    }
    return validate_spec(ModelSpec, fields)


def hf_to_gpt_state_dict(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors -> our names: prefix ``transformer.``, transpose Conv1D, drop mask buffers
    and the tied ``lm_head.weight`` (it is the token embedding)."""
    ours: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state.items():
        if _MASK_BUFFER.search(name) or name == "lm_head.weight":
            continue
        key = name if name.startswith("transformer.") else f"transformer.{name}"
        if key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        ours[key] = tensor.contiguous()
    return ours


def load_hf_gpt2(path_or_name: str, device: torch.device | str = "cpu") -> GPT:
    """Load HF GPT-2 weights (a local folder, or a hub name such as ``gpt2`` or
    ``openai-community/gpt2``) into a :class:`GPT` in fp32 on ``device``; ``model.spec`` says its
    shape. Raises UserError for anything missing, unreadable or not representable."""
    folder = _resolve_folder(path_or_name)
    spec = _folder_spec(folder)
    hf_state = _read_weights(folder)
    wte = hf_state.get("transformer.wte.weight", hf_state.get("wte.weight"))
    if (
        "lm_head.weight" in hf_state
        and wte is not None
        and not torch.equal(hf_state["lm_head.weight"], wte)
    ):
        raise UserError(
            "lm_head.weight differs from the token embedding",
            "only tied GPT-2 weights can be imported",
        )
    state = hf_to_gpt_state_dict(hf_state)

    # Shapes on the meta device (no random init to throw away), memory on `device`, then the weights.
    with torch.device("meta"):
        model = GPT(spec)
    model.to_empty(device=device)
    model.tie_weights()
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = "; ".join(
            f"{what} {', '.join(keys[:3])}"
            for what, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        )
        raise UserError(
            f"the weights in {str(folder)!r} do not match their config.json: {detail}",
            "the folder looks damaged",
        )
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise UserError(
                f"{key} has shape {tuple(state[key].shape)} in {str(folder)!r}, config.json implies {tuple(shape)}",
                "the folder looks damaged",
            )
    state["lm_head.weight"] = state["transformer.wte.weight"]
    with torch.no_grad():
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def hf_gpt2_spec(path_or_name: str) -> ModelSpec:
    """The ModelSpec of a Hugging Face GPT-2 folder or hub name, from its config.json alone (a
    hub repository's weights are not fetched for it)."""
    return _folder_spec(_resolve_folder(path_or_name, weights=False))


def _folder_spec(folder: Path) -> ModelSpec:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{str(folder)!r} has no config.json", "pass a Hugging Face GPT-2 folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot read {str(config_path)!r}: {exc}", "the folder looks damaged"
        ) from exc
    return hf_config_to_spec(config)


def _resolve_folder(path_or_name: str, weights: bool = True) -> Path:
    """A local folder as it is; otherwise a hub repository id through the HF cache."""
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(
            f"{path_or_name!r} is a file, not a folder", "pass the folder that holds config.json"
        )
    if not _HUB_NAME.match(path_or_name) or path_or_name.count("/") > 1:
        raise UserError(
            f"folder {path_or_name!r} does not exist",
            "pass a Hugging Face GPT-2 folder or a hub name like gpt2",
        )
    return _snapshot(path_or_name, weights=weights)


def _snapshot(repo_id: str, weights: bool = True) -> Path:
    """Fetch config.json and one weights file of a hub repository (or find them in the cache);
    ``weights=False``: config.json alone (a spec, e.g. for `gpt2 train --init gpt2-xl --dry-run`)."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError as exc:
        raise UserError(
            f"{repo_id!r} is not a local folder and huggingface_hub is not installed",
            "pass a local Hugging Face GPT-2 folder",
        ) from exc
    try:
        # The published repositories hold the same weights in several formats; take safetensors
        # and fall back to pytorch_model.bin only when a repository has no safetensors.
        if not weights:
            return Path(snapshot_download(repo_id, allow_patterns=["config.json"]))
        folder = Path(
            snapshot_download(repo_id, allow_patterns=["config.json", "model.safetensors*"])
        )
        if _weights_file(folder) is None:
            folder = Path(
                snapshot_download(repo_id, allow_patterns=["config.json", "pytorch_model.bin*"])
            )
    except Exception as exc:  # offline, network, authentication, missing repository: one line each
        # LocalEntryNotFoundError: not cached, and the hub is off (HF_HUB_OFFLINE) or unreachable.
        if constants.HF_HUB_OFFLINE or type(exc).__name__ in (
            "LocalEntryNotFoundError",
            "OfflineModeIsEnabled",
        ):
            raise _offline_error(repo_id) from exc
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub: {first_line}",
            "check the name, or pass a local folder",
        ) from exc
    if _weights_file(folder) is None:
        raise UserError(
            f"hub repository {repo_id!r} has no GPT-2 weights (model.safetensors or pytorch_model.bin)",
            "pass a GPT-2 repository or a local folder",
        )
    return folder


def _offline_error(repo_id: str) -> UserError:
    return UserError(
        f"{repo_id!r} is not a local folder, and as a hub name it is not in the Hugging Face cache "
        "and the hub cannot be reached (offline)",
        "pass a local folder with config.json and model.safetensors, or download it once online",
    )


def _weights_file(folder: Path) -> Path | None:
    for name in (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights = _weights_file(folder)
    if weights is None:
        raise UserError(
            f"{str(folder)!r} has no model.safetensors or pytorch_model.bin",
            "pass a Hugging Face GPT-2 folder",
        )
    files = [weights]
    if weights.name.endswith(".index.json"):  # sharded: the index maps tensor names to files
        try:
            weight_map = json.loads(weights.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(
                f"cannot read {str(weights)!r}: {exc}", "the folder looks damaged"
            ) from exc
        files = [folder / name for name in sorted(set(weight_map.values()))]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(_read_weights_file(file))
    return state


def _read_weights_file(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        # weights_only: a downloaded .bin is a pickle and must not be able to run code.
        state = torch.load(file, map_location="cpu", weights_only=True)
    except torch.serialization.pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():
            raise _unreadable(file, exc) from exc
        # The safe load refused to build an object. torch's own message then suggests
        # weights_only=False, which would run whatever the pickle holds: say what happened instead.
        raise UserError(
            f"{str(file)!r} holds Python objects besides tensors, which a safe load refuses (nothing was executed)",
            "use the model's model.safetensors instead, or a .bin that holds only tensors",
        ) from exc
    except Exception as exc:  # truncated file, bad header
        raise _unreadable(file, exc) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(
            f"{str(file)!r} does not hold a plain state dict of tensors",
            "it is not a GPT-2 checkpoint",
        )
    return state


def _unreadable(file: Path, exc: BaseException) -> UserError:
    return UserError(
        f"cannot read weights {str(file)!r}: {str(exc).splitlines()[0] if str(exc) else exc!r}",
        "the file is damaged or not a GPT-2 checkpoint",
    )


# -------------------------------------------------------------------------------- export


def export_hf(model: GPT, out_dir: str | os.PathLike) -> Path:
    """Write ``model`` as a HF GPT-2 folder (config.json + model.safetensors) that
    ``transformers.GPT2LMHeadModel.from_pretrained`` loads. Only GPT-2's own architecture can be
    exported: learned positions, multi-head attention, biases. Returns the folder."""
    spec = model.spec
    if spec.pos != "learned":
        raise UserError(
            "a RoPE model cannot be exported to the GPT-2 format",
            "GPT-2 has learned positions (pos=learned)",
        )
    if spec.kv_heads != spec.n_head:
        raise UserError(
            f"an attn={spec.attn} model cannot be exported to the GPT-2 format",
            "GPT-2 has multi-head attention (attn=mha)",
        )
    if not spec.bias:
        raise UserError(
            "a model without biases cannot be exported to the GPT-2 format",
            "GPT-2 has biases (bias=true)",
        )

    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to wte; transformers re-ties it (tie_word_embeddings)
            continue
        tensor = tensor.detach()
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        tensors[name] = tensor.to("cpu").contiguous()  # safetensors wants contiguous CPU tensors
    dtype = model.transformer.wte.weight.dtype
    eot = (
        _EOT_TOKEN if spec.vocab_size > _EOT_TOKEN else None
    )  # tiny vocabularies have no <|endoftext|>
    config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": spec.vocab_size,
        "n_positions": spec.block_size,
        "n_ctx": spec.block_size,
        "n_embd": spec.n_embd,
        "n_layer": spec.n_layer,
        "n_head": spec.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": spec.dropout,
        "embd_pdrop": spec.dropout,
        "attn_pdrop": spec.dropout,
        "layer_norm_epsilon": spec.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    out = Path(out_dir)
    from safetensors.torch import save_file

    def write_files(folder: Path) -> None:
        # config.json last: until it is there, nothing takes the folder for a GPT-2 model.
        _write_atomic(
            folder / "model.safetensors",
            lambda path: save_file(tensors, str(path), metadata={"format": "pt"}),
        )
        _write_atomic(
            folder / "config.json",
            lambda path: path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8"),
        )

    if out.is_dir():  # an existing (empty, or --overwrite) folder: file by file, each atomic
        write_files(out)
        return out
    if out.exists():
        raise UserError(f"{str(out)!r} is a file", "the Hugging Face format is a folder; pass a folder path")
    # A new folder is built under a hidden name beside it and renamed into place when complete,
    # so an interrupted export leaves no half-written folder.
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create the folder {str(out.parent)!r}: {exc.strerror or type(exc).__name__}",
            "check the path and its permissions",
        ) from exc
    remove_stale_staging(out)
    staging = staging_path(out)
    staging.mkdir()
    try:
        write_files(staging)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    return out


def _write_atomic(target: Path, write) -> None:
    """Write through a temporary file in the same folder, so a crash never leaves half a file.

    The file gets the mode of any new file, 0o666 less the process umask: ``tempfile.mkstemp``
    would make it 0o600, and so does safetensors' ``save_file`` (0.8), so the mode the file had
    when created here is set again after ``write``."""
    remove_stale_staging(target)  # what an export killed here before left behind
    tmp = staging_path(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = os.fstat(fd).st_mode & 0o7777
    finally:
        os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
