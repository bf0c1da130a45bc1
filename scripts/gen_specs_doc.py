"""Write docs/specs.md from the spec classes (the single source of truth for every setting).

Run `python scripts/gen_specs_doc.py`; tests/test_docs.py fails when the file is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel

from gpt2cli.specs import CompareSpec, EvaluateSpec, GenerateSpec, PrepareSpec, TrainSpec

DOC = Path(__file__).resolve().parents[1] / "docs" / "specs.md"

HEADER = """# Specs reference

Every setting of gpt2 with its default, generated from `gpt2cli/specs.py` by
`python scripts/gen_specs_doc.py` (a test keeps this file in step with the code).

A spec is built as: field defaults < `--config FILE` (TOML, YAML or JSON, same nesting as below)
< command-line flags < `--set section.field=value` (the value is read as YAML: `3e-4`, `true`,
`[0.9, 0.95]`, `null`). The specs of `gpt2 data`, `eval`, `generate` and `compare` have no sections:
there it is `--set field=value` (`--set generate.top_k=50` is taken as `top_k=50`). Unknown keys are
errors. The spec is written to the run folder as `spec.json` and into every checkpoint (settings
whose default is derived at start, such as `optim.warmup` or `train.seq_len`, stay `null` there);
`gpt2 train --spec spec.json` runs one exactly.

Example `run.toml`:

```toml
[model]
preset = "nano"
attn = "gqa"
pos = "rope"

[optim]
lr = 6e-4

[train]
steps = 2000
batch_size = 32
```
"""


def _default(info) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
        return f"`{value!r}`"
    return f"`{info.default!r}`"


def _type(info) -> str:
    text = str(info.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("|", "\\|")


def section(title: str, cls: type[BaseModel], prefix: str = "") -> list[str]:
    lines = [f"## {title}", "", (cls.__doc__ or "").strip(), ""]
    rows, nested = [], []
    for name, info in cls.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            nested.append((name, ann))
            continue
        rows.append(f"| `{prefix}{name}` | {_type(info)} | {_default(info)} | {info.description} |")
    if rows:
        lines += ["| setting | type | default | meaning |", "|---|---|---|---|", *rows, ""]
    for name, sub in nested:
        lines += section(f"`{prefix}{name}`: {sub.__name__}", sub, f"{prefix}{name}.")
    return lines


def render() -> str:
    lines = [HEADER]
    lines += section("gpt2 train: TrainSpec", TrainSpec)
    lines += section("gpt2 data: PrepareSpec", PrepareSpec)
    lines += section("gpt2 eval: EvaluateSpec", EvaluateSpec)
    lines += section("gpt2 generate: GenerateSpec", GenerateSpec)
    lines += section("gpt2 compare: CompareSpec", CompareSpec)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render(), encoding="utf-8")
    sys.stdout.write(f"wrote {DOC}\n")
