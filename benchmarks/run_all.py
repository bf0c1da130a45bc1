"""The benchmark harness (`nox -s bench`): our code and the Hugging Face peer, side by side.

For each training shape it alternates ours and the peer (benchmarks/peers/hf_peer.py, a copy of
the shared peer script) --repeat times in fresh processes, so that machine load hits both alike,
and reports medians; both sides get the same dtype, batch, sequence length, compile setting,
warm-up and timed steps, and on CUDA the same fp32 matmul precision. Then generation at batch 1
and 8 (benchmarks/generate_speed.py; with --compile both sides compile) and data preparation
(benchmarks/data_prep.py), --repeat runs each, medians. A table on stdout and one JSON file
(--out) that also records the settings behind the figures.

    .venv/bin/python benchmarks/run_all.py                       # CPU: tiny and nano shapes, fp32
    python benchmarks/run_all.py --device cuda --shapes gpt2:1024:16 --dtype bf16 --compile --peak-tflops 989
    .venv/bin/python benchmarks/run_all.py --shapes tiny:64:4 --steps 2 --repeat 1 --gen-preset tiny \
        --gen-new-tokens 16 --gen-batches 1 --data-mb 1      # smoke check of the whole harness, minutes
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from bench_args import OneLineParser, parse_names, parse_positive_ints, refuse

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from gpt2cli.presets import PRESETS  # noqa: E402

JOBS = ("train", "generate", "data")
DTYPES = ("fp32", "bf16", "fp16")
# The settings both training processes print, which must agree for the ratio to be like for like.
TRAIN_PROTOCOL = ("dtype", "compile", "steps", "warmup", "matmul_precision")


def parse_shapes(value: str) -> list[tuple[str, int, int]]:
    """--shapes as (preset, seq, batch) triples; a bad entry is refused in one line."""
    shapes = []
    for item in (entry.strip() for entry in value.split(",")):
        parts = item.split(":")
        if len(parts) != 3:
            refuse(f"--shapes: {item!r} is not preset:seq:batch (for example tiny:64:16)")
        preset, seq, batch = parts
        if preset not in PRESETS:
            refuse(f"--shapes: unknown preset {preset!r} in {item!r}; valid: {', '.join(PRESETS)}")
        if not (seq.isdigit() and batch.isdigit() and int(seq) >= 1 and int(batch) >= 1):
            refuse(f"--shapes: sequence length and batch in {item!r} must be whole numbers >= 1 "
                   "(for example tiny:64:16)")
        shapes.append((preset, int(seq), int(batch)))
    return shapes


def last_json(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    # The last JSON object printed, on one line or indented over several.
    text = proc.stdout
    decoder = json.JSONDecoder()
    starts = [i for i in range(len(text)) if text[i] == "{" and (i == 0 or text[i - 1] == "\n")]
    for start in reversed(starts):
        try:
            return decoder.raw_decode(text, start)[0]
        except json.JSONDecodeError:
            continue
    raise SystemExit(f"{' '.join(cmd)} printed no JSON:\n{text[-2000:]}")


def train_pair(preset: str, seq: int, batch: int, a: argparse.Namespace) -> dict:
    shape = PRESETS[preset]
    layers, heads, dim = shape["n_layer"], shape["n_head"], shape["n_embd"]
    # Every setting goes to both sides explicitly: their own defaults differ (warm-up 3 and 5;
    # TF32 on CUDA for ours, full fp32 for the peer).
    common = ["--seq", str(seq), "--batch", str(batch), "--dtype", a.dtype, "--device", a.device,
              "--steps", str(a.steps), "--warmup", str(a.warmup), "--matmul-precision", a.matmul_precision]
    if a.compile:
        common.append("--compile")
    if a.peak_tflops:
        common += ["--peak-tflops", str(a.peak_tflops)]
    ours_cmd = [sys.executable, str(HERE / "train_speed.py"), "--preset", preset, *common]
    peer_cmd = [sys.executable, str(HERE / "peers" / "hf_peer.py"), "train", "--layers", str(layers), "--heads",
                str(heads), "--dim", str(dim), *common]
    ours, peer = [], []
    for _ in range(a.repeat):
        ours.append(last_json(ours_cmd))
        peer.append(last_json(peer_cmd))
    protocol = {key: ours[0][key] for key in TRAIN_PROTOCOL}
    differing = [key for key in TRAIN_PROTOCOL if any(r[key] != protocol[key] for r in ours + peer)]
    if differing:  # a harness bug, not bad input: say what differs
        raise SystemExit(f"train {preset} T={seq} B={batch}: ours and the peer ran with different "
                         f"{', '.join(differing)}; the comparison would not be like for like")

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    # CUDA: the allocator's peak over the timed steps; CPU: the process's peak resident set.
    memory_key = "peak_mem_gb" if "peak_mem_gb" in ours[0] else "peak_rss_gb"
    result = {"job": "train", "shape": f"{preset} T={seq} B={batch}", "preset": preset, "seq": seq,
              "batch": batch, **protocol, "runs": a.repeat,
              "ours_tokens_per_s": med(ours, "tokens_per_s"), "peer_tokens_per_s": med(peer, "tokens_per_s"),
              "peak_memory": "CUDA max allocated" if memory_key == "peak_mem_gb" else "peak RSS of the process",
              "ours_peak_memory_gb": med(ours, memory_key), "peer_peak_memory_gb": med(peer, memory_key)}
    if a.peak_tflops:
        result["ours_mfu"] = med(ours, "mfu")
        result["peer_mfu"] = med(peer, "mfu")
    result["ratio"] = result["ours_tokens_per_s"] / result["peer_tokens_per_s"]
    return result


TABLE_COLUMNS = ("job", "setting", "ours", "HF", "ours / HF", "peak memory, ours / HF")


def table_rows(results: list[dict]) -> list[tuple[str, ...]]:
    """One tuple per TABLE_COLUMNS for every result, as printed. Every ratio is the JSON's, of
    unrounded medians."""
    rows = []
    for r in results:
        if r["job"] == "train":
            ours_mfu = f" ({r['ours_mfu']:.1%} MFU)" if "ours_mfu" in r else ""
            peer_mfu = f" ({r['peer_mfu']:.1%} MFU)" if "peer_mfu" in r else ""
            setting = f"{r['shape']}, {r['dtype']}{', compiled' if r['compile'] else ''}"
            memory = "CUDA peak" if r["peak_memory"].startswith("CUDA") else "peak RSS"
            rows.append(("train step", setting, f"{r['ours_tokens_per_s']:,.0f} tok/s{ours_mfu}",
                         f"{r['peer_tokens_per_s']:,.0f} tok/s{peer_mfu}", f"{r['ratio']:.2f}x",
                         f"{r['ours_peak_memory_gb']:.2f} / {r['peer_peak_memory_gb']:.2f} GB ({memory})"))
        elif r["job"] == "generate":
            med = r["median_tokens_per_s"]
            for c in r["comparisons"]:
                rows.append(("generate", f"{r['preset']}, B={r['batch']}, {r['prompt_tokens']}+{r['new_tokens']} "
                             f"tok, {r['dtype']}: {c['label']}", f"{med[c['ours']]:,.1f} tok/s",
                             f"{med[c['hf']]:,.1f} tok/s", f"{c['ratio']:.2f}x", "-"))
        elif r["job"] == "data":
            runs = "1 run" if r["runs"] == 1 else f"median of {r['runs']} runs"
            rows.append(("data prep", f"JSONL, {r['corpus_mb']} MB ({runs})",
                         f"{r['median_tokens_per_s'] / 1e6:.2f} M tok/s", "-", "-", "-"))
    return rows


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ours against Hugging Face (medians)")
    for col in TABLE_COLUMNS:
        table.add_column(col, justify="left" if col in ("job", "setting") else "right")
    for row in table_rows(results):
        table.add_row(*row)
    Console().print(table)


def main() -> None:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=DTYPES)
    ap.add_argument("--compile", action="store_true", help="compile both sides (training and generation)")
    ap.add_argument("--matmul-precision", default="high", choices=["highest", "high", "medium"],
                    help="fp32 matmuls on CUDA, the same for both sides (default high: TF32, as gpt2 train "
                         "runs); the CPU runs full fp32")
    ap.add_argument("--shapes", default="tiny:64:16,nano:128:16", help="preset:seq:batch,...")
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per process (default 8)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed training steps first, both sides (default 3)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="processes per training shape and side, generation and data runs (default 3)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--gen-batches", default="1,8", help="generation batch sizes, comma list (default 1,8)")
    ap.add_argument("--gen-preset", default="gpt2", choices=list(PRESETS),
                    help="generation model (default gpt2, the 124M model; tiny for a quick check)")
    ap.add_argument("--gen-prompt-tokens", type=int, default=16, help="prompt length (default 16)")
    ap.add_argument("--gen-new-tokens", type=int, default=256, help="new tokens per call (default 256)")
    ap.add_argument("--data-mb", type=float, default=24.0, help="data prep corpus size in MB (default 24)")
    ap.add_argument("--only", default="", help=f"comma list of jobs to run (default all): {','.join(JOBS)}")
    ap.add_argument("--skip", default="", help=f"comma list of jobs to skip: {','.join(JOBS)}")
    ap.add_argument("--out", default="bench-out/results.json")
    a = ap.parse_args()
    only = parse_names("--only", a.only, JOBS) or list(JOBS)
    skip = parse_names("--skip", a.skip, JOBS)
    jobs = [job for job in JOBS if job in only and job not in skip]
    shapes = parse_shapes(a.shapes) if "train" in jobs else []
    gen_batches = parse_positive_ints("--gen-batches", a.gen_batches) if "generate" in jobs else []
    for option in ("steps", "repeat", "gen_prompt_tokens", "gen_new_tokens"):
        if getattr(a, option) < 1:
            refuse(f"--{option.replace('_', '-')}: {getattr(a, option)} must be 1 or more")
    if a.warmup < 0:
        refuse(f"--warmup: {a.warmup} must be 0 or more")
    if not a.data_mb > 0:
        refuse(f"--data-mb: {a.data_mb} must be more than 0")
    results = []
    for preset, seq, batch in shapes:
        r = train_pair(preset, seq, batch, a)
        results.append(r)
        print(f"train {r['shape']:<22} ours {r['ours_tokens_per_s']:>10.0f} tok/s   "
              f"HF {r['peer_tokens_per_s']:>10.0f} tok/s   ratio {r['ratio']:.2f}x", flush=True)
    for batch in gen_batches:
        # The figure goes next to the JSON: the harness never rewrites the figures in docs/.
        cmd = [sys.executable, str(HERE / "generate_speed.py"), "--device", a.device, "--repeat", str(a.repeat),
               "--dtype", a.dtype, "--batch", str(batch), "--preset", a.gen_preset,
               "--prompt-tokens", str(a.gen_prompt_tokens), "--new-tokens", str(a.gen_new_tokens),
               "--figure", str(Path(a.out).parent / f"generate_speed_b{batch}.png")]
        if a.compile:
            cmd.append("--compile")
        r = {"job": "generate", **last_json(cmd)}
        results.append(r)
        print("generate " + json.dumps(r), flush=True)
    if "data" in jobs:
        cmd = [sys.executable, str(HERE / "data_prep.py"), "--repeat", str(a.repeat), "--mb", str(a.data_mb)]
        r = {"job": "data", **last_json(cmd)}
        results.append(r)
        print("data " + json.dumps(r), flush=True)
    print_table(results)
    settings = {"jobs": jobs, "device": a.device, "dtype": a.dtype, "compile": a.compile,
                "matmul_precision": a.matmul_precision if a.device.startswith("cuda") else "highest",
                "steps": a.steps, "warmup": a.warmup, "repeat": a.repeat, "shapes": a.shapes,
                "gen_preset": a.gen_preset, "gen_batches": gen_batches, "gen_prompt_tokens": a.gen_prompt_tokens,
                "gen_new_tokens": a.gen_new_tokens, "data_mb": a.data_mb, "peak_tflops": a.peak_tflops}
    record = {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
              "device": a.device, "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else
              platform.processor() or "cpu", "settings": settings, "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
