"""How a SOURCE is read as a local path or a Hub name, Hub lookups that fail fast, and empty documents.

Nothing here reaches the internet: the Hub is a closed local port or a fake server on 127.0.0.1.
"""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2cli.data import prepare as prep
from gpt2cli.data.prepare import prepare_data
from gpt2cli.data.shards import TokenFolder
from gpt2cli.errors import UserError
from gpt2cli.specs import PrepareSpec
from gpt2cli.tokenizer import EOT_ID, encode
from tests.conftest import run_gpt2

# Without a network, `datasets` used to retry for ~25 s; a fast failure is the Python start-up,
# the import of `datasets` and one refused connection: a couple of seconds.
FAST_S = 12.0


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def online_env(tmp_path: Path, endpoint: str) -> dict[str, str]:
    """Offline mode off (as for a user with no HF_* settings), the Hub at ``endpoint``."""
    return {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
            "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "GPT2_CACHE_DIR": str(tmp_path / "cache")}


def timed_gpt2(*args: str, cwd: Path, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = run_gpt2(*args, cwd=cwd, env=env, timeout=120)
    return proc, time.monotonic() - started


# ------------------------------------------------------------------ local path or Hub name

@pytest.mark.parametrize("argument", ["src/notez", "src/notez/a.txt", "./src/notez", "./notez_folder", "../notez_gpt2",
                                     "/nonexistent_gpt2/notes", "~/nonexistent_gpt2_notes", "typo_file.txt"])
def test_missing_local_paths_fail_at_once_without_a_hub_lookup(tmp_path, monkeypatch, argument):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()

    def no_lookup(self, spec):
        raise AssertionError(f"{argument!r} was looked up on the Hub")

    monkeypatch.setattr(prep.HuggingFaceDataset, "_load_hub", no_lookup)
    with pytest.raises(UserError) as info:
        prep.resolve_sources(PrepareSpec(sources=[argument]))
    message = str(info.value)
    assert message.startswith(f"no such file or folder: {argument!r} (check the path"), message
    if argument.startswith("src/"):
        assert "'src' exists here, so this is a local path, not a Hugging Face dataset name" in message


@pytest.mark.parametrize("name", ["roneneldan/TinyStories", "wikitext", "HuggingFaceFW/fineweb-edu",
                                  "bigcode/the-stack-v1.1", "notez_folder"])
def test_names_that_are_not_local_paths_go_to_the_hub(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    [source] = prep._argument_sources(name)  # classification only: nothing is loaded
    assert isinstance(source, prep.HuggingFaceDataset) and source.hub_name == name


def test_an_existing_first_component_makes_it_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "roneneldan").mkdir()
    with pytest.raises(UserError, match="'roneneldan' exists here"):
        prep._argument_sources("roneneldan/TinyStories")


# --------------------------------------------------------------------- Hub lookups fail fast

def test_no_network_fails_fast_with_one_line(tmp_path):
    """The review's case: no HF_* settings, no network. It took ~25 s and printed 12 retry lines."""
    (tmp_path / "src").mkdir()
    env = online_env(tmp_path, f"http://127.0.0.1:{closed_port()}")
    proc, seconds = timed_gpt2("data", "notez_folder", "--out", "d", cwd=tmp_path, env=env)
    line = one_error_line(proc)
    assert line.startswith("Error: no local file or folder 'notez_folder', and no Hugging Face dataset of that "
                           "name is reachable (no network: "), line
    assert "not in the local Hugging Face cache either" in line
    assert line.endswith("(check the path; for a Hub dataset, check the network)"), line
    assert "Retry" not in proc.stderr and "Retry" not in proc.stdout
    assert seconds < FAST_S, f"took {seconds:.1f} s"

    proc, seconds = timed_gpt2("data", "src/notez", "--out", "d", cwd=tmp_path, env=env)
    assert "no such file or folder: 'src/notez'" in one_error_line(proc)
    assert seconds < FAST_S, f"took {seconds:.1f} s"
    assert not (tmp_path / "d").exists()


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the Hub does for a dataset that does not exist."""

    requests: list[str] = []

    def _not_found(self) -> None:
        self.requests.append(f"{self.command} {self.path}")
        body = b'{"error": "Repository not found"}'
        self.send_response(401)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = _not_found

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeHub.requests = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_reachable_hub_without_the_dataset_says_both_things(tmp_path, fake_hub):
    proc, seconds = timed_gpt2("data", "someone/nothing_here", "--out", "d", cwd=tmp_path,
                               env=online_env(tmp_path, fake_hub))
    line = one_error_line(proc)
    assert line.startswith(
        "Error: no local file or folder 'someone/nothing_here', and no Hugging Face dataset of that name ("
    ), line
    assert "doesn't exist on the Hub" in line  # datasets' words for the Hub's answer
    assert line.endswith("(check the path or the dataset name; a private or gated dataset needs `hf auth login`)")
    assert seconds < FAST_S, f"took {seconds:.1f} s"
    assert any("someone/nothing_here" in r for r in _FakeHub.requests)  # it did ask the (fake) Hub


_MAKE_CACHE = """
import json, os, shutil, sys
from pathlib import Path
import datasets
home = Path(os.environ["HF_HOME"])
source = home / "rows.jsonl"
source.write_text("".join(json.dumps({"text": t}) + "\\n" for t in json.loads(sys.argv[1])))
datasets.load_dataset("json", data_files=str(source), split="train")
[built] = [p for p in (home / "datasets" / "json").glob("*/*/*") if p.is_dir()]
target = home / "datasets" / "someone___tiny" / "default" / built.parent.name / built.name
shutil.copytree(built, target)
for arrow in target.glob("json-*.arrow"):
    arrow.rename(arrow.with_name("tiny-" + arrow.name[len("json-"):]))
"""


def test_a_cached_hub_dataset_loads_without_network(tmp_path):
    """No network, no HF_HUB_OFFLINE: a dataset in the Hugging Face cache loads at once."""
    texts = [f"cached document number {i}." for i in range(6)]
    env = online_env(tmp_path, f"http://127.0.0.1:{closed_port()}")
    (tmp_path / "hf").mkdir()
    made = subprocess.run([sys.executable, "-c", _MAKE_CACHE, json.dumps(texts)], capture_output=True, text=True,
                          env={**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, timeout=120)
    assert made.returncode == 0, made.stderr
    proc, seconds = timed_gpt2("data", "someone/tiny", "--out", "d", "--val-fraction", "0", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert seconds < FAST_S, f"took {seconds:.1f} s"
    folder = TokenFolder(tmp_path / "d")
    assert np.asarray(folder.tokens("train")).tolist() == [t for text in texts for t in encode(text) + [EOT_ID]]
    assert folder.meta["source"] == [{"kind": "hub", "name": "someone/tiny"}]


def test_offline_switch_is_restored_after_a_lookup(tmp_path, monkeypatch):
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(prep, "_hub_unreachable_reason", lambda: "no network: test")
    started = time.monotonic()
    with pytest.raises(UserError, match=r"is reachable \(no network: test; not in the local Hugging Face cache"):
        prepare_data(PrepareSpec(sources=["someone/not_cached"], out=str(tmp_path / "out")))
    assert time.monotonic() - started < FAST_S
    assert constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- empty documents

def test_null_and_empty_texts_are_skipped_and_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [{"text": "first"}, {"text": None}, {"text": ""}, {"text": "second"}, {"text": None}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "b.json").write_text(json.dumps([{"text": None}, {"text": "third"}]))
    (tmp_path / "c.txt").write_text("")
    pq.write_table(pa.table({"text": ["fourth", None, ""]}), tmp_path / "d.parquet")
    folder = TokenFolder(prepare_data(PrepareSpec(sources=[str(tmp_path)], out=str(tmp_path / "out"),
                                                  val_fraction=0.0)))
    assert folder.meta["documents"] == 4 and folder.meta["empty_documents"] == 7
    words = ["first", "second", "third", "fourth"]
    assert np.asarray(folder.tokens("train")).tolist() == [t for w in words for t in encode(w) + [EOT_ID]]


@pytest.mark.parametrize("content,expected", [
    ('{"text": "ok"}\n{"text": "ok"}\n{"text": 7}\n', "x.jsonl line 3: column 'text' holds int values, not text"),
    ('{"text": "ok"}\n{"body": "no text field"}\n', "x.jsonl line 2 has no column 'text' (columns: body)"),
    ('{"text": "ok"}\nnull\n', "x.jsonl line 2 is a JSON null, not an object with a text field"),
    ('{"text": ["a", "list"]}\n', "x.jsonl line 1: column 'text' holds list values, not text"),
])
def test_records_without_text_are_errors_that_name_the_line(tmp_path, content, expected):
    (tmp_path / "x.jsonl").write_text(content)
    with pytest.raises(UserError) as info:
        prepare_data(PrepareSpec(sources=[str(tmp_path / "x.jsonl")], out=str(tmp_path / "out")))
    assert expected in info.value.render()
    assert not (tmp_path / "out").exists()


def test_only_empty_documents_is_an_error_that_counts_them(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": null}\n{"text": ""}\n{"text": null}\n')
    with pytest.raises(UserError, match=r"no text found in .*x.jsonl \(all 3 documents are empty\)"):
        prepare_data(PrepareSpec(sources=[str(tmp_path / "x.jsonl")], out=str(tmp_path / "out")))


def test_empty_count_does_not_depend_on_threads(tmp_path, monkeypatch):
    """With --max-tokens, reading runs ahead of writing by a number of batches that depends on the
    number of threads; the count must not (meta.json is the same for every --num-proc)."""
    monkeypatch.setattr(prep, "BATCH_CHARS", 64)
    rows = [{"text": None} if i % 3 == 2 else {"text": f"document {i} " * 4} for i in range(300)]
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metas = []
    for workers in (1, 8):
        spec = PrepareSpec(sources=[str(tmp_path / "x.jsonl")], out=str(tmp_path / f"out{workers}"),
                           max_tokens=500, num_proc=workers)
        metas.append(TokenFolder(prepare_data(spec)).meta)
    assert metas[0]["empty_documents"] == metas[1]["empty_documents"] > 0
    assert metas[0]["fingerprint"] == metas[1]["fingerprint"]
    # the empty documents counted are those before the last document written
    assert metas[0]["empty_documents"] == (metas[0]["documents"] - 1) // 2


def test_summary_reports_skipped_documents(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "hello"}\n{"text": null}\n{"text": ""}\n{"text": "world"}\n')
    env = {"GPT2_CACHE_DIR": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf")}
    proc = run_gpt2("data", "x.jsonl", "--out", "d", cwd=tmp_path, env=env, check=True)
    assert "skipped 2 empty documents (empty files, or empty or null text fields)" in proc.stdout
    assert TokenFolder(tmp_path / "d").meta["empty_documents"] == 2
    (tmp_path / "y.jsonl").write_text('{"text": "hello"}\n{"text": "world"}\n')
    proc = run_gpt2("data", "y.jsonl", "--out", "e", cwd=tmp_path, env=env, check=True)
    assert "skipped" not in proc.stdout


# --------------------------------------------------------------------------- .json, streamed

JSON_RECORDS = [
    {"id": 1, "text": "plain"},
    {"text": "caf\u00e9 \U0001F600 \u4e2d\u6587", "meta": {"nested": [1, 2.5e-3, -7, True, None]}},
    {"text": "brackets ] [ } { and , commas \"quoted\" \\ backslash\nnewline\ttab"},
    {"text": None},
    "a bare string record",
    {"text": "x" * 300, "n": 12345678901234567890},
]


def json_texts(path: Path, monkeypatch, read_bytes: int) -> list[str]:
    """The documents of a .json file read ``read_bytes`` bytes at a time."""
    monkeypatch.setattr(prep, "READ_BYTES", read_bytes)
    return list(prep.JsonFile(path).documents(PrepareSpec(sources=[str(path)])))


def expected_texts(values: list) -> list[str]:
    return [v if isinstance(v, str) else (v["text"] or "") for v in values]


@pytest.mark.parametrize("read_bytes", [1, 3, 7, 64, 1 << 22])
@pytest.mark.parametrize("layout", ["compact", "indented", "lines", "one record"])
def test_a_json_file_read_in_chunks_gives_the_records_of_the_whole_file(tmp_path, monkeypatch, read_bytes, layout):
    """Chunk boundaries anywhere (inside strings, escapes, numbers, multi-byte characters) change
    nothing: the records are json.loads' records of the whole file."""
    path = tmp_path / "c.json"
    if layout == "compact":
        text, values = json.dumps(JSON_RECORDS, ensure_ascii=False, separators=(",", ":")), JSON_RECORDS
    elif layout == "indented":
        text, values = "\ufeff \n" + json.dumps(JSON_RECORDS, indent=2) + "\n\n", JSON_RECORDS
    elif layout == "lines":  # several top-level values: JSON lines in a .json file
        text, values = "\n".join(json.dumps(r, ensure_ascii=False) for r in JSON_RECORDS) + "\n", JSON_RECORDS
    else:
        text, values = json.dumps(JSON_RECORDS[1]), [JSON_RECORDS[1]]
    path.write_text(text, encoding="utf-8")
    assert json_texts(path, monkeypatch, read_bytes) == expected_texts(values)


def test_a_large_json_list_is_read_one_record_at_a_time(tmp_path, monkeypatch):
    """Memory holds a chunk and the record being read, not the file: the buffer stays a few
    chunks long while the file is a thousand times longer. A record longer than a chunk is read
    whole, and parsed a few times, not once per chunk."""
    records = [{"text": f"document {i} " + "word " * 10} for i in range(6000)]
    records.insert(3000, {"text": "long " * 20_000})
    path = tmp_path / "big.json"
    path.write_text(json.dumps(records))
    largest, long_parses = [0], [0]
    real_read, real_decode = prep._JsonStream._read, prep._JSON_DECODER.raw_decode

    def read(self, at_least):
        real_read(self, at_least)
        largest[0] = max(largest[0], len(self.buffer))

    def decode(text, pos):
        long_parses[0] += text.startswith('{"text": "long', pos)
        return real_decode(text, pos)

    monkeypatch.setattr(prep._JsonStream, "_read", read)
    monkeypatch.setattr(prep._JSON_DECODER, "raw_decode", decode)
    texts = json_texts(path, monkeypatch, 256)
    assert texts == [r["text"] for r in records]
    assert path.stat().st_size > 500_000 and largest[0] < 250_000  # the long record is 100,012 characters
    assert long_parses[0] <= 12  # the buffer doubles: not 100,012 / 256 = 390 tries


@pytest.mark.parametrize("content,expected", [
    ('[{"text": "a"},\n {"text": "b"}\n {"text": "c"}]', "x.json is not valid JSON (Expecting ',' delimiter at line 3)"),
    ('[{"text": "a"},\n {"text": "b",}]', "x.json is not valid JSON (Expecting property name enclosed in double quotes at line 2)"),
    ('[{"text": "a"},\n {"text": "unterminated}]', "x.json is not valid JSON (Unterminated string starting at line 2)"),
    ('[{"text": "a"},\n {"text": "new\nline"}]', "x.json is not valid JSON (Invalid control character at line 2)"),
    ('[{"text": "a"}', "x.json is not valid JSON (Expecting ',' delimiter at line 1)"),
    ('[{"text": "a"}]\n[{"text": "b"}]', "x.json is not valid JSON (Extra data at line 2)"),
    ("", "x.json is not valid JSON (Expecting value at line 1)"),
    ('[{"text": "a"}, 7]', "x.json record 1 is a JSON number, not an object with a text field"),
    ('{"text": "a"}\n{"body": "b"}', "x.json line 2 has no column 'text' (columns: body)"),
    ('{"body": "b"}', "x.json record 0 has no column 'text' (columns: body)"),
    ('{"body": "b"}\n{"text": "a"}', "x.json line 1 has no column 'text' (columns: body)"),
])
def test_a_bad_json_file_is_one_error_that_names_the_line(tmp_path, monkeypatch, content, expected):
    path = tmp_path / "x.json"
    path.write_text(content)
    for read_bytes in (2, 1 << 22):
        with pytest.raises(UserError) as info:
            json_texts(path, monkeypatch, read_bytes)
        assert expected in info.value.render()
