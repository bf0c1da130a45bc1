"""`gpt2 train`'s terminal view (gpt2cli/cli/progress.py): the bar moves every step, stats at log rows."""

from __future__ import annotations

import io

from rich.console import Console

from gpt2cli.cli import progress as progress_module
from gpt2cli.cli.progress import TrainProgress

INFO = {"run_dir": "runs/x", "resumed_from": None, "start_step": 0, "params": 3.3e6, "strategy": "single",
        "world_size": 1, "device_name": "cpu", "dtype": "float32", "batch_size": 2, "seq_len": 16,
        "grad_accum": 1, "tokens_per_step": 32, "total_steps": 50, "data": "data"}


def test_the_bar_moves_every_step_and_the_stats_at_log_rows(monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(progress_module, "err", Console(file=screen, force_terminal=True, width=200))
    view = TrainProgress()
    assert view.live
    view.start(INFO)
    task = view.progress.tasks[0]
    for step in range(1, 4):
        view.advance(step)  # no log row yet (log_every 10): the bar still moves
    assert task.completed == 3 and task.fields["stats"] == ""
    view.step({"step": 10, "total_steps": 50, "loss": 4.25, "lr": 1e-3, "tokens_per_s": 1234.0, "grad_norm": 0.5})
    assert task.completed == 10 and "loss 4.2500" in task.fields["stats"]
    view.progress.stop()


def test_piped_output_prints_log_rows_only(monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(progress_module, "err", Console(file=screen, force_terminal=False, width=200))
    view = TrainProgress()
    view.start(INFO)
    view.advance(1)
    view.step({"step": 10, "total_steps": 50, "loss": 4.25, "lr": 1e-3, "tokens_per_s": 1234.0, "grad_norm": 0.5})
    lines = screen.getvalue().splitlines()
    assert lines[-1].startswith("step     10/50 | loss 4.2500") and not any("step      1/" in line for line in lines)
