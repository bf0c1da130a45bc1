"""Documentation that is generated from code stays in step with it."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_specs_reference_is_up_to_date():
    spec = importlib.util.spec_from_file_location("gen_specs_doc", REPO / "scripts" / "gen_specs_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (REPO / "docs" / "specs.md").read_text(encoding="utf-8") == module.render(), (
        "docs/specs.md is stale: run `python scripts/gen_specs_doc.py`"
    )
