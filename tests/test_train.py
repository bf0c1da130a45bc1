"""The training workflow: learning, exact resume, checkpoints, signals, non-finite losses, the
run folder, and the real `gpt2 train` command."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from gpt2cli import checkpoint as ckpt
from gpt2cli.errors import NonFiniteLossError, UserError
from gpt2cli.metrics import read_metrics
from gpt2cli.specs import DEFAULT_LOSS_CHUNK, TrainSpec, build_spec
from gpt2cli.train import (
    SilentReporter,
    describe_schedule,
    lr_at,
    plan_batches,
    resolve_loss_chunk,
    train,
)
from tests.conftest import REPO, gpt2_command, run_gpt2


def tiny_spec(out: Path, **sections) -> TrainSpec:
    flags = {
        "model": {"preset": "tiny"},
        "train": {"steps": 12, "batch_size": 4, "seq_len": 32, "device": "cpu", "log_every": 1},
        "optim": {"warmup": 2, "lr": 3e-3},
        "eval": {"every": 6, "tokens": 1024},
        "run": {"out": str(out), "save_every": 4},
    }
    for section, values in sections.items():
        flags[section] = {**flags.get(section, {}), **values}
    return build_spec(TrainSpec, flags=flags)


class MessageLog(SilentReporter):
    """A reporter that keeps the run's messages (warnings, skipped steps) for the test to read."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


def test_loss_decreases_and_run_folder_is_complete(tmp_path, cache_dir):
    result = train(tiny_spec(tmp_path / "run", train={"steps": 40}, eval={"every": 20}))
    losses = train_losses(tmp_path / "run")
    assert result.status == "completed" and result.step == 40
    assert sum(list(losses.values())[-5:]) / 5 < sum(list(losses.values())[:5]) / 5 - 0.5
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"spec.json", "metrics.jsonl", "ckpt.pt", "best.pt"}
    stored = TrainSpec.model_validate_json((tmp_path / "run" / "spec.json").read_text())
    assert stored.run.out == str(tmp_path / "run") and stored.model.preset == "tiny"


def test_metrics_schema(tmp_path, cache_dir):
    train(tiny_spec(tmp_path / "run", train={"steps": 6, "log_every": 3}, eval={"every": 3}))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train"]
    eval_rows = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train_rows] == [3, 6] and [r["step"] for r in eval_rows] == [3, 6]
    for r in train_rows:
        assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "time_s"} <= r.keys()
        assert r["tokens"] == r["step"] * 4 * 32
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
        assert r["strategy"] == "single" and r["world_size"] == 1  # per segment: a resume may change them
    for r in eval_rows:
        assert {"step", "tokens", "val_loss", "val_ppl", "best"} <= r.keys()
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    assert {r["start_step"] for r in rows} == {0}  # the segment: the step this process started from
    # A resume starts a new segment: its rows say where it started (gpt2 compare adds segments up).
    train(tiny_spec(tmp_path / "run", train={"steps": 9, "log_every": 3}, eval={"every": 3}, run={"resume": "auto"}))
    resumed = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] > 6]
    assert resumed and {r["start_step"] for r in resumed} == {6}


def test_tokens_per_s_leaves_out_evaluation_and_checkpoint_time(tmp_path, cache_dir, monkeypatch):
    """A slow eval and save at step 4 lengthen the wall clock (time_s) but not the window of
    steps 5-6 that tokens/s is measured over."""
    import gpt2cli.train as train_module

    pause = 0.4
    real_eval, real_save = train_module.evaluate_loss, ckpt.save_checkpoint

    def slow_eval(*args, **kwargs):
        time.sleep(pause)
        return real_eval(*args, **kwargs)

    def slow_save(*args, **kwargs):
        time.sleep(pause)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_loss", slow_eval)
    monkeypatch.setattr(ckpt, "save_checkpoint", slow_save)
    train(tiny_spec(tmp_path / "run", train={"steps": 6, "log_every": 2}, eval={"every": 4},
                    run={"save_every": 4}))
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"}
    wall = rows[6]["time_s"] - rows[4]["time_s"]  # wall-clock: holds the eval and the save (best.pt too)
    assert wall >= 2 * pause
    window = 2 * 4 * 32 / rows[6]["tokens_per_s"]  # the seconds tokens/s was measured over
    assert window < wall - 1.5 * pause


def test_resume_is_bit_exact(tmp_path, cache_dir, monkeypatch):
    full = tmp_path / "full"
    train(tiny_spec(full, model={"dropout": 0.1}))
    part = tmp_path / "part"
    monkeypatch.setenv("GPT2_FAULT", "stop_at_step:7")  # interrupted after step 7 (not a save step)
    stopped = train(tiny_spec(part, model={"dropout": 0.1}))
    assert stopped.status == "interrupted" and stopped.step == 7
    monkeypatch.delenv("GPT2_FAULT")
    result = train(tiny_spec(part, model={"dropout": 0.1}, run={"resume": "auto"}))
    assert result.step == 12
    assert train_losses(part) == train_losses(full)  # exact float equality, every step
    a = ckpt.load_checkpoint(full / "ckpt.pt")["model"]
    b = ckpt.load_checkpoint(part / "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_checkpoint_of_another_torch_version_warns_and_continues(tmp_path, cache_dir):
    """Resume is exact within one torch version; from another the run goes on, with a warning."""
    run = tmp_path / "run"
    train(tiny_spec(run, train={"steps": 2}, eval={"every": 100, "tokens": 256}))
    record = ckpt.load_checkpoint(run / "ckpt.pt")
    ckpt.save_checkpoint(run / "ckpt.pt", {k: v for k, v in record.items() if k not in ("digest", "format",
                                                                                        "format_version")}
                         | {"torch_version": "1.13.0"})
    same = MessageLog()
    train(tiny_spec(run, train={"steps": 3}, eval={"every": 100, "tokens": 256}, run={"resume": "auto"}),
          reporter=same)
    assert any(line.startswith(f"warning: {str(run / 'ckpt.pt')!r} was written by torch 1.13.0, this is torch ")
               for line in same.lines), same.lines
    again = MessageLog()  # the checkpoint of step 3 is this torch's: no warning
    result = train(tiny_spec(run, train={"steps": 4}, eval={"every": 100, "tokens": 256}, run={"resume": "auto"}),
                   reporter=again)
    assert result.step == 4 and not any("written by torch" in line for line in again.lines)


def test_checkpoint_holds_the_full_training_state(tmp_path, cache_dir):
    train(tiny_spec(tmp_path / "run", train={"steps": 4}))
    record = ckpt.load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert record["step"] == 4 and record["tokens_seen"] == 4 * 4 * 32
    assert {"model", "optimizer", "loader", "rng", "spec", "best_val_loss", "global_batch"} <= record.keys()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in record["model"])
    assert "transformer.h.0.attn.c_attn.weight" in record["optimizer"]["state"]
    best = ckpt.load_checkpoint(tmp_path / "run" / "best.pt")
    assert "optimizer" not in best and best["val_loss"] > 0


def test_keep_step_checkpoints(tmp_path, cache_dir):
    train(tiny_spec(tmp_path / "run", train={"steps": 12}, run={"save_every": 2, "keep": 2}))
    names = sorted(p.name for p in ckpt.step_checkpoints(tmp_path / "run"))
    assert names == [ckpt.step_checkpoint_name(10), ckpt.step_checkpoint_name(12)]
    assert ckpt.load_checkpoint(tmp_path / "run" / names[0])["step"] == 10


def test_resume_refuses_a_different_model_shape(tmp_path, cache_dir):
    train(tiny_spec(tmp_path / "run", train={"steps": 4}))
    with pytest.raises(UserError, match="model shape"):
        train(tiny_spec(tmp_path / "run", model={"n_layer": 3}, run={"resume": "auto"}))
    with pytest.raises(UserError, match="global batch"):
        train(tiny_spec(tmp_path / "run", train={"batch_size": 8}, run={"resume": "auto"}))


def test_new_run_refuses_an_existing_run_folder(tmp_path, cache_dir):
    train(tiny_spec(tmp_path / "run", train={"steps": 2}))
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny_spec(tmp_path / "run", train={"steps": 2}))


def test_nonfinite_loss_stops_before_the_step(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("GPT2_FAULT", "nan_at_step:5")  # fault steps count from 0: the 6th step
    with pytest.raises(NonFiniteLossError, match=r"at step 6 "):  # counted from 1, as the logs count
        train(tiny_spec(tmp_path / "run"))
    record = ckpt.load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert record["step"] == 4
    assert all(torch.isfinite(t).all() for t in record["model"].values())
    status = json.loads((tmp_path / "run" / "status.json").read_text())  # not "running" forever
    assert status["status"] == "failed" and status["step"] == 5 and "non-finite loss" in status["error"]


def test_nonfinite_skip_mode_continues(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("GPT2_FAULT", "nan_at_step:5")
    result = train(tiny_spec(tmp_path / "run", train={"on_nonfinite": "skip", "log_every": 1}))
    assert result.status == "completed" and result.step == 12
    # metrics.jsonl is strict JSON (no NaN/Infinity): the skipped step's loss is null there, and
    # read_metrics gives it back as NaN.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=lambda name: pytest.fail(f"not JSON: {name}")) for line in lines]
    assert [r["loss"] for r in rows if r["kind"] == "train" and r["step"] == 6] == [None]
    assert math.isnan(next(r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("step") == 6
                           and r["kind"] == "train"))


def test_nonfinite_skip_limit_allows_that_many_skips_in_a_row(tmp_path, cache_dir, monkeypatch):
    """--max-nonfinite-skips N: N non-finite steps in a row are skipped, the (N+1)-th stops."""
    monkeypatch.setenv("GPT2_FAULT", "nan_at_step:2,nan_at_step:3")  # the 3rd and 4th steps
    skip = {"on_nonfinite": "skip", "steps": 6}
    reporter = MessageLog()
    result = train(tiny_spec(tmp_path / "two", train={**skip, "max_nonfinite_skips": 2}), reporter=reporter)
    assert result.status == "completed" and result.step == 6
    assert [ln for ln in reporter.lines if "skipped" in ln] == ["non-finite loss or gradient at step 3: step skipped (1 in a row)",
                       "non-finite loss or gradient at step 4: step skipped (2 in a row)"]
    with pytest.raises(NonFiniteLossError, match=r"at step 4, 2 in a row ") as stopped:
        train(tiny_spec(tmp_path / "one", train={**skip, "max_nonfinite_skips": 1}))
    assert "raise --max-nonfinite-skips (now 1)" in stopped.value.render()  # not the mode already on


def test_batch_arithmetic():
    spec = build_spec(TrainSpec, flags={"model": {"preset": "tiny"}, "train": {"batch_size": 4, "seq_len": 32,
                                                                               "batch_tokens": 512}})
    assert plan_batches(spec, 1).grad_accum == 4 and plan_batches(spec, 2).grad_accum == 2
    assert plan_batches(spec, 2).tokens_per_step == 512
    with pytest.raises(UserError, match="not a multiple"):
        plan_batches(spec, 3)
    by_tokens = build_spec(TrainSpec, flags={"model": {"preset": "tiny"}, "train": {"tokens": 10_000,
                                                                                    "batch_size": 4, "seq_len": 32}})
    assert plan_batches(by_tokens, 1).total_steps == math.ceil(10_000 / 128)


def test_schedule_warmup_then_cosine_to_min_lr():
    spec = build_spec(TrainSpec, flags={"optim": {"lr": 1.0, "min_lr": 0.1, "warmup": 10}})
    assert lr_at(0, spec, 100) == pytest.approx(0.1)
    assert lr_at(9, spec, 100) == pytest.approx(1.0)
    assert lr_at(100, spec, 100) == pytest.approx(0.1)
    values = [lr_at(s, spec, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_wsd_schedule_holds_lr_then_decays_linearly_and_a_longer_budget_keeps_the_past():
    spec = build_spec(TrainSpec, flags={"optim": {"lr": 1.0, "min_lr": 0.1, "warmup": 10, "schedule": "wsd"}})
    assert lr_at(0, spec, 100) == pytest.approx(0.1)
    assert [lr_at(s, spec, 100) for s in range(9, 80)] == [1.0] * 71  # stable until the last 20 steps
    assert lr_at(89, spec, 100) == pytest.approx(0.55)  # halfway down the linear decay
    assert lr_at(99, spec, 100) == pytest.approx(0.1)  # the last step runs at min_lr
    # Twice the budget: the decay starts at 160, every step before 80 keeps its lr.
    assert [lr_at(s, spec, 200) for s in range(80)] == [lr_at(s, spec, 100) for s in range(80)]
    assert lr_at(159, spec, 200) == 1.0 and lr_at(179, spec, 200) == pytest.approx(0.55)
    half = build_spec(TrainSpec, flags={"optim": {"lr": 1.0, "min_lr": 0.0, "warmup": 0, "schedule": "wsd",
                                                  "decay_fraction": 0.5}})
    assert lr_at(49, half, 100) == 1.0 and lr_at(74, half, 100) == pytest.approx(0.5)
    # A decay of one step still reaches min_lr.
    short = build_spec(TrainSpec, flags={"optim": {"lr": 1.0, "min_lr": 0.1, "warmup": 0, "schedule": "wsd",
                                                   "decay_fraction": 0.01}})
    assert lr_at(98, short, 100) == 1.0 and lr_at(99, short, 100) == pytest.approx(0.1)
    # What --dry-run says, in metrics.jsonl's steps (step N runs with lr_at(N - 1)): held through 80.
    assert describe_schedule(spec, 100) == "warm-up 10 steps to 1, held through step 80, linear decay to 0.1 at step 100"
    assert lr_at(80 - 1, spec, 100) == 1.0 and lr_at(81 - 1, spec, 100) < 1.0
    assert describe_schedule(spec, 3) == "warm-up 10 steps, longer than the run's 3: the lr rises to 0.3 at step 3, " \
        "not to --lr 1"
    assert describe_schedule(spec, 10).startswith("warm-up 10 steps to 1,")  # as long as the run: it gets there


def test_a_wsd_run_extended_before_its_decay_equals_the_longer_run(tmp_path, cache_dir, monkeypatch):
    """What wsd is for: a 10-step run stopped in its stable phase (the decay starts at step 8)
    and resumed with a 20-step budget trains exactly like a 20-step run from the start."""
    wsd = {"warmup": 2, "lr": 3e-3, "schedule": "wsd"}
    full = tmp_path / "full"
    train(tiny_spec(full, train={"steps": 20}, optim=wsd))
    part = tmp_path / "part"
    monkeypatch.setenv("GPT2_FAULT", "stop_at_step:7")
    assert train(tiny_spec(part, train={"steps": 10}, optim=wsd)).step == 7
    monkeypatch.delenv("GPT2_FAULT")
    assert train(tiny_spec(part, train={"steps": 20}, optim=wsd, run={"resume": "auto"})).step == 20
    assert train_losses(part) == train_losses(full)
    lrs = {r["step"]: r["lr"] for r in read_metrics(full / "metrics.jsonl") if r["kind"] == "train"}
    # row N holds the lr of step index N - 1; the decay is the last 4 steps, down to min_lr
    assert lrs[16] == 3e-3 and lrs[20] < lrs[17] < 3e-3 and lrs[20] == pytest.approx(3e-4)


def test_the_default_warm_up_is_fixed_when_a_run_starts_so_a_longer_budget_keeps_it(tmp_path, cache_dir,
                                                                                        monkeypatch):
    """Without --warmup the warm-up is 5% of the steps, resolved when the run starts and stored:
    a 20-step wsd run (warm-up 1) stopped at step 5 and resumed with 40 steps trains exactly like
    a 40-step run with --warmup 1, not like one that warms up over 2 steps."""
    wsd = {"warmup": None, "lr": 3e-3, "schedule": "wsd"}
    part = tmp_path / "part"
    monkeypatch.setenv("GPT2_FAULT", "stop_at_step:5")
    assert train(tiny_spec(part, train={"steps": 20}, optim=wsd)).step == 5
    monkeypatch.delenv("GPT2_FAULT")
    stored = TrainSpec.model_validate_json((part / "spec.json").read_text())
    assert stored.optim.warmup == 1
    from gpt2cli.cli.train import resolve_train_spec

    resumed = resolve_train_spec({"--out": str(part), "--resume": "auto", "--steps": 40}, None, [])
    assert resumed.optim.warmup == 1
    log = MessageLog()
    assert train(resumed, reporter=log).step == 40
    assert not any("changed settings" in line for line in log.lines)
    full = tmp_path / "full"
    train(tiny_spec(full, train={"steps": 40}, optim={**wsd, "warmup": 1}))
    assert train_losses(part) == train_losses(full)


# ------------------------------------------------------------------ the real command


def test_cli_train_tiny_then_resume(tmp_path, cache_dir):
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--steps", "6", "--batch-size", "4", "--seq-len", "32",
            "--eval-every", "3", "--eval-tokens", "512", "--device", "cpu", "--out", str(run)]
    first = run_gpt2(*args, check=True)
    assert "best val loss" in first.stdout and "gpt2 generate" in first.stdout
    assert "\x1b[" not in first.stderr  # piped output has no control codes
    again = run_gpt2(*args)
    assert again.returncode == 2 and again.stderr.startswith("Error:") and "Traceback" not in again.stderr
    more = run_gpt2("train", "--out", str(run), "--resume", "auto", "--steps", "9", check=True)
    assert "resumed from" in more.stderr
    assert max(train_losses(run)) == 9
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    fewer = run_gpt2("train", "--out", str(run), "--resume", "auto", "--steps", "5")  # below the run's step 9
    assert fewer.returncode == 2 and "past the 5 steps" in fewer.stderr and "--steps above 9" in fewer.stderr
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before  # status.json and spec.json untouched


def test_cli_dry_run_prints_plan_and_creates_nothing(tmp_path):
    proc = run_gpt2("train", "--preset", "gpt2", "--attn", "gqa", "--batch-size", "8", "--grad-accum", "4",
                    "--dry-run", "--out", str(tmp_path / "run"), check=True)
    assert "parameters" in proc.stdout and "32,768 tokens per step" in proc.stdout and '"n_kv_head": 3' in proc.stdout
    assert "lr: warm-up 10 steps to 0.0006, cosine decay towards 6e-05, reached after step 200" in proc.stdout
    assert not (tmp_path / "run").exists()


def test_settings_from_a_config_file_or_set_beat_the_default_preset(tmp_path):
    """defaults < --config < flags < --set holds for the preset and for resuming: the device's default
    preset is the bottom layer, and a resume named in a file or a --set reads the run's own spec."""
    from gpt2cli.cli.train import resolve_train_spec
    from gpt2cli.specs import spec_to_json

    none = {flag: None for flag in ("--device", "--gpus", "--out", "--resume")}
    preset_file = tmp_path / "p.toml"
    preset_file.write_text('[model]\npreset = "tiny"\n')
    assert resolve_train_spec({**none, "--device": "cpu"}, str(preset_file), []).model.n_layer == 2
    assert resolve_train_spec({**none, "--device": "cpu"}, None, ["model.preset=tiny"]).model.n_layer == 2
    assert resolve_train_spec({**none, "--device": "cpu"}, None, []).model.preset == "nano"  # the CPU default

    run = tmp_path / "run"
    run.mkdir()
    stored = build_spec(TrainSpec, flags={"model": {"preset": "tiny", "n_embd": 32}, "train": {"steps": 5}})
    (run / "spec.json").write_text(spec_to_json(stored))
    resume_file = tmp_path / "r.toml"
    resume_file.write_text(f'[run]\nout = "{run}"\nresume = "auto"\n')
    out_file = tmp_path / "o.toml"
    out_file.write_text(f'[run]\nout = "{run}"\n')
    for values, config, sets in [
        (none, str(resume_file), []),
        ({**none, "--out": str(run)}, None, ["run.resume=auto"]),
        ({**none, "--resume": "auto"}, str(out_file), []),
    ]:
        spec = resolve_train_spec(values, config, sets)
        assert (spec.model, spec.train.steps, spec.run.resume) == (stored.model, 5, "auto"), (config, sets)


def test_a_resume_replaces_what_the_stored_spec_holds_only_as_another_way_or_a_default(tmp_path):
    """On resume, a --tokens replaces the stored steps (and --steps the stored tokens), a
    --batch-tokens the stored grad_accum; an --lr moves the min_lr that was the old lr / 10 (one
    set by hand stays); --quiet is not carried over."""
    from gpt2cli.cli.train import resolve_train_spec
    from gpt2cli.specs import spec_to_json

    none = {flag: None for flag in ("--device", "--gpus", "--out", "--resume", "--steps", "--tokens", "--lr",
                                    "--batch-tokens", "--grad-accum", "--min-lr", "--quiet")}
    run = tmp_path / "run"
    run.mkdir()

    def stored(**sections) -> None:
        flags = {"model": {"preset": "tiny"}, "train": {"steps": 4, "grad_accum": 2}, "optim": {"lr": 2e-3},
                 "run": {"quiet": True}}
        for section, values in sections.items():
            flags[section] = {**flags[section], **values}
        (run / "spec.json").write_text(spec_to_json(build_spec(TrainSpec, flags=flags)))

    def resumed(**given):
        return resolve_train_spec({**none, "--out": str(run), "--resume": "auto", **given}, None, [])

    stored()
    spec = resumed(**{"--tokens": 320})
    assert (spec.train.tokens, spec.train.steps) == (320, None)
    spec = resumed(**{"--batch-tokens": 256})
    assert (spec.train.batch_tokens, spec.train.grad_accum) == (256, 1)
    spec = resumed(**{"--lr": 1e-3})
    assert (spec.optim.lr, spec.optim.min_lr) == (1e-3, 1e-4)
    assert resumed().run.quiet is False and resumed(**{"--quiet": True}).run.quiet is True
    stored(optim={"min_lr": 5e-5})
    assert resumed(**{"--lr": 1e-3}).optim.min_lr == 5e-5  # set by hand: kept
    stored(train={"steps": None, "tokens": 640})
    spec = resumed(**{"--steps": 6})
    assert (spec.train.steps, spec.train.tokens) == (6, None)
    with pytest.raises(UserError, match="give steps or tokens, not both"):  # both in one layer
        resumed(**{"--steps": 6, "--tokens": 640})


def test_a_config_file_budget_gives_way_to_the_other_budget_flag(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("[train]\ntokens = 640\n")
    spec = build_spec(TrainSpec, config_file=config, flags={"train": {"steps": 3}})
    assert (spec.train.steps, spec.train.tokens) == (3, None)
    spec = build_spec(TrainSpec, config_file=config, sets=["train.steps=3"])
    assert (spec.train.steps, spec.train.tokens) == (3, None)


def test_resume_changes_are_warned_and_recorded_a_preset_change_is_refused(tmp_path, cache_dir):
    """A resume that changes settings says which, and metrics.jsonl keeps the old values (spec.json
    describes the continuation); a --preset would only relabel the stored model: refused."""
    run = tmp_path / "run"
    small = {"eval": {"every": 100, "tokens": 256}}
    train(tiny_spec(run, train={"steps": 2}, **small))
    reporter = MessageLog()
    train(tiny_spec(run, train={"steps": 3}, optim={"warmup": 2, "lr": 1e-3, "schedule": "linear"},
                    run={"resume": "auto"}, **small), reporter=reporter)
    warning = next(line for line in reporter.lines if line.startswith("warning: resuming with changed settings"))
    assert "optim.lr 0.003 -> 0.001" in warning and "optim.schedule cosine -> linear" in warning
    assert "train.steps" not in warning
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "resume"]
    assert rows == [{"kind": "resume", "step": 2, "tokens": 2 * 4 * 32,
                     "changed": {"optim.lr": [0.003, 0.001], "optim.min_lr": [0.0003, 0.0001],
                                 "optim.schedule": ["cosine", "linear"]}}]
    quiet = MessageLog()  # the same settings again: nothing to say
    train(tiny_spec(run, train={"steps": 4}, optim={"warmup": 2, "lr": 1e-3, "schedule": "linear"},
                    run={"resume": "auto"}, **small), reporter=quiet)
    assert not any("changed settings" in line for line in quiet.lines)
    with pytest.raises(UserError, match=r"another preset \(tiny -> nano\)"):
        train(tiny_spec(run, model={"preset": "nano", "n_layer": 2, "n_head": 2, "n_embd": 64},
                        train={"steps": 5}, run={"resume": "auto"}, **small))


def test_a_fork_keeps_its_own_best_model(tmp_path, cache_dir):
    """--resume of another run's checkpoint into a new folder: the fork's first evaluation is its
    best so far (best.pt appears), not a comparison with a best.pt it does not hold."""
    source, fork = tmp_path / "source", tmp_path / "fork"
    train(tiny_spec(source, train={"steps": 4}, eval={"every": 2, "tokens": 256}))
    result = train(tiny_spec(fork, train={"steps": 6}, eval={"every": 2, "tokens": 256},
                             run={"resume": str(source / "ckpt.pt")}))
    evals = [r for r in read_metrics(fork / "metrics.jsonl") if r["kind"] == "eval" and r["step"] > 4]
    assert (fork / "best.pt").exists() and evals[0]["best"] is True
    assert result.best_val_loss == min(r["val_loss"] for r in evals)


def test_resume_of_a_multi_process_run_stopped_before_it_began_reads_the_launch_spec(tmp_path):
    """Stopped during start-up, a DDP run folder holds only launch-spec.json: --resume auto must
    continue that spec (tiny, 2 processes), not start the default preset in one process."""
    from gpt2cli.cli.train import resolve_train_spec
    from gpt2cli.parallel.launch import LAUNCH_SPEC_NAME
    from gpt2cli.specs import spec_to_json

    launched = build_spec(TrainSpec, flags={"model": {"preset": "tiny"}, "train": {"device": "cpu"},
                                            "parallel": {"strategy": "ddp", "nproc": 2}})
    (tmp_path / LAUNCH_SPEC_NAME).write_text(spec_to_json(launched))
    spec = resolve_train_spec({"--out": str(tmp_path), "--resume": "auto"}, None, [])
    assert (spec.model, spec.parallel.strategy, spec.parallel.nproc) == (launched.model, "ddp", 2)


def test_resume_under_strategy_single_does_not_carry_over_the_stored_process_count(tmp_path):
    """docs/training.md allows resuming a DDP run on one process: --strategy single drops the
    stored --nproc (it was refused as "2 processes need --strategy ddp"), unless it is given again.
    (tests/test_parallel.py resumes a real DDP run this way.)"""
    from gpt2cli.cli.train import resolve_train_spec
    from gpt2cli.specs import spec_to_json

    stored = build_spec(TrainSpec, flags={"model": {"preset": "tiny"}, "train": {"device": "cpu"},
                                          "parallel": {"strategy": "fsdp", "nproc": 2, "fsdp_cpu_offload": False,
                                                       "fsdp_reshard_after_forward": False}})
    (tmp_path / "spec.json").write_text(spec_to_json(stored))
    resume = {"--out": str(tmp_path), "--resume": "auto"}
    single = resolve_train_spec({**resume, "--strategy": "single", "--batch-size": 32}, None, [])
    assert (single.parallel.strategy, single.parallel.nproc, single.parallel.procs_per_node) == ("single", None, 1)
    assert single.parallel.fsdp_reshard_after_forward is True  # FSDP's settings stay with FSDP
    assert resolve_train_spec(resume, None, ["parallel.strategy=single"]).parallel.nproc is None
    ddp = resolve_train_spec({**resume, "--strategy": "ddp"}, None, [])
    assert (ddp.parallel.strategy, ddp.parallel.nproc) == ("ddp", 2)  # another multi-process strategy keeps it
    with pytest.raises(UserError, match="need --strategy ddp"):  # given again, it is the user's contradiction
        resolve_train_spec({**resume, "--strategy": "single", "--nproc": 2}, None, [])


def test_cli_config_file_preset_reaches_the_run(tmp_path):
    (tmp_path / "p.toml").write_text('[model]\npreset = "tiny"\n')
    proc = run_gpt2("train", "--config", str(tmp_path / "p.toml"), "--device", "cpu", "--dry-run", check=True)
    assert '"preset": "tiny"' in proc.stdout and '"n_layer": 2' in proc.stdout


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path):
    cases = [
        ["--steps", "-1"],
        ["--preset", "gpt5"],
        ["--dtype", "fp8"],
        ["--n-head", "5", "--preset", "tiny"],
        ["--gpus", "2", "--strategy", "ddp"],
        ["--data", str(tmp_path / "missing")],
        ["--resume", str(tmp_path / "nothing.pt"), "--preset", "tiny"],
        ["--betas", "0.9"],
        ["--nproc", "2"],
        ["--decay-fraction", "0.3"],
        ["--strategy", "ddp", "--nproc", "2", "--node-rank", "1"],
        ["--strategy", "ddp", "--nproc", "2", "--rdzv-endpoint", "127.0.0.1:29599"],
        ["--schedule", "wsd", "--decay-fraction", "0"],
    ]
    for extra in cases:
        proc = run_gpt2("train", "--device", "cpu", "--out", str(tmp_path / "run"), *extra)
        assert proc.returncode == 2, (extra, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:"), (extra, proc.stderr)
        assert not (tmp_path / "run").exists(), extra


@pytest.mark.parametrize("procs", [[], ["--strategy", "ddp", "--nproc", "2"]], ids=["single", "ddp"])
def test_cli_validation_split_shorter_than_a_window_is_refused_before_any_step(tmp_path, procs):
    """Checked with the training split, up front: exit 2, one line naming the split, no run folder
    (under torchrun too, where the launcher had already made it), so a retry can use the name."""
    from gpt2cli.data.prepare import prepare_data
    from gpt2cli.specs import PrepareSpec

    (tmp_path / "corpus.txt").write_text((REPO / "gpt2cli" / "assets" / "tinyshakespeare.txt").read_text()[:20_000])
    data = prepare_data(PrepareSpec(sources=[str(tmp_path / "corpus.txt")], out=str(tmp_path / "tokens"),
                                    val_fraction=0.002))
    run = tmp_path / "runs" / "short-val"
    proc = run_gpt2("train", "--preset", "tiny", "--data", str(data), "--seq-len", "32", "--batch-size", "2",
                    "--steps", "3", "--device", "cpu", *procs, "--out", str(run))
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "'val' split" in errors[0] and "--val-fraction" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_folder_without_a_validation_split_names_both_ways_out(tmp_path):
    """Prepared with --val-fraction 0: the hint says to prepare a split, or to score the
    training split, and the run folder is not made."""
    from gpt2cli.data.prepare import prepare_data
    from gpt2cli.specs import PrepareSpec

    (tmp_path / "corpus.txt").write_text((REPO / "gpt2cli" / "assets" / "tinyshakespeare.txt").read_text()[:5_000])
    data = prepare_data(PrepareSpec(sources=[str(tmp_path / "corpus.txt")], out=str(tmp_path / "tokens"),
                                    val_fraction=0.0))
    spec = tiny_spec(tmp_path / "run", data={"dir": str(data)})
    with pytest.raises(UserError) as info:
        train(spec)
    assert "has no 'val' split (it has: train)" in info.value.message
    assert "--val-fraction above 0" in info.value.hint and "--set data.val_split=train" in info.value.hint
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError) as typo:  # a misspelt split is a setting to correct, not data to prepare
        train(tiny_spec(tmp_path / "run", data={"dir": str(data), "val_split": "nosuch"}))
    assert typo.value.hint == "set data.val_split to one of train"
    result = train(tiny_spec(tmp_path / "run", data={"dir": str(data), "val_split": "train"},
                             train={"steps": 2}))
    assert result.status == "completed"


def test_cli_damaged_checkpoint_on_resume(tmp_path, cache_dir):
    run = tmp_path / "run"
    run_gpt2("train", "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
             "--eval-tokens", "256", "--device", "cpu", "--out", str(run), check=True)
    data = (run / "ckpt.pt").read_bytes()
    (run / "ckpt.pt").write_bytes(data[: len(data) // 3])
    proc = run_gpt2("train", "--resume", str(run / "ckpt.pt"), "--steps", "4")
    assert proc.returncode == 2 and "damaged" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_sigterm_checkpoints_and_resumes(tmp_path, cache_dir):
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--steps", "400", "--batch-size", "2", "--seq-len", "16",
            "--eval-every", "1000", "--eval-tokens", "256", "--log-every", "1", "--device", "cpu",
            "--out", str(run)]
    import os

    proc = subprocess.Popen([*gpt2_command(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:
        rows = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
        if len(rows) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 75, stderr
    record = ckpt.load_checkpoint(run / "ckpt.pt")
    stopped_at = record["step"]
    assert 3 <= stopped_at < 400
    assert "--resume auto" in stdout and f"stopped by SIGTERM after step {stopped_at};" in stderr
    done = run_gpt2("train", "--out", str(run), "--resume", "auto", "--steps", str(stopped_at + 3), check=True)
    assert done.returncode == 0
    assert max(train_losses(run)) == stopped_at + 3
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == sorted(set(steps))  # no duplicated rows after the resume
    json.loads((run / "spec.json").read_text())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_process_ddp_and_fsdp_match_single_without_torchrun(tmp_path, cache_dir, strategy):
    single = train(tiny_spec(tmp_path / "single", train={"steps": 3}))
    wrapped = train(tiny_spec(tmp_path / strategy, train={"steps": 3}, parallel={"strategy": strategy}))
    assert wrapped.status == single.status == "completed"
    assert train_losses(tmp_path / strategy) == pytest.approx(train_losses(tmp_path / "single"), rel=1e-6)


def test_loss_chunk_default_follows_what_measured_faster():
    """Chunked only for eager steps off CUDA; an explicit value always wins."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_loss_chunk(None, False, cpu) == DEFAULT_LOSS_CHUNK
    assert resolve_loss_chunk(None, True, cpu) == 0
    assert resolve_loss_chunk(None, False, cuda) == 0
    assert resolve_loss_chunk(None, True, cuda) == 0
    assert resolve_loss_chunk(256, True, cuda) == 256
    assert resolve_loss_chunk(0, False, cpu) == 0


@pytest.mark.parametrize(("text", "kind"), [
    # gloo, when a peer process exits: at once, long before any timeout
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:29500: Connection reset by peer",
     "peer died"),
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:60085. This is "
     "typically caused by a remote worker crashing.", "peer died"),
    # a hung peer: the collective waited --dist-timeout
    ("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv operation "
     "to complete", "timeout"),
    ("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLREDUCE)", "timeout"),
    ("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)", None),
])
def test_a_failed_collective_says_whether_a_peer_died_or_timed_out(text, kind):
    from gpt2cli.cli.train import collective_error, collective_failure

    exc = RuntimeError(text)
    assert collective_failure(exc) == kind
    error = collective_error(exc, rank=0, dist_timeout=300)
    if kind is None:
        assert error is None
        return
    line = error.render()
    assert error.exit_code == 1 and line.startswith("Error: [rank 0] ") and "\n" not in line
    if kind == "peer died":
        assert "another process died (connection reset" in line and "--dist-timeout" not in line
    else:
        assert "did not finish within --dist-timeout 300 s" in line


def test_more_cpu_processes_than_cores_is_warned_about_not_refused(monkeypatch, capsys):
    from gpt2cli.cli import train as cli_train

    monkeypatch.setattr(cli_train.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def warning(nproc: int, device: str = "cpu", **parallel) -> str:
        spec = build_spec(TrainSpec, flags={"parallel": {"strategy": "ddp", "nproc": nproc, **parallel},
                                            "train": {"device": device}})
        cli_train._check_device(spec)
        return capsys.readouterr().err

    line = warning(3)
    assert line.startswith("warning: --nproc 3 starts more processes than this machine has CPU cores (2)")
    assert line.count("\n") == 1
    assert warning(3, device="auto") == line  # auto without CUDA is the CPU
    assert warning(2) == ""
    assert warning(3, device="cuda") == ""  # one process per GPU, not per core


def test_cli_warns_of_more_cpu_processes_than_cores_on_a_dry_run(tmp_path):
    import os

    nproc = (os.cpu_count() or 1) + 1
    proc = run_gpt2("train", "--preset", "tiny", "--strategy", "ddp", "--nproc", str(nproc), "--device", "cpu",
                    "--dry-run", "--out", str(tmp_path / "run"), check=True)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr  # one warning line, accepted
    assert lines[0].startswith(f"warning: --nproc {nproc} starts more processes than this machine has CPU cores")
    assert f"x {nproc} process(es)" in proc.stdout and not (tmp_path / "run").exists()


def test_an_unknown_dtype_is_a_user_error_naming_the_choices():
    from gpt2cli.train import resolve_dtype

    with pytest.raises(UserError, match="unknown dtype 'int8'") as info:
        resolve_dtype("int8", torch.device("cpu"))
    assert "fp32" in info.value.hint and "bf16" in info.value.hint
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("parallel", [{"nproc": 2}, {"nproc": 2, "strategy": "fsdp"}])
def test_several_processes_without_a_launcher_are_refused_before_anything_is_made(tmp_path, monkeypatch,
                                                                                    parallel):
    """One process training a run whose spec.json says two would be a silent lie."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    spec = tiny_spec(tmp_path / "run", parallel={"strategy": "ddp", **parallel})
    with pytest.raises(UserError, match=r"nproc 2 \(2 processes\) needs the launcher") as info:
        train(spec)
    assert "gpt2 train" in info.value.hint and "torchrun" in info.value.hint
    assert not (tmp_path / "run").exists()


def test_train_gives_back_the_global_rng_and_matmul_precision(tmp_path, cache_dir):
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        torch.manual_seed(1234)
        before = torch.get_rng_state()
        result = train(tiny_spec(tmp_path / "run", train={"steps": 2}, eval={"every": 2, "tokens": 256}))
        assert result.status == "completed"
        assert torch.equal(torch.get_rng_state(), before)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(precision)


def test_a_spec_changed_without_validation_is_validated_again(tmp_path):
    spec = tiny_spec(tmp_path / "run")
    bad = spec.model_copy(update={"train": spec.train.model_copy(update={"steps": -3})})
    with pytest.raises(UserError, match="steps"):
        train(bad)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sections", [
    {},
    {"model": {"preset": "nano", "attn": "gqa", "pos": "rope"}},
    {"model": {"preset": "gpt2", "attn": "mqa", "dropout": 0.1}, "optim": {"lr": 1e-3, "schedule": "linear"}},
    {"model": {"preset": "mini"}, "train": {"steps": None, "tokens": 100_000, "batch_tokens": 1024},
     "parallel": {"strategy": "fsdp", "nproc": 2}},
    {"model": {"n_layer": 2, "n_embd": 96, "n_head": 6, "attn": "gqa"}},
])
def test_validating_again_keeps_every_resolved_value(tmp_path, sections):
    from gpt2cli.train import _revalidate

    spec = tiny_spec(tmp_path / "run", **sections)
    again = _revalidate(spec)
    assert again.model_dump() == spec.model_dump() and again == spec


def scripted_val_losses(monkeypatch, losses: list[float]) -> None:
    """Evaluations return these val losses in order (the model is not scored)."""
    import gpt2cli.train as train_module

    queue = list(losses)
    monkeypatch.setattr(train_module, "evaluate_loss", lambda *args, **kwargs: queue.pop(0))


def test_patience_stops_early_with_a_checkpoint_and_a_resume_keeps_the_count(tmp_path, cache_dir, monkeypatch,
                                                                              capsys):
    """--patience 2: two evaluations in a row without a new best end the run there (exit 0, status
    early-stopped, ckpt.pt at that step, best.pt at the best); the count is in the checkpoint,
    so a resume with --patience 3 stops at the very next evaluation without a new best."""
    from gpt2cli.cli import main

    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--device", "cpu", "--steps", "12", "--batch-size", "2", "--seq-len", "16",
            "--eval-every", "1", "--save-every", "6", "--log-every", "1", "--out", str(run)]
    scripted_val_losses(monkeypatch, [5.0, 4.0, 4.5, 4.2, 4.1, 3.0, 3.5, 2.9, 3.6, 2.8, 3.7, 3.8])
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--patience", "2"])
    assert exit_info.value.code in (0, None)
    captured = capsys.readouterr()
    assert ("stopped early after step 4: the val loss has not improved for 2 evaluations (--patience 2); best.pt "
            "holds the best, val loss 4.0000") in captured.err.replace("\n", " ")
    assert "status" in captured.out and "early-stopped" in captured.out and "next: gpt2 generate" in captured.out
    assert json.loads((run / "status.json").read_text())["status"] == "early-stopped"
    assert ckpt.load_checkpoint(run / "ckpt.pt")["step"] == 4 and ckpt.load_checkpoint(run / "best.pt")["step"] == 2

    with pytest.raises(SystemExit):
        main([*args, "--resume", "auto", "--patience", "3"])  # 4.1: a third evaluation without a new best
    assert ckpt.load_checkpoint(run / "ckpt.pt")["step"] == 5
    assert json.loads((run / "status.json").read_text())["status"] == "early-stopped"
    with pytest.raises(SystemExit):
        main([*args, "--resume", "auto", "--patience", "5"])  # 3.0 is a new best: the count starts again
    assert ckpt.load_checkpoint(run / "ckpt.pt")["step"] == 12 and ckpt.load_checkpoint(run / "best.pt")["step"] == 10
    assert json.loads((run / "status.json").read_text())["status"] == "completed"


def test_compare_shows_an_early_stopped_run_as_such(tmp_path, cache_dir, monkeypatch):
    from gpt2cli.compare import load_run

    scripted_val_losses(monkeypatch, [5.0, 5.1])
    result = train(tiny_spec(tmp_path / "run", train={"steps": 8}, eval={"every": 1, "patience": 1}))
    assert (result.status, result.step) == ("early-stopped", 2)
    assert load_run(tmp_path / "run").status == "early-stopped"


def test_auto_named_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, cache_dir, monkeypatch):
    import gpt2cli.train as train_module

    monkeypatch.setattr(train_module, "auto_run_name", lambda spec: "tiny-mha-learned-20261129-120000")
    runs = tmp_path / "runs"
    spec = tiny_spec(tmp_path / "unused", train={"steps": 2})
    spec = spec.model_copy(update={"run": spec.run.model_copy(update={"out": None, "runs_dir": str(runs)})})
    first, second = train(spec), train(spec)
    assert first.run_dir == runs / "tiny-mha-learned-20261129-120000"
    assert second.run_dir == runs / "tiny-mha-learned-20261129-120000-2"
    assert first.finished and second.finished and (second.run_dir / "ckpt.pt").exists()
    stored = TrainSpec.model_validate_json((second.run_dir / "spec.json").read_text())
    assert stored.run.out == str(second.run_dir)


def test_a_typed_setting_that_does_nothing_is_refused_but_not_in_a_sweep(tmp_path):
    for extra, says in [(["--rope-base", "5000"], "--rope-base (model.rope_base) does nothing without --pos rope"),
                        (["--set", "model.rope_base=500"], "does nothing without --pos rope"),
                        (["--max-nonfinite-skips", "3"], "does nothing without --on-nonfinite skip")]:
        proc = run_gpt2("train", "--preset", "tiny", "--dry-run", *extra)
        assert proc.returncode == 2 and says in proc.stderr, (extra, proc.stderr)
    # In a sweep the setting is meant for the points where it applies.
    sweep = run_gpt2("train", "--preset", "tiny", "--steps", "2", "--rope-base", "5000", "--sweep", "pos=learned,rope",
                     "--out", str(tmp_path / "sweep"), "--dry-run")
    assert sweep.returncode == 0, sweep.stderr


def test_a_dry_run_of_a_resume_says_where_it_continues_and_refuses_what_the_resume_would(tmp_path, cache_dir):
    run = tmp_path / "run"
    train(tiny_spec(run, train={"steps": 4}))
    common = ["train", "--out", str(run), "--resume", "auto", "--dry-run"]
    ok = run_gpt2(*common, "--steps", "8", "--lr", "1e-3", check=True)
    assert f"resume: {run / 'ckpt.pt'} at step 4 of 8" in ok.stdout and "optim.lr 0.003 -> 0.001" in ok.stdout
    for extra, says in [(["--steps", "8", "--batch-size", "8"], "the global batch changed from 4 to 8")]:
        refused = run_gpt2(*common, *extra)
        assert refused.returncode == 2 and refused.stdout == "" and says in refused.stderr, refused.stderr
    fresh = run_gpt2("train", "--preset", "tiny", "--out", str(tmp_path / "new"), "--resume", "auto", "--dry-run",
                     check=True)
    assert "resume: no checkpoint in" in fresh.stdout and not (tmp_path / "new").exists()
