"""Best val loss against a swept setting, one line per `gpt2 compare --group-by FIELD --format json`
file (mean ± std over seeds, single runs as dots). Used for docs/experiments/rope-gqa.md:

    gpt2 compare RUNS... --group-by optim.lr --format json > baseline.json
    python scripts/plot_sweep.py baseline.json:"GPT-2" rope-gqa.json:"RoPE + GQA" --field optim.lr \\
        --out docs/figures/lr-sweep-cpu.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", help="FILE.json:LABEL")
    ap.add_argument("--field", default="optim.lr")
    ap.add_argument("--metric", default="best_val_loss")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ticks: set[float] = set()
    for item in a.inputs:
        path, _, label = item.partition(":")
        data = json.loads(Path(path).read_text())
        points = sorted((c["spec"][a.field], c["metrics"][a.metric]) for c in data["columns"])
        xs = [x for x, _ in points]
        ticks.update(xs)
        line = ax.errorbar(xs, [m["mean"] for _, m in points], yerr=[m["std"] for _, m in points], marker="o",
                           capsize=3, label=f"{label or path} (mean ± std)")
        for x, m in points:
            ax.plot([x] * len(m["values"]), m["values"], ".", color=line[0].get_color(), alpha=0.4, ms=4)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel(a.field)
    ax.set_ylabel(a.metric.replace("_", " "))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=120)
    print(f"figure: {a.out}")


if __name__ == "__main__":
    main()
