"""`gpt2 train --profile N`: where a training step's time goes, recorded with torch.profiler.

:class:`StepProfiler` records N consecutive optimizer steps of a run, after the run's first two
(compilation, allocator and kernel warm-up), and writes into ``RUN/profile/``:

- ``trace.json``: the Chrome trace of those steps (open it in https://ui.perfetto.dev or
  chrome://tracing): every op on the CPU and, on CUDA, every kernel on the GPU, on a time line.
- ``top-ops.txt``: the ops that took the most time, summed over the profiled steps: self CUDA
  time on a GPU (what the device did), self CPU time otherwise.

Only rank 0 profiles (its view stands for every rank: they run the same program); the others
run as usual. Profiling slows the steps it records, so their metrics rows are not speed figures.
"""

from __future__ import annotations

from pathlib import Path

import torch

PROFILE_DIR = "profile"
WARMUP_STEPS = 2  # a run's first steps compile, allocate and pick kernels: not what we want to see


def profiler_activities(device: torch.device) -> list[torch.profiler.ProfilerActivity]:
    """CPU ops always; GPU kernels too on CUDA."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def top_ops_table(profile: torch.profiler.profile, device: torch.device, rows: int = 40) -> tuple[str, str]:
    """The ops that took the most time (self CUDA time on CUDA, self CPU time otherwise), as a
    table, and the name of the sort key."""
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profile.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=80), sort


class StepProfiler:
    def __init__(self, run_dir: Path, steps: int, *, first_step: int, total_steps: int,
                 device: torch.device, enabled: bool) -> None:
        """Profile ``steps`` steps of a run that goes from ``first_step`` (0, or where a resumed run
        starts) to ``total_steps``. Not ``enabled`` (ranks other than 0), it does nothing."""
        remaining = total_steps - first_step
        self.steps = min(steps, remaining) if enabled else 0
        # Skip the warm-up when the run is long enough to leave the requested steps after it.
        self.start = first_step + min(WARMUP_STEPS, max(0, remaining - self.steps))
        self.out = Path(run_dir) / PROFILE_DIR
        self.device = device
        self._profile: torch.profiler.profile | None = None

    def before_step(self, step: int) -> None:
        if self.steps and step == self.start:
            self._profile = torch.profiler.profile(activities=profiler_activities(self.device))
            self._profile.__enter__()

    def after_step(self, step: int) -> list[Path]:
        """Call with the number of steps done; returns the files once the last profiled step ends."""
        if self._profile is not None and step >= self.start + self.steps:
            return self.close()
        return []

    def close(self) -> list[Path]:
        """Stop (also when the run ends early) and write what was recorded."""
        profile, self._profile = self._profile, None
        if profile is None:
            return []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        profile.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        trace, table = self.out / "trace.json", self.out / "top-ops.txt"
        profile.export_chrome_trace(str(trace))
        ops, sort = top_ops_table(profile, self.device)
        header = f"top ops over {self.steps} profiled step(s) from step {self.start + 1}, sorted by {sort}\n"
        table.write_text(header + ops + "\n", encoding="utf-8")
        return [trace, table]
