"""Decoding speed of `gpt2 generate` vs Hugging Face `generate`, side by side (not a test).

Both run the same random-init GPT-2 124M weights (--preset picks another size; ours initialised
with seed 0, exported with ``export_hf`` and loaded by
``transformers.GPT2LMHeadModel.from_pretrained``), batch 1 (or
--batch N: N sequences of the same prompt decoded together), a 16-token prompt, 256 new tokens,
greedy, no early stop, in the same process. The runs alternate
(ours, HF, ours, HF, ...) after one full-length warm-up call each, so that machine load hits both
alike; medians are reported, and the first call's time apart (compilation and per-shape kernel
planning included: what a one-shot command pays). Tokens/s = batch x new tokens / wall time of the whole call (prefill included).

--compile compiles both sides, so that the compiled rows compare like with like: ours compiles
its decode step (gpt2 generate --compile), and HF runs `generate` the way transformers documents
for fast decoding: a static KV cache (cache_implementation="static") with its forward compiled by
transformers itself (CompileConfig's defaults). The eager rows stay as well. The JSON's
"comparisons" say which of ours is divided by which of HF's; every ratio is of unrounded medians.

    .venv/bin/python benchmarks/generate_speed.py                       # CPU, fp32, 5 runs each
    .venv/bin/python benchmarks/generate_speed.py --device cuda --dtype bf16 --compile
    .venv/bin/python benchmarks/generate_speed.py --preset tiny --new-tokens 8 --repeat 1   # smoke check

Prints a JSON summary, and writes a figure only when --figure names one (so that a run never
overwrites the figures committed in docs/figures/). transformers is needed here only (the
package itself never imports it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_figures import pyplot, save_figure  # noqa: E402

from gpt2cli.generate import Generator  # noqa: E402
from gpt2cli.loading import load_model  # noqa: E402
from gpt2cli.model import GPT  # noqa: E402
from gpt2cli.model.hf import export_hf  # noqa: E402
from gpt2cli.presets import PRESETS  # noqa: E402
from gpt2cli.specs import GenerateSpec, ModelSpec  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# What each timed variant runs, written into the JSON so that a reader of the figures knows.
SIDES = {
    "ours": "gpt2 generate, eager",
    "ours+compile": "gpt2 generate --compile (decode step compiled; CUDA: reduce-overhead graphs, "
                    "CPU: inductor with freezing)",
    "ours-int8": "gpt2 generate --quantize int8, eager (int8 weight-only linear layers)",
    "ours-int8+compile": "gpt2 generate --quantize int8 --compile (int8 weight-only linear layers; CPU: inductor "
                         "without freezing)",
    "hf": "HF generate, eager (dynamic KV cache, its default)",
    "hf+compile": "HF generate, static KV cache, forward compiled by transformers (CompileConfig defaults)",
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="gpt2", choices=list(PRESETS),
                        help="model size (default gpt2, the 124M model; tiny for a quick check)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true",
                        help="also time both sides compiled: ours with a compiled decode step, HF with a "
                             "static cache and its compiled forward")
    parser.add_argument("--sync-every", default="",
                        help="comma list: also time the compiled generator reading tokens back every N steps "
                             "(GenerateSpec.sync_every; the default run uses the device's default)")
    parser.add_argument("--quantize", default="none", choices=["none", "int8"],
                        help="int8: also time ours with int8 weight-only linear layers (gpt2 generate --quantize "
                             "int8), eager and, with --compile, compiled; its ratios to HF's fp weights are "
                             "labelled as not like for like")
    parser.add_argument("--figure", default=None, help="PNG to write (default: no figure)")
    args = parser.parse_args()

    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    # The small presets' context is shorter than prompt + new tokens: widen it (gpt2's 1024 fits).
    block_size = max(PRESETS[args.preset]["block_size"], args.prompt_tokens + args.new_tokens)
    with tempfile.TemporaryDirectory(prefix="gpt2-gen-bench-") as tmp:
        export_hf(GPT(ModelSpec(preset=args.preset, block_size=block_size)), tmp)
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp, dtype=dtype).to(device).eval()
        ours_model = load_model(tmp).model
    hf.generation_config.pad_token_id = 50256
    # name -> extra arguments of hf.generate. The compiled variant is what transformers documents
    # for fast generation: a static cache, which makes generate compile the forward with its
    # CompileConfig (mode reduce-overhead). generate compiles on its own only on accelerators;
    # the config's _compile_all_devices flag (transformers' own switch) lets it compile on a CPU
    # too, as ours does there.
    hf_runs: dict[str, dict] = {"hf": {}}
    if args.compile:
        compile_config = transformers.CompileConfig()
        compile_config._compile_all_devices = True
        hf_runs["hf+compile"] = {"cache_implementation": "static", "compile_config": compile_config}
    # name -> (generator, sync_every); the sync variants share the compiled generator (same graph).
    gens: dict[str, tuple[Generator, int | None]] = {"ours": (Generator(ours_model, device=device, dtype=dtype), None)}
    if args.compile:
        compiled_model = GPT(ours_model.spec)
        compiled_model.load_state_dict(ours_model.state_dict())
        compiled = Generator(compiled_model, device=device, dtype=dtype, compile=True)
        gens["ours+compile"] = (compiled, None)
        for every in (int(v) for v in args.sync_every.split(",") if v.strip()):
            gens[f"ours+compile sync{every}"] = (compiled, every)
    if args.quantize == "int8":
        for name, compile_it in [("ours-int8", False), ("ours-int8+compile", True)][: 1 + args.compile]:
            copy_model = GPT(ours_model.spec)
            copy_model.load_state_dict(ours_model.state_dict())
            gens[name] = (Generator(copy_model, device=device, dtype=dtype, compile=compile_it, quantize="int8"), None)

    prompt = torch.randint(0, 50257, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    spec = GenerateSpec(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True, top_k=None,
                        num_samples=args.batch)
    ids = torch.tensor([prompt] * args.batch, device=device)

    def run_ours(name: str, n: int) -> tuple[float, list[int]]:
        gen, every = gens[name]
        r = gen.generate(prompt, spec.model_copy(update={"max_new_tokens": n, "sync_every": every}))
        return r.total_s + r.compile_s, r.samples[0].tokens  # wall time: a first call's compilation counts

    @torch.inference_mode()
    def run_hf(name: str, n: int) -> tuple[float, list[int]]:
        sync(device)
        t0 = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, num_beams=1, **hf_runs[name])
        sync(device)
        return time.perf_counter() - t0, out[0, len(prompt):].tolist()

    # The first call, at full length, is the warm-up: the allocator, kernels planned or tuned
    # per shape (cuDNN attention plans per key length: an H200's first eager HF call ran at
    # 22 tokens/s against 164 later), and for --compile the compilation itself. It is what a
    # one-shot `gpt2 generate` pays, so it is reported too, apart from the medians.
    # The sync variants share the compiled generator: their warm-up is not a first call.
    t_first, warmed = {}, set()
    for name, (gen, _) in gens.items():
        seconds = run_ours(name, args.new_tokens)[0]
        if id(gen) not in warmed:
            t_first[name] = seconds
            warmed.add(id(gen))
    hf_compile_error = None
    for name in list(hf_runs):
        try:
            t_first[name] = run_hf(name, args.new_tokens)[0]
        except Exception as exc:  # HF's compiled path is third-party: keep the rest of the run measurable
            if name == "hf":
                raise
            # Without HF compiled, the compiled rows can only be set against HF eager: they are
            # labelled so in the JSON (see comparisons), never passed off as like for like.
            hf_compile_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"HF compiled generate failed ({hf_compile_error}); its rows are left out", file=sys.stderr)
            del hf_runs[name]

    times: dict[str, list[float]] = {name: [] for name in [*gens, *hf_runs]}
    tokens: dict[str, list[int]] = {}
    for i in range(args.repeat):
        for name in gens:
            s, toks = run_ours(name, args.new_tokens)
            times[name].append(s)
            tokens[name] = toks
        for name in hf_runs:
            s, toks = run_hf(name, args.new_tokens)
            times[name].append(s)
            tokens[name] = toks
        print(f"run {i + 1}: " + ", ".join(f"{k} {args.batch * args.new_tokens / v[-1]:.1f}" for k, v in times.items())
              + " tokens/s", flush=True)

    rates = {k: [args.batch * args.new_tokens / s for s in v] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}
    same = sum(a == b for a, b in zip(tokens["ours"], tokens["hf"], strict=True))
    first_diff = next((i for i, (a, b) in enumerate(zip(tokens["ours"], tokens["hf"], strict=True)) if a != b), None)
    summary = {
        "preset": args.preset,
        "params": ours_model.num_params(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "batch": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeat": args.repeat,
        "median_tokens_per_s": {k: round(v, 1) for k, v in med.items()},
        "range_tokens_per_s": {k: [round(min(v), 1), round(max(v), 1)] for k, v in rates.items()},
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "compile": args.compile,
        "sides": {k: SIDES[k.split(" ")[0]] + (f", {reads(gens[k][1])}" if k in gens and gens[k][1] else "")
                  for k in times},
        "comparisons": comparisons(med, list(gens), "hf+compile" in hf_runs),
        "int8_speedup": {mode: med[f"ours-int8{suffix}"] / med[f"ours{suffix}"]
                         for mode, suffix in [("eager", ""), ("compiled", "+compile")] if f"ours-int8{suffix}" in med},
        "hf_compile_error": hf_compile_error,
        "greedy_tokens_equal_to_hf": f"{same}/{args.new_tokens}",
        "greedy_tokens_equal_to_hf_eager": {
            k: f"{sum(a == b for a, b in zip(tokens[k], tokens['hf'], strict=True))}/{args.new_tokens}"
            for k in tokens if k != "hf"},
        "first_difference_at": first_diff,
        "first_call_s": {k: round(v, 2) for k, v in t_first.items()},
        "first_call_tokens_per_s": {k: round(args.batch * args.new_tokens / v, 1) for k, v in t_first.items()},
    }
    print(json.dumps(summary, indent=2))
    if args.figure:
        write_figure(summary, rates, Path(args.figure))


def comparisons(med: dict[str, float], ours_names: list[str], hf_compiled: bool) -> list[dict]:
    """Which of ours is divided by which of HF's, with a label that says what each side ran.

    Like for like first: eager against eager, compiled against compiled. Compiled ours against
    eager HF is kept (the figures in docs/benchmarks.md before HF was compiled are of that kind)
    but labelled so."""
    pairs = [("ours", "hf", "ours eager vs HF eager")]
    for name in (n for n in ours_names if n.startswith("ours-int8")):
        # int8 weights against HF's float ones: a user's choice of trade, never a like-for-like figure.
        if name.endswith("+compile"):
            hf = "hf+compile" if hf_compiled else "hf"
            pairs.append((name, hf, f"ours int8 compiled vs HF {'compiled' if hf_compiled else 'eager'} "
                                    "(float weights: not like for like)"))
        else:
            pairs.append((name, "hf", "ours int8 eager vs HF eager (float weights: not like for like)"))
    for name in (n for n in ours_names if n != "ours" and not n.startswith("ours-int8")):
        every = name.removeprefix("ours+compile").removeprefix(" sync")
        ours = f"ours compiled, {reads(int(every))}" if every else "ours compiled"
        if hf_compiled:
            pairs.append((name, "hf+compile", f"{ours} vs HF compiled (static cache)"))
        pairs.append((name, "hf", f"{ours} vs HF eager"))
    return [{"ours": o, "hf": h, "label": label, "ratio": med[o] / med[h]} for o, h, label in pairs]


def reads(every: int) -> str:
    """How often the compiled generator reads tokens back (GenerateSpec.sync_every), in words."""
    return "a read per token" if every == 1 else f"a read every {every} tokens"


def write_figure(summary: dict, rates: dict[str, list[float]], path: Path) -> None:
    plt = pyplot()
    names = list(rates)
    labels = {"ours": "gpt2 generate", "ours+compile": "gpt2 generate --compile", "hf": "HF generate (eager)",
              "ours-int8": "gpt2 generate --quantize int8", "ours-int8+compile": "... --quantize int8 --compile",
              "hf+compile": "HF generate (static cache, compiled)"}
    fig, ax = plt.subplots(figsize=(6, 3.2))
    colors = {"ours": "#4c72b0", "ours+compile": "#55a868", "ours-int8": "#8172b2", "ours-int8+compile": "#937860", "hf": "#c44e52", "hf+compile": "#dd8452"}
    meds = [statistics.median(rates[n]) for n in names]
    top = max(max(v) for v in rates.values())
    ax.barh([labels.get(n, n) for n in names], meds, color=[colors.get(n, "gray") for n in names])
    for i, n in enumerate(names):
        ax.plot(rates[n], [i] * len(rates[n]), "k.", ms=4)
        ax.text(max(rates[n]) + top * 0.02, i, f"median {meds[i]:.1f}", va="center", fontsize=8)
    ax.set_xlabel("tokens/s (median; dots: single runs)")
    ax.set_title(
        f"{summary['preset']} ({summary['params'] / 1e6:.0f}M), batch {summary['batch']}, {summary['prompt_tokens']}+{summary['new_tokens']} tokens, {summary['dtype']}, "
        f"{summary['device']} ({summary['threads']} threads)",
        fontsize=8,
    )
    ax.set_xlim(0, top * 1.35)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
