"""`gpt2 train --tensorboard`: the metrics rows as TensorBoard scalars beside metrics.jsonl, one
event per step also across a crash and a resume, and a clear error without the package."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2cli.errors import UserError
from gpt2cli.metrics import TENSORBOARD_DIR, read_metrics
from gpt2cli.train import train
from tests.conftest import run_gpt2
from tests.test_train import tiny_spec

pytest.importorskip("tensorboard")


def scalars(run: Path, tag: str) -> dict[int, float]:
    """What TensorBoard shows for ``tag``: its loader's view of the events, purges applied."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / TENSORBOARD_DIR))
    events.Reload()
    steps = [e.step for e in events.Scalars(tag)]
    assert len(steps) == len(set(steps)), f"{tag}: a step shown twice: {steps}"
    return {e.step: e.value for e in events.Scalars(tag)}


def rows(run: Path, kind: str, column: str) -> dict[int, float]:
    return {r["step"]: r[column] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == kind}


def test_the_scalars_are_the_metrics_rows(tmp_path, cache_dir):
    run = tmp_path / "run"
    train(tiny_spec(run, train={"steps": 6, "log_every": 2}, eval={"every": 3}, run={"tensorboard": True}))
    for kind, column, tag in (("train", "loss", "train/loss"), ("train", "lr", "train/lr"),
                              ("train", "grad_norm", "train/grad_norm"), ("eval", "val_loss", "val/loss")):
        expected = rows(run, kind, column)
        shown = scalars(run, tag)
        assert sorted(shown) == sorted(expected) and expected, tag
        for step, value in expected.items():
            assert shown[step] == pytest.approx(value, rel=1e-6), (tag, step)


def test_a_crash_and_a_resume_show_each_step_once_with_the_resumed_values(tmp_path, cache_dir):
    """The attempt that crashed logged steps 5 and 6 past its step-4 checkpoint; the resume
    recomputes them, and TensorBoard shows the resumed values only, as metrics.jsonl does."""
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--device", "cpu", "--steps", "8", "--batch-size", "2", "--seq-len", "16",
            "--log-every", "1", "--eval-every", "4", "--eval-tokens", "256", "--out", str(run), "--tensorboard"]
    crashed = run_gpt2(*args, "--save-every", "4", env={"GPT2_FAULT": "crash_at_step:6"})
    assert crashed.returncode != 0 and sorted(scalars(run, "train/loss")) == [1, 2, 3, 4, 5, 6]
    before = scalars(run, "train/loss")
    run_gpt2(*args, "--save-every", "4", "--resume", "auto", check=True)
    shown, expected = scalars(run, "train/loss"), rows(run, "train", "loss")
    assert sorted(shown) == sorted(expected) == list(range(1, 9))
    for step, value in expected.items():
        assert shown[step] == pytest.approx(value, rel=1e-6), step
    assert all(shown[s] == before[s] for s in range(1, 5))  # the steps before the checkpoint stay


def test_without_the_package_it_is_one_error_before_the_run_folder(tmp_path, cache_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(UserError) as info:
        train(tiny_spec(tmp_path / "run", run={"tensorboard": True}))
    assert info.value.render() == ("Error: --tensorboard needs the tensorboard package, which is not installed "
                                   "(pip install 'gpt2cli[tensorboard]' (or tensorboard), or drop --tensorboard)")
    assert not (tmp_path / "run").exists()


def test_an_installed_but_broken_tensorboard_is_one_error_before_the_run_folder(tmp_path, cache_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import now fails
    with pytest.raises(UserError) as info:
        train(tiny_spec(tmp_path / "run", run={"tensorboard": True}))
    assert info.value.render().startswith("Error: --tensorboard: the tensorboard package does not load (")
    assert not (tmp_path / "run").exists()
