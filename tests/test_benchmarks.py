"""The benchmark harness's own behaviour (benchmarks/): bad input refused in one line, the table
and JSON built from the right figures, both sides given the same protocol. Nothing here measures
speed; no model is built."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """Import a benchmark script as a module (they run as `python benchmarks/NAME.py`)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


def run_script(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, **(env or {})})


def assert_refused(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, nothing on stdout, one line on stderr (no traceback) that holds every needle."""
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(("args", "needles"), [
    (["--skip", "trian,generate"], ["--skip", "trian", "valid: train, generate, data"]),
    (["--only", "gen"], ["--only", "gen", "valid: train, generate, data"]),
    (["--shapes", "gpt2-medium:64:2,tiny:64"], ["'tiny:64'", "preset:seq:batch"]),
    (["--shapes", "gpt3:64:2"], ["unknown preset 'gpt3'", "gpt2-medium"]),
    (["--shapes", "tiny:64:zero"], ["'tiny:64:zero'", "whole numbers"]),
    (["--shapes", "tiny:0:4"], ["'tiny:0:4'", ">= 1"]),
    (["--only", "generate", "--gen-batches", "1,x"], ["--gen-batches", "'x'"]),
    (["--steps", "0"], ["--steps"]),
    (["--dtype", "fp64"], ["--dtype", "fp64"]),
])
def test_run_all_refuses_bad_input_in_one_line(tmp_path, args, needles):
    proc = run_script("run_all.py", *args, "--out", str(tmp_path / "out" / "results.json"))
    assert_refused(proc, *needles)
    assert not (tmp_path / "out").exists()


def test_gpu_check_refuses_an_unknown_stage_and_leaves_no_folder(tmp_path):
    # The stage that was dropped from the list: a typo or a stale name must not run an empty table.
    proc = run_script("gpu_check.py", "--dry-run", "--only", "train_ours_b16,train_ours_b16_cudnn",
                      "--out", str(tmp_path / "out"), env={"TMPDIR": str(tmp_path)})
    assert_refused(proc, "train_ours_b16_cudnn", "train_ours_b16_chunked_ce", "study")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither $OUT nor a study folder


def test_gpu_check_names_the_study_folder_without_creating_it(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # read TMPDIR again
    gpu_check = bench("gpu_check")
    stages = {s.name: s for s in gpu_check.stages(tmp_path / "out", dry=True)}
    study_out = Path(stages["study"].cmd[stages["study"].cmd.index("--out") + 1])
    assert study_out.parent.parent == tmp_path
    assert list(tmp_path.iterdir()) == []


def fake_train_json(peer: bool, **changes) -> dict:
    row = {"peer": "hf-transformers" if peer else "gpt2cli", "tokens_per_s": 100.0 if peer else 150.0,
           "dtype": "fp32", "compile": False, "steps": 2, "warmup": 3, "matmul_precision": "highest",
           "peak_rss_gb": 0.5 if peer else 0.4, "mfu": 0.1 if peer else 0.15}
    return {**row, **changes}


def harness_args() -> argparse.Namespace:
    """run_all's parsed options, as train_pair reads them."""
    return argparse.Namespace(device="cpu", dtype="fp32", compile=False, matmul_precision="high", steps=2,
                              warmup=3, repeat=2, peak_tflops=1.0)


def test_train_pair_gives_both_sides_the_same_protocol_and_reports_memory_and_mfu(bench, monkeypatch):
    run_all = bench("run_all")
    commands = []

    def fake_last_json(cmd):
        commands.append(cmd)
        return fake_train_json(peer="hf_peer.py" in cmd[1])

    monkeypatch.setattr(run_all, "last_json", fake_last_json)
    args = harness_args()
    result = run_all.train_pair("tiny", 64, 4, args)
    ours_cmd, peer_cmd = commands[0], commands[1]
    for flag in ("--warmup", "--steps", "--dtype", "--matmul-precision", "--seq", "--batch"):
        assert ours_cmd[ours_cmd.index(flag) + 1] == peer_cmd[peer_cmd.index(flag) + 1], flag
    assert peer_cmd[peer_cmd.index("--layers") + 1:peer_cmd.index("--layers") + 6:2] == ["2", "4", "64"]
    assert len(commands) == 4  # --repeat 2: ours and the peer alternate
    assert result["ours_peak_memory_gb"] == 0.4 and result["peer_peak_memory_gb"] == 0.5
    assert result["peak_memory"] == "peak RSS of the process"
    assert result["peer_mfu"] == 0.1 and result["warmup"] == 3 and result["dtype"] == "fp32"
    row = run_all.table_rows([result])[0]
    assert row[2] == "150 tok/s (15.0% MFU)" and row[3] == "100 tok/s (10.0% MFU)"
    assert row[4] == "1.50x" and row[5] == "0.40 / 0.50 GB (peak RSS)"


def test_train_pair_stops_when_the_sides_ran_differently(bench, monkeypatch):
    run_all = bench("run_all")
    monkeypatch.setattr(run_all, "last_json",
                        lambda cmd: fake_train_json(peer="hf_peer.py" in cmd[1],
                                                    **({"warmup": 5} if "hf_peer.py" in cmd[1] else {})))
    args = harness_args()
    with pytest.raises(SystemExit, match="warmup"):
        run_all.train_pair("tiny", 64, 4, args)


def test_generation_rows_use_the_unrounded_ratio_and_say_what_each_side_ran(bench):
    run_all, generate_speed = bench("run_all"), bench("generate_speed")
    # 13.96 / 10.02 = 1.393: from the rounded 14.0 / 10.0 it would print 1.40x.
    med = {"ours": 13.96, "ours+compile": 30.0, "hf": 10.02, "hf+compile": 20.0}
    comparisons = generate_speed.comparisons(med, ["ours", "ours+compile"], hf_compiled=True)
    assert [c["label"] for c in comparisons] == [
        "ours eager vs HF eager", "ours compiled vs HF compiled (static cache)", "ours compiled vs HF eager"]
    result = {"job": "generate", "preset": "gpt2", "batch": 1, "prompt_tokens": 16, "new_tokens": 256,
              "dtype": "fp32", "median_tokens_per_s": {k: round(v, 1) for k, v in med.items()},
              "comparisons": comparisons}
    rows = run_all.table_rows([result])
    assert rows[0][4] == "1.39x"
    assert rows[1][1].endswith("ours compiled vs HF compiled (static cache)") and rows[1][4] == "1.50x"
    assert rows[2][1].endswith("ours compiled vs HF eager") and rows[2][4] == "2.99x"


def test_without_hf_compiled_the_compiled_rows_say_hf_eager(bench):
    generate_speed = bench("generate_speed")
    med = {"ours": 1.0, "ours+compile": 2.0, "ours+compile sync1": 1.5, "hf": 1.0}
    labels = [c["label"] for c in generate_speed.comparisons(med, list(med)[:3], hf_compiled=False)]
    assert labels == ["ours eager vs HF eager", "ours compiled vs HF eager",
                      "ours compiled, a read per token vs HF eager"]


def test_int8_rows_are_labelled_as_not_like_for_like(bench):
    generate_speed = bench("generate_speed")
    med = {"ours": 1.0, "ours+compile": 2.0, "ours-int8": 0.5, "ours-int8+compile": 3.0, "hf": 1.0, "hf+compile": 2.0}
    comparisons = generate_speed.comparisons(med, list(med)[:4], hf_compiled=True)
    assert [(c["ours"], c["hf"]) for c in comparisons] == [
        ("ours", "hf"), ("ours-int8", "hf"), ("ours-int8+compile", "hf+compile"),
        ("ours+compile", "hf+compile"), ("ours+compile", "hf")]
    assert all("not like for like" in c["label"] for c in comparisons if "int8" in c["ours"])
    assert not any("not like for like" in c["label"] for c in comparisons if "int8" not in c["ours"])


def test_data_row_reports_the_median(bench):
    run_all = bench("run_all")
    row = run_all.table_rows([{"job": "data", "corpus_mb": 1.0, "runs": 3, "best_tokens_per_s": 3e6,
                               "median_tokens_per_s": 2e6}])[0]
    assert row[1] == "JSONL, 1.0 MB (median of 3 runs)" and row[2] == "2.00 M tok/s"
