"""Shared test fixtures. Everything runs on CPU, offline, with the tiny preset."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# No test may reach the network: the hub libraries fail at once instead of retrying for 20 s.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def gpt2_command() -> list[str]:
    """The installed `gpt2` console script next to this interpreter (falls back to -m)."""
    exe = Path(sys.executable).with_name("gpt2")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("gpt2")
    return [found] if found else [sys.executable, "-m", "gpt2cli"]


def run_gpt2(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 240,
             check: bool = False) -> subprocess.CompletedProcess:
    """Run the real `gpt2` command in a subprocess and capture its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [*gpt2_command(), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"gpt2 {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def record_attention_shapes(monkeypatch) -> list[tuple[int, int]]:
    """(query length, key length) of every attention call from now on, in order."""
    from gpt2cli.model import attention

    seen: list[tuple[int, int]] = []
    real = attention.grouped_sdpa

    def recording(q, k, v, **kwargs):
        seen.append((q.shape[2], k.shape[2]))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(attention, "grouped_sdpa", recording)
    return seen


def random_hf_gpt2(std: float, *, seed: int = 0, n_positions: int = 64):
    """A small transformers GPT2LMHeadModel (GPT-2 vocabulary, 2 layers, d=32) with every tensor
    drawn from N(0, std): decisive logits for parity checks."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=n_positions, n_embd=32, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One gpt2 cache (prepared embedded corpus) shared by the whole session."""
    path = tmp_path_factory.mktemp("gpt2-cache")
    os.environ["GPT2_CACHE_DIR"] = str(path)
    return path
