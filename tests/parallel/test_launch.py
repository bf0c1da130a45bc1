"""The environment `gpt2 train` gives its torchrun workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpt2cli.errors import UserError
from gpt2cli.parallel.launch import LAUNCH_DIR_ENV, check_gpus, worker_env
from gpt2cli.specs import ParallelSpec


def test_worker_env_adds_defaults_and_keeps_what_the_user_set(tmp_path: Path):
    spec_path = tmp_path / "launch-spec.json"
    ddp = worker_env(ParallelSpec(strategy="ddp", nproc=2), spec_path, {"PATH": "/bin"})
    assert ddp["PATH"] == "/bin" and ddp["PYTHONUNBUFFERED"] == "1" and int(ddp["OMP_NUM_THREADS"]) >= 1
    assert ddp[LAUNCH_DIR_ENV] == str(tmp_path) and "THP_MEM_ALLOC_ENABLE" not in ddp
    # FSDP gives large freed blocks back to the OS on the CPU: torch's allocator advises huge pages.
    fsdp = worker_env(ParallelSpec(strategy="fsdp", nproc=2), spec_path, {})
    assert fsdp["THP_MEM_ALLOC_ENABLE"] == "1"
    user = worker_env(ParallelSpec(strategy="fsdp", nproc=2), spec_path,
                      {"THP_MEM_ALLOC_ENABLE": "0", "OMP_NUM_THREADS": "3"})
    assert user["THP_MEM_ALLOC_ENABLE"] == "0" and user["OMP_NUM_THREADS"] == "3"


def test_gpus_without_cuda_says_so_and_names_the_cpu_route(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--gpus 2 needs CUDA GPUs, and this machine has none") as caught:
        check_gpus(ParallelSpec(strategy="fsdp", gpus=2))
    assert caught.value.hint == "on the CPU use --strategy fsdp --nproc 2 --device cpu"
    check_gpus(ParallelSpec(strategy="ddp"))  # no --gpus: nothing to check
