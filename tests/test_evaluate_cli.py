"""`gpt2 eval`: one table / JSON for several checkpoints on the same windows, bits per byte, and a
loss equal to the one transformers computes for an imported GPT-2 folder."""

from __future__ import annotations

import io
import json
import math
import os
import pty
import re
import subprocess
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from gpt2cli.data import TokenFolder
from gpt2cli.data.prepare import prepare_data
from gpt2cli.specs import PrepareSpec
from gpt2cli.tokenizer import token_byte_lengths
from tests.conftest import gpt2_command, random_hf_gpt2, run_gpt2
from tests.test_generate import cli, one_error_line, one_thread, random_model, save_model, tiny_gpt2  # noqa: F401


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A small token folder (about 12k tokens of Shakespeare, half of it validation)."""
    root = tmp_path_factory.mktemp("eval-data")
    text = (resources.files("gpt2cli") / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:50_000]
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    return prepare_data(PrepareSpec(sources=[str(root / "corpus.txt")], out=str(root / "tokens"), val_fraction=0.5))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    model = random_hf_gpt2(0.05)
    path = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("ckpts")
    (root / "run").mkdir()
    return [
        save_model(tiny_gpt2(seed=1), root / "run" / "best.pt").parent,  # a run folder
        save_model(tiny_gpt2("gqa", "rope", seed=2), root / "gqa-rope.pt"),
    ]


def test_hf_folder_loss_equals_transformers(hf_dir, data_dir, capsys):
    transformers = pytest.importorskip("transformers")
    seq_len, n_tokens = 32, 1024
    code, out, err = cli(capsys, "eval", hf_dir, "--data", data_dir, "--seq-len", seq_len, "--tokens", n_tokens,
                         "--batch-size", 3, "--format", "json", "--device", "cpu")
    assert code == 0, err
    report = json.loads(out)
    row = report["results"][0]
    windows = n_tokens // seq_len
    assert report["windows"] == windows and row["tokens"] == windows * seq_len == report["tokens"]

    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    tokens = TokenFolder(data_dir).tokens("val")
    losses = []
    with torch.no_grad():
        for i in range(windows):
            window = torch.from_numpy(np.asarray(tokens[i * seq_len : i * seq_len + seq_len + 1], dtype=np.int64))[None]
            losses.append(hf(input_ids=window, labels=window).loss.item())  # HF shifts the labels itself
    assert row["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5, abs=1e-5)
    assert row["perplexity"] == pytest.approx(math.exp(row["loss"]))
    n_bytes = int(token_byte_lengths()[np.asarray(tokens[1 : windows * seq_len + 1], dtype=np.int64)].sum())
    assert report["bytes"] == n_bytes
    assert row["bits_per_byte"] == pytest.approx(row["loss"] * row["tokens"] / math.log(2) / n_bytes)


def test_several_checkpoints_give_one_table_and_one_json(checkpoints, hf_dir, data_dir, capsys):
    args = ["eval", *checkpoints, hf_dir, "--data", data_dir, "--tokens", 640, "--batch-size", 4]
    code, out, err = cli(capsys, *args, "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    rows = report["results"]
    assert [r["checkpoint"] for r in rows] == [str(p) for p in [*checkpoints, hf_dir]]
    assert report["seq_len"] == 64 and {r["tokens"] for r in rows} == {640}  # the same windows for all
    assert len({round(r["loss"], 6) for r in rows}) == 3
    assert all(r["loss"] > 0 and r["bits_per_byte"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert "run folder" in rows[0]["source"] and "Hugging Face" in rows[2]["source"]

    code, table, err = cli(capsys, *args)  # the default format: one table
    assert code == 0, err
    assert table.count("\n") < 20 and "bits/byte" in table and "640 tokens" in table
    for row in rows:
        assert f"{row['loss']:.4f}" in table
    # eval scores the same as the library function the training loop uses
    from gpt2cli.evaluate import evaluate_loss
    from gpt2cli.loading import load_model

    model = load_model(checkpoints[1]).model
    expected = evaluate_loss(model, TokenFolder(data_dir).tokens("val"), seq_len=64, batch_size=4, max_tokens=640)
    assert rows[1]["loss"] == pytest.approx(expected, rel=1e-6)


def test_eval_bad_input(checkpoints, data_dir, tmp_path, capsys):
    small_vocab = save_model(random_model(), tmp_path / "vocab512.pt")  # vocabulary of 512
    cases = {
        "does not exist": ["eval", tmp_path / "missing.pt", "--data", data_dir],
        "outside the vocabulary": ["eval", small_vocab, "--data", data_dir, "--seq-len", 16],
        "exceeds the context": ["eval", checkpoints[1], "--data", data_dir, "--seq-len", 128],
        "no split": ["eval", checkpoints[1], "--data", data_dir, "--split", "test"],
        "--batch-size": ["eval", checkpoints[1], "--data", data_dir, "--batch-size", 0],
        "not a prepared data folder": ["eval", checkpoints[1], "--data", tmp_path],
        "missing' does not exist": ["eval", checkpoints[1], "--data", tmp_path / "missing"],
    }
    for needle, args in cases.items():
        code, out, err = cli(capsys, *args)
        assert needle in one_error_line(code, err), (needle, err)


def test_a_text_file_as_data_is_called_a_file_with_the_command_that_prepares_it(checkpoints, tmp_path, capsys):
    text = tmp_path / "my notes.txt"
    text.write_text("to be or not to be\n", encoding="utf-8")
    code, out, err = cli(capsys, "eval", checkpoints[1], "--data", text)
    line = one_error_line(code, err)
    assert out == "" and "does not exist" not in line
    assert f"{str(text)!r} is a file, not a prepared data folder" in line
    assert f"gpt2 data '{text}' --out DIR" in line  # quoted: copy-pastable despite the space


def test_tokens_below_one_window_still_score_one_full_window(checkpoints, data_dir, capsys):
    """--tokens is rounded down to whole windows, but never below one (docs/specs.md says so)."""
    for tokens, windows in ((10, 1), (16, 1), (40, 2)):
        code, out, err = cli(capsys, "eval", checkpoints[1], "--data", data_dir, "--seq-len", 16, "--tokens", tokens,
                             "--format", "json", "--device", "cpu")
        assert code == 0, err
        report = json.loads(out)
        assert (report["windows"], report["tokens"], report["results"][0]["tokens"]) == (windows, 16 * windows,
                                                                                         16 * windows)
    code, out, err = cli(capsys, "eval", checkpoints[1], "--data", data_dir, "--seq-len", 16, "--tokens", 10)
    assert code == 0, err
    assert ": 1 window x 16 tokens = 16 tokens, " in out.splitlines()[0]  # not "1 windows"


def _nan_checkpoint(path: Path) -> Path:
    model = tiny_gpt2(seed=3)
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(float("nan"))
    return save_model(model, path)


def _refuse_nan_and_infinity(constant: str):
    raise AssertionError(f"not valid JSON: {constant}")


def test_a_nonfinite_model_keeps_every_other_row_and_exits_3(checkpoints, data_dir, tmp_path, capsys):
    """A model that turns out NaN while scored: the finished and later rows are still printed
    (valid JSON: null for NaN), one Error: line names it, and the exit status is 3."""
    nan_ckpt = _nan_checkpoint(tmp_path / "nan.pt")
    args = ["eval", checkpoints[1], nan_ckpt, checkpoints[0], "--data", data_dir, "--tokens", 128, "--device", "cpu"]

    code, out, err = cli(capsys, *args, "--format", "json")
    assert code == 3, err
    report = json.loads(out, parse_constant=_refuse_nan_and_infinity)
    good, bad, later = report["results"]
    assert good["error"] is None and later["error"] is None and good["loss"] > 0 and later["loss"] > 0
    assert bad["checkpoint"] == str(nan_ckpt) and bad["error"] == "the loss is not finite (nan)"
    assert bad["loss"] is None and bad["perplexity"] is None and bad["bits_per_byte"] is None
    assert bad["tokens"] == good["tokens"] == 128
    assert err == (f"Error: the loss of {str(nan_ckpt)!r} (nan) is not finite; the other rows are valid "
                   "(its weights hold NaN or inf)\n")

    code, table, err = cli(capsys, *args)  # the table: the same three rows, NaN shown as it is
    assert code == 3 and err.startswith("Error: the loss of") and err.count("\n") == 1, err
    nan_row = next(line for line in table.splitlines() if "nan.pt" in line)
    assert nan_row.split("│")[3].strip() == "nan" and nan_row.split("│")[4].strip() == "nan"
    assert f"{good['loss']:.4f}" in table and f"{later['loss']:.4f}" in table


def test_progress_goes_to_a_terminal_stderr_after_the_header_and_before_the_table(checkpoints, data_dir,
                                                                                  monkeypatch, capsys):
    from gpt2cli.cli import evaluate as eval_cli

    screen = io.StringIO()  # stdout and stderr on one terminal, as a user sees them
    monkeypatch.setattr(eval_cli, "out", Console(file=screen, force_terminal=True, width=200, highlight=False))
    monkeypatch.setattr(eval_cli, "err", Console(file=screen, force_terminal=True, width=200, highlight=False))
    code, _, _ = cli(capsys, "eval", *checkpoints, "--data", data_dir, "--tokens", 640, "--batch-size", 2,
                     "--device", "cpu")
    assert code == 0
    seen = _plain(screen.getvalue())
    header = seen.index(f"{data_dir}, split val: 10 windows x 64 tokens = 640 tokens")
    first = seen.index(f"scoring 1/2 {checkpoints[0]}")
    second = seen.index(f"scoring 2/2 {checkpoints[1]}")
    assert header < first < second < seen.index("bits/byte")
    assert re.search(r"scoring 2/2 .*?10/10 windows", seen)  # the bar counts windows


def test_an_interrupted_eval_leaves_nothing_on_a_redirected_stdout(checkpoints, data_dir, monkeypatch, capsys):
    """stdout to a file or pipe gets the header line with the table, so a Ctrl-C (or a crash) while
    a model is scored leaves no header without its table there; a whole run still has both."""
    from gpt2cli.cli import evaluate as eval_cli

    args = ["eval", *checkpoints, "--data", data_dir, "--tokens", 128, "--device", "cpu"]
    code, table, _ = cli(capsys, *args)
    assert code == 0 and table.startswith(f"{data_dir}, split val: 2 windows x 64 tokens = 128 tokens, ")
    assert "bits/byte" in table and table.count("split val") == 1

    def interrupted(self, index, checkpoint, windows):
        if index == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(eval_cli._ScoringDisplay, "model", interrupted)
    code, out, _ = cli(capsys, *args)
    assert code == 130 and out == ""


def test_token_ids_outside_the_vocabulary_are_one_line(checkpoints, data_dir, tmp_path, capsys):
    """A damaged token file (or one made with another tokenizer) is refused, not an IndexError."""
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(data_dir, damaged)
    tokens = np.memmap(damaged / "val.bin", dtype=np.uint16, mode="r+")
    tokens[::100] = 60000
    tokens.flush()
    del tokens
    code, out, err = cli(capsys, "eval", checkpoints[1], "--data", damaged, "--tokens", 128, "--device", "cpu")
    line = one_error_line(code, err)
    assert "hold id 60,000, outside the GPT-2 tokenizer's vocabulary of 50,257 ids" in line and "gpt2 data" in line


def test_json_stdout_holds_only_the_json_while_a_terminal_stderr_shows_progress(checkpoints, data_dir, monkeypatch,
                                                                               capsys):
    from gpt2cli.cli import evaluate as eval_cli

    screen = io.StringIO()
    monkeypatch.setattr(eval_cli, "err", Console(file=screen, force_terminal=True, width=200, highlight=False))
    code, out, err = cli(capsys, "eval", checkpoints[1], "--data", data_dir, "--tokens", 128, "--format", "json",
                         "--device", "cpu")
    assert code == 0 and json.loads(out)["windows"] == 2
    seen = _plain(screen.getvalue())
    assert "2 windows x 64 tokens" in seen and f"scoring {checkpoints[1]}" in seen


def _plain(terminal_text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal_text)


def test_real_command_on_a_terminal_shows_progress_and_piped_shows_none(checkpoints, data_dir):
    args = [*gpt2_command(), "eval", str(checkpoints[1]), "--data", str(data_dir), "--tokens", "128", "--device",
            "cpu", "--format", "json"]
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "200"}
    primary, secondary = pty.openpty()
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=secondary, env=env) as proc:
        os.close(secondary)
        stderr = b""
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # the terminal closed: the command has ended
                break
            if not chunk:
                break
            stderr += chunk
        stdout = proc.stdout.read()
    os.close(primary)
    assert proc.returncode == 0, stderr
    assert json.loads(stdout)["results"][0]["checkpoint"] == str(checkpoints[1])
    seen = _plain(stderr.decode())
    assert "2 windows x 64 tokens" in seen and f"scoring {checkpoints[1]}" in seen

    piped = run_gpt2(*args[len(gpt2_command()):])
    assert piped.returncode == 0 and piped.stderr == "" and json.loads(piped.stdout)["windows"] == 2


def test_real_command_unknown_device_is_one_line_exit_2(checkpoints, data_dir):
    proc = run_gpt2("eval", str(checkpoints[1]), "--data", str(data_dir), "--device", "tpu")
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("Error: invalid settings: --device (device): must be auto, cpu, cuda, cuda:N or mps, "
                                  "got 'tpu'")


def test_fresh_training_run_generates_and_evaluates(tmp_path, cache_dir, capsys):
    from gpt2cli.specs import TrainSpec, build_spec
    from gpt2cli.train import train

    spec = build_spec(TrainSpec, flags={
        "model": {"preset": "tiny", "attn": "gqa", "pos": "rope"},
        "train": {"steps": 2, "batch_size": 2, "seq_len": 32, "device": "cpu", "log_every": 1},
        "eval": {"every": 2, "tokens": 256}, "run": {"out": str(tmp_path / "run"), "quiet": True},
    })
    train(spec)
    code, out, err = cli(capsys, "generate", tmp_path / "run", "ROMEO:", "-n", "5", "--seed", "1", "-v")
    assert code == 0 and out.startswith("ROMEO:") and "best.pt, step 2" in err, err
    code, out, err = cli(capsys, "eval", tmp_path / "run", tmp_path / "run" / "ckpt.pt", "--tokens", "256",
                         "--format", "json")
    assert code == 0, err
    rows = json.loads(out)["results"]
    assert rows[0]["loss"] == rows[1]["loss"]  # best.pt and ckpt.pt hold the same step-2 weights


def test_an_error_during_evaluation_leaves_the_model_in_training_mode():
    from gpt2cli.evaluate import evaluate_sums
    from gpt2cli.model import GPT
    from gpt2cli.specs import ModelSpec

    model = GPT(ModelSpec(preset="tiny")).train()

    def failing_autocast():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate_sums(model, np.arange(200, dtype=np.uint16), seq_len=16, batch_size=2, autocast=failing_autocast)
    assert model.training and all(m.training for m in model.modules())


def test_a_huge_perplexity_is_shown_in_scientific_notation():
    from gpt2cli.cli.evaluate import _number

    assert _number(572.2349, "{:,.2f}") == "572.23" and _number(999_999.0, "{:,.2f}") == "999,999.00"
    assert _number(6.975e253, "{:,.2f}") == "6.975e+253" and _number(float("nan"), "{:.2f}") == "nan"
