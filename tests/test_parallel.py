"""Several processes through the real `gpt2 train` command (gloo on CPU): DDP and FSDP match one
process, checkpoints move between strategies, resume under DDP is exact, two torchrun agents form
one job over a loopback rendezvous, a crashed worker is restarted, a hung peer fails the job.

torchrun costs about 4 s per launch here, so runs are shared between assertions (module fixtures).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from gpt2cli import checkpoint as ckpt
from gpt2cli.metrics import read_metrics
from tests.conftest import gpt2_command, run_gpt2
from tests.test_hellaswag import shakespeare_examples, write_jsonl

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 20
COMMON = ["--preset", "tiny", "--device", "cpu", "--seq-len", "32", "--eval-every", "10", "--eval-tokens", "512",
          "--log-every", "1", "--save-every", "5", "--quiet", "--lr", "3e-3", "--warmup", "2"]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"}


def grad_norms(run: Path) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"}


def train(run: Path, *extra: str, env: dict | None = None, check: bool = True):
    return run_gpt2("train", *COMMON, "--out", str(run), *extra, env=env, check=check, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("parallel")
    # HellaSwag at every evaluation: 5 examples, 2 per batch on 2 ranks, so one rank makes a
    # forward pass without examples (FSDP gathers the weights on every rank or none).
    hellaswag = write_jsonl(root / "hellaswag.jsonl", shakespeare_examples(5, seed=3))
    scored = ("--hellaswag", str(hellaswag), "--eval-batch-size", "2")
    train(root / "single", "--steps", str(STEPS), "--batch-size", "4", *scored)
    train(root / "ddp", "--steps", str(STEPS), "--batch-size", "2", "--strategy", "ddp", "--nproc", "2", *scored)
    train(root / "fsdp", "--steps", str(STEPS), "--batch-size", "2", "--strategy", "fsdp", "--nproc", "2", *scored)
    return root


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(runs, strategy):
    single, other = losses(runs / "single"), losses(runs / strategy)
    assert sorted(single) == sorted(other) == list(range(1, STEPS + 1))
    for step in single:
        assert other[step] == pytest.approx(single[step], rel=1e-5), step
    assert single[STEPS] < single[1] - 0.5  # and it learned something
    # The global gradient norm (clipping) does not depend on how the gradient is split: whole on
    # one process, averaged over two (DDP), or in shards (FSDP).
    single_norms, other_norms = grad_norms(runs / "single"), grad_norms(runs / strategy)
    for step in single_norms:
        assert other_norms[step] == pytest.approx(single_norms[step], rel=1e-5), step


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_hellaswag_on_two_processes_matches_one(runs, strategy):
    """Each rank scores every other example and the counts are summed: the accuracies of one process."""
    keys = ("hellaswag_acc", "hellaswag_acc_norm", "hellaswag_examples", "hellaswag_truncated")

    def scores(run: Path) -> list[tuple]:
        return [tuple(r[k] for k in keys) for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]

    single = scores(runs / "single")
    assert len(single) == 2 and all(s[2] == 5 for s in single)
    assert scores(runs / strategy) == single


def test_only_rank_zero_writes(runs):
    names = {p.name for p in (runs / "ddp").iterdir()}
    assert {"spec.json", "metrics.jsonl", "ckpt.pt", "best.pt", "launch-spec.json"} <= names
    rows = read_metrics(runs / "ddp" / "metrics.jsonl")
    assert len([r for r in rows if r["kind"] == "train"]) == STEPS  # one writer, no duplicates


def test_fsdp_checkpoint_resumes_on_one_process(runs, tmp_path):
    # Take the FSDP run's step-10 state and continue it on a single process with the same global batch.
    record = ckpt.load_checkpoint(runs / "fsdp" / "ckpt.pt")
    assert record["world_size"] == 2 and not any(k.startswith("_fsdp") for k in record["model"])
    resumed = tmp_path / "fsdp-to-single"
    resumed.mkdir()
    (resumed / "spec.json").write_text((runs / "fsdp" / "spec.json").read_text())
    proc = run_gpt2("train", "--resume", str(runs / "fsdp" / "ckpt.pt"), "--out", str(resumed),
                    "--strategy", "single", "--nproc", "1", "--batch-size", "4", "--steps", str(STEPS + 4),
                    check=True, timeout=300)
    assert proc.returncode == 0
    after = losses(resumed)
    assert sorted(after) == list(range(STEPS + 1, STEPS + 5))
    assert all(v == v and v < 11 for v in after.values())


def test_fsdp_checkpoints_store_the_tied_embedding_once_like_ddp(runs):
    # FSDP gathers lm_head.weight and transformer.wte.weight separately; saved as two tensors, the
    # embedding (most of the tiny model) was stored twice and best.pt was twice DDP's size.
    for name in ("best.pt", "ckpt.pt"):
        model = ckpt.load_checkpoint(runs / "fsdp" / name)["model"]
        lm_head, wte = model["lm_head.weight"], model["transformer.wte.weight"]
        assert lm_head.untyped_storage().data_ptr() == wte.untyped_storage().data_ptr(), name
        fsdp, ddp = (runs / "fsdp" / name).stat().st_size, (runs / "ddp" / name).stat().st_size
        assert abs(fsdp - ddp) < 0.01 * ddp, (name, fsdp, ddp)


def test_a_refused_ddp_resume_leaves_the_run_folder_as_it_was(runs, tmp_path):
    """The workers refuse a resume with another seed; the launcher prints their line once, and the
    folder keeps every file byte for byte: no worker-error reports left, launch-spec.json put back."""
    import shutil

    run = tmp_path / "ddp-copy"
    shutil.copytree(runs / "ddp", run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    proc = run_gpt2("train", "--out", str(run), "--resume", "auto", "--seed", "5", "--strategy", "ddp",
                    "--nproc", "2", "--device", "cpu", timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error: [rank 0]"), proc.stderr
    assert "seed" in lines[0]
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_ddp_run_resumes_on_one_process_with_strategy_single(runs, tmp_path):
    """As docs/training.md allows: --strategy single (no --nproc) with the same global batch; the
    stored --nproc 2 is not carried over."""
    import shutil

    run = tmp_path / "ddp-to-single"
    shutil.copytree(runs / "ddp", run)
    proc = run_gpt2("train", "--out", str(run), "--resume", "auto", "--strategy", "single", "--batch-size", "4",
                    "--steps", str(STEPS + 2), timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows][-2:] == [STEPS + 1, STEPS + 2]
    assert {(r["strategy"], r["world_size"]) for r in rows if r["step"] > STEPS} == {("single", 1)}


def test_single_checkpoint_resumes_under_ddp_and_matches(runs, tmp_path):
    # single -> ddp: the same global batch continues the same data and the same losses.
    full = tmp_path / "single-full"
    train(full, "--steps", str(STEPS + 5), "--batch-size", "4", "--save-every", str(STEPS))
    part = tmp_path / "single-part"
    train(part, "--steps", str(STEPS + 5), "--batch-size", "4", "--save-every", str(STEPS),
          env={"GPT2_FAULT": f"stop_at_step:{STEPS}"}, check=False)
    assert ckpt.load_checkpoint(part / "ckpt.pt")["step"] == STEPS
    run_gpt2("train", "--out", str(part), "--resume", "auto", "--strategy", "ddp", "--nproc", "2",
             "--batch-size", "2", check=True, timeout=300)
    a, b = losses(full), losses(part)
    for step in range(STEPS + 1, STEPS + 6):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_ddp_resume_is_exact(runs, tmp_path):
    part = tmp_path / "ddp-part"
    stopped = train(part, "--steps", str(STEPS), "--batch-size", "2", "--strategy", "ddp", "--nproc", "2",
                    env={"GPT2_FAULT": "stop_at_step:7"}, check=False)
    assert stopped.returncode == 75, stopped.stderr
    train(part, "--resume", "auto", "--steps", str(STEPS), "--batch-size", "2", "--strategy", "ddp", "--nproc", "2")
    assert losses(part) == losses(runs / "ddp")  # bit for bit
    a = ckpt.load_checkpoint(part / "ckpt.pt")["model"]
    b = ckpt.load_checkpoint(runs / "ddp" / "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch 2.9+")
def test_muon_under_ddp_matches_one_process(tmp_path, cache_dir):
    """Every rank orthogonalises the same all-reduced gradient, so the replicas stay one model and
    follow the single-process run. Not bit for bit: Newton-Schulz runs in bf16, where the last-bit
    differences of a gradient averaged over two processes can round the other way."""
    muon = ("--optimizer", "muon", "--steps", "6")
    train(tmp_path / "single", *muon, "--batch-size", "4")
    train(tmp_path / "ddp", *muon, "--batch-size", "2", "--strategy", "ddp", "--nproc", "2")
    single, ddp = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert sorted(ddp) == sorted(single) == list(range(1, 7))
    for step in single:
        assert ddp[step] == pytest.approx(single[step], rel=1e-3), step
    assert single[6] < single[1] - 0.3


def test_crashed_worker_is_restarted_and_resumes(tmp_path, cache_dir):
    run = tmp_path / "elastic"
    proc = train(run, "--steps", "12", "--batch-size", "2", "--strategy", "ddp", "--nproc", "2",
                 "--max-restarts", "1", "--save-every", "4", env={"GPT2_FAULT": "crash_at_step:6:rank1"}, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = sorted(losses(run))
    assert steps == list(range(1, 13))  # rows after the step-4 checkpoint were rewritten, none lost
    assert ckpt.load_checkpoint(run / "ckpt.pt")["step"] == 12


def test_a_crashed_worker_without_restarts_fails_the_job_in_a_line_of_its_own(tmp_path, cache_dir):
    """No torchrun traceback: the launcher says which worker ended and how, and status.json says
    failed (for FSDP too, where no rank reported an error of its own)."""
    for strategy in ("fsdp",):  # where no rank had a line of its own; DDP's go the same way
        run = tmp_path / strategy
        proc = train(run, "--steps", "12", "--batch-size", "2", "--strategy", strategy, "--nproc", "2",
                     env={"GPT2_FAULT": "crash_at_step:6:rank1"}, check=False)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr and "Root Cause" not in proc.stderr, proc.stderr[-3000:]
        failed = next(line for line in proc.stderr.splitlines() if line.startswith("Error: the job failed: "))
        assert "1 exited with code 1" in failed and "Traceback" not in failed, failed  # rank 1, with rank 0 or not
        status = json.loads((run / "status.json").read_text())
        assert status["status"] == "failed" and status["step"] >= 5, status


def test_hung_peer_fails_within_the_timeout(tmp_path, cache_dir):
    started = time.time()
    proc = train(tmp_path / "hang", "--steps", "8", "--batch-size", "2", "--strategy", "ddp", "--nproc", "2",
                 "--dist-timeout", "5", env={"GPT2_FAULT": "hang_at_step:3:rank1"}, check=False)
    assert proc.returncode != 0
    assert time.time() - started < 60
    assert "[rank 0]" in proc.stderr and "--dist-timeout" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_over_loopback_rendezvous(tmp_path, cache_dir):
    run = tmp_path / "two-nodes"
    port = _free_port()
    args = [*gpt2_command(), "train", *COMMON, "--out", str(run), "--steps", "6", "--batch-size", "2",
            "--strategy", "ddp", "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "test-job"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    nodes = [subprocess.Popen([*args, "--node-rank", str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [n.communicate(timeout=240) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs
    assert sorted(losses(run)) == list(range(1, 7))
    assert ckpt.load_checkpoint(run / "ckpt.pt")["world_size"] == 2


def test_gpus_without_gpus_is_refused(tmp_path):
    proc = run_gpt2("train", "--strategy", "ddp", "--gpus", "2", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "needs CUDA GPUs, and this machine has none" in proc.stderr
    assert "--strategy ddp --nproc 2 --device cpu" in proc.stderr and not (tmp_path / "r").exists()


def test_fsdp_fine_tuning_starts_from_the_init_weights(runs, tmp_path):
    """--init under FSDP: the full weights go into the sharded model the way a resume loads a
    checkpoint; at a learning rate of 1e-9 the run's checkpoint holds the starting weights."""
    out = tmp_path / "fsdp-init"
    without_preset = [a for a in COMMON if a not in ("--preset", "tiny")]  # the model comes from --init
    run_gpt2("train", *without_preset, "--out", str(out), "--init", str(runs / "single" / "best.pt"), "--steps", "1",
             "--batch-size", "2", "--lr", "1e-9", "--strategy", "fsdp", "--nproc", "2", check=True, timeout=300)
    start = ckpt.load_checkpoint(runs / "single" / "best.pt")["model"]
    tuned = ckpt.load_checkpoint(out / "ckpt.pt")["model"]
    assert start.keys() == tuned.keys()
    for name in start:
        torch.testing.assert_close(tuned[name], start[name], rtol=0, atol=1e-7, msg=name)
