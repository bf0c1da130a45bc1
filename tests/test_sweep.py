"""Sweeps: parsing --sweep, expanding the grid x seeds, and a tiny real sweep through `gpt2 train`
that creates and compares its grid."""

from __future__ import annotations

import json

import pytest

from gpt2cli.cli.compare import flag_aliases
from gpt2cli.compare import compare_paths
from gpt2cli.errors import UserError
from gpt2cli.specs import TrainSpec, build_spec
from gpt2cli.sweep import Axis, check_conflicts, parse_axes, plan_sweep, run_sweep
from tests.conftest import run_gpt2


def test_parse_axes_resolves_flag_names_dotted_paths_and_field_names():
    axes = parse_axes(["pos=learned,rope", "--attn=mha,gqa", "optim.lr=1e-3, 3e-4", "kv-heads=1,2",
                       "n_embd=64,128", "betas=[0.9,0.95],[0.9,0.99]"], flag_aliases())
    assert [(a.key, a.path) for a in axes] == [
        ("pos", "model.pos"), ("attn", "model.attn"), ("optim.lr", "optim.lr"), ("kv-heads", "model.n_kv_head"),
        ("n_embd", "model.n_embd"), ("betas", "optim.betas")]
    assert axes[2].values == ("1e-3", "3e-4") and axes[5].values == ("[0.9,0.95]", "[0.9,0.99]")


@pytest.mark.parametrize("text, match", [
    ("pos", "not of the form"),
    ("pos=", "not of the form"),
    ("colour=red,blue", "not a setting"),
    ("batch_size=1,2", "ambiguous"),  # train.batch_size or eval.batch_size
    ("pos=rope,,learned", "empty value"),
    ("pos=rope,rope", "repeats"),
    ("out=a,b", "cannot vary run.out"),
    ("seed=1,2", "--seeds"),
])
def test_parse_axes_refuses_bad_input(text, match):
    with pytest.raises(UserError, match=match):
        parse_axes([text], flag_aliases())


def test_a_variants_file_is_an_axis_of_hand_picked_settings(tmp_path):
    variants = tmp_path / "variants.toml"
    variants.write_text('''
[[variants]]
name = "gpt2"
pos = "learned"

[[variants]]
name = "rope-gqa"
model = { pos = "rope", attn = "gqa" }
optim.lr = 3e-4
''', encoding="utf-8")
    axes = parse_axes([str(variants), "warmup=0,10"], flag_aliases())
    assert axes[0].paths == ["model.pos", "model.attn", "optim.lr"]
    sweep = plan_sweep(tmp_path / "sweep", axes, 1, 0, build_tiny)
    assert [p.name for p in sweep.points] == ["gpt2_warmup=0", "gpt2_warmup=10", "rope-gqa_warmup=0",
                                              "rope-gqa_warmup=10"]
    spec = sweep.points[2].spec
    assert (spec.model.pos, spec.model.attn, spec.optim.lr, spec.optim.warmup) == ("rope", "gqa", 3e-4, 0)
    assert sweep.points[0].spec.model.attn == "mha"
    assert sweep.points[0].overrides == {"model.pos": "learned", "optim.warmup": "0"}
    assert sweep.to_manifest()["axes"][0]["variants"][1]["name"] == "rope-gqa"
    with pytest.raises(UserError, match="twice"):
        parse_axes([str(variants), "pos=learned,rope"], flag_aliases())
    bad = tmp_path / "bad.yaml"
    bad.write_text("pos: [learned, rope]\n", encoding="utf-8")
    with pytest.raises(UserError, match="variants"):
        parse_axes([str(bad)], flag_aliases())


def test_an_axis_given_twice_or_also_by_a_flag_is_refused():
    with pytest.raises(UserError, match="twice"):
        parse_axes(["pos=rope", "model.pos=learned"], flag_aliases())
    with pytest.raises(UserError, match="--pos"):
        check_conflicts([Axis("pos", "model.pos", ("rope",))], {"model.pos": "--pos"})


def build_tiny(overrides, seed, run_dir) -> TrainSpec:
    sets = [f"{path}={value}" for path, value in overrides.items()] + [f"train.seed={seed}"]
    return build_spec(TrainSpec, flags={"model": {"preset": "tiny"}, "run": {"out": str(run_dir)}}, sets=sets)


def test_grid_times_seeds_goes_seed_by_seed_with_derived_defaults(tmp_path):
    axes = parse_axes(["pos=learned,rope", "attn=mha,gqa"], flag_aliases())
    sweep = plan_sweep(tmp_path / "sweep", axes, seeds=3, base_seed=7, build=build_tiny)
    assert len(sweep.points) == 12 and sweep.seeds == [7, 8, 9]
    assert [p.name for p in sweep.points[:4]] == [
        "pos=learned_attn=mha_seed=7", "pos=learned_attn=gqa_seed=7",
        "pos=rope_attn=mha_seed=7", "pos=rope_attn=gqa_seed=7"]
    assert [p.seed for p in sweep.points] == [7] * 4 + [8] * 4 + [9] * 4
    gqa = sweep.points[1].spec
    # The swept value goes in before validation: kv heads are derived for gqa (tiny: 4 heads -> 2).
    assert gqa.model.attn == "gqa" and gqa.model.n_kv_head == 2 and gqa.train.seed == 7
    assert gqa.run.out == str(tmp_path / "sweep" / "pos=learned_attn=gqa_seed=7")
    lr = plan_sweep(tmp_path / "lr", parse_axes(["lr=1e-3,1e-2"], flag_aliases()), 1, 0, build_tiny)
    assert [p.name for p in lr.points] == ["lr=1e-3", "lr=1e-2"]
    assert [p.spec.optim.min_lr for p in lr.points] == pytest.approx([1e-4, 1e-3])  # lr / 10 each
    seeds_only = plan_sweep(tmp_path / "s", [], 2, 5, build_tiny)
    assert [p.name for p in seeds_only.points] == ["seed=5", "seed=6"]


def test_a_point_that_does_not_validate_is_named_before_anything_runs(tmp_path):
    axes = parse_axes(["n_head=4,3"], flag_aliases())
    with pytest.raises(UserError, match="sweep run n_head=3: .*divisible"):
        plan_sweep(tmp_path / "sweep", axes, 1, 0, build_tiny)
    assert not (tmp_path / "sweep").exists()


def test_run_sweep_records_statuses_and_goes_on_after_a_nonfinite_loss(tmp_path):
    from gpt2cli.errors import NonFiniteLossError

    sweep = plan_sweep(tmp_path / "sweep", parse_axes(["lr=1e-3,1e0,1e-4"], flag_aliases()), 1, 0, build_tiny)
    trained = []

    def train_one(point, index):
        trained.append(point.name)
        if point.name == "lr=1e0":
            raise NonFiniteLossError("non-finite loss at step 3")
        return "done"

    run_sweep(sweep, train_one)
    manifest = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["done", "failed", "done"]
    assert "step 3" in manifest["runs"][1]["error"] and len(trained) == 3
    again = plan_sweep(tmp_path / "sweep", parse_axes(["lr=1e-3,1e0,1e-4"], flag_aliases()), 1, 0, build_tiny)
    with pytest.raises(UserError, match="already holds a sweep"):
        run_sweep(again, train_one)
    trained.clear()
    run_sweep(again, lambda p, i: trained.append(p.name) or "done", resume=True)
    assert trained == ["lr=1e0"]  # finished runs are skipped
    other = plan_sweep(tmp_path / "sweep", parse_axes(["lr=1e-3"], flag_aliases()), 1, 0, build_tiny)
    with pytest.raises(UserError, match="different grid"):
        run_sweep(other, lambda p, i: "done", resume=True)


TINY = ["train", "--preset", "tiny", "--steps", "2", "--seq-len", "16", "--batch-size", "2",
        "--eval-tokens", "256", "--device", "cpu"]


def test_cli_dry_run_and_conflicts_write_nothing(tmp_path):
    parent = tmp_path / "sweep"
    proc = run_gpt2(*TINY, "--sweep", "pos=learned,rope", "--seeds", "2", "--out", str(parent), "--dry-run",
                    check=True)
    assert "sweep of 4 runs" in proc.stdout and "pos=rope_seed=1338" in proc.stdout
    bad = run_gpt2(*TINY, "--pos", "rope", "--sweep", "pos=learned,rope", "--out", str(parent))
    assert bad.returncode == 2 and "--pos" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not parent.exists()


def test_tiny_sweep_creates_and_compares_its_grid(tmp_path, cache_dir):
    parent = tmp_path / "sweep"
    args = [*TINY, "--sweep", "pos=learned,rope", "--out", str(parent)]
    proc = run_gpt2(*args, check=True)
    manifest = json.loads((parent / "sweep.json").read_text())
    names = [r["name"] for r in manifest["runs"]]
    assert names == ["pos=learned", "pos=rope"] and all(r["status"] == "done" for r in manifest["runs"])
    for name, pos in zip(names, ["learned", "rope"], strict=True):
        spec = TrainSpec.model_validate_json((parent / name / "spec.json").read_text())
        assert spec.model.pos == pos and spec.train.steps == 2
        assert (parent / name / "metrics.jsonl").exists()
    # stdout holds the comparison only (per-run summaries go to stderr).
    assert "model.pos" in proc.stdout and "pos=learned" in proc.stdout and "best val loss" in proc.stdout
    assert "sweep 2/2 pos=rope" in proc.stderr

    compared = compare_paths([parent])  # what `gpt2 compare PARENT` shows
    assert [c.label for c in compared.columns] == names
    assert all(c.status == "done" and c.stats["best_val_loss"].n == 1 for c in compared.columns)
    # The same command again continues the sweep: both runs are done, so it only compares.
    resumed = run_gpt2(*args, "--resume", "auto", check=True)
    assert resumed.stderr.count("done, skipped") == 2 and "model.pos" in resumed.stdout


def test_two_spellings_of_one_value_are_one_run_and_refused(tmp_path):
    proc = run_gpt2("train", "--preset", "tiny", "--steps", "2", "--sweep", "lr=1e-3,0.001", "--out",
                    str(tmp_path / "sweep"), "--dry-run")
    assert proc.returncode == 2 and proc.stderr.startswith("Error: --sweep points lr=1e-3 and lr=0.001 are the same run")
    assert not (tmp_path / "sweep").exists()


def test_a_stop_during_a_runs_last_step_stops_the_sweep_after_it(tmp_path, cache_dir):
    """SIGTERM just after the ranks agreed on the last step (GPT2_FAULT late_stop_at_step): too late
    to interrupt that run, which completes, but the sweep stops there and says how to go on."""
    parent = tmp_path / "sweep"
    args = [*TINY, "--sweep", "pos=learned,rope", "--out", str(parent)]
    proc = run_gpt2(*args, env={"GPT2_FAULT": "late_stop_at_step:2"})
    assert proc.returncode == 75, proc.stderr
    assert "SIGTERM came during the last step; the run completed" in proc.stderr
    assert "sweep stopped after pos=learned" in proc.stderr
    manifest = json.loads((parent / "sweep.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["done", "pending"]  # --resume auto goes on (tested above)
