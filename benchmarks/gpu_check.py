"""Everything that needs a GPU, in one run: the CUDA tests, our training step and generation
against the Hugging Face peer, and (time allowing) a small GPU version of the RoPE/GQA study.

A lent GPU comes with a fixed time budget, so the stages run in order of value, each with its
own timeout, and a stage is skipped when the time left is less than it needs. Every stage's
output goes to one log; every JSON line a benchmark prints goes to results.jsonl; a short table
is printed last. Started by benchmarks/gpu_check.sh (which installs the wheels the GPU machine
lacks); `--dry-run` runs the same stages on the CPU with toy shapes, to check this script.

    bash benchmarks/gpu_check.sh                        # on the GPU machine; OUT=folder for results
    .venv/bin/python benchmarks/gpu_check.py --dry-run  # here, on the CPU
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench_args import OneLineParser, parse_names

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable


@dataclass
class Stage:
    name: str
    cmd: list[str]
    needs_s: int  # skip when less time than this is left
    timeout_s: int
    env: dict[str, str] = field(default_factory=dict)


def stages(out: Path, dry: bool) -> list[Stage]:
    if dry:  # same scripts, toy shapes, CPU
        train = ["--preset", "tiny", "--seq", "64", "--dtype", "fp32", "--device", "cpu", "--steps", "2",
                 "--warmup", "1"]
        peer = ["--layers", "2", "--heads", "4", "--dim", "64", "--seq", "64", "--batch", "4", "--dtype", "fp32",
                "--device", "cpu", "--steps", "2", "--warmup", "1"]
        gen = ["--device", "cpu", "--dtype", "fp32", "--preset", "tiny", "--new-tokens", "8", "--repeat", "1"]
        tests_env = {"GPT2_GPU_TEST_DEVICE": "cpu"}
        study = ["--preset", "tiny", "--steps", "20", "--batch-size", "4", "--seq-len", "32", "--device", "cpu",
                 "--eval-every", "10", "--eval-tokens", "1024"]
        b16, b32 = "4", "8"
        scaling = ["--device", "cpu", "--centre", "tiny:32:2", "--seqs", "16,32", "--batches", "1,2",
                   "--presets", "tiny", "--steps", "2"]
    else:
        train = ["--preset", "gpt2", "--seq", "1024", "--dtype", "bf16", "--compile", "--peak-tflops", "989",
                 "--steps", "20", "--warmup", "5"]
        # The peer's fp32 matmuls in TF32 like ours (train_speed.py's default on CUDA).
        peer = ["--seq", "1024", "--batch", "16", "--dtype", "bf16", "--compile", "--peak-tflops", "989",
                "--steps", "20", "--warmup", "5", "--matmul-precision", "high"]
        gen = ["--device", "cuda", "--dtype", "bf16", "--compile", "--repeat", "3"]
        tests_env = {}
        # nanoGPT's Shakespeare shape (6L/6H/384, T=256, B=64), 600 steps = 9.8M tokens per variant.
        study = ["--preset", "mini", "--steps", "600", "--batch-size", "64", "--seq-len", "256", "--device", "cuda",
                 "--eval-every", "100", "--eval-tokens", "32768", "--dropout", "0.2", "--lr", "1e-3", "--no-compile"]
        b16, b32 = "16", "32"
        scaling = ["--device", "cuda", "--dtype", "bf16", "--centre", "gpt2:1024:8", "--seqs", "256,512,1024,2048",
                   "--batches", "2,4,8,16", "--presets", "mini,gpt2,gpt2-medium", "--steps", "10"]
    bench = HERE / "train_speed.py"
    # A fresh folder per call (a sweep refuses a folder that holds one); outside $OUT, so that
    # its checkpoints do not travel back with the results. Only named here: the sweep creates it
    # if the study stage runs, so a call without that stage leaves nothing behind in /tmp.
    study_dir = Path(tempfile.gettempdir()) / f"gpt2-gpu-study-{uuid.uuid4().hex[:12]}" / "study"
    return [
        # sync1: the compiled generator reading every token back (before sync_every), same graph.
        # --compile compiles HF too (static cache): more compilation than before, hence 260 s.
        Stage("generate_b1", [PY, str(HERE / "generate_speed.py"), *gen, "--sync-every", "1",
                              "--figure", str(out / "generate_b1.png")], 90, 260),
        Stage("train_ours_b16", [PY, str(bench), *train, "--batch", b16, "--vocab", "50257,50304"], 150, 240),
        # Triton GEMM templates with fused epilogues (the profile put 10.8 of 33.6 ms outside the
        # matmuls and attention): the candidate for the 640k target. Minutes of autotuning.
        Stage("train_ours_b16_autotune", [PY, str(bench), *train, "--batch", b16, "--vocab", "50304",
                                          "--compile-mode", "max-autotune-no-cudagraphs"], 200, 420),
        # Compiled step with the output layer and loss in 4 chunks of 4,096 tokens (gradients in the
        # same pass): the profile's 2.1 ms of log-softmax/cross-entropy reads and writes the
        # 1.6 GB bf16 logits several times. Prediction: +2-5% and ~1.5 GB less at its peak.
        Stage("train_ours_b16_chunked_ce", [PY, str(bench), *train, "--batch", b16, "--vocab", "50304",
                                            "--loss-chunk", "4096"], 90, 200),
        Stage("train_hf_b16", [PY, str(HERE / "peers" / "hf_peer.py"), "train", *peer], 90, 180),
        Stage("train_ours_b32", [PY, str(bench), *train, "--batch", b32, "--vocab", "50304"], 80, 180),
        # Where the compiled step's time goes: the top kernels of 3 profiled steps.
        Stage("train_profile_b16", [PY, str(bench), *train, "--batch", b16, "--vocab", "50304", "--steps", "5",
                                    "--profile", "3"], 80, 150),
        Stage("tests", [PY, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider",
                        # one file: spread its tests over the workers (pyproject's default is a file each)
                        *(["-n", "4", "--dist", "load"] if not dry else [])], 90, 240, tests_env),
        Stage("generate_b8", [PY, str(HERE / "generate_speed.py"), *gen, "--batch", "8",
                              "--figure", str(out / "generate_b8.png")], 80, 260),
        # int8 weight-only decoding (gpt2 generate --quantize int8) next to bf16, compiled and eager:
        # not measured on a GPU yet (docs/benchmarks.md, "Int8 weight-only decoding").
        Stage("generate_b1_int8", [PY, str(HERE / "generate_speed.py"), *gen, "--quantize", "int8"], 120, 300),
        # Eager (no compile) GPT-2 step: the plain loss against the chunked one (gpt2 train's eager default).
        Stage("train_eager_loss", [PY, str(bench), *[t for t in train if t != "--compile"], "--batch", b16,
                                   "--loss-chunk", "0"], 40, 90),
        Stage("train_eager_chunked", [PY, str(bench), *[t for t in train if t != "--compile"], "--batch", b16,
                                      "--loss-chunk", "512"], 40, 90),
        Stage("study", [PY, "-m", "gpt2cli", "train", *study, "--sweep", "pos=learned,rope", "--sweep", "attn=mha,gqa",
                        "--out", str(study_dir), "--quiet"], 150, 300),
        Stage("study_compare", [PY, "-m", "gpt2cli", "compare", str(study_dir), "--format", "markdown",
                                "--plot", str(out / "study.png")], 20, 60),
        # Step time and memory against T, B and model size on the GPU (eager bf16: no compile per point).
        Stage("scaling", [PY, str(HERE / "scaling.py"), *scaling, "--out", str(out / "scaling.json"),
                          "--figure", str(out / "scaling.png")], 150, 300),
    ]


def json_objects(text: str) -> list[dict]:
    """Every JSON object that starts at the beginning of a line (one-line or indented)."""
    decoder, found = json.JSONDecoder(), []
    for i, ch in enumerate(text):
        if ch == "{" and (i == 0 or text[i - 1] == "\n"):
            try:
                found.append(decoder.raw_decode(text, i)[0])
            except json.JSONDecodeError:
                continue
    return found


def run_stage(stage: Stage, left_s: float, log, results) -> dict:
    if left_s < stage.needs_s:
        log.write(f"\n===== {stage.name}: skipped, {left_s:.0f} s left < {stage.needs_s} s\n")
        return {"stage": stage.name, "status": "skipped"}
    log.write(f"\n===== {stage.name}: {' '.join(stage.cmd)}\n")
    log.flush()
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **stage.env}
    try:
        proc = subprocess.run(stage.cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=min(stage.timeout_s, max(left_s - 5, 10)))
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    seconds = time.perf_counter() - t0
    log.write(stdout)
    log.write("\n--- stderr (last 6000 chars)\n" + stderr[-6000:])
    log.write(f"\n===== {stage.name}: rc={rc} in {seconds:.0f} s\n")
    log.flush()
    objs = json_objects(stdout)
    for obj in objs:
        results.write(json.dumps({"stage": stage.name, **obj}) + "\n")
    results.flush()
    tail = [line for line in stdout.strip().splitlines() if line.strip()][-1:] or [""]
    return {"stage": stage.name, "status": f"rc={rc}", "seconds": round(seconds), "json": objs, "tail": tail[0],
            "stdout": stdout}


def summary_table(done: list[dict]) -> str:
    lines = ["", "stage               status    s   result"]
    for d in done:
        if d["status"] == "skipped":
            lines.append(f"{d['stage']:<19} skipped")
            continue
        head = f"{d['stage']:<19} {d['status']:<8} {d['seconds']:>4}   "
        rows = []
        for r in d["json"]:
            if r.get("job") == "train":
                mfu = f" MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
                mem = f" mem {r['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in r else ""
                chunk = f" chunk={r['loss_chunk']}" if r.get("loss_chunk") else ""
                chunk += f" sdpa={r['sdpa']}" if r.get("sdpa", "auto") != "auto" else ""
                chunk += f" {r['compile_mode']}" if r.get("compile_mode", "default") != "default" else ""
                rows.append(f"{r['peer']} B={r['batch']} V={r.get('vocab', 50257)}{chunk}: {r['tokens_per_s']:,.0f} tok/s "
                            f"({r['ms_per_step']:.1f} ms/step){mfu}{mem}")
            elif "median_tokens_per_s" in r:
                rates = ", ".join(f"{k} {v:,.0f}" for k, v in r["median_tokens_per_s"].items())
                rows.append(f"batch {r.get('batch', 1)} tok/s: {rates}; greedy equal to HF {r['greedy_tokens_equal_to_hf']}")
        if not rows:
            rows = [d["tail"][:110]]
        lines.append(head + rows[0])
        lines += [" " * 35 + row for row in rows[1:]]
    return "\n".join(lines)


def main() -> None:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=480, help="stop starting stages after this (default 480)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench-out/gpu")
    ap.add_argument("--only", default="", help="comma list of stage names to run (default: all)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy shapes: check this script")
    a = ap.parse_args()
    out = Path(a.out)
    all_stages = stages(out, a.dry_run)
    # Refused before anything runs: on a lent GPU a misspelt stage would waste the device time.
    only = parse_names("--only", a.only, [s.name for s in all_stages])
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    chosen = [s for s in all_stages if not only or s.name in only]
    done = []
    with open(out / "log.txt", "w") as log, open(out / "results.jsonl", "w") as results:
        info = subprocess.run([PY, "-c", "import torch, platform; print(platform.python_version(), torch.__version__, "
                               "torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"],
                              capture_output=True, text=True)
        log.write(f"python torch device: {info.stdout.strip()} {info.stderr.strip()[-500:]}\n")
        print(f"python torch device: {info.stdout.strip()}", flush=True)
        for stage in chosen:
            left = a.budget_s - (time.perf_counter() - start)
            d = run_stage(stage, left, log, results)
            done.append(d)
            print(f"{stage.name}: {d['status']} {d.get('seconds', '')} s", flush=True)
        table = summary_table(done)
        log.write(table + "\n")
    print(table)
    compare = next((d for d in done if d["stage"] == "study_compare" and d["status"] == "rc=0"), None)
    if compare:
        (out / "study.md").write_text(compare["stdout"])


if __name__ == "__main__":
    main()
