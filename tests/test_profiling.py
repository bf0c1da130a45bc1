"""`gpt2 train --profile N`: which steps are recorded, and the files the real command writes."""

from __future__ import annotations

import json

import torch

from gpt2cli.metrics import read_metrics
from gpt2cli.profiling import StepProfiler
from tests.conftest import run_gpt2


def window(steps: int, first: int, total: int, enabled: bool = True) -> tuple[int, int]:
    p = StepProfiler("unused", steps, first_step=first, total_steps=total, device=torch.device("cpu"), enabled=enabled)
    return p.start, p.steps


def test_the_profiled_steps_follow_the_warm_up_and_fit_the_run():
    assert window(3, first=0, total=100) == (2, 3)  # after the first two steps
    assert window(3, first=40, total=100) == (42, 3)  # a resumed run warms up again
    assert window(3, first=0, total=4) == (1, 3)  # a short run gives up warm-up steps first
    assert window(10, first=0, total=4) == (0, 4)  # never more steps than the run has
    assert window(3, first=0, total=100, enabled=False)[1] == 0  # ranks other than 0
    idle = StepProfiler("unused", 0, first_step=0, total_steps=10, device=torch.device("cpu"), enabled=True)
    idle.before_step(0)
    assert idle.after_step(1) == [] and idle.close() == []


def test_gpt2_train_profile_writes_a_trace_and_the_top_ops(tmp_path, cache_dir):
    run = tmp_path / "run"
    proc = run_gpt2("train", "--preset", "tiny", "--steps", "5", "--batch-size", "4", "--seq-len", "32",
                    "--eval-every", "5", "--eval-tokens", "256", "--device", "cpu", "--profile", "2",
                    "--out", str(run), check=True)
    trace, table = run / "profile" / "trace.json", run / "profile" / "top-ops.txt"
    assert "profile of 2 step(s)" in proc.stderr and "trace.json" in proc.stderr and "top-ops.txt" in proc.stderr
    names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
    assert "aten::mm" in names or "aten::addmm" in names  # the matmuls of the profiled steps
    text = table.read_text()
    assert text.startswith("top ops over 2 profiled step(s) from step 3, sorted by self_cpu_time_total")
    assert "aten::" in text
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"][-1] == 5
