"""`gpt2 export`: a Hugging Face folder transformers loads with equal logits, a clear refusal for
variants GPT-2 cannot express, and a safetensors file (any variant) that generate/eval read back."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from gpt2cli.loading import load_model
from tests.conftest import run_gpt2
from tests.test_generate import cli, one_error_line, one_thread, save_model, tiny_gpt2  # noqa: F401


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    return {
        "gpt2": save_model(tiny_gpt2(seed=4), root / "gpt2.pt"),
        "rope-gqa": save_model(tiny_gpt2("gqa", "rope", seed=5), root / "rope-gqa.pt"),
    }


def test_hf_export_loads_in_transformers_with_equal_logits(ckpts, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    code, out, err = cli(capsys, "export", ckpts["gpt2"], tmp_path / "hf")
    assert code == 0, err
    assert out.strip() == str(tmp_path / "hf") and {p.name for p in (tmp_path / "hf").iterdir()} == {
        "config.json", "model.safetensors"}
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    capsys.readouterr()  # transformers' own progress bar
    ours = load_model(ckpts["gpt2"]).model
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), atol=1e-5, rtol=1e-5)
    # An existing folder is not overwritten unless asked.
    code, _, err = cli(capsys, "export", ckpts["gpt2"], tmp_path / "hf")
    assert "not empty" in one_error_line(code, err)
    code, _, err = cli(capsys, "export", ckpts["gpt2"], tmp_path / "hf", "--overwrite")
    assert code == 0, err


def test_hf_export_of_rope_gqa_is_refused_before_writing(ckpts, tmp_path, capsys):
    code, out, err = cli(capsys, "export", ckpts["rope-gqa"], tmp_path / "hf")
    line = one_error_line(code, err)
    assert "pos=rope" in line and "attn=gqa" in line and "--format safetensors" in line
    assert out == "" and not (tmp_path / "hf").exists()


def test_safetensors_export_round_trips_through_generate_and_eval(ckpts, tmp_path, capsys, cache_dir):
    target = tmp_path / "rope-gqa.safetensors"
    code, out, err = cli(capsys, "export", ckpts["rope-gqa"], target, "--format", "safetensors")
    assert code == 0 and out.strip() == str(target), err
    original, exported = load_model(ckpts["rope-gqa"]), load_model(target)
    assert exported.spec == original.spec and "safetensors export" in exported.source
    assert all(torch.equal(a, b) for a, b in zip(original.model.state_dict().values(),
                                                 exported.model.state_dict().values(), strict=True))

    args = ["Once", "-n", "10", "--seed", "3", "--temperature", "1.0", "--format", "jsonl", "--num-samples", "2"]
    runs = []
    for source in (ckpts["rope-gqa"], target):
        code, out, err = cli(capsys, "generate", source, *args)
        assert code == 0, err
        runs.append([json.loads(line)["completion"] for line in out.splitlines()])
    assert runs[0] == runs[1]

    from gpt2cli.evaluate import evaluate_checkpoints
    from gpt2cli.specs import EvaluateSpec

    report = evaluate_checkpoints(EvaluateSpec(checkpoints=[str(ckpts["rope-gqa"]), str(target)], tokens=256,
                                               device="cpu"))
    losses = [r["loss"] for r in report["results"]]
    assert losses[0] == losses[1]


def test_foreign_or_damaged_safetensors_is_refused(ckpts, tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    for name, needle in (("foreign.safetensors", "not a gpt2 safetensors export"), ("broken.safetensors", "cannot read")):
        code, _, err = cli(capsys, "generate", tmp_path / name, "Hi")
        assert needle in one_error_line(code, err)
    code, _, err = cli(capsys, "export", ckpts["gpt2"], tmp_path / "out.bin", "--format", "safetensors")
    assert ".safetensors" in one_error_line(code, err)


def test_exported_files_get_the_mode_of_a_new_file_under_the_umask(ckpts, tmp_path):
    """Like any file the user creates: 0o666 less the umask (not mkstemp's 0o600), for both
    formats, with no temporary file or folder left beside them."""
    umask = 0o027  # 0o640: differs from 0o600 and from a plain 0o644
    old = os.umask(umask)
    try:
        hf = run_gpt2("export", str(ckpts["gpt2"]), str(tmp_path / "hf"))
        st = run_gpt2("export", str(ckpts["rope-gqa"]), str(tmp_path / "m.safetensors"), "--format", "safetensors")
    finally:
        os.umask(old)
    assert hf.returncode == 0 and st.returncode == 0, hf.stderr + st.stderr
    files = [tmp_path / "hf" / "config.json", tmp_path / "hf" / "model.safetensors", tmp_path / "m.safetensors"]
    assert {f: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f: oct(0o666 & ~umask) for f in files}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.safetensors"]
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]


def test_safetensors_export_to_an_existing_file_or_below_one_is_one_error_line(ckpts, tmp_path):
    """OUT an existing regular file (not .safetensors), or a path under a file: refused before the
    model is loaded, with one line naming the file, exit 2, and the file untouched; as for --format hf."""
    (tmp_path / "afile").write_text("keep me")
    cases = [
        (("afile", "--format", "safetensors"), "Error: 'afile' is a file (--format safetensors writes"),
        (("afile", "--format", "safetensors", "--overwrite"), "Error: 'afile' is a file (--format safetensors"),
        (("afile/x.safetensors", "--format", "safetensors"), "Error: 'afile' is a file, not a folder"),
        (("afile",), "Error: 'afile' is a file (--format hf writes a folder"),
        (("afile/sub",), "Error: 'afile' is a file, not a folder"),
        (("", "--overwrite"), "Error: OUT is empty (give the folder or file to write"),  # not the cwd
    ]
    for args, expected in cases:
        proc = run_gpt2("export", str(ckpts["gpt2"]), *args, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), (args, proc.stderr)
        assert proc.stdout == ""
        assert (tmp_path / "afile").read_text() == "keep me"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_an_export_removes_what_a_killed_export_left_and_only_that(ckpts, tmp_path, capsys):
    """A SIGKILLed export leaves its hidden staging folder or temporary file (no code runs on
    SIGKILL); the next export beside it removes those of dead processes on this host."""
    import subprocess

    from gpt2cli.fsutil import HOST

    dead = subprocess.Popen(["true"])
    dead.wait()
    left = [tmp_path / f".hf.tmp-{HOST}-{dead.pid}-abcd", tmp_path / f".w.safetensors.tmp-{HOST}-{dead.pid}-abcd"]
    left[0].mkdir()
    (left[0] / "model.safetensors").write_bytes(b"half")
    left[1].write_bytes(b"half")
    kept = [tmp_path / f".hf.tmp-{HOST}-{os.getpid()}-abcd",  # a live process: maybe still writing
            tmp_path / ".hf.tmp-otherhost-1-abcd"]  # another machine's, on a shared filesystem
    for path in kept:
        path.mkdir()
    assert cli(capsys, "export", ckpts["gpt2"], tmp_path / "hf")[0] == 0
    assert cli(capsys, "export", ckpts["gpt2"], tmp_path / "w.safetensors", "--format", "safetensors")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf", "w.safetensors", *(p.name for p in kept)])

