"""`TokenFolder` says what is wrong with a meta.json it cannot use."""

from __future__ import annotations

import json

import pytest

from gpt2cli.data.prepare import prepare_data
from gpt2cli.data.shards import TokenFolder
from gpt2cli.errors import UserError
from gpt2cli.specs import PrepareSpec


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("dtype", "int32", "has dtype 'int32', this gpt2 reads token files of dtype 'uint16' "
                           "(prepare the folder again with this version of gpt2)"),
        ("dtype", None, "has no dtype, this gpt2 reads token files of dtype 'uint16'"),
        ("splits", ["train"], "is damaged (no table of splits) (prepare the folder again)"),
    ],
)
def test_meta_json_problems_are_named(tmp_path, key, value, expected):
    (tmp_path / "a.txt").write_text("All the world's a stage.")
    folder = prepare_data(PrepareSpec(sources=[str(tmp_path / "a.txt")], out=str(tmp_path / "tokens")))
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    if value is None:
        del meta[key]
    else:
        meta[key] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError) as info:
        TokenFolder(folder)
    assert str(info.value).startswith(f"{str(meta_path)!r} {expected}"), str(info.value)
