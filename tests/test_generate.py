"""`gpt2 generate` and gpt2cli.generate: KV-cached decoding equals full recomputation, sampling
settings, stop rules, streaming, output formats, Hugging Face folders and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpt2cli.checkpoint import save_checkpoint
from gpt2cli.errors import UserError
from gpt2cli.generate import Generator, TextStream, sample_next
from gpt2cli.model import GPT, kv_cache_bytes_per_token
from gpt2cli.specs import GenerateSpec, ModelSpec, TrainSpec, spec_to_json
from gpt2cli.tokenizer import EOT_ID, encode
from tests.conftest import random_hf_gpt2, record_attention_shapes, run_gpt2

VARIANTS = [(attn, pos) for attn in ("mha", "gqa", "mqa") for pos in ("learned", "rope")]


# ------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models decode faster on one thread, and far faster on a busy machine, where a second
    OpenMP thread waits for a core at every small op. Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_model(attn: str = "mha", pos: str = "learned", *, seed: int = 0, std: float = 0.1, **fields) -> GPT:
    """A small GPT with every tensor random (std 0.1: decisive logits, no near-ties)."""
    base = {"vocab_size": 512, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 32}
    spec = ModelSpec(**{**base, **fields, "attn": attn, "pos": pos, "n_kv_head": 2 if attn == "gqa" else None})
    torch.manual_seed(seed)
    model = GPT(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def save_model(model: GPT, path: Path, **extra) -> Path:
    """A checkpoint as `gpt2 train` writes best.pt: the TrainSpec as JSON and the full state dict."""
    spec = TrainSpec(model=model.spec.model_dump())
    save_checkpoint(path, {"spec": spec_to_json(spec), "model": model.state_dict(), "step": 2, **extra})
    return path


def tiny_gpt2(attn: str = "mha", pos: str = "learned", seed: int = 0) -> GPT:
    """The tiny preset (GPT-2 vocabulary, context 64), random weights: text in, text out."""
    return random_model(attn, pos, seed=seed, std=0.05, **{k: v for k, v in ModelSpec(preset="tiny").shape_fields().items()
                                                          if k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_model(tiny_gpt2(), tmp_path_factory.mktemp("gen") / "best.pt")


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run `gpt2 ...` in this process (same entry point as the console script)."""
    from gpt2cli.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def one_error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error:"), (code, err)
    return lines[0]


def greedy(**kw) -> GenerateSpec:
    return GenerateSpec(temperature=0.0, **kw)


# -------------------------------------------------------------------- cache == recomputation


@pytest.mark.parametrize("attn,pos", VARIANTS)
def test_greedy_cached_decoding_equals_full_recomputation(attn, pos):
    gen = Generator(random_model(attn, pos), device="cpu", dtype="fp32")
    prompt = torch.randint(0, 512, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    spec = greedy(max_new_tokens=20, num_samples=2, ignore_eos=True)
    cached = gen.generate(prompt, spec)
    full = gen.generate(prompt, spec, use_cache=False)
    assert cached.window_slides == 0 and cached.cache_bytes > 0
    assert [s.tokens for s in cached.samples] == [s.tokens for s in full.samples]
    assert len(cached.samples[0].tokens) == 20 and cached.samples[0].tokens == cached.samples[1].tokens
    # beyond the context (32): the sliding window re-encodes, with and without the cache alike
    spec = greedy(max_new_tokens=50, ignore_eos=True)
    cached, full = gen.generate(prompt, spec), gen.generate(prompt, spec, use_cache=False)
    assert cached.window_slides == full.window_slides >= 2
    assert cached.samples[0].tokens == full.samples[0].tokens and len(cached.samples[0].tokens) == 50


def test_cache_holds_only_kv_heads():
    mha = Generator(random_model("mha"), device="cpu", dtype="fp32").generate([1, 2], greedy(max_new_tokens=2))
    gqa = Generator(random_model("gqa"), device="cpu", dtype="fp32").generate([1, 2], greedy(max_new_tokens=2))
    assert mha.cache_bytes_per_token == 2 * 2 * 4 * 8 * 4 and gqa.cache_bytes_per_token == mha.cache_bytes_per_token // 2


# ------------------------------------------------------------------------------- sampling


def test_same_seed_same_text_and_another_seed_another():
    gen = Generator(tiny_gpt2(), device="cpu", dtype="fp32")
    spec = GenerateSpec(max_new_tokens=12, temperature=1.0, top_k=None, num_samples=2, seed=7)
    a, b = gen.generate("Once upon a time", spec), gen.generate("Once upon a time", spec)
    assert [s.completion for s in a.samples] == [s.completion for s in b.samples]
    assert a.samples[0].tokens != a.samples[1].tokens  # the batch rows draw differently
    c = gen.generate("Once upon a time", spec.model_copy(update={"seed": 8}))
    assert [s.tokens for s in c.samples] != [s.tokens for s in a.samples]


def test_top_k_and_top_p_restrict_the_draw():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    uniform = torch.rand(2000, 4, generator=torch.Generator().manual_seed(0))
    assert set(sample_next(logits, 1.0, top_k=2, uniform=uniform).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.6, uniform=uniform).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.5, uniform=uniform).tolist()) == {0}
    assert set(sample_next(logits, 1.0, top_p=1.0, uniform=uniform).tolist()) == {0, 1, 2, 3}
    assert set(sample_next(logits, 0.0).tolist()) == {0}
    with pytest.raises(ValueError, match="uniform noise"):
        sample_next(logits, 1.0)


@pytest.mark.parametrize("temperature", [1e-3, 1e-38, 1e-45])
def test_a_tiny_temperature_tends_to_greedy(temperature):
    """logits / T overflowed for T below about 1e-38: every positive logit became +inf and the
    lowest token id won. As T goes to 0 the draw must become the argmax."""
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.5, -2.0, 4.0, 4.5]])
    uniform = torch.rand(logits.shape, generator=torch.Generator().manual_seed(0))
    for top_k, top_p in ((None, None), (2, None), (None, 0.9)):
        assert sample_next(logits, temperature, top_k, top_p, uniform).tolist() == [1, 3]


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.5, None), (2.0, 3)])
def test_gumbel_draw_follows_the_tempered_softmax(temperature, top_k):
    """The Gumbel-max draw has the distribution softmax(logits / T) over the kept tokens: observed
    frequencies of 40,000 draws within 0.01 of the exact probabilities."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 40_000
    uniform = torch.rand(n, 4, generator=torch.Generator().manual_seed(3))
    tokens = sample_next(torch.log(p).repeat(n, 1), temperature, top_k=top_k, uniform=uniform)
    expected = p ** (1 / temperature)
    if top_k is not None:
        expected[top_k:] = 0
    expected /= expected.sum()
    observed = torch.bincount(tokens, minlength=4).double() / n
    assert (observed - expected.double()).abs().max() < 0.01, (observed, expected)


# ------------------------------------------------------------------------ ending and streaming


def test_stop_string_ends_a_sample_and_is_never_streamed():
    gen = Generator(tiny_gpt2(), device="cpu", dtype="fp32")
    free = gen.generate("The", greedy(max_new_tokens=30)).samples[0]
    assert free.finish_reason == "length" and len(free.completion) > 12
    stop = free.completion[8:11]
    expected = free.completion[: free.completion.find(stop)]
    pieces: list[str] = []
    result = gen.generate("The", greedy(max_new_tokens=30, stop=["never-there", stop]),
                          on_text=lambda i, t: pieces.append(t)).samples[0]
    assert result.finish_reason == "stop" and result.completion == expected
    assert "".join(pieces) == expected and result.num_tokens < 30


def rigged_eos_model() -> GPT:
    """Greedy decoding picks <|endoftext|> at once: ln_f adds a bias along the EOT embedding."""
    model = tiny_gpt2()
    with torch.no_grad():
        direction = torch.randn(model.spec.n_embd, generator=torch.Generator().manual_seed(3))
        direction /= direction.norm()
        model.transformer.wte.weight[EOT_ID] = 2.0 * direction
        model.transformer.ln_f.bias.copy_(10.0 * direction)
    return model


def test_eos_ends_a_sample_unless_ignored():
    gen = Generator(rigged_eos_model(), device="cpu", dtype="fp32")
    ended = gen.generate("Hello", greedy(max_new_tokens=10)).samples[0]
    assert (ended.finish_reason, ended.completion, ended.tokens) == ("eos", "", [EOT_ID])
    kept = gen.generate("Hello", greedy(max_new_tokens=10, ignore_eos=True)).samples[0]
    assert kept.finish_reason == "length" and kept.num_tokens == 10 and "<|endoftext|>" in kept.completion


def test_streaming_never_splits_a_character_nor_shows_a_partial_stop():
    ids = encode("a€🙂 b\n\nc")
    assert len(ids) > len("a€🙂 b\n\nc") - 3  # the emoji and € span several byte-level tokens
    pieces: list[str] = []
    stream = TextStream(0, ["\n\n"], ignore_eos=False, on_text=lambda i, t: pieces.append(t))
    for t in ids:
        stream.add(t)
        if stream.done:
            break
    assert stream.finish_reason == "stop" and stream.text == "a€🙂 b"
    assert "".join(pieces) == "a€🙂 b" and all("\ufffd" not in p and "\n" not in p for p in pieces)
    # Without a stop the partial character is held back, then flushed whole.
    pieces.clear()
    stream = TextStream(0, [], ignore_eos=False, on_text=lambda i, t: pieces.append(t))
    emoji = encode("🙂")
    for t in emoji[:-1]:
        stream.add(t)
    assert pieces == []
    stream.add(emoji[-1])
    stream.end("length")
    assert pieces == ["🙂"] and stream.finish_reason == "length"


def test_queued_steps_give_the_samples_of_per_token_reads():
    """sync_every > 1 (the accelerator default) reads tokens back in groups: same tokens,
    finish reasons and streamed text as reading every token, across stop strings, <|endoftext|>,
    samples of different lengths in one batch and window slides."""
    model = tiny_gpt2()
    spec = GenerateSpec(max_new_tokens=100, temperature=1.0, top_k=50, num_samples=3, seed=11)
    free = Generator(model, device="cpu", dtype="fp32").generate("The", spec)
    text = free.samples[1].completion
    stop = next(text[i:i + 4] for i in range(20, len(text))  # ends sample 1 alone, early
                if all(text[i:i + 4] not in s.completion for s in (free.samples[0], free.samples[2])))

    def run(sync_every: int, model: GPT, spec: GenerateSpec):
        pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
        result = Generator(model, device="cpu", dtype="fp32").generate(
            "The", spec.model_copy(update={"sync_every": sync_every}), on_text=lambda i, t: pieces[i].append(t))
        assert all("".join(pieces[s.index]) == s.completion for s in result.samples)
        return [(s.tokens, s.finish_reason, s.completion) for s in result.samples], result

    stopped = spec.model_copy(update={"stop": [stop]})
    per_token, one = run(1, model, stopped)
    grouped, seven = run(7, model, stopped)
    assert grouped == per_token and per_token[1][1] == "stop"
    assert any(reason == "length" for _, reason, _ in per_token) and one.window_slides >= 1
    assert seven.decode_steps >= one.decode_steps  # steps past the end are computed, never shown
    assert run(7, model, spec)[0] == run(1, model, spec)[0]
    eos, _ = run(7, rigged_eos_model(), greedy(max_new_tokens=40, num_samples=3))
    assert eos == [([EOT_ID], "eos", "")] * 3


def test_progress_is_told_at_every_hand_over():
    seen: list[int] = []
    spec = greedy(max_new_tokens=20, ignore_eos=True, sync_every=6)
    result = Generator(tiny_gpt2(), device="cpu", dtype="fp32").generate("The", spec, on_progress=seen.append)
    assert seen == [6, 12, 18, 20] and result.samples[0].num_tokens == 20


def test_compiled_step_samples_like_eager():
    """--compile puts the model step and the draw (top-k, top-p, Gumbel noise) in one graph: the
    same tokens as eager, greedy and sampled, call after call, with queued steps."""
    prompt = [1, 2, 3, 4, 5]
    compiled = Generator(random_model("gqa", "rope"), device="cpu", dtype="fp32", compile=True)
    for spec in (greedy(max_new_tokens=40, num_samples=2, ignore_eos=True, sync_every=4),
                 GenerateSpec(temperature=0.9, top_k=20, top_p=0.9, max_new_tokens=40, num_samples=2, seed=3,
                              ignore_eos=True, sync_every=4)):
        eager = Generator(random_model("gqa", "rope"), device="cpu", dtype="fp32").generate(prompt, spec)
        first, second = compiled.generate(prompt, spec), compiled.generate(prompt, spec)
        assert [s.tokens for s in first.samples] == [s.tokens for s in eager.samples] == [s.tokens for s in second.samples]
        # the first call of a setting compiles, and that time is kept out of its rates; the second reuses the graph
        assert first.compile_s > 0 and second.compile_s == 0 and eager.compile_s == 0
        assert first.total_s < first.compile_s  # compiling took longer than the rest of the call
    assert first.compiled and first.samples[0].tokens != first.samples[1].tokens


def test_a_compiled_generator_compiles_once_per_cache_growth_not_per_prompt_length():
    """An interactive session sends prompts of any length, back and forth. The compiled step's
    cache only grows (in steps of 64 positions), so 12 calls of 7 lengths compile 3 times (caches
    of 64, 128 and 160 positions), never hit dynamo's recompile limit (8 by default), and give
    eager's tokens every time."""
    model = random_model("gqa", "rope", block_size=160)
    compiled = Generator(model, device="cpu", dtype="fp32", compile=True)
    eager = Generator(random_model("gqa", "rope", block_size=160), device="cpu", dtype="fp32")
    spec = greedy(max_new_tokens=20, ignore_eos=True)
    compiles = []
    for length in (3, 70, 3, 70, 5, 9, 100, 3, 130, 3, 70, 40):
        prompt = [(7 * i) % 500 + 1 for i in range(length)]
        result = compiled.generate(prompt, spec)
        assert result.samples[0].tokens == eager.generate(prompt, spec).samples[0].tokens, length
        compiles.append(result.compile_s > 0)
    assert compiles == [True, True] + [False] * 6 + [True] + [False] * 3


def test_prompt_longer_than_the_context_is_refused_and_output_slides():
    gen = Generator(tiny_gpt2(), device="cpu", dtype="fp32")
    with pytest.raises(UserError, match="no room left"):
        gen.generate(list(range(65)), greedy(max_new_tokens=1))
    result = gen.generate(list(range(64)), greedy(max_new_tokens=40, ignore_eos=True))  # a full prompt
    assert result.samples[0].num_tokens == 40 and result.window_slides >= 1


# ------------------------------------------------------------------------------- the command


def test_text_output_streams_prompt_and_completion(ckpt, capsys):
    code, out, err = cli(capsys, "generate", ckpt, "Hello there", "-n", "8", "--seed", "1", "-v")
    assert code == 0 and out.startswith("Hello there") and out.endswith("\n")
    assert "tokens/s" in err and "bytes per token" in err and "best.pt" in err
    code, out2, _ = cli(capsys, "generate", ckpt.parent, "Hello there", "-n", "8", "--seed", "1", "--no-echo")
    assert code == 0 and out == "Hello there" + out2  # a run folder means its best.pt


def test_jsonl_schema(ckpt, capsys):
    code, out, err = cli(capsys, "generate", ckpt, "Hi", "-n", "6", "--num-samples", "3", "--format", "jsonl",
                         "--temperature", "1.2", "--top-p", "0.9", "--stop", "zzz")
    assert code == 0 and "tokens/s" in err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert set(r) == {"index", "prompt", "completion", "prompt_tokens", "tokens", "finish_reason", "tokens_per_s"}
        assert r["prompt"] == "Hi" and r["prompt_tokens"] == 1 and 1 <= r["tokens"] <= 6
        assert r["finish_reason"] in ("length", "eos", "stop") and r["tokens_per_s"] > 0


def test_set_with_or_without_the_generate_prefix_and_top_k_zero(ckpt, capsys, tmp_path):
    """--set generate.field=value (the form every help shows) and field=value set the same; top_k 0
    is "no limit" from the flag, --set or a config file; the timing line counts 1 token, not 1 tokens."""
    (tmp_path / "g.toml").write_text("top_k = 0\n")
    outs = set()
    for extra in (["--set", "generate.max_new_tokens=3", "--top-k", "0"], ["--set", "max_new_tokens=3", "--set",
                  "top_k=0"], ["-n", "3", "--config", tmp_path / "g.toml"]):
        code, out, err = cli(capsys, "generate", ckpt, "Hi", "--seed", "4", "--format", "jsonl", *extra)
        assert code == 0, err
        row = json.loads(out)
        assert row["tokens"] <= 3 and row["prompt_tokens"] == 1 and "(prefill 1 token " in err
        outs.add(row["completion"])
    assert len(outs) == 1


def test_prompt_from_stdin_and_file(ckpt, capsys, monkeypatch, tmp_path):
    import io

    (tmp_path / "p.txt").write_text("From a file", encoding="utf-8")
    code, out, _ = cli(capsys, "generate", ckpt, "--prompt-file", tmp_path / "p.txt", "-n", "3", "-t", "0")
    assert code == 0 and out.startswith("From a file")
    monkeypatch.setattr("sys.stdin", io.StringIO("From stdin"))
    code, out, _ = cli(capsys, "generate", ckpt, "-", "-n", "3", "-t", "0")
    assert code == 0 and out.startswith("From stdin")


def test_interactive_samples_every_line_as_a_one_off_call_would(ckpt, capsys):
    """--interactive: each line of stdin is a prompt (\\n a newline in it); the output equals the
    one-off calls', one after another; a prompt that cannot be sampled (here, bytes that are not
    UTF-8 and a prompt past the context) is one Error line and the session goes on to the end of
    input, exit 0. Through the real command, so that stdin is bytes as a user's is."""
    import os
    import subprocess

    from tests.conftest import gpt2_command

    args = ["-n", "5", "--seed", "3", "--ignore-eos"]  # sampled: each prompt as its one-off call, seed and all
    expected = ""
    for prompt in ("Hello there", "ROMEO:\nO", "The end"):
        code, out, _ = cli(capsys, "generate", ckpt, prompt, *args)
        assert code == 0
        expected += out
    too_long = " ".join(["word"] * 100)  # the tiny model's context is 64 tokens
    lines = b"Hello there\n\xff\xfe\nROMEO:\\nO\n" + too_long.encode() + b"\nThe end"  # no final newline
    proc = subprocess.run([*gpt2_command(), "generate", str(ckpt), "--interactive", *args], input=lines,
                          capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == expected
    errors = [line for line in proc.stderr.decode().splitlines() if line.startswith("Error:")]
    assert len(errors) == 2 and "not UTF-8" in errors[0] and "more than the model's context" in errors[1]
    assert proc.stderr.decode().count(" tokens/s (prefill") == 3  # a timing line per sampled prompt

    code, _, err = cli(capsys, "generate", ckpt, "Hi", "--interactive")
    assert "--interactive reads its prompts from stdin" in one_error_line(code, err)


def test_interactive_ctrl_c_on_a_terminal_stops_the_sample_and_asks_again(ckpt):
    """On a terminal: "> " asks for a prompt; Ctrl-C stops an endless sample (--ignore-eos, the
    window slides) and asks for the next prompt; Ctrl-D ends the session, exit 0."""
    import os
    import pty
    import select
    import time

    from tests.conftest import gpt2_command

    pid, fd = pty.fork()
    if pid == 0:  # the child: the real command on the terminal's other end
        os.execv(gpt2_command()[0], [*gpt2_command(), "generate", str(ckpt), "-i", "-n", "1000000", "--ignore-eos"])
    seen, after = b"", 0  # the output so far; where the last marker found ends

    def read_until(marker: bytes, timeout: float = 60.0) -> None:
        """Read until ``marker`` shows after the previous one (it may have come with it)."""
        nonlocal seen, after
        deadline = time.monotonic() + timeout
        while (found := seen.find(marker, after)) < 0:
            assert time.monotonic() < deadline, f"no {marker!r} in {seen[-500:]!r}"
            if select.select([fd], [], [], 0.1)[0]:
                seen += os.read(fd, 65536)
        after = found + len(marker)

    try:
        read_until(b"> ")
        os.write(fd, b"Hello\n")
        read_until(b"Hello")
        time.sleep(0.5)  # sampling, endlessly
        os.write(fd, b"\x03")  # Ctrl-C
        read_until(b"(stopped)")
        read_until(b"> ")
        os.write(fd, b"\x04")  # Ctrl-D: end of input
        _, status = os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert b"Traceback" not in seen and b"Aborted" not in seen


def test_hf_folder_generates_like_transformers(tmp_path, capsys):
    pytest.importorskip("transformers")
    hf = random_hf_gpt2(0.1)
    hf.save_pretrained(tmp_path / "hf")
    prompt = "The quick brown fox"
    ids = torch.tensor([encode(prompt)])
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                             do_sample=False, pad_token_id=EOT_ID)[0, ids.shape[1]:].tolist()
    code, out, err = cli(capsys, "generate", tmp_path / "hf", prompt, "-n", "12", "-t", "0", "--ignore-eos",
                         "--format", "jsonl", "-v")
    assert code == 0, err
    assert "Hugging Face GPT-2 folder" in err
    from gpt2cli.tokenizer import decode

    assert json.loads(out)["completion"] == decode(theirs)


# --------------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_exit_2(ckpt, tmp_path, capsys):
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    cases = {
        "does not exist": ["generate", tmp_path / "missing.pt", "Hi"],
        "damaged": ["generate", damaged, "Hi"],
        "not a gpt2 checkpoint": ["generate", tmp_path / "notes.txt", "Hi"],
        "top_p": ["generate", ckpt, "Hi", "--top-p", "1.5"],
        "--top-p": ["generate", ckpt, "Hi", "--top-p", "0"],
        "--temperature": ["generate", ckpt, "Hi", "--temperature", "-0.5"],
        "--max-new-tokens": ["generate", ckpt, "Hi", "--max-new-tokens", "0"],
        "--sync-every": ["generate", ckpt, "Hi", "--sync-every", "0"],
        "--top-k": ["generate", ckpt, "Hi", "--top-k", "-1"],
        "--stop (stop): a stop string must not be empty": ["generate", ckpt, "Hi", "--stop", ""],
        "no room left": ["generate", ckpt, "word " * 70],
        "not both": ["generate", ckpt, "Hi", "--prompt-file", tmp_path / "notes.txt"],
    }
    for needle, args in cases.items():
        code, out, err = cli(capsys, *args)
        assert needle in one_error_line(code, err), (needle, err)
        assert out == ""


def test_a_batch_beyond_the_memory_left_is_refused_before_anything_is_allocated(monkeypatch):
    import gpt2cli.generate as generate_module

    gen = Generator(tiny_gpt2(), device="cpu", dtype="fp32")
    spec = greedy(max_new_tokens=8)
    per_sample = gen.bytes_per_sample(2, spec, cache_len=10)
    # the estimate covers at least the cache and the fp32 logits of one sample
    assert per_sample > kv_cache_bytes_per_token(gen.spec, 4) * 10 + 4 * gen.spec.vocab_size
    assert gen.bytes_per_sample(2, GenerateSpec(max_new_tokens=8, top_p=0.9), 10) > per_sample  # sorting costs more
    monkeypatch.setattr(generate_module, "available_memory_bytes", lambda: 5 * per_sample + 1)
    with pytest.raises(UserError) as exc:
        gen.generate([11, 12], spec.model_copy(update={"num_samples": 6}))
    assert "use --num-samples 5 or fewer" in exc.value.render()
    assert gen._cache_key is None  # refused before the cache was made
    result = gen.generate([11, 12], spec.model_copy(update={"num_samples": 5}))
    assert len(result.samples) == 5 and all(s.num_tokens == 8 for s in result.samples)
    # Not one sample fits because of its length (beyond the context only the output grows): say -n.
    with pytest.raises(UserError) as exc:
        gen.generate([11, 12], greedy(max_new_tokens=10**12))
    assert exc.value.render().startswith("Error: 1 sample of 1,000,000,000,002 tokens needs about")
    assert "ask for fewer tokens with --max-new-tokens (-n)" in exc.value.render()


def test_real_command_ctrl_c_says_aborted_and_exits_130(ckpt):
    import os
    import signal
    import subprocess

    from tests.conftest import gpt2_command

    proc = subprocess.Popen([*gpt2_command(), "generate", str(ckpt), "Hi", "-n", "100000", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        # os.read: a buffered read could take text past "Hi" that communicate() then never sees
        assert os.read(proc.stdout.fileno(), 2) == b"Hi"  # echoed once decoding is under way
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err == b"Aborted.\n", (proc.returncode, err)
    assert out.endswith(b"\n")  # the text so far, ended: "Aborted." starts its own line


def test_ctrl_c_while_decoding_keeps_what_was_sampled():
    """A KeyboardInterrupt mid-decoding (here from inside a hand-over, the worst place) returns
    the samples so far, ended as "interrupted", each with every token sampled before the stop."""
    gen = Generator(random_model(), device="cpu", dtype="fp32")
    spec = GenerateSpec(max_new_tokens=40, num_samples=2, seed=3, ignore_eos=True)
    full = gen.generate([5, 6], spec)
    pieces = []

    def on_text(index: int, piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 9:
            raise KeyboardInterrupt

    cut = gen.generate([5, 6], spec, on_text)
    assert cut.interrupted and not full.interrupted
    assert {s.finish_reason for s in cut.samples} == {"interrupted"}
    for short, whole in zip(cut.samples, full.samples, strict=True):
        assert 0 < short.num_tokens < whole.num_tokens
        assert short.tokens == whole.tokens[: short.num_tokens]  # the same draws, cut off


def test_real_command_ctrl_c_in_jsonl_writes_the_rows_so_far(ckpt):
    import os
    import signal
    import subprocess
    import time

    from tests.conftest import gpt2_command

    proc = subprocess.Popen([*gpt2_command(), "generate", str(ckpt), "Hi", "-n", "100000", "--device", "cpu",
                             "--format", "jsonl", "--num-samples", "2", "-v"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stderr.readline().startswith("model: ")  # loaded; the prefill takes milliseconds
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err == "Aborted.\n", (proc.returncode, err)
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    assert all(r["finish_reason"] == "interrupted" and 0 < r["tokens"] < 100000 for r in rows), rows


def test_real_command_into_a_closed_pipe_stops_quietly_like_a_sigpipe(ckpt):
    """`gpt2 generate ... | head`: the reader goes away, sampling stops at the next token, and the
    command ends as a process killed by SIGPIPE would (141), with nothing on stderr."""
    import os
    import subprocess

    from tests.conftest import gpt2_command

    proc = subprocess.Popen([*gpt2_command(), "generate", str(ckpt), "Hi", "-n", "100000", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout.read(2) == "Hi"
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 141 and err == "", (proc.returncode, err)


def test_real_command_bad_input_has_no_traceback(tmp_path):
    proc = run_gpt2("generate", str(tmp_path / "nope.pt"), "Hi")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("Error: checkpoint")


def test_real_command_refuses_a_prompt_that_is_not_utf8(ckpt):
    """Bytes that are not UTF-8, on stdin or in the argument (which Python turns into lone
    surrogates), are one line and exit 2, like a --prompt-file of them, not a traceback or
    mangled text and invalid JSON."""
    import os
    import subprocess

    from tests.conftest import gpt2_command

    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}  # strict, as under an ordinary UTF-8 locale
    stdin = subprocess.run([*gpt2_command(), "generate", str(ckpt), "-", "-n", "2"], input=b"\xff\xfe bad",
                           capture_output=True, env=env, timeout=120)
    argv = subprocess.run([*gpt2_command(), "generate", str(ckpt), os.fsdecode(b"a\xffb"), "-n", "2",
                           "--format", "jsonl"], capture_output=True, env=env, timeout=120)
    for proc, what in ((stdin, "the prompt on stdin"), (argv, "the prompt argument")):
        err = proc.stderr.decode()
        assert proc.returncode == 2 and proc.stdout == b"" and err.count("\n") == 1, err
        assert err.startswith(f"Error: {what} is not UTF-8 text"), err


def test_real_command_unknown_device_is_one_line_exit_2(ckpt):
    proc = run_gpt2("generate", str(ckpt), "Hi", "--device", "tpu")
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("Error: invalid settings: --device (device): must be auto, cpu, cuda, cuda:N or mps, "
                                  "got 'tpu'")


def test_eager_cpu_decoding_attends_over_the_filled_slots_only(monkeypatch):
    """Each CPU decode step's keys are the tokens so far, not the whole cache buffer."""
    gen = Generator(random_model(), device="cpu", dtype="fp32")
    seen = record_attention_shapes(monkeypatch)
    gen.generate([1, 2, 3, 4], GenerateSpec(temperature=0.0, max_new_tokens=6, ignore_eos=True))
    n_layer = gen.model.spec.n_layer
    decode_keys = [keys for queries, keys in seen[n_layer:]][::n_layer]  # first layer of each step
    assert seen[0] == (4, 4)  # prefill
    assert decode_keys == [5, 6, 7, 8, 9]


def test_weights_holding_nan_or_inf_are_refused_before_sampling(tmp_path, capsys):
    """A safetensors file carries no digest, so nothing else would catch such values, and a NaN
    model samples its first token again and again with exit 0 (plan T19)."""
    from gpt2cli.loading import save_safetensors

    model = tiny_gpt2(seed=4)
    with torch.no_grad():
        model.transformer.h[0].attn.c_proj.weight[3, 5] = float("nan")
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("inf")
    for path in (save_safetensors(model, tmp_path / "nan.safetensors"), save_model(model, tmp_path / "nan.pt")):
        code, out, err = cli(capsys, "generate", path, "ROMEO:", "-n", 4, "--device", "cpu")
        line = one_error_line(code, err)
        assert line.startswith("Error: the weights of ") and repr(str(path)) in line and "hold NaN or inf (1 of " in line
        assert "transformer.h.0.attn.c_proj.weight" in line and out == ""


def test_loading_a_model_imports_neither_dynamo_nor_dtensor():
    """Start-up time of generate, eval and export: building a model on the meta device (as every
    load does) and resolving the device import neither torch._dynamo (1.5 s, through a meta-device
    normal_ or power) nor DTensor (0.8 s, through torch.distributed.checkpoint)."""
    import subprocess
    import sys

    code = ("import sys\nfrom gpt2cli.loading import build_model\nfrom gpt2cli.model import GPT\n"
            "from gpt2cli.parallel.base import resolve_device\nfrom gpt2cli.specs import ModelSpec\n"
            "for pos in ('learned', 'rope'):\n"
            "    spec = ModelSpec(preset='tiny', pos=pos)\n"
            "    build_model(spec, GPT(spec).state_dict(), 'x', device=resolve_device('cpu'))\n"
            "print([m for m in ('torch._dynamo', 'torch.distributed.tensor') if m in sys.modules])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
