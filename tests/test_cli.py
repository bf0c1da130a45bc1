"""The root `gpt2` command through the installed console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import run_gpt2


def test_help_lists_every_command():
    proc = run_gpt2("--help", check=True)
    for name in ("data", "train", "eval", "generate", "compare", "info"):
        assert f" {name} " in proc.stdout


def test_version():
    proc = run_gpt2("--version", check=True)
    assert proc.stdout.startswith("gpt2 ")


def test_python_dash_m_works():
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "gpt2cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("gpt2 ")


def test_unknown_command_and_option_are_one_line_errors():
    for args in (["frobnicate"], ["train", "--no-such-flag"], ["train", "--steps", "many"]):
        proc = run_gpt2(*args)
        assert proc.returncode == 2, args
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:"), (args, proc.stderr)


def test_tables_into_a_closed_pipe_end_quietly_like_a_sigpipe():
    """Rich and Click each turn a broken pipe into a quiet exit 1; the command reports what a
    process killed by SIGPIPE does (141), and the interpreter's last flush prints nothing."""
    import os
    import subprocess

    from tests.conftest import gpt2_command

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    try:
        proc = subprocess.run([*gpt2_command(), "info", "--preset", "tiny"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == "", (proc.returncode, proc.stderr)


def test_a_command_without_its_arguments_shows_help_and_fails():
    """`gpt2 eval runs/*/best.pt` on a glob that matched nothing runs `gpt2 eval`: its help is
    shown, and the exit status says the job was not done. `gpt2` alone is a request for help."""
    assert run_gpt2().returncode == 0
    for command in ("eval", "generate", "export"):
        proc = run_gpt2(command)
        assert proc.returncode == 2 and "Usage" in proc.stdout + proc.stderr, command


def test_debug_shows_the_traceback():
    proc = run_gpt2("train", "--steps", "0", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "Error:" in proc.stderr


def test_train_help_states_precedence_and_groups():
    proc = run_gpt2("train", "--help", check=True)
    text = " ".join(proc.stdout.split())
    assert "defaults < --config FILE < flags < --set" in text
    for panel in ("Model", "Optimizer", "Parallelism", "Run folder"):
        assert panel in proc.stdout


@pytest.mark.parametrize("args, expected, absent", [
    (["--spec", "run.toml"],
     "is not a JSON spec as written by gpt2", ("this version", "Invalid JSON")),
    (["--nproc", "2"],
     "2 processes (--nproc 2) need --strategy ddp or --strategy fsdp", ()),
    (["--gpus", "2", "--device", "cpu"],
     "--gpus needs CUDA GPUs, not --device cpu; for 2 processes on the CPU use --strategy ddp --nproc 2 --device cpu",
     ("need --strategy",)),
    (["--lr", "-1"], "--lr (optim.lr): Input should be greater than 0", ("min_lr", "--min-lr")),
])
def test_train_errors_name_what_the_user_can_change(tmp_path, args, expected, absent):
    (tmp_path / "run.toml").write_text('[model]\npreset = "tiny"\n[train]\nsteps = 3\n')
    extra = [] if "--spec" in args else ["--preset", "tiny", "--steps", "3", "--device", "cpu"]
    proc = run_gpt2("train", *extra, *args, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error:"), proc.stderr
    assert expected in lines[0] and not any(word in lines[0] for word in absent), lines[0]
    if "--spec" in args:
        assert "--config" in lines[0]
    assert list(tmp_path.iterdir()) == [tmp_path / "run.toml"]  # nothing written


@pytest.fixture
def small_filesystem(tmp_path):
    """A 20 MB tmpfs (root only, where mounts are allowed; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_keeps_what_was_there(small_filesystem, tmp_path):
    """No space left, in a checkpoint (torch.save wraps the OSError) or in token files (a write
    with no path): exit 2 and one line, no traceback, nothing half-written left behind."""
    run = small_filesystem / "run"
    proc = run_gpt2("train", "--preset", "tiny", "--steps", "8", "--seq-len", "16", "--batch-size", "2",
                    "--eval-tokens", "64", "--device", "cpu", "--out", str(run), "--quiet")
    assert proc.returncode == 2 and proc.stderr == (
        f"Error: No space left on device: '{run / 'ckpt.pt'}' (free some space)\n"), proc.stderr
    assert not list(run.glob(".*tmp*"))  # the partial checkpoint was removed
    assert '"status": "failed"' in (run / "status.json").read_text()

    for entry in small_filesystem.iterdir():  # the space back, all but 256 KB taken by a filler
        shutil.rmtree(entry)
    (small_filesystem / "filler").write_bytes(b"\0" * (20 * 2**20 - 2**18))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("ROMEO: But soft, what light through yonder window breaks? " * 20 + "\n") * 1_000)
    proc = run_gpt2("data", str(corpus), "--out", str(small_filesystem / "tokens"))
    assert proc.returncode == 2 and proc.stderr.startswith("Error: No space left on device"), proc.stderr
    assert proc.stderr.count("\n") == 1 and [p.name for p in small_filesystem.iterdir()] == ["filler"]


def test_paths_that_cannot_be_written_are_one_line_errors(tmp_path):
    """A file where a folder must go, a folder under a file: exit 2 and one line naming the path,
    not an OSError traceback (a read-only folder takes the same route)."""
    (tmp_path / "afile").write_text("x")
    for out_dir, words in ((tmp_path / "afile", "File exists"), (tmp_path / "afile" / "sub", "Not a directory")):
        proc = run_gpt2("train", "--preset", "tiny", "--steps", "1", "--device", "cpu", "--out", str(out_dir))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"Error: {words}: ") and str(out_dir)[-8:] in lines[0] and "Traceback" not in lines[0]
    assert (tmp_path / "afile").read_text() == "x"


def test_ctrl_c_while_the_command_is_still_loading_is_aborted_not_a_traceback():
    """The console script's import of the CLI takes a second or more; a Ctrl-C then (as if it came
    while that import ran) ends with `Aborted.` and 130, as everywhere outside a training loop."""
    code = ("import builtins\nreal = builtins.__import__\n"
            "def importing(name, *args, **kwargs):\n"
            "    if name == 'gpt2cli.cli':\n        raise KeyboardInterrupt\n"
            "    return real(name, *args, **kwargs)\n"
            "builtins.__import__ = importing\n"
            "from gpt2cli.console import main\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, "Aborted.\n", "")


def test_a_piped_table_keeps_every_cell_on_one_line(capsys):
    """Into a file or a pipe (not a terminal) a table is as wide as its longest cell: a long
    checkpoint path stays whole on its row instead of wrapping at 80 columns."""
    from rich.table import Table

    from gpt2cli.cli.common import print_wide

    long_path = "/runs/" + "deep-folder-" * 12 + "best.pt"
    table = Table("checkpoint", "loss", title="run /runs/" + "a-title-longer-than-the-cells-" * 6)
    table.add_row(long_path, "nan")
    print_wide(table)
    out = capsys.readouterr().out
    assert "a-title-longer-than-the-cells-" * 6 in out  # the title too, on one line
    row = next(line for line in out.splitlines() if long_path in line)
    assert row.split("│")[2].strip() == "nan"
    assert all(line == line.rstrip() for line in out.splitlines())


def test_an_error_line_drops_one_period_and_keeps_an_ellipsis():
    from gpt2cli.errors import UserError

    assert UserError("bad value.", "fix it").render() == "Error: bad value (fix it)"
    assert UserError("missing a, b, c ...", "damaged").render() == "Error: missing a, b, c ... (damaged)"
