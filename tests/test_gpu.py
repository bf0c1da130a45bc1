"""CUDA paths: the same equalities as the CPU suite, on a GPU (skipped where there is none).

Run on a lent GPU by benchmarks/gpu_check.sh (`pytest -m gpu`). They cover what the CPU suite
cannot: SDPA's CUDA kernels with GQA and a cache mask, bf16 decoding, the compiled decode step
with CUDA graphs, `gpt2 train` with autocast, fused AdamW, pinned-memory prefetch and
torch.compile, NCCL for DDP and FSDP, and checkpoints written on a GPU read back by eval and
generate.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from gpt2cli.generate import Generator
from gpt2cli.metrics import read_metrics
from gpt2cli.model import GPT
from gpt2cli.specs import GenerateSpec, ModelSpec
from tests.conftest import record_attention_shapes, run_gpt2

# GPT2_GPU_TEST_DEVICE=cpu runs the same checks on the CPU: a dry run of this module's logic
# before spending GPU time on it.
DEVICE = os.environ.get("GPT2_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

VARIANTS = [(attn, pos) for attn in ("mha", "gqa", "mqa") for pos in ("learned", "rope")]


def random_model(attn: str = "mha", pos: str = "learned", seed: int = 0) -> GPT:
    """Small, every tensor random with std 0.1: decisive logits, no near-ties in greedy decoding."""
    spec = ModelSpec(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=64, attn=attn, pos=pos,
                     n_kv_head=2 if attn == "gqa" else None)
    torch.manual_seed(seed)
    model = GPT(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("attn,pos", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_logits_equal_full_forward_on_cuda(attn, pos, dtype):
    """Prefill in two chunks, then single tokens through the cache: every position's logits match
    one full pass (fp32 to rounding; bf16 within its precision), and both match the CPU in fp32."""
    model = random_model(attn, pos)
    idx = torch.randint(0, 512, (3, 40))
    with torch.no_grad():
        reference = model(idx).double()  # CPU fp32
        model = model.to(DEVICE, dtype)
        x = idx.to(DEVICE)
        full = model(x)
        model.setup_kv_cache(batch_size=3, dtype=dtype, device=DEVICE)
        parts = [model(x[:, :10], torch.arange(10, device=DEVICE)),
                 model(x[:, 10:16], torch.arange(10, 16, device=DEVICE))]
        parts += [model(x[:, t:t + 1], torch.tensor([t], device=DEVICE)) for t in range(16, 40)]
        cached = torch.cat(parts, dim=1)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.isfinite(cached).all()
    assert relative_error(cached, full) < tolerance
    assert relative_error(full.cpu(), reference) < tolerance


@pytest.mark.parametrize("attn,pos", [("mha", "learned"), ("gqa", "rope")])
def test_greedy_generation_on_cuda_equals_cpu_and_recomputation(attn, pos):
    prompt = torch.randint(0, 512, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    spec = GenerateSpec(temperature=0.0, max_new_tokens=30, num_samples=2, ignore_eos=True)
    cpu = Generator(random_model(attn, pos), device="cpu", dtype="fp32").generate(prompt, spec)
    gen = Generator(random_model(attn, pos), device=DEVICE, dtype="fp32")
    cached, full = gen.generate(prompt, spec), gen.generate(prompt, spec, use_cache=False)
    tokens = [s.tokens for s in cpu.samples]
    assert [s.tokens for s in cached.samples] == tokens == [s.tokens for s in full.samples]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "top-k-top-p"])
def test_compiled_decode_with_cuda_graphs_equals_eager(sampled):
    """torch.compile(mode="reduce-overhead") records the decode step, model and draw, as a CUDA
    graph; a second call with the same shapes replays it. Tokens equal the eager generator's, call
    after call, with the default 16 steps queued per read and with a read per step."""
    prompt = torch.randint(0, 512, (5,), generator=torch.Generator().manual_seed(2)).tolist()
    spec = GenerateSpec(temperature=0.9 if sampled else 0.0, top_k=40, top_p=0.9, max_new_tokens=40, num_samples=2,
                        seed=4, ignore_eos=True)
    eager = Generator(random_model("gqa", "rope"), device=DEVICE, dtype="fp32").generate(prompt, spec)
    compiled = Generator(random_model("gqa", "rope"), device=DEVICE, dtype="fp32", compile=True)
    first, second = compiled.generate(prompt, spec), compiled.generate(prompt, spec)
    per_token = compiled.generate(prompt, spec.model_copy(update={"sync_every": 1}))
    expected = [s.tokens for s in eager.samples]
    assert [s.tokens for s in first.samples] == expected == [s.tokens for s in second.samples]
    assert [s.tokens for s in per_token.samples] == expected
    assert first.compiled


def test_eager_cuda_decoding_keeps_one_key_length(monkeypatch):
    """On CUDA every eager decode step attends over the whole cache buffer: one shape per call, so
    that an attention kernel that plans per shape (cuDNN) plans once, not once per token."""
    gen = Generator(random_model(), device=DEVICE, dtype="bf16")
    seen = record_attention_shapes(monkeypatch)
    gen.generate([1, 2, 3, 4], GenerateSpec(temperature=0.0, max_new_tokens=6, ignore_eos=True))
    decode_keys = {keys for queries, keys in seen if queries == 1}
    assert len(decode_keys) == (1 if torch.device(DEVICE).type == "cuda" else 5)


def test_bf16_sampling_on_cuda_is_reproducible():
    model = random_model("mqa", "rope")
    gen = Generator(model, device=DEVICE, dtype="bf16")
    spec = GenerateSpec(temperature=1.0, top_k=50, top_p=0.9, max_new_tokens=20, num_samples=3, seed=5,
                        ignore_eos=True)
    a, b = gen.generate([1, 2, 3], spec), gen.generate([1, 2, 3], spec)
    assert [s.tokens for s in a.samples] == [s.tokens for s in b.samples]
    assert a.dtype == "bfloat16" and all(0 <= t < 512 for s in a.samples for t in s.tokens)


def test_hf_export_matches_transformers_on_cuda(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gpt2cli.model.hf import export_hf

    model = GPT(ModelSpec(preset="tiny"))
    export_hf(model, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").to(DEVICE).eval()
    idx = torch.randint(0, 50257, (2, 48), device=DEVICE)
    with torch.no_grad():
        ours = model.to(DEVICE).eval()(idx)
        theirs = hf(idx).logits
    assert relative_error(ours, theirs) < 1e-4


# ---------------------------------------------------------------------------- the real command


def train_rows(run: Path, kind: str = "train") -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == kind]


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, cache_dir) -> Path:
    """`gpt2 train` on the GPU with its defaults there: bf16 autocast, fused AdamW, torch.compile."""
    run = tmp_path_factory.mktemp("gpu") / "run"
    run_gpt2("train", "--preset", "tiny", "--device", DEVICE, "--steps", "60", "--batch-size", "16",
             "--seq-len", "64", "--eval-every", "30", "--eval-tokens", "4096", "--log-every", "10",
             "--save-every", "30", "--out", str(run), "--quiet", check=True, timeout=600)
    return run


def test_train_on_cuda_learns_and_records_the_device(cuda_run):
    rows = train_rows(cuda_run)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    status = json.loads((cuda_run / "status.json").read_text())
    assert status["status"] == "completed", status
    spec = json.loads((cuda_run / "spec.json").read_text())
    assert spec["train"]["device"] == DEVICE


def test_resume_on_cuda_continues_the_run(cuda_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cuda_run, run)
    proc = run_gpt2("train", "--preset", "tiny", "--device", DEVICE, "--steps", "80", "--batch-size", "16",
                    "--seq-len", "64", "--eval-every", "30", "--eval-tokens", "4096", "--log-every", "10",
                    "--save-every", "30", "--out", str(run), "--resume", "auto", "--quiet", timeout=600)
    assert proc.returncode == 0, proc.stderr
    steps = [r["step"] for r in train_rows(run)]
    assert steps == sorted(set(steps)) and steps[-1] == 80 and 70 in steps


def test_eval_and_generate_read_a_gpu_checkpoint(cuda_run):
    proc = run_gpt2("eval", str(cuda_run / "best.pt"), "--device", DEVICE, "--format", "json", check=True)
    assert math.isfinite(json.loads(proc.stdout)["results"][0]["loss"])
    proc = run_gpt2("generate", str(cuda_run / "best.pt"), "ROMEO:", "--device", DEVICE, "--compile",
                    "--max-new-tokens", "24", "--seed", "3", "--format", "jsonl", check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert rows and rows[0]["tokens"] >= 1 and rows[0]["finish_reason"] in ("length", "eos")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ddp_and_fsdp_on_one_gpu_train(strategy, tmp_path, cuda_run):
    run = tmp_path / strategy
    procs = ["--gpus", "1"] if DEVICE == "cuda" else ["--nproc", "1", "--device", DEVICE]
    proc = run_gpt2("train", "--preset", "tiny", "--strategy", strategy, *procs, "--no-compile",
                    "--steps", "60", "--batch-size", "16", "--seq-len", "64", "--eval-every", "30",
                    "--eval-tokens", "4096", "--log-every", "10", "--out", str(run), "--quiet", timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = train_rows(run)
    assert rows[-1]["step"] == 60 and all(math.isfinite(r["loss"]) for r in rows)
    # The single-device run's curve (same seed, data order and schedule), up to bf16 and compile noise.
    single = {r["step"]: r["loss"] for r in train_rows(cuda_run)}
    for r in rows:
        assert abs(r["loss"] - single[r["step"]]) < 0.15, (r, single)


# ------------------------------------------------------------------------------------ HellaSwag


def test_hellaswag_on_cuda_scores_as_on_the_cpu():
    """The ending losses on the GPU equal the CPU's in fp32 (the same choices) and stay within
    bf16's precision under autocast, as `gpt2 eval --task hellaswag --device cuda` runs them."""
    from gpt2cli.hellaswag import Example, encode_examples, score_examples
    from gpt2cli.train import autocast_context
    from tests.test_generate import tiny_gpt2
    from tests.test_hellaswag import ending_losses, shakespeare_examples

    examples = [Example(r["ctx"], tuple(r["endings"]), r["label"]) for r in shakespeare_examples(12, seed=2)]
    encoded = encode_examples(examples, block_size=64)
    model = tiny_gpt2(seed=4)
    on_cpu = score_examples(model, encoded, batch_size=5)
    rows = [row for e in encoded for row in e.rows]
    starts = [s for e in encoded for s in e.starts]
    cpu_sums, _ = ending_losses(model, rows, starts)
    model.to(DEVICE)
    on_device = score_examples(model, encoded, batch_size=5)
    assert (on_device.correct, on_device.correct_norm) == (on_cpu.correct, on_cpu.correct_norm)
    device = torch.device(DEVICE)
    bf16_sums, _ = ending_losses(model, rows, starts, autocast=lambda: autocast_context(device, torch.bfloat16))
    assert relative_error(bf16_sums, cpu_sums) < 2e-2


@pytest.mark.skipif(DEVICE != "cuda", reason="CPU offload is an FSDP setting for CUDA")
def test_fsdp_with_cpu_offload_evaluates_on_the_gpu(tmp_path, cache_dir):
    """Under --fsdp-cpu-offload the parameters live on the CPU between uses: the eval batches
    (val loss and HellaSwag) must still go to the GPU."""
    from tests.test_hellaswag import shakespeare_examples, write_jsonl

    hellaswag = write_jsonl(tmp_path / "hs.jsonl", shakespeare_examples(6))
    run = tmp_path / "offload"
    proc = run_gpt2("train", "--preset", "tiny", "--strategy", "fsdp", "--gpus", "1", "--fsdp-cpu-offload",
                    "--no-compile", "--steps", "4", "--batch-size", "8", "--seq-len", "64", "--eval-every", "2",
                    "--eval-tokens", "1024", "--hellaswag", str(hellaswag), "--out", str(run), "--quiet", timeout=600)
    assert proc.returncode == 0, proc.stderr
    evals = train_rows(run, "eval")
    assert [r["step"] for r in evals] == [2, 4]
    assert all(math.isfinite(r["val_loss"]) and r["hellaswag_examples"] == 6 for r in evals)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch 2.9+")
def test_muon_on_cuda_learns_with_compile_and_bf16(tmp_path, cache_dir):
    """The GPU defaults (torch.compile, bf16 autocast) with Muon for the matrices and fused AdamW
    for the rest: finite, learning, and a resume continues it."""
    run = tmp_path / "muon"
    common = ["train", "--preset", "tiny", "--device", DEVICE, "--optimizer", "muon", "--batch-size", "16",
              "--seq-len", "64", "--eval-every", "20", "--eval-tokens", "4096", "--log-every", "5",
              "--save-every", "20", "--out", str(run), "--quiet"]
    run_gpt2(*common, "--steps", "40", check=True, timeout=600)
    rows = train_rows(run)
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"] - 1.0
    run_gpt2(*common, "--steps", "50", "--resume", "auto", check=True, timeout=600)
    assert [r["step"] for r in train_rows(run)][-1] == 50
