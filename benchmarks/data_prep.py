"""End-to-end speed of `gpt2 data` on a JSONL corpus of document-sized records (not a test).

Builds a corpus of at least --mb megabytes from the embedded tiny Shakespeare text in a temporary
folder (records of 1-8 KB, cut at line ends, each repetition starting at a different offset so
that records differ), then runs the same code path as `gpt2 data corpus.jsonl` and prints the
throughput. Usage:

    .venv/bin/python benchmarks/data_prep.py [--mb 24] [--num-proc N] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path

from gpt2cli.data.prepare import default_workers, prepare_data
from gpt2cli.data.shards import TokenFolder
from gpt2cli.specs import PrepareSpec


def build_corpus(path: Path, min_bytes: int, seed: int = 0) -> tuple[int, int]:
    """Write JSONL records of 1-8 KB of Shakespeare until the file holds ``min_bytes``."""
    text = (resources.files("gpt2cli") / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    rng = random.Random(seed)
    written = records = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < min_bytes:
            position = rng.randrange(len(text))
            while position < len(text) and written < min_bytes:
                end = text.find("\n", position + rng.randint(1000, 8000))
                end = len(text) if end < 0 else end + 1
                line = json.dumps({"id": records, "text": text[position:end]}) + "\n"
                fh.write(line)
                written += len(line.encode("utf-8"))
                records += 1
                position = end
    return written, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=24.0, help="corpus size in MB (default 24)")
    parser.add_argument("--num-proc", type=int, default=None, help="tokenizer threads (default: all cores)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the best and the median are reported")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="gpt2-data-bench-"))
    try:
        corpus = workdir / "corpus.jsonl"
        size, records = build_corpus(corpus, int(args.mb * 1e6))
        print(f"corpus: {size / 1e6:.1f} MB, {records:,} JSONL records, in {workdir}")
        print(f"cores: {os.cpu_count()}, tokenizer threads: {args.num_proc or default_workers()}")
        rates = []
        for run in range(args.repeat):
            out = workdir / f"out{run}"
            spec = PrepareSpec(sources=[str(corpus)], out=str(out), num_proc=args.num_proc)
            started = time.perf_counter()
            prepare_data(spec)
            seconds = time.perf_counter() - started
            folder = TokenFolder(out)
            tokens = sum(folder.num_tokens(split) for split in folder.splits)
            rate = tokens / seconds
            print(f"run {run + 1}: {tokens:,} tokens in {seconds:.2f} s = {rate / 1e6:.2f} M tokens/s "
                  f"({size / 1e6 / seconds:.1f} MB/s)")
            rates.append(rate)
            shutil.rmtree(out)
        best, median = max(rates), statistics.median(rates)
        print(f"best: {best / 1e6:.2f} M tokens/s, median {median / 1e6:.2f} M tokens/s of {len(rates)} runs, "
              "end to end (read JSONL, tokenize, write, fingerprint)")
        print(json.dumps({"corpus_mb": round(size / 1e6, 1), "tokens": tokens, "runs": len(rates),
                          "best_tokens_per_s": best, "median_tokens_per_s": median}))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
