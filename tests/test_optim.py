"""gpt2cli.optim: which weights each optimizer gets, the size and shape of Muon's steps, exact resume
of a Muon run, and the settings Muon refuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpt2cli.errors import UserError
from gpt2cli.model import GPT
from gpt2cli.optim import OptimizerSet, build_optimizer, muon_matrices
from gpt2cli.specs import ModelSpec, TrainSpec, build_spec
from gpt2cli.train import train
from tests.conftest import run_gpt2
from tests.test_train import tiny_spec, train_losses

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch 2.9+")


def muon_spec(**optim) -> TrainSpec:
    return build_spec(TrainSpec, flags={"model": {"preset": "tiny"}, "optim": {"name": "muon", "lr": 1e-2, **optim}})


def tiny_model(**model) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelSpec(preset="tiny", **model))


def test_muon_gets_the_block_matrices_and_adamw_everything_else():
    model = tiny_model(pos="rope", rope_learnable=True, attn="gqa")
    optimizer = build_optimizer(model, muon_spec(), torch.device("cpu"))
    assert isinstance(optimizer, OptimizerSet)
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = sorted(names[id(p)] for g in muon.param_groups for p in g["params"])
    in_adamw = sorted(names[id(p)] for g in adamw.param_groups for p in g["params"])
    expected = sorted(f"transformer.h.{i}.{m}.weight" for i in range(model.spec.n_layer)
                      for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert in_muon == expected
    # Every other trainable tensor once, the tied embedding/output matrix included; no tensor twice.
    assert sorted(in_muon + in_adamw) == sorted(names.values())
    assert "transformer.wte.weight" in in_adamw and "rope.inv_freq" in in_adamw
    # The step's lr, set on the set's groups, reaches both optimizers.
    for group in optimizer.param_groups:
        group["lr"] = 0.5
    assert {g["lr"] for o in optimizer for g in o.param_groups} == {0.5}


def test_a_wrapped_model_gives_the_same_matrices():
    model = tiny_model()
    wrapper = nn.Sequential(model)  # stands for DDP's or torch.compile's module around the model
    assert [id(p) for p in muon_matrices(wrapper)] == [id(p) for p in muon_matrices(model)]


def test_muon_steps_are_orthogonal_and_of_adamw_size():
    """Muon moves an m x n matrix against the orthogonal factor of its gradient (U V^T of the SVD
    U S V^T), scaled as Moonshot's recipe says: 0.2 * lr * sqrt(max(m, n)), an RMS of about
    0.2 * lr whatever the shape, which lets a run keep the lr tuned for AdamW. AdamW's first step
    moves every weight by lr."""
    model = tiny_model()
    lr = 1e-2
    optimizer = build_optimizer(model, muon_spec(lr=lr, weight_decay=0.0), torch.device("cpu"))
    x = torch.randint(0, model.spec.vocab_size, (16, 64))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(x, targets=x.roll(-1, dims=1)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    matrices = {id(p) for p in muon_matrices(model)}
    for name, p in model.named_parameters():
        delta = (p.detach() - before[name]).float()
        if id(p) in matrices:
            step = delta / (0.2 * lr * max(p.shape) ** 0.5)
            u, _, vh = torch.linalg.svd(grads[name], full_matrices=False)
            polar = u @ vh
            cosine = (step * polar).sum() / (step.norm() * polar.norm())
            # Five quintic Newton-Schulz steps in bf16 take the singular values to about 1 (0.7-1.2),
            # not exactly 1; the directions the gradient lacks (LayerNorm leaves a few) stay small.
            assert cosine < -0.9, (name, cosine)
            singular = torch.linalg.svdvals(step)
            assert singular.max() < 1.5 and 0.7 < singular.median() < 1.3, (name, singular)
            assert 0.1 * lr < delta.pow(2).mean().sqrt() < 0.3 * lr, name
        elif name == "transformer.wte.weight":
            moved = delta[delta != 0].abs()  # g / (|g| + eps): lr, a little less where g is tiny
            assert moved.max() <= lr * 1.001 and moved.median() == pytest.approx(lr, rel=1e-2)


def test_a_muon_run_learns_and_resumes_exactly(tmp_path, cache_dir, monkeypatch):
    muon = {"name": "muon", "lr": 3e-3, "warmup": 2}
    full = tmp_path / "full"
    train(tiny_spec(full, train={"steps": 10}, optim=muon))
    losses = train_losses(full)
    assert sum(list(losses.values())[-3:]) / 3 < sum(list(losses.values())[:3]) / 3 - 0.5
    part = tmp_path / "part"
    monkeypatch.setenv("GPT2_FAULT", "stop_at_step:5")
    assert train(tiny_spec(part, train={"steps": 10}, optim=muon)).step == 5
    monkeypatch.delenv("GPT2_FAULT")
    assert train(tiny_spec(part, train={"steps": 10}, optim=muon, run={"resume": "auto"})).step == 10
    assert train_losses(part) == losses  # the momentum buffers came back from the checkpoint


def test_loaded_optimizer_state_keeps_the_settings_of_the_spec():
    """An optimizer's state_dict carries its groups' settings: loaded as they are, a resume that
    changes --betas, --weight-decay or adamw -> adam would run on with the checkpoint's."""
    from gpt2cli.optim import keep_settings_of

    model = tiny_model()
    saved = build_optimizer(model, build_spec(TrainSpec, flags={"model": {"preset": "tiny"}}), torch.device("cpu"))
    x = torch.randint(0, model.spec.vocab_size, (2, 16))
    model(x, targets=x).backward()
    saved.step()
    changed = build_spec(TrainSpec, flags={"model": {"preset": "tiny"},
                                           "optim": {"name": "adam", "betas": (0.8, 0.9), "weight_decay": 0.3}})
    resumed = build_optimizer(model, changed, torch.device("cpu"))
    resumed.load_state_dict(saved.state_dict())
    assert resumed.param_groups[0]["betas"] == (0.9, 0.95)  # the checkpoint's, until:
    keep_settings_of(resumed, build_optimizer(model, changed, torch.device("cpu")))
    assert all(g["betas"] == (0.8, 0.9) and g["weight_decay"] == 0.0 for g in resumed.param_groups)  # Adam: no decay
    assert all(not g.get("decoupled_weight_decay", False) for g in resumed.param_groups)
    assert resumed.state  # the moments stay


def test_a_resume_cannot_switch_between_adam_and_muon_state(tmp_path, cache_dir):
    run = tmp_path / "run"
    train(tiny_spec(run, train={"steps": 4}))
    with pytest.raises(UserError, match=r"another optimizer \(adamw -> muon\)"):
        train(tiny_spec(run, train={"steps": 8}, optim={"name": "muon"}, run={"resume": "auto"}))
    # Adam and AdamW keep the same kind of state: that change is allowed (and recorded).
    assert train(tiny_spec(run, train={"steps": 6}, optim={"name": "adam"}, run={"resume": "auto"})).step == 6


@pytest.mark.parametrize("extra, says", [
    (["--optimizer", "muon", "--strategy", "fsdp"], "does not run under --strategy fsdp"),
    (["--muon-momentum", "0.9"], "--muon-momentum (optim.muon_momentum) does nothing without --optimizer muon"),
    (["--optimizer", "muon", "--muon-momentum", "1"], "--muon-momentum"),
])
def test_muon_settings_that_cannot_work_are_one_line(tmp_path, extra, says):
    proc = run_gpt2("train", "--preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "run"), *extra)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and says in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_torch_without_muon_is_told_so_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    spec = tiny_spec(tmp_path / "run", optim={"name": "muon"})
    with pytest.raises(UserError, match=r"--optimizer muon needs torch 2.9 or newer"):
        train(spec)
    assert not (tmp_path / "run").exists()
