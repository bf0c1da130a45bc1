"""Reliability and safety through the real `gpt2` command (docs/reliability.md).

Faults are injected from outside (SIGKILL, SIGTERM, damaged and malicious files, bad flags) or
through the product's switch ``GPT2_FAULT`` (off unless set): ``crash_in_save[:STEP]`` exits 137
between the write and the rename of a checkpoint, ``nan_at_step:N[:rankR]`` poisons one loss.

What the existing suites already assert is not repeated here: bit-exact resume after a clean stop,
SIGTERM to a single run, non-finite stop/skip in one process, one truncated checkpoint on resume
(tests/test_train.py); DDP equivalence, DDP exact resume, elastic restart, hung peer
(tests/test_parallel.py); unit tests of damaged and foreign files (tests/test_checkpoint.py).

Everything here runs the tiny preset at --seq-len 16 and --batch-size 2 on the CPU. Runs are
shared between assertions (module fixtures), and the one-process-per-case checks run two at a time.
With GPT2_RELIABILITY_REPORT=FILE the tallies of faults injected, kills survived, bad inputs tried
and checkpoints lost are written to FILE as JSON (docs/reliability.md quotes them).
"""

from __future__ import annotations

import ast
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from gpt2cli import checkpoint as ckpt
from gpt2cli.metrics import read_metrics
from tests.conftest import REPO, gpt2_command, run_gpt2

STEPS = 16  # single-process runs
DDP_STEPS = 12
BASE = ["--preset", "tiny", "--device", "cpu", "--seq-len", "16", "--batch-size", "2", "--eval-tokens", "256",
        "--eval-every", "1000", "--log-every", "1", "--save-every", "2", "--quiet"]
SINGLE = [*BASE, "--dropout", "0.1", "--steps", str(STEPS)]
DDP = [*BASE, "--strategy", "ddp", "--nproc", "2", "--dist-timeout", "30", "--steps", str(DDP_STEPS)]
LINUX_PROC = Path("/proc/self/environ").exists()

TALLY: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_tally():
    TALLY["checkpoints_lost"] += 0  # reported even when (as it should be) nothing was lost
    yield
    target = os.environ.get("GPT2_RELIABILITY_REPORT")
    if target:
        Path(target).write_text(json.dumps(dict(sorted(TALLY.items())), indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------- helpers


def train_rows(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_rows(run)}


def assert_each_step_once(run: Path, total: int) -> None:
    steps = [r["step"] for r in train_rows(run)]
    assert steps == list(range(1, total + 1)), steps


def start(args: list[str], env: dict | None = None, new_session: bool = False) -> subprocess.Popen:
    return subprocess.Popen([*gpt2_command(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            start_new_session=new_session)


def wait_for_rows(run: Path, count: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until metrics.jsonl holds `count` training rows (the run is then inside step count + 1)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len(train_rows(run)) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {count}: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError(f"no step {count} within {timeout} s")


def worker_pids(run: Path) -> dict[int, int]:
    """rank -> pid of the live torchrun workers of a run (Linux /proc)."""
    spec = str(run / "launch-spec.json").encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            if spec not in cmd or b"gpt2cli.torchrun" in cmd:
                continue
            env = dict(e.split(b"=", 1) for e in (entry / "environ").read_bytes().split(b"\0") if b"=" in e)
            found[int(env[b"RANK"])] = int(entry.name)
        except (OSError, KeyError, ValueError):
            continue
    return found


def listening_addresses(run: Path) -> set[str]:
    """The addresses that the agent and workers of a run listen on (Linux /proc): "127.0.0.1",
    "0.0.0.0", "::" and so on, read from /proc/net/tcp{,6} for the sockets they hold."""
    spec = str(run / "launch-spec.json").encode()
    inodes: set[str] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if spec not in (entry / "cmdline").read_bytes().split(b"\0"):
                continue
            for fd in (entry / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:["):-1])
        except OSError:
            continue
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(fields[1].split(":")[0])
            # The kernel prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(family, raw))
    return found


def wait_no_workers(run: Path, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while worker_pids(run):
        assert time.time() < deadline, f"stray workers still running: {worker_pids(run)}"
        time.sleep(0.1)


def last_complete_checkpoint(run: Path, last_row: int, every: int = 2) -> int:
    """The resume point after a fault: must be the newest complete checkpoint, never older than the
    save that preceded the last logged step by more than one interval."""
    found = ckpt.latest_checkpoint(run)
    TALLY["checkpoints_checked"] += 1
    if found is None:
        TALLY["checkpoints_lost"] += 1
        raise AssertionError(f"no complete checkpoint left in {run}")
    step = int(ckpt.load_checkpoint(found)["step"])
    # A save step, or the last logged step itself: a stop's checkpoint (a SIGKILL of `gpt2 train`
    # reaches torchrun as its parent-death signal, and the workers stop as for a SIGTERM).
    if not ((step % every == 0 or step == last_row) and last_row - every <= step <= last_row):
        TALLY["checkpoints_lost"] += 1
        raise AssertionError(f"resume point step {step}, last logged step {last_row}")
    return step


def all_finite(record: dict) -> bool:
    tensors = list(record["model"].values())
    for state in record.get("optimizer", {}).get("state", {}).values():
        tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("Error:"), stderr
    return lines[0]


# The console script's entry point, imported once; then one forked process per case (its own cwd,
# stdout, stderr and exit status), two at a time. A case costs what `gpt2` does after its imports,
# instead of a fresh interpreter importing torch each time (that import is what
# test_help_and_flag_errors_do_not_import_torch is about). A few cases are also run through the
# real console script (test_forked_cases_match_the_console_script).
_FORK_DRIVER = r"""
import importlib, json, os, sys, traceback
from gpt2cli.cli import main

# What the commands import or build lazily, done once here for every forked case.
for name in ("gpt2cli.train", "gpt2cli.loading", "gpt2cli.generate", "gpt2cli.data.prepare", "gpt2cli.compare",
             "gpt2cli.modelinfo", "gpt2cli.tokenizer"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
try:
    from gpt2cli.tokenizer import get_tokenizer, token_byte_lengths

    get_tokenizer()
    token_byte_lengths()
except Exception:
    pass

cases = json.load(sys.stdin)
codes = [None] * len(cases)
running = {}


def reap():
    pid, status = os.waitpid(-1, 0)
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)


for i, (argv, cwd, out_path, err_path) in enumerate(cases):
    while len(running) >= 2:
        reap()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        running[pid] = i
        continue
    code = 1
    try:
        os.chdir(cwd)
        for fd, path in ((1, out_path), (2, err_path)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.argv = ["gpt2", *argv]
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
while running:
    reap()
json.dump(codes, sys.stdout)
"""


def run_many(cases: list[tuple[list[str], Path]], scratch: Path) -> list[subprocess.CompletedProcess]:
    """Run each (argv, cwd) as `gpt2 *argv` in its own (forked) process; CompletedProcess each."""
    scratch.mkdir(parents=True, exist_ok=True)
    spec = [(argv, str(cwd), str(scratch / f"{i}.out"), str(scratch / f"{i}.err"))
            for i, (argv, cwd) in enumerate(cases)]
    driver = subprocess.run([sys.executable, "-c", _FORK_DRIVER], input=json.dumps(spec), capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert driver.returncode == 0, driver.stderr
    codes = json.loads(driver.stdout)
    return [subprocess.CompletedProcess(["gpt2", *argv], code, Path(out).read_text(), Path(err).read_text())
            for (argv, _, out, err), code in zip(spec, codes, strict=True)]


# ------------------------------------------------------------------------ shared runs


@pytest.fixture(scope="module")
def root(tmp_path_factory, cache_dir) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def reference(root) -> Path:
    """An uninterrupted single-process run: what every interrupted one must reproduce exactly."""
    run = root / "reference"
    run_gpt2("train", *SINGLE, "--out", str(run), check=True)
    assert_each_step_once(run, STEPS)
    return run


# A process of the same command sometimes takes another rounding path: twice in about 25 full
# suite runs (2026-11-28), one process logged step 1 as 10.86203670501709 instead of
# 10.862020492553711 (16 ulp) and 1 ulp at steps 4 and 7, always those same values, once in the
# reference and once in a killed run; the other steps were bit-identical. About 100 direct runs
# (threads 1-4, AVX2, MKL's reproducible mode, CPU load, a shifted heap) never did it, so the cause
# is not known. A resume bug (data order, dropout RNG, schedule or optimizer state) moves the loss
# by far more than ROUNDING_ONLY, so such a difference is accepted, counted and warned about.
ROUNDING_ONLY = 1e-5  # relative


def assert_resumed_equals_uninterrupted(run: Path, reference: Path) -> None:
    """Losses and final weights bit for bit, or, where one process rounded differently, equal
    to within ROUNDING_ONLY (counted as rounding_only_differences, and warned about)."""
    got, want = losses(run), losses(reference)
    a = ckpt.load_checkpoint(run / "ckpt.pt")["model"]
    b = ckpt.load_checkpoint(reference / "ckpt.pt")["model"]
    if got == want and all(torch.equal(a[k], b[k]) for k in a):
        return
    assert got.keys() == want.keys()
    differing = {step: (got[step], want[step]) for step in want if got[step] != want[step]}
    assert all(math.isclose(x, y, rel_tol=ROUNDING_ONLY) for x, y in differing.values()), differing
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=ROUNDING_ONLY, atol=1e-7, msg=k)
    TALLY["rounding_only_differences"] += 1
    warnings.warn(f"resumed and uninterrupted runs differ by rounding only, at steps {differing}", stacklevel=2)


@pytest.fixture(scope="module")
def ddp_reference(root) -> Path:
    run = root / "ddp-reference"
    run_gpt2("train", *DDP, "--out", str(run), check=True, timeout=300)
    assert_each_step_once(run, DDP_STEPS)
    return run


# ------------------------------------------------------------- 1. SIGKILL, then --resume auto


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_at_a_random_step_then_resume_is_exact(reference, root, seed):
    rng = random.Random(seed)
    kill_after, delay = rng.randint(3, STEPS - 7), rng.uniform(0.0, 0.2)
    run = root / f"sigkill-{seed}"
    proc = start(["train", *SINGLE, "--out", str(run)])
    wait_for_rows(run, kill_after, proc)
    time.sleep(delay)  # anywhere inside the step: forward, backward, optimizer or the checkpoint write
    proc.kill()
    proc.communicate()
    TALLY["faults_injected"] += 1
    TALLY["sigkill"] += 1
    assert proc.returncode == -signal.SIGKILL
    last_row = max(losses(run))
    assert last_row < STEPS
    resume_step = last_complete_checkpoint(run, last_row)

    done = run_gpt2("train", "--out", str(run), "--resume", "auto", check=True)
    assert done.returncode == 0
    assert_each_step_once(run, STEPS)
    assert_resumed_equals_uninterrupted(run, reference)  # the steps before and after the kill, and the weights
    TALLY["kills_survived"] += 1
    TALLY[f"sigkill_seed{seed}_resumed_from_step_{resume_step}_killed_after_{last_row}"] += 1


# ------------------------------------------------------------------ 2. crash inside a save


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_crash_between_write_and_rename_keeps_the_previous_checkpoint(reference, root):
    """GPT2_FAULT=crash_in_save:N exits 137 after the checkpoint of step N is written and fsynced
    but before it is renamed into place. First at the very first save (nothing to fall back on: the
    resume starts over, and the rows of the lost attempt must not stay twice), then at step 6."""
    run = root / "crash-in-save"
    first = run_gpt2("train", *SINGLE, "--keep", "2", "--out", str(run), env={"GPT2_FAULT": "crash_in_save:2"})
    assert first.returncode == 137, first.stderr
    assert ckpt.latest_checkpoint(run) is None and len(list(run.glob(".ckpt.pt.tmp-*"))) == 1
    assert sorted(losses(run)) == [1, 2]
    crashed = run_gpt2("train", "--out", str(run), "--resume", "auto", env={"GPT2_FAULT": "crash_in_save:6"})
    TALLY["faults_injected"] += 2
    assert crashed.returncode == 137, crashed.stderr
    assert_each_step_once(run, 6)  # the first attempt's rows were dropped when it started over
    temps = list(run.glob(".ckpt.pt.tmp-*"))
    assert len(temps) == 1  # the cut-off write, complete but never renamed (the older one was removed)
    assert ckpt.latest_checkpoint(run) == run / ckpt.CKPT_NAME  # never the temp file
    assert last_complete_checkpoint(run, max(losses(run))) == 4
    assert sorted(p.name for p in ckpt.step_checkpoints(run)) == [ckpt.step_checkpoint_name(s) for s in (2, 4)]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "running" and status["step"] == 4  # a crash, not a stop; its last checkpoint

    run_gpt2("train", "--out", str(run), "--resume", "auto", check=True)
    assert not list(run.glob(".*.tmp-*"))  # the stale temp file was removed on resume
    assert_each_step_once(run, STEPS)
    assert_resumed_equals_uninterrupted(run, reference)
    assert sorted(p.name for p in ckpt.step_checkpoints(run)) == [
        ckpt.step_checkpoint_name(s) for s in (STEPS - 2, STEPS)]
    TALLY["crashes_in_save_survived"] += 2


# ---------------------------------------------------- 3 and 4. damaged and malicious checkpoints


class _Evil:
    """Unpickling this runs open(marker, "w"): the marker file proves code execution."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


DAMAGE_KINDS = ["truncated", "flipped-byte", "format-version", "not-a-checkpoint"]


def _damage(kind: str, good: Path, target: Path) -> None:
    data = good.read_bytes()
    if kind == "truncated":
        target.write_bytes(data[: int(len(data) * 0.6)])
    elif kind == "flipped-byte":
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x01  # inside tensor bytes: only the digest notices
        target.write_bytes(bytes(flipped))
    elif kind == "format-version":
        record = ckpt.load_checkpoint(good)
        record["format_version"] = 999
        record["digest"] = ckpt.payload_digest(record)  # a consistent file of an unknown version
        torch.save(record, target)
    else:
        target.write_text("these are notes, not a checkpoint\n")


def _evil_files(folder: Path, marker: Path, spec_json: str) -> dict[str, Path]:
    folder.mkdir(parents=True)
    disguise = {"format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION, "spec": spec_json,
                "step": 4, "model": _Evil(str(marker)), "digest": "0" * 64}
    zipped = folder / "evil.pt"  # torch.save archive, looks like a checkpoint
    torch.save(disguise, zipped)
    # A folder of its own: `train --resume FILE` takes its folder's run lock, and the cases run two
    # at a time; sharing a folder, the second of two resumes could meet the first one's lock.
    raw = folder / "legacy" / "evil-legacy.pt"  # a bare pickle (torch's legacy format)
    raw.parent.mkdir()
    import pickle

    raw.write_bytes(pickle.dumps(disguise, protocol=2))
    # run-ckpt-auto: the same as run-ckpt, for the `--resume auto` case (its own lock, as above)
    for name, source in (("run-ckpt", zipped), ("run-ckpt-auto", zipped), ("run-best", raw)):
        run = folder / name
        run.mkdir()
        (run / "spec.json").write_text(spec_json)
        shutil.copy(source, run / (ckpt.BEST_NAME if name == "run-best" else ckpt.CKPT_NAME))
    return {"file": zipped, "legacy": raw, "run-ckpt": folder / "run-ckpt", "run-ckpt-auto": folder / "run-ckpt-auto",
            "run-best": folder / "run-best"}


@pytest.fixture(scope="module")
def file_attacks(reference, root):
    """Every command that reads checkpoints, on damaged and on malicious files: one process each,
    two at a time. Returns (name, argv, result, folder that must stay as it was, expected words)."""
    base = root / "file-attacks"
    spec_json = (reference / "spec.json").read_text()
    cases = []
    for kind in DAMAGE_KINDS:
        run = base / "damaged" / kind
        run.mkdir(parents=True)
        (run / "spec.json").write_text(spec_json)
        bad = run / ckpt.CKPT_NAME
        _damage(kind, reference / ckpt.CKPT_NAME, bad)
        for command, argv in (("train --resume", ["train", "--resume", str(bad), "--steps", str(STEPS + 4)]),
                              ("eval", ["eval", str(bad), "--device", "cpu"]),
                              ("generate", ["generate", str(bad), "ROMEO:", "--device", "cpu", "-n", "4"])):
            cases.append((f"damaged {kind}: {command}", argv, run, [str(bad)]))
    auto_run = base / "damaged" / "auto"
    shutil.copytree(base / "damaged" / "flipped-byte", auto_run)
    cases.append(("damaged flipped-byte: train --resume auto", ["train", "--out", str(auto_run), "--resume", "auto"],
                  auto_run, [str(auto_run), "ckpt.pt"]))

    marker = base / "PWNED"
    evil = _evil_files(base / "malicious", marker, spec_json)
    out = base / "exports"
    out.mkdir()
    attacks = [
        ("train --resume", "file", ["train", "--resume", str(evil["file"])]),
        ("train --resume", "legacy", ["train", "--resume", str(evil["legacy"]), "--device", "cpu"]),
        ("train --resume", "run-ckpt", ["train", "--resume", str(evil["run-ckpt"])]),
        ("train --resume auto", "run-ckpt-auto", ["train", "--out", str(evil["run-ckpt-auto"]), "--resume", "auto"]),
        ("eval", "file", ["eval", str(evil["file"]), "--device", "cpu"]),
        ("eval", "run-ckpt", ["eval", str(evil["run-ckpt"]), "--device", "cpu"]),
        ("eval", "run-best", ["eval", str(evil["run-best"]), "--device", "cpu"]),
        ("generate", "legacy", ["generate", str(evil["legacy"]), "hi", "--device", "cpu"]),
        ("generate", "run-ckpt", ["generate", str(evil["run-ckpt"]), "hi", "--device", "cpu"]),
        ("generate", "run-best", ["generate", str(evil["run-best"]), "hi", "--device", "cpu"]),
        ("export", "file", ["export", str(evil["file"]), str(out / "a")]),
        ("export", "run-best", ["export", str(evil["run-best"]), str(out / "b.safetensors"), "--format",
                                "safetensors"]),
        ("export", "run-ckpt", ["export", str(evil["run-ckpt"]), str(out / "c")]),
    ]
    for command, where, argv in attacks:
        folder = evil[where] if where.startswith("run") else evil[where].parent
        cases.append((f"malicious {where}: {command}", argv, folder, [str(evil[where])]))

    before = {str(c[2]): sorted(p.name for p in c[2].iterdir()) for c in cases}
    results = run_many([(argv, base) for _, argv, _, _ in cases], root / "file-attack-outputs")
    TALLY["faults_injected"] += len(cases)
    TALLY["bad_files_tried"] += len(cases)
    return [(name, argv, res, folder, words, before[str(folder)])
            for (name, argv, folder, words), res in zip(cases, results, strict=True)], marker, out


def _attack_ids():
    ids = [f"damaged {k}: {c}" for k in DAMAGE_KINDS for c in ("train --resume", "eval", "generate")]
    ids.append("damaged flipped-byte: train --resume auto")
    ids += [f"malicious {w}: {c}" for c, w in (
        ("train --resume", "file"), ("train --resume", "legacy"), ("train --resume", "run-ckpt"),
        ("train --resume auto", "run-ckpt-auto"), ("eval", "file"), ("eval", "run-ckpt"), ("eval", "run-best"),
        ("generate", "legacy"), ("generate", "run-ckpt"), ("generate", "run-best"), ("export", "file"),
        ("export", "run-best"), ("export", "run-ckpt"))]
    return ids


@pytest.mark.timeout(400)
@pytest.mark.parametrize("case", _attack_ids())
def test_damaged_or_malicious_checkpoint_is_refused(file_attacks, case):
    results, marker, exports = file_attacks
    name, argv, proc, folder, words, before = next(r for r in results if r[0] == case)
    assert proc.returncode == 2, (argv, proc.stderr)
    line = one_error_line(proc.stderr)
    assert any(w in line for w in words), line  # names the file (or the run folder and ckpt.pt)
    assert proc.stdout == ""  # nothing was generated, scored or exported from it
    assert sorted(p.name for p in folder.iterdir()) == before  # no run files written beside it
    assert not marker.exists()  # the pickle's code never ran
    assert not list(exports.iterdir())
    if case.startswith("malicious") and "auto" not in case:
        assert "nothing was executed" in line or "not a gpt2 checkpoint" in line, line
    if "format-version" in case:
        assert "format version 999" in line and "upgrade" in line


# ------------------------------------------------------------------- 1 and 5. DDP kills, SIGTERM


def _sigkill_ddp(run: Path, target: str, after_rows: int, delay: float) -> None:
    """SIGKILL the launcher's whole process group (gpt2 + torchrun; the workers, in sessions of
    their own, must notice and stop) or the writing worker (rank 0), at a given step."""
    proc = start(["train", "--out", str(run), "--resume", "auto"] if (run / "spec.json").exists()
                 else ["train", *DDP, "--out", str(run)], new_session=True)
    wait_for_rows(run, after_rows, proc)
    time.sleep(delay)
    if target == "group":
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(worker_pids(run)[0], signal.SIGKILL)
    proc.communicate(timeout=120)
    TALLY["faults_injected"] += 1
    TALLY["sigkill"] += 1
    assert proc.returncode != 0
    wait_no_workers(run)  # no orphan keeps training into the folder
    last_row = max(losses(run))
    assert last_row < DDP_STEPS
    last_complete_checkpoint(run, last_row)


def _assert_matches_ddp_reference(run: Path, reference: Path) -> None:
    assert_each_step_once(run, DDP_STEPS)
    ref, after = losses(reference), losses(run)
    assert all(abs(after[s] - ref[s]) <= 1e-6 for s in ref), (after, ref)
    TALLY["ddp_resume_bit_exact"] += int(after == ref)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not LINUX_PROC, reason="finds workers through /proc")
@pytest.mark.timeout(300)
def test_ddp_sigterm_to_the_parent_then_sigkill_of_the_group_then_resume(ddp_reference, root):
    """SIGTERM to `gpt2 train` (the launcher) of a 2-process run: the workers agree on a step,
    commit a checkpoint and the launcher exits 75. The resumed run is then killed with SIGKILL
    (whole process group) at a seeded step and resumed again: the losses are the uninterrupted run's."""
    run = root / "ddp-sigterm-sigkill"
    proc = start(["train", *DDP, "--out", str(run)])
    wait_for_rows(run, 3, proc)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    TALLY["faults_injected"] += 1
    assert proc.returncode == 75, stderr
    assert time.time() - sent < 30  # well before torchrun's own SIGKILL grace
    # One line says it (rank 0's); torchrun's own per-worker shutdown warnings are left out.
    assert "closing signal" not in stderr and "death signal" not in stderr, stderr
    assert "stopped by SIGTERM after step" in stderr, stderr
    wait_no_workers(run)
    status = json.loads((run / "status.json").read_text())
    record = ckpt.load_checkpoint(run / ckpt.CKPT_NAME)
    stopped = record["step"]
    assert status["status"] == "interrupted" and stopped == status["step"] == max(losses(run))
    assert record["world_size"] == 2 and all_finite(record)
    TALLY["signals_survived"] += 1

    rng = random.Random(11)
    _sigkill_ddp(run, "group", rng.randint(stopped + 2, DDP_STEPS - 4), rng.uniform(0.0, 0.2))
    run_gpt2("train", "--out", str(run), "--resume", "auto", check=True, timeout=300)
    _assert_matches_ddp_reference(run, ddp_reference)
    TALLY["kills_survived"] += 1


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not LINUX_PROC, reason="finds workers through /proc")
@pytest.mark.timeout(300)
def test_ddp_sigkill_of_the_writing_worker_then_resume(ddp_reference, root):
    rng = random.Random(12)
    run = root / "ddp-sigkill-rank0"
    _sigkill_ddp(run, "rank0", rng.randint(3, DDP_STEPS - 5), rng.uniform(0.0, 0.2))
    run_gpt2("train", "--out", str(run), "--resume", "auto", check=True, timeout=300)
    _assert_matches_ddp_reference(run, ddp_reference)
    TALLY["kills_survived"] += 1


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not LINUX_PROC, reason="finds workers through /proc")
@pytest.mark.timeout(300)
def test_ddp_stopped_or_killed_during_start_up_leaves_no_worker_and_no_folder(root):
    """While the workers still start (import torch, join the rendezvous): SIGINT to `gpt2 train`
    ends the launch with one line and exit 130, no traceback and no run folder; SIGKILL of the
    whole group leaves no worker waiting out --dist-timeout for an agent that is gone."""

    def wait_for_workers(run: Path, proc: subprocess.Popen) -> None:
        deadline = time.time() + 60
        while len(worker_pids(run)) < 2:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "no workers"
            time.sleep(0.02)

    run = root / "startup-sigint"
    proc = start(["train", *DDP, "--out", str(run)])
    wait_for_workers(run, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    TALLY["faults_injected"] += 1
    assert proc.returncode == 130, stderr
    assert stderr.splitlines()[-1] == "Stopped by SIGINT before the run began; nothing was written.", stderr
    assert "Traceback" not in stderr and not run.exists()
    wait_no_workers(run)

    run = root / "startup-sigkill"
    proc = start(["train", *DDP, "--dist-timeout", "600", "--out", str(run)], new_session=True)
    wait_for_workers(run, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)  # the pipes close when the last worker is gone
    TALLY["faults_injected"] += 1
    wait_no_workers(run, timeout=5)
    assert not (run / "spec.json").exists() or not (run / ckpt.CKPT_NAME).exists()
    TALLY["signals_survived"] += 1


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not LINUX_PROC, reason="finds workers through /proc")
@pytest.mark.timeout(300)
def test_a_second_ctrl_c_stops_a_ddp_job_at_once_and_returns_after_its_workers(root):
    """The first SIGINT asks the workers to checkpoint and stop; a second one kills the job at
    once. `gpt2 train` returns only when no worker is left, so the run folder is free then."""
    from gpt2cli.fsutil import FolderLock

    run = root / "second-ctrl-c"
    proc = start(["train", *DDP, "--out", str(run)])
    wait_for_rows(run, 2, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    TALLY["faults_injected"] += 2
    assert proc.returncode in (75, 130), stderr  # 75 if the checkpoint was in before the kill
    assert worker_pids(run) == {}, "workers outlived gpt2 train"
    lock = FolderLock(run)
    assert lock.acquire()
    lock.release()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not LINUX_PROC, reason="finds workers through /proc")
@pytest.mark.timeout(300)
def test_ddp_resume_stopped_during_start_up_leaves_the_run_as_it_was(ddp_reference, root):
    """A resume stopped while its workers start: the previous session's status.json (here
    "completed": the run is continued with more steps) is not this launch's, so it is one line,
    exit 130, and the run folder is as it was."""
    import shutil

    run = root / "startup-resume"
    shutil.copytree(ddp_reference, run)
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    proc = start(["train", "--out", str(run), "--resume", "auto", "--steps", str(DDP_STEPS + 4)])
    deadline = time.time() + 60
    while len(worker_pids(run)) < 2:
        assert proc.poll() is None and time.time() < deadline, "no workers"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    TALLY["faults_injected"] += 1
    assert proc.returncode == 130, stderr
    assert stderr.splitlines()[-1] == f"Stopped by SIGINT before the run began; {run} is as it was.", stderr
    wait_no_workers(run)
    after = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    assert after == before


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_a_run_folder_in_use_is_refused_to_a_second_train(root):
    """While a run trains, a second `gpt2 train` into its folder is refused with one line and writes
    nothing there: a 2-process launch against a one-process run (the launcher's lock), and a
    one-process resume against a 2-process run (its launcher holds the lock for the workers).
    The 2-process run also shows that a one-node job listens on loopback only: its stores
    (torchrun's and the workers') take no connection from another machine."""
    single_resume = ["train", "--resume", "auto", "--quiet"]
    ddp_launch = ["train", *DDP[:-1], "4000", "--resume", "auto"]
    for name, args, second in (("in-use-single", [*BASE, "--steps", "4000"], ddp_launch),
                               ("in-use-ddp", [*DDP[:-1], "4000"], single_resume)):
        run = root / name
        proc = start(["train", *args, "--out", str(run)])
        try:
            wait_for_rows(run, 2, proc)
            if name == "in-use-ddp" and LINUX_PROC:
                listening = listening_addresses(run)
                assert listening and listening <= {"127.0.0.1", "::1"}, listening
            before = (run / "spec.json").read_bytes()
            refused = run_gpt2(*second, "--out", str(run), timeout=120)
            line = one_error_line(refused.stderr)
            assert refused.returncode == 2 and "is in use by another gpt2 train" in line, refused.stderr
            assert (run / "spec.json").read_bytes() == before and proc.poll() is None
            steps = [r["step"] for r in train_rows(run)]
            assert steps == list(range(1, len(steps) + 1))  # the first run's rows alone
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
        assert proc.returncode == 75
        wait_no_workers(run)


# -------------------------------------------------------------- 6. a NaN on one rank only


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_ddp_nan_on_rank1_stops_every_rank_before_the_step(root):
    run = root / "ddp-nan"
    proc = run_gpt2("train", *DDP, "--out", str(run), env={"GPT2_FAULT": "nan_at_step:5:rank1"}, timeout=150)
    TALLY["faults_injected"] += 1
    assert proc.returncode == 3, proc.stderr[-2000:]
    line = one_error_line(proc.stderr)  # once, not per rank, and no torchrun report
    # Fault steps count from 0, messages from 1 as the logs do: index 5 is "step 6".
    assert "non-finite" in line and "step 6 " in line and "[rank 0]" in line
    assert max(losses(run)) == 5  # step index 5 (the 6th) was never completed on any rank
    record = ckpt.load_checkpoint(run / ckpt.CKPT_NAME)
    assert record["step"] == 4 and all_finite(record)
    wait_no_workers(run)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_ddp_nan_skip_mode_stops_at_the_consecutive_limit(root):
    run = root / "ddp-nan-skip"
    # Step indices 2, 5, 6 and 7 (from 0): the 3rd step is skipped, then the 6th and 7th (2 in a
    # row, the limit), and the 8th, a third in a row, stops the run.
    faults = "nan_at_step:2:rank1,nan_at_step:5:rank1,nan_at_step:6:rank1,nan_at_step:7:rank1"
    proc = run_gpt2("train", *DDP, "--out", str(run), "--on-nonfinite", "skip", "--max-nonfinite-skips", "2",
                    env={"GPT2_FAULT": faults}, timeout=150)
    TALLY["faults_injected"] += 4
    assert proc.returncode == 3, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert [ln for ln in lines if "skipped" in ln] == [
        "non-finite loss or gradient at step 3: step skipped (1 in a row)",
        "non-finite loss or gradient at step 6: step skipped (1 in a row)",
        "non-finite loss or gradient at step 7: step skipped (2 in a row)",
    ]
    errors = [ln for ln in lines if ln.startswith("Error:")]
    assert len(errors) == 1 and "step 8, 3 in a row " in errors[0] and "Traceback" not in proc.stderr
    rows = losses(run)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6, 7]
    assert [s for s, v in rows.items() if math.isnan(v)] == [3, 6, 7]  # the skipped steps, logged as NaN
    record = ckpt.load_checkpoint(run / ckpt.CKPT_NAME)
    assert record["step"] == 6 and all_finite(record)  # skipped steps never reached the weights


# -------------------------------------------------------------------- 7. the bad-input table

# (argv with {T}: a scratch folder, {RUN}: a finished run, {DATA}: its data; words one of which
# the Error line must hold: the flag, its setting or the path).
BAD_INPUTS: list[tuple[str, list[str], tuple[str, ...]]] = [
    # train: out-of-range numbers, unknown names, contradictions, paths, parallel settings
    ("train warmup negative", ["train", "--device", "cpu", "--warmup", "-1"], ("--warmup",)),
    ("train lr 0", ["train", "--device", "cpu", "--lr", "0"], ("--lr",)),
    ("train min-lr above lr", ["train", "--device", "cpu", "--lr", "0.001", "--min-lr", "0.01"], ("min_lr",)),
    ("train lr overflowing adam", ["train", "--device", "cpu", "--preset", "tiny", "--lr", "1e38"], ("--lr",)),
    ("train min-lr inf", ["train", "--device", "cpu", "--min-lr", "inf"], ("--min-lr",)),
    ("train steps and tokens", ["train", "--device", "cpu", "--steps", "10", "--tokens", "1000"], ("steps",)),
    ("train seq-len above context", ["train", "--device", "cpu", "--preset", "tiny", "--seq-len", "128"],
     ("seq_len",)),
    ("train kv-heads not dividing", ["train", "--device", "cpu", "--preset", "tiny", "--attn", "gqa",
                                     "--kv-heads", "3"], ("n_kv_head",)),
    ("train dropout 1.5", ["train", "--device", "cpu", "--dropout", "1.5"], ("--dropout",)),
    ("train unknown strategy", ["train", "--device", "cpu", "--strategy", "zero"], ("--strategy",)),
    ("train unknown device", ["train", "--device", "tpu"], ("device",)),
    ("train cuda without GPU", ["train", "--device", "cuda", "--preset", "tiny"], ("cuda",)),
    ("train fsdp on missing GPUs", ["train", "--strategy", "fsdp", "--gpus", "4"], ("--gpus",)),
    ("train nproc 0", ["train", "--device", "cpu", "--nproc", "0"], ("--nproc",)),
    ("train single with 2 procs", ["train", "--device", "cpu", "--strategy", "single", "--nproc", "2"],
     ("strategy",)),
    ("train cpu offload under ddp", ["train", "--device", "cpu", "--preset", "tiny", "--strategy", "ddp", "--nproc",
                                     "2", "--fsdp-cpu-offload"], ("--fsdp-cpu-offload",)),
    ("train cpu offload under single", ["train", "--device", "cpu", "--preset", "tiny", "--fsdp-cpu-offload"],
     ("--fsdp-cpu-offload",)),
    ("train no reshard under ddp", ["train", "--device", "cpu", "--preset", "tiny", "--strategy", "ddp",
                                    "--no-fsdp-reshard-after-forward"], ("--no-fsdp-reshard-after-forward",)),
    ("train cpu offload on the cpu", ["train", "--device", "cpu", "--preset", "tiny", "--strategy", "fsdp",
                                      "--nproc", "2", "--fsdp-cpu-offload"], ("--fsdp-cpu-offload",)),
    # device auto resolves to the CPU here (as "train cuda without GPU" assumes): refused before launching
    ("train cpu offload on auto without GPU", ["train", "--preset", "tiny", "--strategy", "fsdp", "--nproc", "2",
                                               "--fsdp-cpu-offload"], ("--fsdp-cpu-offload",)),
    ("train 2 nodes no endpoint", ["train", "--device", "cpu", "--strategy", "ddp", "--nnodes", "2"],
     ("rdzv_endpoint",)),
    ("train endpoint without port", ["train", "--device", "cpu", "--strategy", "ddp", "--nnodes", "2",
                                     "--rdzv-endpoint", "nohost"], ("--rdzv-endpoint",)),
    ("train node-rank out of range", ["train", "--device", "cpu", "--strategy", "ddp", "--nnodes", "2",
                                      "--rdzv-endpoint", "127.0.0.1:29500", "--node-rank", "5"], ("--node-rank",)),
    ("train batch-tokens not a multiple", ["train", "--device", "cpu", "--preset", "tiny", "--batch-size", "4",
                                           "--seq-len", "32", "--batch-tokens", "1000"], ("--batch-tokens",)),
    ("train unknown on-nonfinite", ["train", "--device", "cpu", "--on-nonfinite", "ignore"], ("--on-nonfinite",)),
    ("train skips limit 0", ["train", "--device", "cpu", "--max-nonfinite-skips", "0"], ("--max-nonfinite-skips",)),
    ("train save-every 0", ["train", "--device", "cpu", "--save-every", "0"], ("--save-every",)),
    ("train missing config", ["train", "--device", "cpu", "--config", "{T}/missing.toml"], ("missing.toml",)),
    ("train malformed config", ["train", "--device", "cpu", "--config", "{T}/bad.toml"], ("bad.toml",)),
    ("train unknown set key", ["train", "--device", "cpu", "--set", "optim.nope=1"], ("optim.nope",)),
    ("train set not a number", ["train", "--device", "cpu", "--set", "optim.lr=abc"], ("--lr", "optim.lr")),
    ("train spec plus flags", ["train", "--spec", "{RUN}/spec.json", "--steps", "3"], ("--spec",)),
    ("train data without meta", ["train", "--device", "cpu", "--preset", "tiny", "--data", "{T}/emptydir"],
     ("emptydir",)),
    ("train data meta garbage", ["train", "--device", "cpu", "--preset", "tiny", "--data", "{T}/garbage-data"],
     ("garbage-data",)),
    ("train resume auto without out", ["train", "--device", "cpu", "--resume", "auto"], ("--out",)),
    ("train resume folder without ckpt", ["train", "--device", "cpu", "--preset", "tiny", "--resume",
                                          "{T}/emptydir"], ("emptydir",)),
    # data: paths, empty and malformed corpora, ranges
    ("data missing source", ["data", "{T}/missing.txt"], ("missing.txt",)),
    ("data empty file", ["data", "{T}/empty.txt"], ("empty.txt",)),
    ("data malformed jsonl", ["data", "{T}/bad.jsonl"], ("bad.jsonl",)),
    ("data unknown text column", ["data", "{T}/good.jsonl", "--text-column", "body"], ("body",)),
    ("data not utf-8", ["data", "{T}/latin1.txt"], ("latin1.txt",)),
    # gpt2 data names the setting (val_fraction), not the flag: cli/data.py passes no flag names
    ("data val-fraction 1.5", ["data", "{T}/good.jsonl", "--val-fraction", "1.5"], ("--val-fraction", "val_fraction")),
    ("data existing output", ["data", "{T}/good.jsonl", "--out", "{DATA}"], ("{DATA}",)),
    # eval
    ("eval missing checkpoint", ["eval", "{T}/missing.pt"], ("missing.pt",)),
    ("eval missing data", ["eval", "{RUN}", "--data", "{T}/missing-data"], ("missing-data",)),
    ("eval unknown split", ["eval", "{RUN}", "--data", "{DATA}", "--split", "nope"], ("nope",)),
    ("eval seq-len above context", ["eval", "{RUN}", "--device", "cpu", "--seq-len", "1000"], ("--seq-len",)),
    ("eval tokens 0", ["eval", "{RUN}", "--tokens", "0"], ("--tokens",)),
    ("eval cut data", ["eval", "{RUN}", "--device", "cpu", "--data", "{T}/cut-data"], ("cut-data",)),
    ("eval folder without checkpoints", ["eval", "{T}/emptydir"], ("emptydir",)),
    # generate
    ("generate max-new-tokens 0", ["generate", "{RUN}", "--max-new-tokens", "0"], ("--max-new-tokens",)),
    ("generate top-p 1.5", ["generate", "{RUN}", "--top-p", "1.5"], ("--top-p",)),
    ("generate top-k -1", ["generate", "{RUN}", "--top-k", "-1"], ("--top-k",)),
    ("generate empty stop", ["generate", "{RUN}", "--stop", ""], ("--stop",)),
    ("generate prompt twice", ["generate", "{RUN}", "hello", "--prompt-file", "{T}/prompt.txt"],
     ("--prompt-file",)),
    ("generate missing prompt file", ["generate", "{RUN}", "--prompt-file", "{T}/missing-prompt.txt"],
     ("missing-prompt.txt",)),
    ("generate prompt with no room", ["generate", "{RUN}", "word " * 100, "--device", "cpu"], ("context",)),
    ("generate unknown dtype", ["generate", "{RUN}", "--dtype", "fp8"], ("--dtype",)),
    ("generate batch beyond memory", ["generate", "{RUN}", "--num-samples", "100000000", "--device", "cpu"],
     ("--num-samples", "GiB")),
    # compare
    ("compare missing run", ["compare", "{T}/missing-run"], ("missing-run",)),
    ("compare folder without runs", ["compare", "{T}/emptydir"], ("emptydir",)),
    ("compare unknown metric", ["compare", "{RUN}", "--metric", "nope"], ("--metric",)),
    ("compare plot type", ["compare", "{RUN}", "--plot", "{T}/curves.gif"], ("curves.gif",)),
    # info
    ("info unknown preset", ["info", "--preset", "gpt5"], ("gpt5",)),
    ("info heads not dividing", ["info", "--preset", "tiny", "--n-head", "5"], ("n_head",)),
    ("info world-size 0", ["info", "--world-size", "0"], ("--world-size",)),
    # export
    ("export unknown format", ["export", "{RUN}", "{T}/out", "--format", "onnx"], ("--format",)),
    ("export missing checkpoint", ["export", "{T}/missing.pt", "{T}/out"], ("missing.pt",)),
    ("export existing output", ["export", "{RUN}", "{T}/exists.safetensors", "--format", "safetensors"],
     ("exists.safetensors",)),
    ("export wrong suffix", ["export", "{RUN}", "{T}/out.bin", "--format", "safetensors"], ("out.bin",)),
]


def _scratch(folder: Path, data: Path) -> None:
    folder.mkdir()
    (folder / "empty.txt").write_text("")
    (folder / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    (folder / "good.jsonl").write_text('{"text": "hello world"}\n')
    (folder / "latin1.txt").write_bytes("caf\xe9 na\xefve".encode("latin-1"))
    (folder / "bad.toml").write_text("steps = = 3\n")
    (folder / "prompt.txt").write_text("hi")
    (folder / "exists.safetensors").write_text("not mine to overwrite")
    (folder / "emptydir").mkdir()
    (folder / "garbage-data").mkdir()
    (folder / "garbage-data" / "meta.json").write_text("{nope")
    shutil.copytree(data, folder / "cut-data")
    val = folder / "cut-data" / "val.bin"
    val.write_bytes(val.read_bytes()[:20])


@pytest.fixture(scope="module")
def bad_input_results(reference, root):
    from gpt2cli.data import default_data_dir

    data = default_data_dir()
    scratch = root / "bad-input"
    _scratch(scratch, data)
    snapshot = sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*"))
    values = {"{T}": str(scratch), "{RUN}": str(reference), "{DATA}": str(data)}

    def fill(text: str) -> str:
        for key, value in values.items():
            text = text.replace(key, value)
        return text

    cases = []
    for i, (_, argv, _) in enumerate(BAD_INPUTS):
        cwd = root / f"bad-input-cwd-{i}"  # default output folders (runs/, data/) would appear here
        cwd.mkdir()
        cases.append(([fill(a) for a in argv], cwd))
    reference_files = sorted(p.name for p in reference.iterdir())
    results = run_many(cases, root / "bad-input-outputs")
    TALLY["bad_inputs_tried"] += len(cases)
    return {name: (argv, cwd, res, tuple(fill(w) for w in words))
            for (name, _, words), (argv, cwd), res in zip(BAD_INPUTS, cases, results, strict=True)}, \
        (scratch, snapshot), (reference, reference_files)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", [c[0] for c in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(bad_input_results, name):
    results, (scratch, snapshot), (reference, reference_files) = bad_input_results
    argv, cwd, proc, words = results[name]
    assert proc.returncode == 2, (argv, proc.stderr[-2000:])
    line = one_error_line(proc.stderr)
    assert any(w in line for w in words), (words, line)
    assert list(cwd.iterdir()) == []  # no run, data or output folder
    assert sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*")) == snapshot
    assert sorted(p.name for p in reference.iterdir()) == reference_files


def test_bad_input_table_is_large_and_covers_every_command():
    assert len(BAD_INPUTS) >= 30
    assert {argv[0] for _, argv, _ in BAD_INPUTS} >= {"data", "train", "eval", "generate", "compare", "info",
                                                      "export"}


# --------------------------------------------------------------------- 8. static safety checks


def _package_trees():
    for path in sorted((REPO / "gpt2cli").rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_every_torch_load_is_weights_only_and_nothing_unpickles_or_evals():
    loads, problems = 0, []
    for path, tree in _package_trees():
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("dill", "cloudpickle", "marshal", "shelve") for n in names):
                    problems.append(f"{where}:{node.lineno} imports an unpickler")
                if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "torch") and \
                        any(a.name in ("load", "loads") for a in node.names):
                    problems.append(f"{where}:{node.lineno} imports a bare load")
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            kwargs = {k.arg: k.value for k in node.keywords}
            if name.endswith("torch.load") or name == "torch.serialization.load":
                loads += 1
                flag = kwargs.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}:{node.lineno} torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads",
                        "marshal.loads", "yaml.load", "yaml.unsafe_load", "eval", "exec"):
                problems.append(f"{where}:{node.lineno} calls {name}")
            if name.endswith(("np.load", "numpy.load")) and isinstance(kwargs.get("allow_pickle"), ast.Constant) \
                    and kwargs["allow_pickle"].value:
                problems.append(f"{where}:{node.lineno} numpy.load(allow_pickle=True)")
            if any(k == "weights_only" and isinstance(v, ast.Constant) and v.value is False for k, v in kwargs.items()):
                problems.append(f"{where}:{node.lineno} weights_only=False")
    assert problems == []
    assert loads >= 1  # the scan does see the checkpoint loader


def test_torchrun_reinvocation_is_standalone_or_an_explicit_endpoint(tmp_path):
    from gpt2cli.parallel.launch import torchrun_command
    from gpt2cli.specs import ParallelSpec

    one_node = torchrun_command(ParallelSpec(strategy="ddp", nproc=2), tmp_path / "spec.json")
    assert "--standalone" in one_node and "--rdzv-endpoint" not in one_node
    assert one_node[one_node.index("--local-addr") + 1] == "127.0.0.1"  # the workers meet on loopback
    nodes = torchrun_command(ParallelSpec(strategy="ddp", nproc=2, nnodes=2, rdzv_endpoint="10.0.0.1:29500"),
                             tmp_path / "spec.json")
    assert nodes[nodes.index("--rdzv-endpoint") + 1] == "10.0.0.1:29500" and "--standalone" not in nodes
    assert one_node[:3] == [sys.executable, "-m", "gpt2cli.torchrun"]  # torch.distributed.run, quiet on signals
    assert one_node[-5:] == ["-m", "gpt2cli", "train", "--spec", str(tmp_path / "spec.json")]
    # No other place builds a torchrun command line, and none binds every interface.
    places = [(path.name, node.lineno) for path, tree in _package_trees() for node in ast.walk(tree)
              if isinstance(node, ast.Constant) and isinstance(node.value, str)
              and (node.value in ("torch.distributed.run", "torchrun", "gpt2cli.torchrun")
                   or "0.0.0.0" in node.value)]
    assert [name for name, _ in places] == ["launch.py"], places


# -------------------------------------------------------- the fork driver is the console script


@pytest.mark.timeout(300)
def test_forked_cases_match_the_console_script(bad_input_results, file_attacks, root):
    """The same invocations through the installed `gpt2` script: same exit status, same stderr."""
    results = bad_input_results[0]
    picks = [(results[n][0], results[n][1], results[n][2]) for n in ("train lr 0",)]
    attacks = {r[0]: r for r in file_attacks[0]}
    for name in ("damaged flipped-byte: generate", "malicious legacy: train --resume"):
        picks.append((attacks[name][1], root / "file-attacks", attacks[name][2]))
    for argv, cwd, forked in picks:
        real = run_gpt2(*argv, cwd=cwd)
        assert (real.returncode, real.stderr, real.stdout) == (forked.returncode, forked.stderr, forked.stdout)


def test_help_and_flag_errors_do_not_import_torch():
    code = ("import sys\nfrom gpt2cli.cli import main\n"
            "try:\n    main(['train', '--device', 'cpu', '--steps', '0'])\nexcept SystemExit as e:\n"
            "    assert e.code == 2, e.code\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
