"""`prepare_data`: every source kind, the validation split, determinism, atomicity, bad input."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from gpt2cli.data import prepare as prep
from gpt2cli.data.prepare import ValidationSelector, default_data_dir, prepare_data, split_text
from gpt2cli.data.shards import TokenFolder, fingerprint_files, is_token_folder
from gpt2cli.errors import UserError
from gpt2cli.fsutil import HOST
from gpt2cli.specs import PrepareSpec
from gpt2cli.tokenizer import EOT_ID, encode

SHAKESPEARE = (resources.files("gpt2cli") / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")
DOCS = [f"Document number {i}. " + "All the world's a stage. " * (i % 5 + 1) for i in range(20)]


def prepare(tmp_path: Path, *sources: str | Path, name: str = "out", **settings) -> TokenFolder:
    spec = PrepareSpec(sources=[str(s) for s in sources], out=str(tmp_path / name), **settings)
    return TokenFolder(prepare_data(spec))


def expected_splits(docs: list[str], fraction: float = 0.1) -> dict[str, list[int]]:
    """The documented rule: document i is validation when floor((i+1)f) > floor(i f)."""
    out: dict[str, list[int]] = {"train": [], "val": []}
    selector = ValidationSelector(fraction)
    for i, doc in enumerate(docs):
        out["val" if selector.is_validation(i) else "train"] += encode(doc) + [EOT_ID]
    return out


def tokens_of(folder: TokenFolder, split: str) -> list[int]:
    return np.asarray(folder.tokens(split)).tolist()


def write_jsonl(path: Path, docs: list[str], column: str = "text") -> Path:
    path.write_text("".join(json.dumps({"id": i, column: d}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


# ------------------------------------------------------------------------- embedded corpus

def test_embedded_corpus(tmp_path):
    folder = prepare(tmp_path)
    train, val = folder.tokens("train"), folder.tokens("val")
    assert train.dtype == np.uint16
    # one document: 338,025 text tokens plus its <|endoftext|>, split by position as nanoGPT does
    assert folder.num_tokens("train") + folder.num_tokens("val") == 338_025 + 1
    assert (folder.num_tokens("train"), folder.num_tokens("val")) == (301_966, 36_060)
    assert int(val[-1]) == EOT_ID and EOT_ID not in np.asarray(train)
    assert tokens_of(folder, "train") == encode(SHAKESPEARE[:1_003_854])
    assert folder.num_bytes("train") + folder.num_bytes("val") == len(SHAKESPEARE.encode())
    meta = folder.meta
    assert meta["split_by"] == "position" and meta["documents"] == 1
    assert meta["tokenizer"] == {"name": "gpt2", "ranks_sha256": prep.RANKS_SHA256, "eot_id": 50256}
    assert meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    assert meta["source"][0]["kind"] == "embedded"
    assert meta["spec"]["out"] == str(tmp_path / "out") and meta["spec"]["num_proc"] >= 1
    assert meta["fingerprint"] == fingerprint_files(folder.path, folder.splits) == folder.fingerprint
    assert "created_at" in meta


def test_default_data_dir_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_CACHE_DIR", str(tmp_path / "cache"))
    first = default_data_dir()
    assert first.parent == tmp_path / "cache" and first.name.startswith("tinyshakespeare-")
    assert TokenFolder(first).num_tokens("train") == 301_966
    stamp = (first / "meta.json").stat().st_mtime_ns
    assert default_data_dir() == first and (first / "meta.json").stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary folders left


def test_default_data_dir_from_several_processes_at_once(tmp_path):
    """Like torchrun ranks: every process gets the same complete folder, nothing is left over."""
    env = {**os.environ, "GPT2_CACHE_DIR": str(tmp_path)}
    code = "from gpt2cli.data import default_data_dir; print(default_data_dir())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    paths = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1
    (path,) = paths
    assert is_token_folder(path)
    assert [p.name for p in tmp_path.iterdir()] == [Path(path).name]


# ------------------------------------------------------------------------------- sources

def test_text_files_folder_and_glob(tmp_path):
    src = tmp_path / "src"
    (src / "b").mkdir(parents=True)
    (src / "a.txt").write_text(DOCS[0])
    (src / "b" / "c.md").write_text(DOCS[1])
    (src / "b" / "d.txt.gz").write_bytes(gzip.compress(DOCS[2].encode()))
    (src / ".hidden.txt").write_text("never read")
    (src / "notes.pdf").write_bytes(b"%PDF")  # other types in a folder are skipped
    # 3 documents are fewer than 1 / val_fraction: the last one goes to validation
    want = {"train": encode(DOCS[0]) + [EOT_ID] + encode(DOCS[1]) + [EOT_ID], "val": encode(DOCS[2]) + [EOT_ID]}

    by_folder = prepare(tmp_path, src, name="folder")
    assert {s: tokens_of(by_folder, s) for s in by_folder.splits} == want
    assert by_folder.meta["documents"] == 3
    assert by_folder.num_documents("train") == 2 and by_folder.num_documents("val") == 1

    by_glob = prepare(tmp_path, src / "**" / "*.*", name="glob")
    assert by_glob.fingerprint == by_folder.fingerprint
    one_file = prepare(tmp_path, src / "a.txt", name="file", val_fraction=0.0)
    assert one_file.splits == ["train"] and tokens_of(one_file, "train") == encode(DOCS[0]) + [EOT_ID]


def test_a_source_folder_holding_its_own_output_is_prepared_again(tmp_path, monkeypatch):
    """`gpt2 data .` writes data/<name> below the folder it reads; the next run must not read
    that folder's meta.json as a corpus (it did: "record 0 has no column 'text'")."""
    project = tmp_path / "proj"
    project.mkdir()
    (project / "some.txt").write_text(DOCS[0])
    monkeypatch.chdir(project)
    first = TokenFolder(prepare_data(PrepareSpec(sources=["."])))
    assert first.path == Path("data/proj")
    (project / "data" / ".proj.tmp-elsewhere-1-abcd").mkdir()  # another host's staging folder
    (project / "data" / ".proj.tmp-elsewhere-1-abcd" / "half.txt").write_text("never read")
    again = TokenFolder(prepare_data(PrepareSpec(sources=["."], overwrite=True)))
    assert again.fingerprint == first.fingerprint and again.meta["source"] == [{"kind": "text", "path": "some.txt"}]
    by_glob = TokenFolder(prepare_data(PrepareSpec(sources=["**/*.*"], out="by-glob")))  # matches data/proj/meta.json
    assert by_glob.fingerprint == first.fingerprint and by_glob.meta["documents"] == 1

    for source in ("data/proj", "data/proj/meta.json"):
        with pytest.raises(UserError, match="'data/proj' holds token files written by `gpt2 data`, not text"):
            prepare_data(PrepareSpec(sources=[source], out="elsewhere"))
    with pytest.raises(UserError, match="holds no .* files \\(folders written by `gpt2 data` are not read\\)"):
        prepare_data(PrepareSpec(sources=["data"], out="elsewhere"))
    with pytest.raises(UserError, match="no .* files match 'data/\\*/\\*'"):
        prepare_data(PrepareSpec(sources=["data/*/*"], out="elsewhere"))
    assert not Path("elsewhere").exists()


def test_links_to_folders_are_followed_and_each_folder_is_read_once(tmp_path):
    root = tmp_path / "lnk"
    (root / "real").mkdir(parents=True)
    (tmp_path / "ext").mkdir()
    (root / "real" / "r.txt").write_text(DOCS[0])
    (tmp_path / "ext" / "x.txt").write_text(DOCS[1])
    (root / "linked").symlink_to("../ext")
    want = [{"kind": "text", "path": str(root / "linked" / "x.txt")}, {"kind": "text", "path": str(root / "real" / "r.txt")}]
    by_folder = prepare(tmp_path, root, name="folder", val_fraction=0.0)
    assert by_folder.meta["source"] == want  # the order of the walk: linked/ before real/
    assert tokens_of(by_folder, "train") == encode(DOCS[1]) + [EOT_ID] + encode(DOCS[0]) + [EOT_ID]
    by_glob = prepare(tmp_path, root / "**" / "*.txt", name="glob", val_fraction=0.0)
    assert by_glob.fingerprint == by_folder.fingerprint

    # loops back to an ancestor, and a second way into a folder read already: each folder once
    (root / "real" / "up").symlink_to("..")
    (tmp_path / "ext" / "back").symlink_to("../lnk")
    (root / "same-again").symlink_to("real")
    looped = prepare(tmp_path, root, name="looped", val_fraction=0.0)
    assert looped.meta["source"] == want and looped.fingerprint == by_folder.fingerprint
    # ** as well: glob.glob went round real/up 40 times (every file read again each time), and
    # with two such links took time exponential in that depth
    (root / "real" / "up-too").symlink_to("../..")
    looped_glob = prepare(tmp_path, root / "**" / "*.txt", name="looped-glob", val_fraction=0.0)
    assert looped_glob.meta["source"] == want and looped_glob.fingerprint == by_folder.fingerprint


def test_jsonl_json_and_gzip(tmp_path):
    want = expected_splits(DOCS)
    assert len(want["val"]) > 0 and want["val"][-1] == EOT_ID
    jsonl = prepare(tmp_path, write_jsonl(tmp_path / "c.jsonl", DOCS), name="jsonl")
    assert {s: tokens_of(jsonl, s) for s in jsonl.splits} == want
    assert jsonl.num_documents("val") == 2 and jsonl.num_documents("train") == 18  # documents 9 and 19

    (tmp_path / "c.json").write_text(json.dumps([{"text": d} for d in DOCS]))
    assert prepare(tmp_path, tmp_path / "c.json", name="json").fingerprint == jsonl.fingerprint
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress((tmp_path / "c.jsonl").read_bytes()))
    assert prepare(tmp_path, tmp_path / "c.jsonl.gz", name="gz").fingerprint == jsonl.fingerprint

    other = prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", DOCS, column="body"), name="col", text_column="body")
    assert other.fingerprint == jsonl.fingerprint


@pytest.mark.parametrize("name, damage", [
    ("notgz.txt.gz", lambda data: b"not gzip at all"),
    ("cut.txt.gz", lambda data: data[: len(data) // 2]),  # cut short: EOFError deep in the read
    ("cut.jsonl.gz", lambda data: data[: len(data) // 2]),
])
def test_a_damaged_gzip_source_is_one_error_naming_it(tmp_path, name, damage):
    whole = gzip.compress("\n".join(json.dumps({"text": d}) for d in DOCS * 200).encode())
    (tmp_path / name).write_bytes(damage(whole))
    with pytest.raises(UserError, match=rf"{name} is not a whole gzip file"):
        prepare(tmp_path, tmp_path / name)
    assert not (tmp_path / "out").exists()


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": DOCS, "n": list(range(len(DOCS)))}), tmp_path / "c.parquet", row_group_size=7)
    folder = prepare(tmp_path, tmp_path / "c.parquet", text_column="content")
    assert {s: tokens_of(folder, s) for s in folder.splits} == expected_splits(DOCS)


def test_saved_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))})
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds.select(range(5)), "test": ds}).save_to_disk(str(tmp_path / "dict"))
    folder = prepare(tmp_path, tmp_path / "saved", name="a")
    assert {s: tokens_of(folder, s) for s in folder.splits} == expected_splits(DOCS)
    assert folder.meta["source"] == [{"kind": "saved_dataset", "path": str(tmp_path / "saved")}]
    assert prepare(tmp_path, tmp_path / "dict", name="b", split="test").fingerprint == folder.fingerprint


def test_several_sources_in_order(tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0])
    write_jsonl(tmp_path / "b.jsonl", DOCS[1:])
    folder = prepare(tmp_path, tmp_path / "a.txt", tmp_path / "b.jsonl")
    assert {s: tokens_of(folder, s) for s in folder.splits} == expected_splits(DOCS)


# ------------------------------------------------------------------ limits and splitting

def test_max_docs_and_max_tokens(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", DOCS)
    few = prepare(tmp_path, path, name="few", max_docs=10, val_fraction=0.0)
    assert few.meta["documents"] == 10 and tokens_of(few, "train") == expected_splits(DOCS[:10], 0.0)["train"]
    capped = prepare(tmp_path, path, name="capped", max_tokens=100, val_fraction=0.0)
    train = tokens_of(capped, "train")
    assert len(train) == 100 and train[-1] == EOT_ID  # the last document is cut and still ended
    single = prepare(tmp_path, name="single", max_tokens=1000)  # one document: cut, then split
    assert single.num_tokens("train") + single.num_tokens("val") == 1000


def test_max_tokens_too_small_for_any_document_says_so(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", DOCS)
    message = bad(tmp_path, path, max_tokens=1)
    assert message == ("Error: --max-tokens 1 leaves no room for a document: the shortest takes 2 tokens (one of text "
                       "and <|endoftext|>) (pass --max-tokens 2 or more)")
    assert prepare(tmp_path, path, max_tokens=2, val_fraction=0.0).num_tokens("train") == 2


def test_an_empty_training_split_is_refused(tmp_path):
    (tmp_path / "tiny.txt").write_text("hi")  # one token: the position split gives it to validation
    message = bad(tmp_path, tmp_path / "tiny.txt")
    assert message == (f"Error: the training split would be empty: {tmp_path / 'tiny.txt'} gives 1 token of text, and "
                       "--val-fraction 0.1 sends all of it to validation (give more text, or pass a smaller "
                       "--val-fraction, such as 0 for no validation split)")
    (tmp_path / "two.txt").write_text(DOCS[0])
    message = bad(tmp_path, tmp_path / "two.txt", max_tokens=2)
    assert "gives 1 token of text within --max-tokens 2" in message and "(raise --max-tokens, or pass" in message
    assert tokens_of(prepare(tmp_path, tmp_path / "tiny.txt", val_fraction=0.0), "train") == encode("hi") + [EOT_ID]


def test_one_document_gives_validation_at_least_its_last_token(tmp_path):
    """The position split takes the last f of the bytes; a fraction too small to move a whole token
    still gives validation the last one, as several documents give it at least the last document."""
    (tmp_path / "a.txt").write_text("hello world")
    folder = prepare(tmp_path, tmp_path / "a.txt", val_fraction=1e-17)
    assert tokens_of(folder, "train") == encode("hello")
    assert tokens_of(folder, "val") == encode(" world") + [EOT_ID]


def test_validation_selector_spreads_documents_evenly():
    chosen = [i for i in range(100) if ValidationSelector(0.1).is_validation(i)]
    assert chosen == list(range(9, 100, 10))
    assert sum(ValidationSelector(0.3).is_validation(i) for i in range(1000)) == 300
    assert not any(ValidationSelector(0.0).is_validation(i) for i in range(100))


def test_split_text_keeps_tokens_identical():
    pieces = split_text(SHAKESPEARE, 997)
    assert len(pieces) > 1000 and "".join(pieces) == SHAKESPEARE
    assert [t for piece in pieces for t in encode(piece)] == encode(SHAKESPEARE)
    tricky = "word  \n  spaced\t\ttabs\n\nnew  lines 'll  123 456 ünï  🤖🤖 " * 300
    pieces = split_text(tricky, 50)
    assert len(pieces) > 10 and [t for p in pieces for t in encode(p)] == encode(tricky)


def test_small_pieces_and_batches_give_the_same_output(tmp_path, monkeypatch):
    reference = prepare(tmp_path, name="ref", num_proc=1)
    monkeypatch.setattr(prep, "PIECE_CHARS", 3000)
    monkeypatch.setattr(prep, "BATCH_CHARS", 20_000)
    chunked = prepare(tmp_path, name="chunked", num_proc=2)
    assert chunked.fingerprint == reference.fingerprint


# ------------------------------------------------------------------ determinism, atomicity

def test_second_run_is_byte_identical(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", DOCS * 5)
    first = prepare(tmp_path, path, name="one")
    second = prepare(tmp_path, path, name="two", num_proc=1)
    for split in first.splits:
        name = f"{split}.bin"
        assert (first.path / name).read_bytes() == (second.path / name).read_bytes()

    def stable(meta):
        return {k: v for k, v in meta.items() if k not in ("created_at", "spec")}

    assert stable(first.meta) == stable(second.meta)
    again = prepare_data(PrepareSpec(sources=[str(path)], out=str(first.path), overwrite=True))
    assert TokenFolder(again).fingerprint == first.fingerprint


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    prepare(tmp_path, name="out")
    with pytest.raises(UserError, match="already exists"):
        prepare(tmp_path, name="out")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    (tmp_path / "mine" / "meta.json").write_text('{"about": "my own notes"}')  # a meta.json, but not ours
    with pytest.raises(UserError, match="not a folder written by `gpt2 data`"):
        prepare(tmp_path, name="mine", overwrite=True)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    assert prepare(tmp_path, name="empty").num_tokens("train") == 301_966


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_CHARS", 50_000)
    monkeypatch.setattr(prep, "PIECE_CHARS", 10_000)
    calls = []

    def interrupt(event):
        calls.append(event)
        if len(calls) == 3:
            raise KeyboardInterrupt

    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare_data(PrepareSpec(out=str(out)), progress=interrupt)
    assert calls[0].tokens > 0 and calls[1].documents >= 0
    assert not out.exists() and not is_token_folder(out)
    assert list(tmp_path.iterdir()) == []  # no temporary folder, and the parents it made are gone


def test_killed_run_never_looks_complete(tmp_path):
    """A staging folder left by a killed process is hidden and has no meta.json."""
    path = write_jsonl(tmp_path / "c.jsonl", [SHAKESPEARE] * 20)
    code = (
        "import os, sys\n"
        "from gpt2cli.data import prepare as p\n"
        "from gpt2cli.specs import PrepareSpec\n"
        "p.BATCH_CHARS = 100_000\n"
        "def die(event):\n"
        "    if event.tokens > 500_000: os._exit(9)\n"
        f"p.prepare_data(PrepareSpec(sources=[{str(path)!r}], out={str(tmp_path / 'out')!r}), progress=die)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert not (tmp_path / "out").exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name != "c.jsonl"]
    assert leftovers and all(p.name.startswith(".out.tmp-") for p in leftovers)
    assert not any(is_token_folder(p) or (p / "meta.json").exists() for p in leftovers)
    # The next run to the same folder removes what the dead process left, and only that.
    live = tmp_path / f".out.tmp-{HOST}-{os.getpid()}-abcd"
    other_host = tmp_path / ".out.tmp-elsewhere-1-abcd"
    live.mkdir(), other_host.mkdir()
    prepare_data(PrepareSpec(sources=[str(path)], out=str(tmp_path / "out")))
    assert is_token_folder(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".out.tmp-elsewhere-1-abcd", live.name, "c.jsonl",
                                                                 "out"])


# -------------------------------------------------------------------------- bad input

def bad(tmp_path, *sources, **settings) -> str:
    with pytest.raises(UserError) as info:
        prepare(tmp_path, *sources, **settings)
    assert not (tmp_path / "out").exists()
    message = info.value.render()
    assert "\n" not in message
    return message


def test_bad_inputs(tmp_path, monkeypatch):
    assert "no such file or folder: 'missing.txt'" in bad(tmp_path, "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    assert "no text found" in bad(tmp_path, tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    message = bad(tmp_path, tmp_path / "latin1.txt")
    assert "latin1.txt is not UTF-8" in message and "--errors replace" in message
    replaced = prepare(tmp_path, tmp_path / "latin1.txt", name="ok", errors="replace", val_fraction=0.0)
    assert replaced.num_tokens("train") == len(encode("caf\ufffd")) + 1
    write_jsonl(tmp_path / "c.jsonl", ["x"], column="body")
    assert "no column 'text' (columns: id, body)" in bad(tmp_path, tmp_path / "c.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    assert "broken.jsonl line 2 is not valid JSON" in bad(tmp_path, tmp_path / "broken.jsonl")
    (tmp_path / "table.csv").write_text("text\nhello\n")
    assert "unknown file type '.csv'" in bad(tmp_path, tmp_path / "table.csv")
    assert "files match" in bad(tmp_path, tmp_path / "*.nothing")
    (tmp_path / "nothing").mkdir()
    assert "holds no .txt" in bad(tmp_path, tmp_path / "nothing")


def test_missing_parquet_column_lists_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a"], "n": [1]}), tmp_path / "c.parquet")
    assert "no column 'text' (columns: content, n)" in bad(tmp_path, tmp_path / "c.parquet")
    assert "holds int64 values, not text" in bad(tmp_path, tmp_path / "c.parquet", text_column="n")


def test_hub_name_offline_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    message = bad(tmp_path, "someone/some_dataset")
    assert message.startswith(
        "Error: no local file or folder 'someone/some_dataset', and no Hugging Face dataset of that name is reachable "
        "(offline mode is on: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE; not in the local Hugging Face cache either)"
    ), message
    assert message.endswith("(check the path; for a Hub dataset, unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)")


def test_lone_surrogates_do_not_crash(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"text": "bad \\ud800 surrogate"}\n')
    folder = prepare(tmp_path, tmp_path / "s.jsonl", val_fraction=0.0)
    assert folder.num_tokens("train") > 1


# --------------------------------------------------------------------------- TokenFolder

def test_token_folder_validation(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        TokenFolder(tmp_path / "nope")
    with pytest.raises(UserError, match="not a prepared data folder"):
        TokenFolder(tmp_path)
    folder = prepare(tmp_path)
    with pytest.raises(UserError, match="no split 'test'"):
        folder.tokens("test")
    with open(folder.path / "val.bin", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(UserError, match="incomplete or damaged"):
        TokenFolder(folder.path)


def test_a_double_star_glob_matches_what_glob_glob_matches_where_no_link_loops(tmp_path):
    """Without links, the walk behind ** gives glob.glob's matches: hidden names only where the
    pattern names them, ** as zero or more folders, DIR/** including DIR."""
    import glob
    import random

    rng = random.Random(0)
    for tree in range(8):
        root = tmp_path / f"tree{tree}"
        for _ in range(20):
            folder = root.joinpath(*(rng.choice(["a", "b", ".h", "c.d"]) for _ in range(rng.randint(0, 3))))
            folder.mkdir(parents=True, exist_ok=True)
            (folder / rng.choice(["x.txt", "y.md", ".z.txt", "w"])).write_text("t")
        for pattern in ("**/*.txt", "**", "a/**/*.txt", "**/a/*", "*/**/*.md", "**/.h/*.txt", "a/**", "**/[ab]/?.*",
                        "*/b/**/*.txt"):
            full = root / pattern
            assert prep._glob(full) == sorted(glob.glob(str(full), recursive=True)), pattern


def test_a_double_star_glob_finds_a_folder_also_when_a_link_to_it_comes_first(tmp_path):
    """Only a link back to a folder of its own path is cut: a folder reached first through a
    link is still searched under its own name, and a file found under both names is read once."""
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "b").mkdir()
    (tmp_path / "data" / "b" / "x.txt").write_text(DOCS[0])
    (tmp_path / "data" / "a" / "link").symlink_to("../b")
    assert prep._glob(tmp_path / "data" / "**" / "b" / "*.txt") == [str(tmp_path / "data" / "b" / "x.txt")]
    assert prep._glob(tmp_path / "data" / "**" / "*.txt") == [str(tmp_path / "data" / "a" / "link" / "x.txt")]
