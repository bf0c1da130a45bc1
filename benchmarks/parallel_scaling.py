"""Throughput and memory of single, DDP and FSDP training through the real `gpt2 train` command.

Runs each strategy for a fixed number of steps at 1, 2, ... processes (--procs; gloo on CPU, NCCL
on GPUs) with the same global batch, then reads metrics.jsonl: median tokens/s over the logged
steps after warm-up (all processes together, and per process), peak memory per process (peak RSS
on CPU, max allocated on CUDA), and the final loss (which must agree between strategies). Prints a
table, writes one JSON file (--out) and a figure (--figure): tokens/s per process and memory per
process against the number of processes, one line per strategy.

    .venv/bin/python benchmarks/parallel_scaling.py --preset nano --steps 20 --out bench-out/parallel.json \
        --figure docs/figures/parallel_scaling_cpu.png
    python benchmarks/parallel_scaling.py --preset gpt2 --device cuda --procs 1,2,4,8 --batch-size 32
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

from bench_figures import pyplot, save_figure


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
    ap.add_argument("--procs", default="1,2", help="comma list of process counts for ddp and fsdp (default 1,2)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--figure", default=None, help="write a PNG of tokens/s and memory per process here")
    a = ap.parse_args()
    procs = [int(n) for n in a.procs.split(",")]
    if any(n < 1 or a.batch_size % n for n in procs):
        raise SystemExit(f"--procs {a.procs}: every count must be >= 1 and divide --batch-size {a.batch_size}")
    common = ["--preset", a.preset, "--steps", str(a.steps), "--seq-len", str(a.seq_len), "--device", a.device,
              "--eval-every", str(a.steps), "--eval-tokens", str(a.seq_len * 4), "--log-every", "2",
              "--save-every", str(a.steps)]
    procs_flag = "--gpus" if a.device.startswith("cuda") else "--nproc"
    # (strategy, processes, extra flags); --batch-size is per process, so the global batch is fixed.
    configs = [("single", 1, [])]
    for n in procs:
        configs += [(strategy, n, ["--strategy", strategy, *([procs_flag, str(n)] if n > 1 else [])])
                    for strategy in ("ddp", "fsdp")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy, n, extra in configs:
            name = f"{strategy} x{n}"
            r = run_one(Path(tmp), name.replace(" ", "-"), [*common, *extra, "--batch-size", str(a.batch_size // n)])
            r.update(strategy=strategy, processes=n, tokens_per_s_per_process=r["tokens_per_s"] / n)
            results.append(r)
            print(f"{name:<10} {r['tokens_per_s']:>10.0f} tok/s (all processes) {r['tokens_per_s_per_process']:>10.0f} "
                  f"per process  {r['peak_mem_mib_rank0']:>8.0f} MiB rank 0 ({r['memory_kind']})  "
                  f"final loss {r['final_loss']:.4f}", flush=True)
    record = {"preset": a.preset, "steps": a.steps, "global_batch": a.batch_size, "seq_len": a.seq_len,
              "device": a.device, "cpu_count": os.cpu_count(), "results": results}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(record, indent=2))
    if a.figure:
        write_figure(record, Path(a.figure))


def write_figure(record: dict, path: Path) -> None:
    plt = pyplot()
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(9, 3.4))
    single = next(r for r in record["results"] if r["strategy"] == "single")
    for strategy, style in (("ddp", "o-"), ("fsdp", "s-")):
        rows = sorted((r for r in record["results"] if r["strategy"] == strategy), key=lambda r: r["processes"])
        n = [r["processes"] for r in rows]
        speed.plot(n, [r["tokens_per_s_per_process"] for r in rows], style, label=strategy)
        memory.plot(n, [r["peak_mem_mib_rank0"] for r in rows], style, label=strategy)
    for ax, key in ((speed, "tokens_per_s_per_process"), (memory, "peak_mem_mib_rank0")):
        ax.axhline(single[key], color="gray", ls="--", lw=1, label="single process")
        ax.set_xlabel("processes")
        ax.set_xticks(sorted({r["processes"] for r in record["results"]}))
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    speed.set_ylabel("tokens/s per process")
    memory.set_ylabel(f"peak memory per process, MiB ({single['memory_kind'].split('_')[1]})")
    speed.legend(fontsize=8)
    fig.suptitle(f"{record['preset']}, global batch {record['global_batch']} x {record['seq_len']} tokens, "
                 f"{record['device']} ({record['cpu_count']} cores)", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
