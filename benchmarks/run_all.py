"""The benchmark harness (`nox -s bench`): our code and the Hugging Face peer, side by side.

For each training shape it alternates ours and the peer (benchmarks/peers/hf_peer.py, a copy of
the shared peer script) --repeat times in fresh processes, so that machine load hits both alike,
and reports medians; then generation at batch 1 and 8 (benchmarks/generate_speed.py) and data preparation
(benchmarks/data_prep.py). A table on stdout and one JSON file (--out).

    .venv/bin/python benchmarks/run_all.py                       # CPU: tiny and nano shapes, fp32
    python benchmarks/run_all.py --device cuda --shapes gpt2:1024:16 --dtype bf16 --compile --peak-tflops 989
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

HERE = Path(__file__).resolve().parent
PRESET_SHAPES = {"tiny": (2, 4, 64), "nano": (4, 8, 128), "mini": (6, 6, 384), "gpt2": (12, 12, 768)}


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
    layers, heads, dim = PRESET_SHAPES[preset]
    common = ["--seq", str(seq), "--batch", str(batch), "--dtype", a.dtype, "--device", a.device,
              "--steps", str(a.steps)]
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
    med = lambda rows: statistics.median(r["tokens_per_s"] for r in rows)  # noqa: E731
    result = {"job": "train", "shape": f"{preset} T={seq} B={batch}", "ours_tokens_per_s": med(ours),
              "peer_tokens_per_s": med(peer), "runs": a.repeat}
    if a.peak_tflops:
        result["ours_mfu"] = statistics.median(r["mfu"] for r in ours)
        result["peer_mfu"] = statistics.median(r["mfu"] for r in peer)
    if "peak_mem_gb" in ours[-1]:
        result["ours_peak_mem_gb"] = ours[-1]["peak_mem_gb"]
        result["peer_peak_mem_gb"] = peer[-1].get("peak_mem_gb")
    result["ratio"] = result["ours_tokens_per_s"] / result["peer_tokens_per_s"]
    return result


def table_rows(results: list[dict]) -> list[tuple[str, str, str, str, str]]:
    """(job, setting, ours, peer, ours / peer) for every result, as printed."""
    rows = []
    for r in results:
        if r["job"] == "train":
            mfu = f" ({r['ours_mfu']:.1%} MFU)" if "ours_mfu" in r else ""
            rows.append(("train step", r["shape"], f"{r['ours_tokens_per_s']:,.0f} tok/s{mfu}",
                         f"{r['peer_tokens_per_s']:,.0f} tok/s", f"{r['ratio']:.2f}x"))
        elif r["job"] == "generate":
            med = r["median_tokens_per_s"]
            for name in (k for k in med if k != "hf"):
                job = "generate" + name.removeprefix("ours").replace("+compile", " --compile")
                rows.append((job, f"B={r['batch']} {r['prompt_tokens']}+{r['new_tokens']} tok",
                             f"{med[name]:,.1f} tok/s", f"{med['hf']:,.1f} tok/s", f"{med[name] / med['hf']:.2f}x"))
        elif r["job"] == "data":
            rows.append(("data prep", "JSONL (best run)", f"{r['best_tokens_per_s'] / 1e6:.2f} M tok/s", "-", "-"))
    return rows


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ours against Hugging Face (medians)")
    for col in ("job", "setting", "ours", "HF", "ours / HF"):
        table.add_column(col, justify="right" if col in ("ours", "HF", "ours / HF") else "left")
    for row in table_rows(results):
        table.add_row(*row)
    Console().print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--shapes", default="tiny:64:16,nano:128:16", help="preset:seq:batch,...")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--gen-batches", default="1,8", help="generation batch sizes, comma list (default 1,8)")
    ap.add_argument("--skip", default="", help="comma list of jobs to skip: train,generate,data")
    ap.add_argument("--out", default="bench-out/results.json")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    results = []
    if "train" not in skip:
        for shape in a.shapes.split(","):
            preset, seq, batch = shape.split(":")
            r = train_pair(preset, int(seq), int(batch), a)
            results.append(r)
            print(f"train {r['shape']:<22} ours {r['ours_tokens_per_s']:>10.0f} tok/s   "
                  f"HF {r['peer_tokens_per_s']:>10.0f} tok/s   ratio {r['ratio']:.2f}x", flush=True)
    if "generate" not in skip:
        for batch in (int(b) for b in a.gen_batches.split(",")):
            # The figure goes next to the JSON: the harness never rewrites the figures in docs/.
            cmd = [sys.executable, str(HERE / "generate_speed.py"), "--device", a.device, "--repeat", str(a.repeat),
                   "--dtype", a.dtype, "--batch", str(batch),
                   "--figure", str(Path(a.out).parent / f"generate_speed_b{batch}.png")]
            if a.compile:
                cmd.append("--compile")
            r = {"job": "generate", **last_json(cmd)}
            results.append(r)
            print("generate " + json.dumps(r), flush=True)
    if "data" not in skip:
        r = {"job": "data", **last_json([sys.executable, str(HERE / "data_prep.py"), "--repeat", "2"])}
        results.append(r)
        print("data " + json.dumps(r), flush=True)
    print_table(results)
    record = {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
              "device": a.device, "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else
              platform.processor() or "cpu", "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
