"""Throughput and memory of single, DDP and FSDP training through the real `gpt2 train` command.

Runs each strategy for a fixed number of steps at 1 and 2 processes (gloo on CPU, NCCL on GPUs)
with the same global batch, then reads metrics.jsonl: median tokens/s over the logged steps after
warm-up, peak memory per process (peak RSS on CPU, max allocated on CUDA), and the final loss
(which must agree between strategies). Prints a table and writes one JSON file.

    .venv/bin/python benchmarks/parallel_scaling.py --preset nano --steps 30 --out bench-out/parallel.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def gpt2_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("gpt2")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "gpt2cli"]


def run_one(tmp: Path, name: str, args: list[str]) -> dict:
    out = tmp / name
    proc = subprocess.run([*gpt2_cmd(), "train", *args, "--out", str(out), "--quiet"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    steady = train[len(train) // 3 :] or train  # drop warm-up (first third)
    mem_key = "peak_mem_bytes" if "peak_mem_bytes" in train[-1] else "peak_rss_bytes"
    return {
        "name": name,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "peak_mem_mib_rank0": train[-1].get(mem_key, 0) / 2**20,
        "memory_kind": mem_key,
        "final_loss": train[-1]["loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8, help="global batch in sequences")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    common = ["--preset", a.preset, "--steps", str(a.steps), "--seq-len", str(a.seq_len), "--device", a.device,
              "--eval-every", str(a.steps), "--eval-tokens", str(a.seq_len * 4), "--log-every", "2",
              "--save-every", str(a.steps)]
    procs_flag = "--gpus" if a.device.startswith("cuda") else "--nproc"
    configs = [
        ("single x1", ["--batch-size", str(a.batch_size)]),
        ("ddp x1", ["--strategy", "ddp", "--batch-size", str(a.batch_size)]),
        ("fsdp x1", ["--strategy", "fsdp", "--batch-size", str(a.batch_size)]),
        ("ddp x2", ["--strategy", "ddp", procs_flag, "2", "--batch-size", str(a.batch_size // 2)]),
        ("fsdp x2", ["--strategy", "fsdp", procs_flag, "2", "--batch-size", str(a.batch_size // 2)]),
    ]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in configs:
            r = run_one(Path(tmp), name.replace(" ", "-"), [*common, *extra])
            results.append(r)
            print(f"{name:<10} {r['tokens_per_s']:>10.0f} tok/s (all processes)  "
                  f"{r['peak_mem_mib_rank0']:>8.0f} MiB rank 0 ({r['memory_kind']})  final loss {r['final_loss']:.4f}",
                  flush=True)
    record = {"preset": a.preset, "steps": a.steps, "global_batch": a.batch_size, "seq_len": a.seq_len,
              "device": a.device, "cpu_count": os.cpu_count(), "results": results}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
