"""`gpt2 train --wandb`: the metrics mirrored to Weights & Biases. What gpt2 hands W&B is checked
through a stand-in `wandb` package that records its calls (init's arguments, every log, finish,
resume); the real package runs offline (WANDB_MODE=offline, no network) and must leave one
offline run per session under one id; missing credentials, a missing package and a W&B run that
does not start are one line each."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gpt2cli.errors import UserError
from gpt2cli.metrics import WANDB_ID_FILE, read_metrics
from gpt2cli.specs import RunSpec, TrainSpec
from tests.conftest import run_gpt2
from tests.test_hellaswag import shakespeare_examples, write_jsonl

TRAIN = ["--preset", "tiny", "--device", "cpu", "--eval-every", "3", "--eval-tokens", "256", "--batch-size", "2",
         "--log-every", "1", "--save-every", "3", "--quiet"]

# A stand-in for the wandb package: each call is a JSON line in $FAKE_WANDB_LOG. A resumed run
# reports as its step the last one logged before ($FAKE_WANDB_STEP), as W&B does.
FAKE_WANDB = '''
import json, os

def _record(**entry):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\\n")

class Settings:
    def __init__(self, **kwargs):
        self.kwargs = kwargs

def login(verify=True, prompt=True, **kwargs):
    return os.environ.get("FAKE_WANDB_LOGGED_IN", "1") == "1"

class _Run:
    def __init__(self, step):
        self.step = step
    def log(self, values, step=None):
        _record(call="log", values=values, step=step)
    def finish(self):
        _record(call="finish")

def init(**kwargs):
    if os.environ.get("FAKE_WANDB_FAIL"):
        raise RuntimeError("could not reach api.wandb.ai")
    settings = kwargs.pop("settings")
    _record(call="init", settings=settings.kwargs, **kwargs)
    return _Run(int(os.environ.get("FAKE_WANDB_STEP", "0")))
'''


@pytest.fixture()
def fake_wandb(tmp_path) -> dict[str, str]:
    package = tmp_path / "fake" / "wandb"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_WANDB)
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")]),
            "FAKE_WANDB_LOG": str(tmp_path / "calls.jsonl")}


def calls(env: dict[str, str]) -> list[dict]:
    path = Path(env["FAKE_WANDB_LOG"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_metrics_go_to_wandb_and_a_resume_continues_the_same_run(tmp_path, fake_wandb, cache_dir):
    run = tmp_path / "runs" / "first"
    hellaswag = write_jsonl(tmp_path / "hs.jsonl", shakespeare_examples(4))
    proc = run_gpt2("train", *TRAIN, "--steps", "6", "--out", str(run), "--wandb", "--hellaswag", str(hellaswag),
                    env=fake_wandb)
    assert proc.returncode == 0, proc.stderr
    init, *logs, finish = calls(fake_wandb)
    run_id = (run / WANDB_ID_FILE).read_text().strip()
    assert len(run_id) == 8 and run_id.isalnum() and run_id.islower()
    assert (init["call"], init["id"], init["resume"], init["name"], init["project"]) == (
        "init", run_id, "allow", "first", "gpt2")
    assert init["dir"] == str(run) and init["settings"] == {"console": "off", "silent": True}  # --quiet
    assert init["config"] == json.loads((run / "spec.json").read_text())
    assert finish == {"call": "finish"}

    rows = read_metrics(run / "metrics.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train"]
    logged_train = [c for c in logs if "train/loss" in c["values"]]
    assert [c["step"] for c in logged_train] == [r["step"] for r in train_rows] == list(range(1, 7))
    assert [c["values"]["train/loss"] for c in logged_train] == [r["loss"] for r in train_rows]
    evals = [r for r in rows if r["kind"] == "eval"]
    logged_evals = [c for c in logs if "val/loss" in c["values"]]
    assert [(c["step"], c["values"]["val/loss"], c["values"]["hellaswag/acc_norm"]) for c in logged_evals] == [
        (r["step"], r["val_loss"], r["hellaswag_acc_norm"]) for r in evals]

    # Resumed from the checkpoint of step 6 while W&B had reached step 8 (as after a crash two steps
    # past a checkpoint): the same W&B run, named as asked now; step 7 is not resent.
    Path(fake_wandb["FAKE_WANDB_LOG"]).unlink()
    proc = run_gpt2("train", "--resume", "auto", "--out", str(run), "--steps", "9", "--wandb", "--quiet",
                    "--wandb-name", "again", env={**fake_wandb, "FAKE_WANDB_STEP": "8", "WANDB_PROJECT": "from-env"})
    assert proc.returncode == 0, proc.stderr
    init, *logs, _ = calls(fake_wandb)
    assert (init["id"], init["project"], init["name"]) == (run_id, "from-env", "again")  # $WANDB_PROJECT
    assert sorted({c["step"] for c in logs}) == [8, 9]

    # --wandb-project wins over $WANDB_PROJECT (a resume at the end: nothing left to train, one init).
    Path(fake_wandb["FAKE_WANDB_LOG"]).unlink()
    proc = run_gpt2("train", "--resume", "auto", "--out", str(run), "--steps", "10", "--wandb", "--quiet",
                    "--wandb-project", "mine", env={**fake_wandb, "WANDB_PROJECT": "from-env"})
    assert proc.returncode == 0, proc.stderr
    assert calls(fake_wandb)[0]["project"] == "mine"


def test_without_credentials_nothing_is_written(tmp_path, fake_wandb, cache_dir):
    proc = run_gpt2("train", *TRAIN, "--steps", "1", "--out", str(tmp_path / "r"), "--wandb",
                    env={**fake_wandb, "FAKE_WANDB_LOGGED_IN": "0"})
    assert proc.returncode == 2 and not (tmp_path / "r").exists()
    assert proc.stderr.strip().splitlines() == [
        "Error: --wandb: no W&B credentials (no WANDB_API_KEY, no wandb login) (run wandb login, or set "
        "WANDB_MODE=offline to log locally and wandb sync later)"]
    assert calls(fake_wandb) == []


def test_a_wandb_run_that_does_not_start_is_one_line(tmp_path, fake_wandb, cache_dir):
    proc = run_gpt2("train", *TRAIN, "--steps", "1", "--out", str(tmp_path / "r"), "--wandb",
                    env={**fake_wandb, "FAKE_WANDB_FAIL": "1"})
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert line.startswith("Error: --wandb: W&B did not start a run (could not reach api.wandb.ai)")
    assert "--resume auto continues it" in line
    assert json.loads((tmp_path / "r" / "status.json").read_text())["status"] == "failed"


def test_a_missing_package_is_said_before_anything(monkeypatch):
    from gpt2cli import train

    monkeypatch.setattr(train, "package_missing", lambda name: name == "wandb")
    with pytest.raises(UserError, match="--wandb needs the wandb package, which is not installed"):
        train.check_wandb(TrainSpec(run=RunSpec(wandb=True)))
    train.check_wandb(TrainSpec())  # without --wandb, nothing is asked of the package


def test_real_wandb_offline_keeps_one_run_id(tmp_path, cache_dir):
    """The real package, offline: each session of the run is an offline W&B run under the id in
    RUN/wandb-id, ready for `wandb sync`."""
    pytest.importorskip("wandb")
    run = tmp_path / "r"
    env = {"WANDB_MODE": "offline", "HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / ".config")}
    for steps in ("3", "6"):
        proc = run_gpt2("train", *TRAIN, "--steps", steps, "--out", str(run), "--resume", "auto", "--wandb", env=env)
        assert proc.returncode == 0, proc.stderr
    run_id = (run / WANDB_ID_FILE).read_text().strip()
    sessions = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(sessions) == 2
    assert all((s / f"run-{run_id}.wandb").stat().st_size > 0 for s in sessions)


@pytest.mark.skipif(bool(os.environ.get("WANDB_API_KEY")), reason="W&B credentials in the environment")
def test_real_wandb_online_without_credentials_is_refused(tmp_path, cache_dir):
    pytest.importorskip("wandb")
    env = {"WANDB_MODE": "online", "HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / ".config"),
           "NETRC": str(tmp_path / "no-netrc")}
    proc = run_gpt2("train", *TRAIN, "--steps", "1", "--out", str(tmp_path / "r"), "--wandb", env=env)
    assert proc.returncode == 2 and "no W&B credentials" in proc.stderr and not (tmp_path / "r").exists()
