"""Training-step speed of our model, with the same protocol as benchmarks/peers/hf_peer.py train.

Random tokens, AdamW (fused on CUDA), global-norm clipping, autocast for bf16/fp16, optional
torch.compile; warm-up steps excluded; the device is synchronised before and after the timed
steps. Prints one JSON line per configuration (tokens/s, ms/step, MFU when --peak-tflops is
given, peak memory). --batch and --vocab take comma lists: every combination is measured in turn
in the same process (one model compile each), which saves the start-up of a process per shape.
--vocab 50304 pads GPT-2's 50257 to a multiple of 64 (the extra rows are never a target).
--sdpa picks the attention kernel (torch.nn.attention.sdpa_kernel); auto is PyTorch's choice,
flash attention on CUDA for these shapes; cudnn is cuDNN's fused attention (Hopper and newer).
--profile N runs N more steps under torch.profiler after the timed ones and prints the ops and
kernels that take the most device time (CPU time on a CPU): where a step's time goes.

    .venv/bin/python benchmarks/train_speed.py --preset nano --seq 128 --batch 16 --dtype fp32
    python benchmarks/train_speed.py --preset gpt2 --seq 1024 --batch 16,32 --vocab 50257,50304 \
        --dtype bf16 --compile --peak-tflops 989
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import resource
import time

import torch

from gpt2cli.model import GPT
from gpt2cli.modelinfo import model_stats
from gpt2cli.profiling import profiler_activities, top_ops_table
from gpt2cli.specs import ModelSpec, TrainSpec, build_spec
from gpt2cli.train import autocast_context, build_optimizer, resolve_dtype, resolve_loss_chunk

GPT2_VOCAB = 50257


def measure(a: argparse.Namespace, batch: int, vocab: int) -> dict:
    device = torch.device(a.device)
    if device.type == "cuda":
        # TF32 ("high") by default, as `gpt2 train` runs; run_all passes the same value to the peer.
        torch.set_float32_matmul_precision(a.matmul_precision)
    spec = ModelSpec(preset=a.preset, attn=a.attn, pos=a.pos, block_size=max(a.seq, 1), vocab_size=vocab)
    torch.manual_seed(0)
    model = GPT(spec).to(device)
    train_spec = build_spec(TrainSpec, flags={"model": spec.model_dump()})
    optimizer = build_optimizer(model, train_spec, device)
    step_model = torch.compile(model, mode=a.compile_mode) if a.compile else model
    dtype = resolve_dtype(a.dtype, device)
    x = torch.randint(0, min(vocab, GPT2_VOCAB), (batch, a.seq), device=device)
    loss_chunk = resolve_loss_chunk(a.loss_chunk, a.compile, device)  # gpt2 train's rule

    def step() -> torch.Tensor:
        with attention_kernel(a.sdpa), autocast_context(device, dtype):
            loss = step_model(x, targets=x, loss_chunk=loss_chunk)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    t_start = time.perf_counter()
    for _ in range(a.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if a.profile:
        print_profile(step, a.profile, device, f"{a.preset} B={batch} V={vocab} T={a.seq}")
    # FLOPs of the unpadded model: padding rows do no useful work, so they earn no MFU.
    stats = model_stats(spec.model_copy(update={"vocab_size": min(vocab, GPT2_VOCAB)}), seq_len=a.seq)
    tps = batch * a.seq * a.steps / dt
    out = {"peer": "gpt2cli", "job": "train", "device": str(device), "dtype": a.dtype, "compile": a.compile, "compile_mode": a.compile_mode or "default",
           "warmup": a.warmup, "steps": a.steps,
           "matmul_precision": a.matmul_precision if device.type == "cuda" else "highest",
           "preset": a.preset, "attn": a.attn, "pos": a.pos, "layers": spec.n_layer, "heads": spec.n_head,
           "dim": spec.n_embd, "params": model.num_params(), "vocab": vocab, "loss_chunk": loss_chunk, "sdpa": a.sdpa, "seq": a.seq, "batch": batch, "ms_per_step": 1000 * dt / a.steps,
           "tokens_per_s": tps, "flops_per_token": stats["flops_per_token"],
           "warmup_s": t0 - t_start, "final_loss": float(loss.detach())}
    if a.peak_tflops:
        out["mfu"] = tps * stats["flops_per_token"] / (a.peak_tflops * 1e12)
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:  # the process's peak resident set (Linux: KiB); one configuration per process to read it alone
        out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def print_profile(step, steps: int, device: torch.device, label: str) -> None:
    """The top ops by self device time over ``steps`` profiled steps (not part of the timing)."""
    with torch.profiler.profile(activities=profiler_activities(device)) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    table, sort = top_ops_table(prof, device, rows=25)
    print(f"profile of {steps} steps, {label}, sorted by {sort}:")
    print(table, flush=True)


def attention_kernel(name: str) -> contextlib.AbstractContextManager:
    """The SDPA backend for the step (traced into the compiled graph on the first call)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([backend])


def release(device: torch.device) -> None:
    """Free the last configuration (compiled graphs, memory) before the next one is built."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="nano")
    p.add_argument("--attn", default="mha")
    p.add_argument("--pos", default="learned")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", default="16", help="sequences per step; a comma list measures each")
    p.add_argument("--vocab", default=str(GPT2_VOCAB), help="vocabulary rows; a comma list measures each")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default=None, choices=["default", "max-autotune-no-cudagraphs", "max-autotune"],
                   help="torch.compile mode (default: torch's default); max-autotune tries Triton matmul "
                        "templates with fused epilogues, at minutes of compilation")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--matmul-precision", default="high", choices=["highest", "high", "medium"],
                   help="torch.set_float32_matmul_precision on CUDA (default high: TF32 for fp32 matmuls); "
                        "the CPU always runs full fp32")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--loss-chunk", type=int, default=None,
                   help="tokens per chunk of the output layer + loss (0 = off); default: gpt2 train's rule")
    p.add_argument("--sdpa", default="auto", choices=["auto", "flash", "efficient", "cudnn", "math"],
                   help="attention kernel (default auto: PyTorch's choice)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile N more steps and print the top ops (default 0: off)")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    batches = [int(b) for b in a.batch.split(",")]
    vocabs = [int(v) for v in a.vocab.split(",")]
    for batch, vocab in itertools.product(batches, vocabs):
        print(json.dumps(measure(a, batch, vocab)), flush=True)
        release(torch.device(a.device))


if __name__ == "__main__":
    main()
