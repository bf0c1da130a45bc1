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


# ------------------------------------------------------------------------------------ --verify


def damaged_copy(folder, target, position: int, token: int):
    """A copy of ``folder`` with the token at ``position`` of train.bin replaced by ``token``."""
    import shutil

    shutil.copytree(folder, target)
    with open(target / "train.bin", "r+b") as fh:
        fh.seek(2 * position)
        fh.write(int(token).to_bytes(2, "little"))
    return target


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    from gpt2cli.data.prepare import prepare_data
    from gpt2cli.specs import PrepareSpec

    root = tmp_path_factory.mktemp("verify")
    (root / "corpus.txt").write_text("To be, or not to be, that is the question. " * 400, encoding="utf-8")
    return prepare_data(PrepareSpec(sources=[str(root / "corpus.txt")], out=str(root / "tokens"), val_fraction=0.5))


def test_verify_finds_an_intact_folder_intact(small_folder):
    from gpt2cli.data.shards import verify_folder

    folder = TokenFolder(small_folder)
    intact, checks = verify_folder(folder)
    assert intact and [c.split for c in checks] == folder.splits
    for c in checks:
        tokens = folder.tokens(c.split)
        assert (c.tokens, c.max_id, c.out_of_vocabulary) == (len(tokens), int(tokens.max()), 0)
    proc = run_gpt2("data", "--verify", str(small_folder), check=True)
    assert f"intact: the tokens match meta.json's fingerprint {folder.fingerprint[:16]}" in proc.stdout


def test_verify_finds_a_flipped_token_and_ids_outside_the_vocabulary(small_folder, tmp_path):
    """A token changed into another valid id only shows in the fingerprint; an id past the
    vocabulary is also counted, with its position. Every folder gets its table, the intact one
    included, and the command ends with one line naming the damaged ones (exit 2)."""
    from gpt2cli.data.shards import verify_folder

    train = TokenFolder(small_folder).tokens("train")
    flipped = damaged_copy(small_folder, tmp_path / "flipped", 7, (int(train[7]) + 1) % 50257)
    outside = damaged_copy(small_folder, tmp_path / "outside", 123, 65535)
    assert verify_folder(TokenFolder(flipped))[0] is False
    intact, checks = verify_folder(TokenFolder(outside))
    train_check = next(c for c in checks if c.split == "train")
    assert not intact and (train_check.out_of_vocabulary, train_check.first_out_of_vocabulary) == (1, 123)
    assert train_check.max_id == 65535

    proc = run_gpt2("data", "--verify", str(small_folder), str(flipped), str(outside))
    error = one_error_line(proc)
    assert error == (f"Error: damaged data: {str(flipped)!r} (the tokens no longer match meta.json's fingerprint), "
                     f"{str(outside)!r} (the tokens no longer match meta.json's fingerprint; ids outside the "
                     "vocabulary in train) (prepare the folder again from its sources, which its meta.json names)")
    assert proc.stdout.count("intact:") == 1 and proc.stdout.count("damaged:") == 2
    assert "1 (first at 123)" in proc.stdout


def test_verify_refuses_what_it_cannot_check(small_folder, tmp_path):
    assert "--verify needs the folders to check" in one_error_line(run_gpt2("data", "--verify"))
    assert ("--verify checks prepared folders; --out is for preparing one (drop it)"
            in one_error_line(run_gpt2("data", "--verify", str(small_folder), "--out", "x")))
    import shutil

    shutil.copytree(small_folder, tmp_path / "cut")
    with open(tmp_path / "cut" / "val.bin", "r+b") as fh:
        fh.truncate(10)
    assert "is 10 bytes, meta.json says" in one_error_line(run_gpt2("data", "--verify", str(tmp_path / "cut")))
