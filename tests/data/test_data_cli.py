"""`gpt2 data` through the real console script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from gpt2cli.data.shards import TokenFolder
from tests.conftest import REPO, gpt2_command, run_gpt2


@pytest.fixture
def env(tmp_path):
    return {"GPT2_CACHE_DIR": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf"),
            "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def test_no_argument_prepares_the_embedded_corpus(tmp_path, env):
    proc = run_gpt2("data", cwd=tmp_path, env=env, check=True)
    folder = TokenFolder(tmp_path / "data" / "tinyshakespeare")
    assert folder.num_tokens("train") == 301_966 and folder.num_tokens("val") == 36_060
    assert "301,966" in proc.stdout and "data/tinyshakespeare" in proc.stdout  # the summary table

    again = run_gpt2("data", cwd=tmp_path, env=env)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        "Error: output folder 'data/tinyshakespeare' already exists (pass --overwrite to replace it, "
        "or choose another --out)"
    ]
    assert run_gpt2("data", "--overwrite", cwd=tmp_path, env=env).returncode == 0
    assert TokenFolder(tmp_path / "data" / "tinyshakespeare").fingerprint == folder.fingerprint


def test_flags_config_and_set(tmp_path, env):
    docs = [{"body": f"document {i} " * 20} for i in range(30)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "prep.toml").write_text('text_column = "body"\nval_fraction = 0.5\n')
    proc = run_gpt2("data", "c.jsonl", "--config", "prep.toml", "--max-docs", "20", "-j", "1",
                    "--set", "val_fraction=0.25", cwd=tmp_path, env=env, check=True)
    folder = TokenFolder(tmp_path / "data" / "c")  # default out: data/<name of the source>
    assert folder.meta["documents"] == 20
    assert folder.num_documents("val") == 5 and folder.num_documents("train") == 15  # --set wins
    assert folder.meta["spec"]["text_column"] == "body" and folder.meta["spec"]["num_proc"] == 1
    assert "total" in proc.stdout


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


def test_bad_inputs_exit_2_with_one_line(tmp_path, env):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    (tmp_path / "t.csv").write_text("text\nhi\n")
    cases = {
        ("missing.txt",): "no such file or folder: 'missing.txt'",
        ("empty.txt",): "no text found in empty.txt",
        ("latin1.txt",): "latin1.txt is not UTF-8 text",
        ("c.jsonl",): "no column 'text' (columns: body, id)",
        ("t.csv",): "unknown file type '.csv'",
        ("someone/some_dataset",): "no local file or folder 'someone/some_dataset', and no Hugging Face dataset",
        ("--val-fraction", "1.5"): "val_fraction",
    }
    for args, expected in cases.items():
        line = one_error_line(run_gpt2("data", *args, "--out", "out", cwd=tmp_path, env=env))
        assert expected in line, line
        assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folders

    ok = run_gpt2("data", "latin1.txt", "--errors", "replace", "--out", "out", cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr
    assert TokenFolder(tmp_path / "out").meta["spec"]["errors"] == "replace"


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_removes_the_staging_folder_and_says_so(tmp_path, env, sig, code):
    """SIGTERM stops `gpt2 data` as Ctrl-C does: the hidden staging folder with its partial
    train.bin is removed, one line says so, and the exit status is the shell's 128 + signal."""
    text = (REPO / "gpt2cli" / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    (tmp_path / "big.txt").write_text(text * 60, encoding="utf-8")  # 67 MB: many seconds on one thread
    proc = subprocess.Popen(
        [*gpt2_command(), "data", "big.txt", "--out", "out", "-j", "1", "--quiet"],
        cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A shell's background job ignores SIGINT, and the child would inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )

    def tokens_written() -> bool:
        try:
            return any(p.stat().st_size > 0 for p in tmp_path.glob(".out.tmp-*/train.bin"))
        except FileNotFoundError:  # the folder went away between glob and stat
            return False

    try:
        deadline = time.monotonic() + 60
        # Signal once tokens are being written into the staging folder: the run is mid-way.
        while not tokens_written():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no staging folder appeared"
            time.sleep(0.01)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines() == [f"Stopped by {sig.name}; the unfinished output was removed."]
    assert stdout == ""
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".", "out"))]  # no staging, no output
