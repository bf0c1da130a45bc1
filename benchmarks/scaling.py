"""How the training step's time and memory grow with sequence length, batch size and model size.

Each point is benchmarks/train_speed.py in a fresh process (so that the peak memory read is
that configuration's alone): AdamW, clipping, 3 warm-up and --steps (10) timed steps. Three sweeps
around one centre (nano, T=128, B=8): sequence length, batch size, model size. Besides time and
memory, each row gives the step's FLOPs (6N + 12LTd per token, x tokens) and the achieved
GFLOP/s, which shows whether time grows as the arithmetic does. A markdown table on stdout, the
rows as JSON (--out) and, when --figure names a PNG, a figure (never by default, so that a run
does not overwrite the figures committed in docs/figures/).

    .venv/bin/python benchmarks/scaling.py --figure bench-out/scaling_cpu.png     # CPU, fp32
    python benchmarks/scaling.py --device cuda --dtype bf16 --compile --centre gpt2:1024:16 \\
        --seqs 256,512,1024,2048 --batches 4,8,16,32 --presets mini,gpt2,gpt2-medium
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench_figures import pyplot, save_figure

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def measure(preset: str, seq: int, batch: int, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(HERE / "train_speed.py"), "--preset", preset, "--seq", str(seq), "--batch", str(batch),
           "--dtype", a.dtype, "--device", a.device, "--steps", str(a.steps), "--warmup", "3"]
    if a.compile:
        cmd.append("--compile")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["gflop_per_step"] = row["flops_per_token"] * batch * seq / 1e9
    row["gflop_per_s"] = row["gflop_per_step"] / (row["ms_per_step"] / 1000)
    row["peak_gb"] = row.get("peak_mem_gb", row.get("peak_rss_gb"))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--centre", default="nano:128:8", help="preset:seq:batch the sweeps vary around")
    ap.add_argument("--seqs", default="32,64,128,256,512")
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--presets", default="tiny,nano,mini,gpt2")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="bench-out/scaling.json")
    ap.add_argument("--figure", default=None, help="PNG to write (default: no figure)")
    a = ap.parse_args()
    preset, seq, batch = a.centre.split(":")
    seq, batch = int(seq), int(batch)
    sweeps = {
        "sequence length": [(preset, int(s), batch) for s in a.seqs.split(",")],
        "batch size": [(preset, seq, int(b)) for b in a.batches.split(",")],
        "model size": [(p, seq, batch) for p in a.presets.split(",")],
    }
    rows: dict[str, list[dict]] = {}
    print("| sweep | preset | T | B | ms/step | tokens/s | GFLOP/step | GFLOP/s | peak memory (GB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, points in sweeps.items():
        rows[name] = []
        for p, s, b in points:
            r = measure(p, s, b, a)
            rows[name].append(r)
            print(f"| {name} | {p} | {s} | {b} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | "
                  f"{r['gflop_per_step']:.2f} | {r['gflop_per_s']:.1f} | {r['peak_gb']:.2f} |", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))
    if a.figure:
        plot(rows, a, Path(a.figure))


def plot(rows: dict[str, list[dict]], a: argparse.Namespace, path: Path) -> None:
    plt = pyplot()
    x_of = {"sequence length": lambda r: r["seq"], "batch size": lambda r: r["batch"],
            "model size": lambda r: r["params"] / 1e6}
    xlabel = {"sequence length": "tokens per sequence (T)", "batch size": "sequences per step (B)",
              "model size": "parameters, M"}
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.6))
    for col, (name, rs) in enumerate(rows.items()):
        xs = [x_of[name](r) for r in rs]
        ax = axes[0][col]
        ax.plot(xs, [r["ms_per_step"] for r in rs], "o-", label="measured")
        # Time if it grew exactly as the FLOPs do, anchored at the first point.
        scale = rs[0]["ms_per_step"] / rs[0]["gflop_per_step"]
        ax.plot(xs, [r["gflop_per_step"] * scale for r in rs], "--", color="gray", label="∝ FLOPs")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"step time vs {name}", fontsize=9)
        ax.set_ylabel("ms per step")
        ax.legend(fontsize=7)
        for r, x in zip(rs, xs, strict=True):
            if name == "model size":
                ax.annotate(r["preset"], (x, r["ms_per_step"]), fontsize=7, textcoords="offset points", xytext=(3, -9))
        ax = axes[1][col]
        ax.plot(xs, [r["peak_gb"] for r in rs], "s-", color="#c44e52")  # linear x: memory grows linearly
        ax.set_ylim(bottom=0)
        ax.set_xlabel(xlabel[name])
        ax.set_ylabel("peak memory, GB")
    memory = "peak allocated (CUDA)" if a.device.startswith("cuda") else "peak RSS of the process"
    fig.suptitle(f"training step (AdamW), {a.device}, {a.dtype}{', compiled' if a.compile else ''}; "
                 f"centre {a.centre}; memory = {memory}", fontsize=9)
    save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    main()
