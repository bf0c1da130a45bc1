"""Prefill time of our generator: one new token after prompts of several lengths and batches.

    .venv/bin/python benchmarks/prefill_speed.py                 # gpt2 preset, random weights, fp32, CPU
    .venv/bin/python benchmarks/prefill_speed.py --shapes 1:512,1:1000,4:512 --repeat 3

Prints one JSON line per shape: the median of ``--repeat`` calls of ``Generation.prefill_s``.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from gpt2cli.generate import Generator
from gpt2cli.model import GPT
from gpt2cli.specs import GenerateSpec, ModelSpec, build_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--shapes", default="1:512,1:1000,4:512", help="BATCH:PROMPT_TOKENS, comma separated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = GPT(build_spec(ModelSpec, flags={"preset": a.preset})).eval()
    generator = Generator(model, device=a.device, dtype=a.dtype)
    for shape in a.shapes.split(","):
        batch, tokens = (int(v) for v in shape.split(":"))
        prompt = torch.randint(0, 50_000, (tokens,)).tolist()
        spec = GenerateSpec(max_new_tokens=1, temperature=0, num_samples=batch, ignore_eos=True)
        times = [generator.generate(prompt, spec).prefill_s for _ in range(a.repeat)]
        print(json.dumps({"job": "prefill", "preset": a.preset, "batch": batch, "prompt_tokens": tokens,
                          "device": a.device, "dtype": a.dtype, "prefill_ms": round(statistics.median(times) * 1e3, 1)}),
              flush=True)


if __name__ == "__main__":
    main()
