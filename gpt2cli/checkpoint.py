"""Checkpoints: one file each, atomic, versioned, integrity-checked, never unpickled.

A checkpoint is ``torch.save`` of plain containers (tensors, numbers, strings, lists, dicts), so
every load uses ``torch.load(..., weights_only=True)`` and a downloaded file can never run code.
It holds:

- ``format`` / ``format_version``: what reads it;
- ``spec``: the resolved TrainSpec as JSON text (or another spec for imported models);
- ``model``: the full, unsharded state dict without ``module.`` / ``_orig_mod.`` prefixes;
- for training state: ``optimizer`` (keyed by parameter names), ``rng``, ``loader``, ``step``,
  ``tokens_seen``, ``best_val_loss``, ``world_size``, ``global_batch``;
- ``digest``: SHA-256 over every tensor's bytes and every other value. The zip container catches
  truncation but not a flipped byte inside tensor data; the digest catches both.

Writes go to a temporary file in the same folder, are fsynced, then renamed over the target and
the folder is fsynced: a crash at any moment leaves either the old complete file or the new one.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from gpt2cli import __version__
from gpt2cli.errors import UserError
from gpt2cli.fsutil import disk_full_error, fsync_dir, remove_stale_staging, staging_path

FORMAT = "gpt2cli-checkpoint"
FORMAT_VERSION = 1

CKPT_NAME = "ckpt.pt"  # latest full training state
BEST_NAME = "best.pt"  # best model by validation loss (no optimizer state)
STEP_PREFIX = "step-"  # step-000123.pt, kept with --keep K

# Fault injection for the reliability tests (off unless the variable is set): GPT2_FAULT=crash_in_save
# (any checkpoint) or crash_in_save:STEP (the checkpoint of that step) exits 137 after the temporary
# file is fully written but before it replaces the target. Other files (spec.json, status.json) are
# not affected, so a run reaches its checkpoints.
FAULT_ENV = "GPT2_FAULT"

# The error weights_only raises for a refused global (the pickle module's own class; we only
# catch it, we never unpickle with it).
_UNPICKLING_ERROR = torch.serialization.pickle.UnpicklingError


def _crash_in_save(step: Any) -> bool:
    for item in os.environ.get(FAULT_ENV, "").split(","):
        kind, _, at = item.partition(":")
        if kind == "crash_in_save" and (not at or at == str(step)):
            return True
    return False


# ---------------------------------------------------------------------------------- digest


def _update_digest(h: Any, value: Any) -> None:
    """Feed a nested structure into a hash in a canonical order."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        h.update(b"D%d" % len(value))
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            _update_digest(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(b"L%d" % len(value))
        for item in value:
            _update_digest(h, item)
    else:
        h.update(f"V{type(value).__name__}:{value!r}".encode())


def payload_digest(payload: dict[str, Any]) -> str:
    h = hashlib.sha256()
    _update_digest(h, {k: v for k, v in payload.items() if k != "digest"})
    return h.hexdigest()


# ------------------------------------------------------------------------------------ write


def atomic_write_bytes(path: Path, writer: Any, *, crash_before_rename: bool = False) -> None:
    """Call ``writer(file)`` on a temp file beside ``path``, fsync, then rename over ``path``.
    Temp files of ``path`` that killed writers on this host left behind are removed first."""
    path = Path(path)
    remove_stale_staging(path)
    tmp = staging_path(path)
    try:
        with open(tmp, "wb") as f:
            try:
                writer(f)
            except RuntimeError as exc:
                # torch.save reports a full disk as a RuntimeError of its zip writer ("unexpected
                # pos ...") around the OSError: that error, with the file it was writing, instead.
                full = disk_full_error(exc)
                if full is None:
                    raise
                raise OSError(full.errno, full.strerror, str(path)) from exc
            f.flush()
            os.fsync(f.fileno())
        if crash_before_rename:
            os._exit(137)  # simulate a kill between the write and the rename
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically. ``payload`` must hold ``spec`` (JSON text) and ``model``."""
    if "spec" not in payload or "model" not in payload:
        raise ValueError("a checkpoint needs at least 'spec' and 'model'")
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gpt2cli_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        **payload,
    }
    record["digest"] = payload_digest(record)
    atomic_write_bytes(Path(path), lambda f: torch.save(record, f),
                       crash_before_rename=_crash_in_save(payload.get("step")))


# ------------------------------------------------------------------------------------- read


def load_weights_only(path: str | Path, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True, **kwargs)``, without torch's warnings about the file
    (such as a pickle protocol it did not write): a file it cannot load is one error line, and
    one it can needs no remark."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, weights_only=True, **kwargs)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", verify: bool = True) -> dict[str, Any]:
    """Load and verify a checkpoint. Anything wrong is one UserError line, never a half load.

    ``verify=False`` is for reading its spec or counters only: the tensors are memory-mapped (not
    read) and the digest, which would read them all, is not checked."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {str(p)!r} does not exist", "check the path")
    if p.is_dir():
        raise UserError(f"{str(p)!r} is a folder, not a checkpoint file", "pass a .pt file or a run folder")
    try:
        record = load_weights_only(p, map_location=map_location, mmap=not verify)
    except _UNPICKLING_ERROR as exc:
        if "global" in str(exc).lower():
            # weights_only refused to build an object: a foreign or malicious pickle. Never retry unsafely.
            raise UserError(
                f"{str(p)!r} is not a gpt2 checkpoint: it holds objects that a safe load refuses "
                "(nothing was executed)",
                "only load checkpoints written by gpt2",
            ) from exc
        raise _damaged(p, exc) from exc
    except Exception as exc:  # zip, EOF and unpickler errors: the bytes are not a whole checkpoint
        raise _damaged(p, exc) from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{str(p)!r} is not a gpt2 checkpoint", "pass a ckpt.pt or best.pt written by gpt2 train")
    version = record.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise UserError(
            f"checkpoint {str(p)!r} has format version {version!r}, this gpt2 reads {FORMAT_VERSION}",
            "upgrade gpt2" if newer else "it was written by an incompatible gpt2",
        )
    if verify and record.get("digest") != payload_digest(record):
        raise UserError(
            f"checkpoint {str(p)!r} is damaged: its contents do not match the stored SHA-256 digest",
            "use another checkpoint (an earlier step-N.pt, or the run's best.pt or ckpt.pt)",
        )
    return record


def _damaged(p: Path, exc: BaseException) -> UserError:
    return UserError(
        f"checkpoint {str(p)!r} is damaged, truncated or not a checkpoint ({_short(exc)})",
        # Read by eval and generate as much as by a resume: the hint serves both.
        "use another checkpoint (an earlier step-N.pt, or the run's best.pt or ckpt.pt); "
        "gpt2 train --resume auto itself falls back to the last complete one",
    )


def _short(exc: BaseException, limit: int = 120) -> str:
    """The first line of an error, cut at a sentence end (else a word end) when it is longer than
    ``limit``: torch's zip errors run on for a paragraph after the part that says what failed."""
    text = str(exc).strip()
    text = text.splitlines()[0].strip() if text else type(exc).__name__
    if len(text) <= limit:
        return text
    head = text[: limit + 1]
    sentence = max(head.rfind(". "), head.rfind("! "), head.rfind("? "))
    if sentence > 0:
        return head[: sentence + 1]
    word = head.rfind(" ")
    return (head[:word] if word > 0 else text[:limit]).rstrip(" ,;:") + " ..."


def is_valid_checkpoint(path: Path) -> bool:
    try:
        load_checkpoint(path)
        return True
    except UserError:
        return False


# ---------------------------------------------------------------------------- finding files


def step_checkpoint_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}.pt"


def step_checkpoints(run_dir: Path) -> list[Path]:
    """Step checkpoints of a run, oldest first."""
    return sorted(Path(run_dir).glob(f"{STEP_PREFIX}*.pt"))


def latest_checkpoint(run_dir: Path, warn: Any = None) -> Path | None:
    """The run's latest complete training checkpoint: ckpt.pt, else the newest valid step file.

    A damaged candidate is skipped (with a warning through ``warn``), never loaded.
    """
    run_dir = Path(run_dir)
    candidates = [run_dir / CKPT_NAME, *reversed(step_checkpoints(run_dir))]
    for cand in candidates:
        if not cand.exists():
            continue
        if is_valid_checkpoint(cand):
            return cand
        if warn:
            warn(f"skipping damaged checkpoint {cand}")
    return None


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that a crash cut off between the write and
    the rename (``.ckpt.pt.tmp-PID``). They are never read as checkpoints; this only frees the
    space. Call it only while no other process writes this run's checkpoints."""
    removed = []
    for path in Path(run_dir).glob(".*.pt.tmp-*"):
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def model_checkpoint_in(path: str | Path) -> Path:
    """For eval/generate: a file as is; a run folder -> its best.pt, else its ckpt.pt."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for name in (BEST_NAME, CKPT_NAME):
            if (p / name).exists():
                return p / name
        raise UserError(f"run folder {str(p)!r} holds no best.pt or ckpt.pt", "train first or pass a checkpoint file")
    raise UserError(f"checkpoint {str(p)!r} does not exist", "check the path")
