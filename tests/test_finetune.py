"""Fine-tuning (`gpt2 train --init CKPT`): the run starts from the named weights, its model takes
their shape, its optimizer, schedule and data order start fresh, and a resume ignores --init."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpt2cli import checkpoint as ckpt
from gpt2cli.cli.train import resolve_train_spec
from gpt2cli.errors import UserError
from gpt2cli.loading import load_model, model_spec_of, save_safetensors
from gpt2cli.metrics import read_metrics
from gpt2cli.presets import FALLBACK_LR, FINETUNE_LR_SCALE, RECOMMENDED_LR
from gpt2cli.specs import TrainSpec, build_spec
from gpt2cli.train import train
from tests.conftest import random_hf_gpt2, run_gpt2

# An Adam step moves a weight by about lr: at 1e-9 the trained weights are the starting ones.
STILL_LR = 1e-9


def finetune_spec(out: Path, init: str | Path | None, **sections) -> TrainSpec:
    """What `gpt2 train --init INIT` resolves to, with a short tiny run's settings."""
    values = {"--init": str(init) if init is not None else None, "--out": str(out), "--steps": 2,
              "--batch-size": 2, "--seq-len": 16, "--device": "cpu", "--eval-every": 2, "--eval-tokens": 256,
              "--warmup": 0, "--log-every": 1, **sections}
    if init is None:
        values["--preset"] = "tiny"
    return resolve_train_spec(values, None, [])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path).model.state_dict()


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, cache_dir) -> Path:
    """A tiny RoPE + GQA run to start from (not GPT-2's shape: the shape must come from it)."""
    out = tmp_path_factory.mktemp("finetune") / "source"
    spec = build_spec(TrainSpec, flags={
        "model": {"preset": "tiny", "pos": "rope", "attn": "gqa", "dropout": 0.0},
        "train": {"steps": 20, "batch_size": 4, "seq_len": 32, "device": "cpu"},
        "eval": {"every": 20, "tokens": 512}, "run": {"out": str(out)},
    })
    train(spec)
    return out


def test_the_run_takes_the_shape_and_weights_of_init_and_a_fine_tuning_learning_rate(source_run, tmp_path):
    spec = finetune_spec(tmp_path / "ft", source_run, **{"--lr": None})
    source = model_spec_of(source_run)
    assert spec.model.shape_fields() == source.shape_fields() and spec.model.pos == "rope"
    assert spec.run.init == str(source_run)
    assert spec.optim.lr == pytest.approx(RECOMMENDED_LR["tiny"] * FINETUNE_LR_SCALE)

    result = train(finetune_spec(tmp_path / "ft", source_run, **{"--lr": STILL_LR}))
    assert result.status == "completed" and result.step == 2
    start, tuned = weights(source_run / ckpt.BEST_NAME), weights(tmp_path / "ft" / ckpt.CKPT_NAME)
    assert start.keys() == tuned.keys()
    for name in start:
        torch.testing.assert_close(tuned[name], start[name], rtol=0, atol=1e-7, msg=name)
    # The first evaluation scores the source's weights: far below a fresh model's ~10.8.
    first_eval = next(r for r in read_metrics(tmp_path / "ft" / "metrics.jsonl") if r["kind"] == "eval")
    fresh = train(finetune_spec(tmp_path / "fresh", None, **{"--lr": STILL_LR, "--pos": "rope", "--attn": "gqa"}))
    assert first_eval["val_loss"] < fresh.val_loss - 0.5


def test_a_resumed_fine_tuning_run_continues_from_its_checkpoint_not_from_init(source_run, tmp_path):
    """--init is read only when the run starts: a resume takes the weights of its checkpoint, so
    the weights it started from may be gone by then."""
    init = tmp_path / "start.pt"
    init.write_bytes((source_run / ckpt.BEST_NAME).read_bytes())
    train(finetune_spec(tmp_path / "ft", init, **{"--lr": 1e-3}))
    after_two = weights(tmp_path / "ft" / ckpt.CKPT_NAME)
    init.unlink()
    spec = resolve_train_spec({"--out": str(tmp_path / "ft"), "--resume": "auto", "--steps": 3}, None, [])
    assert spec.run.init == str(init)  # kept in the run's spec, as where it started
    result = train(spec)
    assert result.status == "completed" and result.step == 3
    rows = [r for r in read_metrics(tmp_path / "ft" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["start_step"] == 2
    assert not torch.equal(weights(tmp_path / "ft" / ckpt.CKPT_NAME)["transformer.wte.weight"],
                           after_two["transformer.wte.weight"])


def test_a_hugging_face_folder_and_a_safetensors_export_start_a_run(tmp_path, cache_dir):
    hf_dir = tmp_path / "hf"
    random_hf_gpt2(0.05, n_positions=64).save_pretrained(hf_dir)
    spec = finetune_spec(tmp_path / "from-hf", hf_dir, **{"--lr": None})
    assert (spec.model.n_layer, spec.model.n_embd, spec.model.block_size) == (2, 32, 64)
    assert spec.model.preset is None and spec.model.dropout == pytest.approx(0.1)  # the config's dropout
    assert spec.optim.lr == pytest.approx(FALLBACK_LR * FINETUNE_LR_SCALE)
    train(finetune_spec(tmp_path / "from-hf", hf_dir, **{"--lr": STILL_LR, "--dropout": 0.0}))
    hf_weights = weights(hf_dir)
    for name, tensor in weights(tmp_path / "from-hf" / ckpt.CKPT_NAME).items():
        torch.testing.assert_close(tensor, hf_weights[name], rtol=0, atol=1e-7, msg=name)

    export = save_safetensors(load_model(hf_dir).model, tmp_path / "model.safetensors")
    assert model_spec_of(export).shape_fields() == spec.model.shape_fields()
    train(finetune_spec(tmp_path / "from-export", export, **{"--lr": STILL_LR}))
    torch.testing.assert_close(weights(tmp_path / "from-export" / ckpt.CKPT_NAME)["transformer.h.0.mlp.c_fc.weight"],
                               hf_weights["transformer.h.0.mlp.c_fc.weight"], rtol=0, atol=1e-7)


def test_an_imported_model_of_a_presets_shape_takes_that_preset(tmp_path):
    """GPT-2's published shape is the gpt2 preset: its recommended rate (a tenth of it) and name."""
    config = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_layer": 12, "n_head": 12,
              "n_embd": 768, "activation_function": "gelu_new"}
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(config))
    (tmp_path / "gpt2" / "model.safetensors").write_bytes(b"")  # only config.json is read for the spec
    spec = finetune_spec(tmp_path / "ft", tmp_path / "gpt2", **{"--lr": None})
    assert spec.model.preset == "gpt2" and spec.optim.lr == pytest.approx(6e-5)


@pytest.mark.parametrize("flags,expected", [
    ({"--n-layer": 3}, "--init {init}: the model settings change the shape of its weights: --n-layer 3 (the weights: 2)"),
    ({"--pos": "learned"}, "--pos learned (the weights: rope)"),
    ({"--attn": "mha"}, "--attn mha (the weights: gqa)"),
    ({"--kv-heads": 1}, "--kv-heads 1 (the weights: 2)"),
    ({"--preset": "nano"}, "--preset nano and --init {init} both choose the model"),
])
def test_model_settings_that_change_the_shape_of_init_are_refused(source_run, tmp_path, flags, expected):
    with pytest.raises(UserError) as info:
        finetune_spec(tmp_path / "ft", source_run, **flags)
    assert expected.format(init=source_run) in info.value.render()
    spec = finetune_spec(tmp_path / "ft", source_run, **{"--dropout": 0.2})  # leaves the shapes alone
    assert spec.model.dropout == pytest.approx(0.2)


def test_the_real_command_fine_tunes_and_refuses_bad_weights_before_the_run_folder(source_run, tmp_path):
    args = ["train", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--device", "cpu",
            "--eval-every", "2", "--eval-tokens", "256"]
    proc = run_gpt2(*args, "--init", str(source_run), "--out", str(tmp_path / "ft"), check=True)
    assert f"fine-tuning run folder {str(source_run)!r} (best.pt" in proc.stderr.replace("\n", "")
    assert json.loads((tmp_path / "ft" / "spec.json").read_text())["run"]["init"] == str(source_run)

    nan = tmp_path / "nan.safetensors"
    model = load_model(source_run).model
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    save_safetensors(model, nan)
    for init, message in ((tmp_path / "missing.pt", "does not exist"), (nan, "hold NaN or inf")):
        proc = run_gpt2(*args, "--init", str(init), "--out", str(tmp_path / "bad"))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
        assert not (tmp_path / "bad").exists()


def test_a_resume_that_names_another_init_is_refused(source_run, tmp_path):
    train(finetune_spec(tmp_path / "ft", source_run, **{"--lr": 1e-3}))
    for other in (str(tmp_path / "elsewhere.pt"), None):
        if other is None:  # a plain run resumed with an --init it never had
            train(finetune_spec(tmp_path / "plain", None, **{"--lr": 1e-3}))
        run = tmp_path / ("ft" if other else "plain")
        given = other or str(source_run)
        with pytest.raises(UserError) as info:
            resolve_train_spec({"--out": str(run), "--resume": "auto", "--steps": 3, "--init": given}, None, [])
        started = f"started from --init {source_run}" if other else "started without --init"
        assert info.value.render().startswith(f"Error: --init {given}: the run being resumed {started}")
    same = resolve_train_spec({"--out": str(tmp_path / "ft"), "--resume": "auto", "--steps": 3,
                               "--init": str(source_run)}, None, [])
    assert same.run.init == str(source_run)  # naming the same weights again is fine


def test_processes_that_read_different_init_weights_refuse_to_train():
    """Each process reads --init itself; a file rewritten meanwhile would give the replicas other
    weights. The sum of every weight, compared across ranks, stops that."""
    from types import SimpleNamespace

    from gpt2cli.train import _Trainer

    state = {"w": torch.ones(3, 2), "b": torch.full((2,), 0.5)}

    def runner(other_rank_total: float | None):
        def all_reduce_max(values):  # what a max over this rank and one other gives
            other = values if other_rank_total is None else torch.tensor([other_rank_total, -other_rank_total],
                                                                         dtype=torch.float64)
            return torch.maximum(values, other)
        strategy = SimpleNamespace(world_size=2, all_reduce_max=all_reduce_max)
        return SimpleNamespace(strategy=strategy, device=torch.device("cpu"),
                               spec=SimpleNamespace(run=SimpleNamespace(init="runs/base")))

    _Trainer._check_same_init_everywhere(runner(None), state)  # the same weights everywhere
    with pytest.raises(UserError, match="the processes read different weights from run.init 'runs/base'"):
        _Trainer._check_same_init_everywhere(runner(7.5), state)


def test_compare_shows_where_a_fine_tuning_run_started(source_run, tmp_path):
    """The run section is left out of compare's setting rows (folders, resume, printing), but
    --init changes what is trained: a fine-tuned and a from-scratch run differ in run.init."""
    from gpt2cli.compare import compare_runs, load_run

    train(finetune_spec(tmp_path / "tuned", source_run, **{"--lr": 1e-3}))
    train(finetune_spec(tmp_path / "fresh", None, **{"--lr": 1e-3, "--pos": "rope", "--attn": "gqa"}))
    comparison = compare_runs([load_run(tmp_path / "tuned"), load_run(tmp_path / "fresh")])
    row = next(r for r in comparison.rows if r.key == "run.init")
    assert [comparison.cell(row, i) for i in range(2)] == [str(source_run), "null"]
    assert not any(r.key in ("run.out", "run.tensorboard") for r in comparison.rows)
