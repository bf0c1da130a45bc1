"""`gpt2 compare` on synthetic run folders: table values, groups, mean and std, targets, partial
runs, parent folders, plots and the output formats."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

import pytest

from gpt2cli.cli import main
from gpt2cli.compare import (
    compare_paths,
    compare_runs,
    format_stat,
    load_run,
    load_runs,
    strategy_history,
    sweep_lines,
    tied,
    time_to_target,
)
from gpt2cli.errors import UserError
from gpt2cli.modelinfo import model_stats
from gpt2cli.plot import terminal_chart, write_plot
from gpt2cli.specs import TrainSpec, build_spec, spec_to_json
from tests.conftest import run_gpt2

TOKENS_PER_STEP = 4 * 32  # batch 4 x seq_len 32 below
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_spec(out: Path, steps: int = 4, seed: int = 1337, **model) -> TrainSpec:
    return build_spec(TrainSpec, flags={
        "model": {"preset": "tiny", **model},
        "train": {"steps": steps, "batch_size": 4, "seq_len": 32, "seed": seed, "device": "cpu"},
        "run": {"out": str(out)},
    })


def make_run(path: Path, val: list[float] | None = None, train: list[float] | None = None, *, steps: int = 4,
             seed: int = 1337, eval_every: int = 2, tokens_per_s: list[float] | None = None,
             times: list[float] | None = None, lr: float | None = None, hellaswag: list[float] | None = None,
             **model) -> Path:
    """A run folder as `gpt2 train` writes it: spec.json and metrics.jsonl (train row every step,
    eval row every `eval_every` steps, with HellaSwag's acc_norm when given; `times` are the time_s
    of the train rows)."""
    spec = make_spec(path, steps=steps, seed=seed, **model)
    if lr is not None:
        spec = spec.model_copy(update={"optim": spec.optim.model_copy(update={"lr": lr, "min_lr": lr / 10})})
    path.mkdir(parents=True)
    (path / "spec.json").write_text(spec_to_json(spec), encoding="utf-8")
    if val is None and train is None:
        return path
    train = train or []
    tps = tokens_per_s or [1000.0] * len(train)
    times = times or [float(i) for i in range(1, len(train) + 1)]
    rows = []
    for i, loss in enumerate(train, start=1):
        rows.append({"kind": "train", "step": i, "tokens": i * TOKENS_PER_STEP, "loss": loss, "lr": 1e-3,
                     "grad_norm": 1.0, "tokens_per_s": tps[i - 1], "time_s": times[i - 1],
                     "peak_rss_bytes": 100 * 2**20 + i})
        if val and i % eval_every == 0 and i // eval_every <= len(val):
            v = val[i // eval_every - 1]
            rows.append({"kind": "eval", "step": i, "tokens": i * TOKENS_PER_STEP, "val_loss": v,
                         "val_ppl": math.exp(v), "best": True, "time_s": times[i - 1] + 0.5})
            if hellaswag:
                rows[-1].update(hellaswag_acc_norm=hellaswag[i // eval_every - 1], hellaswag_acc=0.25)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `gpt2 ...` in this process (fast); returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def stat(comparison, label: str, key: str):
    col = next(c for c in comparison.columns if c.label == label)
    return col.stats[key]


# ------------------------------------------------------------------------------- the table


def test_table_values_and_best_marking(tmp_path):
    a = make_run(tmp_path / "learned", val=[4.0, 3.5], train=[5.0, 4.5, 4.0, 3.6],
                 tokens_per_s=[10.0, 1000.0, 1200.0, 1100.0])
    b = make_run(tmp_path / "rope", val=[3.9, 3.2], train=[5.0, 4.4, 3.8, 3.4], pos="rope")
    result = compare_paths([a, b])
    assert [c.label for c in result.columns] == ["learned", "rope"]
    assert [r.key for r in result.rows if r.spec] == ["model.pos"]  # only the fields that differ
    assert result.cell(next(r for r in result.rows if r.key == "model.pos"), 1) == "rope"

    params = model_stats(make_spec(a).model)["params"]
    assert stat(result, "learned", "params").mean == params
    assert stat(result, "learned", "best_val_loss").mean == 3.5
    assert stat(result, "rope", "final_val_loss").mean == 3.2
    assert stat(result, "rope", "best_val_ppl").mean == pytest.approx(math.exp(3.2))
    assert stat(result, "learned", "final_train_loss").mean == 3.6
    assert stat(result, "learned", "tokens").mean == 4 * TOKENS_PER_STEP
    assert stat(result, "learned", "tokens_per_s").mean == 1100.0  # median without the start-up window
    # A resumed run (time_s restarts): the first window of each segment is start-up, left out too.
    resumed = make_run(tmp_path / "resumed", train=[5.0, 4.8, 4.6, 4.4, 4.2, 4.0],
                       tokens_per_s=[10.0, 1000.0, 1100.0, 20.0, 1200.0, 1300.0], times=[1, 2, 3, 1, 2, 3])
    assert stat(compare_paths([resumed]), "resumed", "tokens_per_s").mean == 1150.0
    assert stat(result, "learned", "wall_time_s").mean == 4.5  # the last row: eval after step 4
    assert stat(result, "learned", "peak_mem_bytes").mean == 100 * 2**20 + 4
    assert result.columns[0].status == "done"

    assert result.best["best_val_loss"] == [1] and result.best["final_train_loss"] == [1]
    assert result.best["rank"] == [1] and result.best_column() == 1
    assert "kv_cache_bytes_per_token" not in result.best  # equal everywhere: nothing to mark
    assert "params" not in result.best  # not a ranked row


def test_kv_cache_row_shows_the_gqa_saving(tmp_path):
    mha = make_run(tmp_path / "mha", val=[3.0], train=[4.0, 3.0])
    gqa = make_run(tmp_path / "gqa", val=[3.1], train=[4.0, 3.1], attn="gqa")
    result = compare_paths([mha, gqa])
    assert stat(result, "mha", "kv_cache_bytes_per_token").mean == 2 * 2 * 4 * 16 * 2  # 2 L n_kv d bf16
    assert stat(result, "gqa", "kv_cache_bytes_per_token").mean == 2 * 2 * 2 * 16 * 2  # tiny gqa: 2 kv heads
    assert result.best["kv_cache_bytes_per_token"] == [1]
    assert {r.key for r in result.rows if r.spec} == {"model.attn", "model.n_kv_head"}


def test_values_equal_within_the_tie_tolerance_share_rank_and_best(tmp_path, capsys):
    # 9.8640 three times, one of them 2e-7 above (float noise): a tie, not a winner.
    a = make_run(tmp_path / "a", val=[10.0, 9.864], train=[5, 4, 3, 2])
    b = make_run(tmp_path / "b", val=[10.0, 9.864 + 2e-7], train=[5, 4, 3, 2])
    c = make_run(tmp_path / "c", val=[10.0, 9.9], train=[5, 4, 3, 2])
    result = compare_paths([c, b, a], group_seeds=False)
    assert [col.rank for col in result.columns] == [3, 1, 1]  # tied runs share a rank
    assert result.best["best_val_loss"] == [1, 2] and result.best["rank"] == [1, 2]
    assert result.best_columns() == [1, 2] and result.best_column() is None
    code, out, _ = cli(capsys, "compare", str(c), str(b), str(a), "--no-group-seeds", "--no-chart")
    assert code == 0 and "best: tie between b, a (best val loss 9.8640)" in out

    # All tied: nothing is marked, everyone is first.
    d = make_run(tmp_path / "d", val=[10.0, 9.864 - 1e-7], train=[5, 4, 3, 2])
    all_tied = compare_paths([a, b, d], group_seeds=False)
    assert [col.rank for col in all_tied.columns] == [1, 1, 1]
    assert "best_val_loss" not in all_tied.best and "rank" not in all_tied.best
    code, out, _ = cli(capsys, "compare", str(a), str(b), str(d), "--no-group-seeds", "--no-chart")
    assert "best: tie between a, b, d" in out

    # A difference that shows in the printed value still ranks.
    e = make_run(tmp_path / "e", val=[10.0, 9.8639], train=[5, 4, 3, 2])
    ranked = compare_paths([a, e], group_seeds=False)
    assert [col.rank for col in ranked.columns] == [2, 1] and ranked.best_column() == 1
    code, out, _ = cli(capsys, "compare", str(a), str(e), "--no-group-seeds", "--no-chart")
    assert "best: e (best val loss 9.8639)" in out and "tie" not in out


def test_tie_rule():
    assert tied(9.864, 9.864 + 2e-7, "loss")  # within 1e-6 relative
    assert tied(3.21004, 3.20996, "loss")  # both print 3.2100
    assert tied(9.86405, 9.86405 - 1e-9, "loss")  # either side of a rounding boundary
    assert not tied(3.2100, 3.2101, "loss")
    assert tied(1234.0, 1234.4, "si") and not tied(1234.0, 1250.0, "si")  # 1.23k
    assert not tied(0.0, 1e-3, "loss")


def write_segments(run: Path, segments: list[tuple[int, str, int]], spec_strategy: str | None = None) -> Path:
    """Give the train rows of ``run`` the strategy and world size `gpt2 train` records: from
    step ``first`` on, (strategy, world size); ``spec_strategy`` is what the last resume left in
    spec.json."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    for row in rows:
        if row["kind"] == "train":
            _, strategy, world = [seg for seg in segments if seg[0] <= row["step"]][-1]
            row.update(strategy=strategy, world_size=world)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if spec_strategy is not None:
        spec = json.loads((run / "spec.json").read_text(encoding="utf-8"))
        spec["parallel"]["strategy"] = spec_strategy
        (run / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    return run


def test_a_run_resumed_under_another_strategy_is_not_grouped_with_pure_runs(tmp_path):
    train = [5, 4, 3, 2]
    # Started with ddp, resumed after step 2 with fsdp: spec.json says fsdp.
    mixed = write_segments(make_run(tmp_path / "mixed", val=[3.0, 2.9], train=train, seed=1),
                           [(1, "ddp", 1), (3, "fsdp", 1)], spec_strategy="fsdp")
    fsdp = write_segments(make_run(tmp_path / "fsdp-s2", val=[3.0, 2.8], train=train, seed=2),
                          [(1, "fsdp", 1)], spec_strategy="fsdp")
    # Written before rows recorded the strategy: spec.json alone speaks for it, as before.
    old = make_run(tmp_path / "fsdp-s3", val=[3.0, 2.7], train=train, seed=3)
    spec = json.loads((old / "spec.json").read_text(encoding="utf-8"))
    spec["parallel"]["strategy"] = "fsdp"
    (old / "spec.json").write_text(json.dumps(spec), encoding="utf-8")

    runs = load_runs([mixed, fsdp, old])
    assert runs[0].fields["parallel.strategy"] == "ddp→fsdp"
    assert runs[0].segments == [("ddp", 1, 1), ("fsdp", 1, 3)]
    assert runs[1].fields["parallel.strategy"] == "fsdp" and runs[2].segments == []
    assert runs[0].to_dict()["segments"][1] == {"strategy": "fsdp", "world_size": 1, "first_step": 3}

    result = compare_runs(runs)  # seeds group: the two pure fsdp runs, not the resumed one
    assert [len(c.runs) for c in result.columns] == [1, 2]
    row = next(r for r in result.rows if r.key == "parallel.strategy")
    assert [result.cell(row, i) for i in range(2)] == ["ddp→fsdp", "fsdp"]
    by_strategy = compare_runs(runs, group_by="strategy", aliases={"strategy": "parallel.strategy"})
    assert [c.label for c in by_strategy.columns] == ["strategy=ddp→fsdp", "strategy=fsdp"]
    assert json.loads(result.to_json())["columns"][0]["spec"]["parallel.strategy"] == "ddp→fsdp"


def test_strategy_history():
    assert strategy_history([]) is None and strategy_history([("ddp", 2, 1)]) is None
    assert strategy_history([("ddp", 2, 1), ("fsdp", 2, 50)]) == "ddp→fsdp"
    assert strategy_history([("ddp", 2, 1), ("ddp", 4, 50)]) == "ddp x2→ddp x4"
    assert strategy_history([("ddp", 2, 1), ("fsdp", 1, 50), ("ddp", 2, 90)]) == "ddp x2→fsdp x1→ddp x2"


def test_runs_that_differ_by_seed_are_grouped_with_mean_and_std(tmp_path):
    rope_best = [3.0, 3.2, 3.4]
    learned_best = [3.5, 3.8]
    runs = [make_run(tmp_path / f"rope-s{i}", val=[4.0, v], train=[5, 4, 4, 3], seed=i, pos="rope")
            for i, v in enumerate(rope_best)]
    runs += [make_run(tmp_path / f"learned-s{i}", val=[4.0, v], train=[5, 4, 4, 3], seed=i)
             for i, v in enumerate(learned_best)]
    result = compare_paths(runs)
    assert [c.label for c in result.columns] == ["rope", "learned"]  # seed suffix stripped
    rope = stat(result, "rope", "best_val_loss")
    assert rope.n == 3 and rope.mean == pytest.approx(statistics.fmean(rope_best))
    assert rope.std == pytest.approx(statistics.stdev(rope_best))
    learned = stat(result, "learned", "best_val_loss")
    assert learned.std == pytest.approx(statistics.stdev(learned_best))
    row = next(r for r in result.rows if r.key == "best_val_loss")
    assert result.cell(row, 0) == "3.2000 ± 0.2000 (3)"
    assert result.cell(next(r for r in result.rows if r.key == "runs"), 1) == "2"
    # Equal values in a group (same shape, same budget) show no spread.
    assert result.cell(next(r for r in result.rows if r.key == "params"), 0).endswith("(3)")
    assert "±" not in result.cell(next(r for r in result.rows if r.key == "params"), 0)
    seed_row = next(r for r in result.rows if r.key == "train.seed")
    assert result.cell(seed_row, 0) == "0, 1, 2" and result.cell(seed_row, 1) == "0, 1"
    assert result.best["best_val_loss"] == [0]

    separate = compare_runs(load_runs(runs), group_seeds=False)
    assert len(separate.columns) == 5
    assert "train.seed" in [r.key for r in separate.rows if r.spec]


def test_group_by_any_spec_field(tmp_path):
    runs = [
        make_run(tmp_path / "a", val=[3.0], train=[4, 3], pos="rope", lr=1e-3),
        make_run(tmp_path / "b", val=[3.2], train=[4, 3], pos="rope", lr=3e-4),
        make_run(tmp_path / "c", val=[3.6], train=[4, 3], lr=1e-3),
    ]
    loaded = load_runs(runs)
    by_pos = compare_runs(loaded, group_by="pos")
    assert [c.label for c in by_pos.columns] == ["pos=rope", "pos=learned"]
    assert stat(by_pos, "pos=rope", "best_val_loss").mean == pytest.approx(3.1)
    lr_row = next(r for r in by_pos.rows if r.key == "optim.lr")
    assert by_pos.cell(lr_row, 0) == "0.001, 0.0003"  # mixed within the group
    both = compare_runs(loaded, group_by="model.pos,optim.lr")
    assert len(both.columns) == 3 and both.columns[1].label == "model.pos=rope, optim.lr=0.0003"
    aliased = compare_runs(loaded, group_by="kv-heads", aliases={"kv-heads": "model.n_kv_head"})
    assert len(aliased.columns) == 1 and aliased.group_by == ["model.n_kv_head"]
    with pytest.raises(UserError, match="not a spec field"):
        compare_runs(loaded, group_by="colour")
    with pytest.raises(UserError, match="ambiguous"):
        compare_runs(loaded, group_by="tokens")  # train.tokens or eval.tokens


def test_tokens_and_time_to_target_and_resumed_wall_time(tmp_path):
    # Resumed after step 2: time_s starts again from 0 in the second segment.
    slow = make_run(tmp_path / "slow", val=[3.5, 2.9], train=[5, 4, 3, 2], times=[1.0, 2.0, 0.5, 1.5])
    fast = make_run(tmp_path / "fast", val=[2.9, 2.5], train=[5, 4, 3, 2])
    never = make_run(tmp_path / "never", val=[3.5, 3.4], train=[5, 4, 3, 2])
    # Identical specs would form one group (repeated runs): compare them one by one.
    result = compare_paths([slow, fast, never], target=3.0, group_seeds=False)
    assert stat(result, "fast", "tokens_to_target").mean == 2 * TOKENS_PER_STEP
    assert stat(result, "fast", "time_to_target_s").mean == 2.5
    assert stat(result, "slow", "tokens_to_target").mean == 4 * TOKENS_PER_STEP
    # Eval rows come 0.5 s after their step: the first segment ends at 2.5 s, the second eval at 2.0 s.
    assert stat(result, "slow", "time_to_target_s").mean == 2.5 + 2.0
    assert stat(result, "slow", "wall_time_s").mean == 2.5 + 2.0
    row = next(r for r in result.rows if r.key == "tokens_to_target")
    assert row.label == "tokens to val loss <= 3" and result.cell(row, 2) == "not reached"
    assert result.best["tokens_to_target"] == [1]
    by_train = compare_paths([fast, never], target=3.0, metric="train_loss", group_seeds=False)
    assert stat(by_train, "fast", "tokens_to_target").mean == 3 * TOKENS_PER_STEP
    with pytest.raises(UserError, match="unknown metric"):
        compare_paths([fast], metric="accuracy")


def test_hellaswag_ranks_higher_first_and_reaches_targets_from_below(tmp_path, capsys):
    """--metric hellaswag_acc_norm: the best acc_norm over evaluations ranks the runs, higher first,
    a target is reached at or above it, and a run trained without --hellaswag has no value."""
    rising = make_run(tmp_path / "rising", val=[3.5, 3.0], train=[5, 4, 3, 2], hellaswag=[0.26, 0.31])
    falling = make_run(tmp_path / "falling", val=[3.4, 2.9], train=[5, 4, 3, 2], hellaswag=[0.30, 0.27],
                       pos="rope")
    plain = make_run(tmp_path / "plain", val=[3.3, 2.8], train=[5, 4, 3, 2], attn="gqa")
    result = compare_paths([rising, falling, plain], metric="hellaswag_acc_norm", target=0.3)
    assert stat(result, "rising", "best_hellaswag_acc_norm").mean == 0.31
    assert stat(result, "falling", "best_hellaswag_acc_norm").mean == 0.30
    assert stat(result, "falling", "final_hellaswag_acc_norm").mean == 0.27
    assert stat(result, "plain", "best_hellaswag_acc_norm").n == 0
    assert [c.rank for c in result.columns] == [1, 2, None]
    assert result.best["best_hellaswag_acc_norm"] == [0] and result.best["final_hellaswag_acc_norm"] == [0]
    assert result.best["best_val_loss"] == [2]  # the loss rows still mark the lowest
    rank_row = next(r for r in result.rows if r.key == "rank")
    assert rank_row.label == "rank by best HellaSwag acc_norm"
    target_row = next(r for r in result.rows if r.key == "tokens_to_target")
    assert target_row.label == "tokens to HellaSwag acc_norm >= 0.3"
    assert stat(result, "rising", "tokens_to_target").mean == 4 * TOKENS_PER_STEP  # 0.31 at the second eval
    assert stat(result, "falling", "tokens_to_target").mean == 2 * TOKENS_PER_STEP  # 0.30 at the first
    code, out, _ = cli(capsys, "compare", str(rising), str(falling), "--metric", "hellaswag_acc_norm")
    assert code == 0 and "best: rising (best HellaSwag acc_norm 0.3100)" in out

    svg = write_plot(result.columns, tmp_path / "with.svg", metric="hellaswag_acc_norm", target=0.3)
    assert "HellaSwag acc_norm" in svg.read_text(encoding="utf-8")  # the third panel
    without = write_plot(compare_paths([plain]).columns, tmp_path / "without.svg")
    assert "HellaSwag" not in without.read_text(encoding="utf-8")


def test_running_runs_and_runs_without_eval_show_what_they_have(tmp_path):
    running = make_run(tmp_path / "running", train=[5.0, 4.5], steps=10)
    empty = make_run(tmp_path / "empty")
    done = make_run(tmp_path / "done", val=[3.0, 2.8], train=[5, 4, 3, 2])
    result = compare_paths([running, empty, done], group_seeds=False)
    cols = {c.label: c for c in result.columns}
    assert cols["running"].status == "partial: step 2 of 10" and cols["empty"].status == "no metrics"
    assert cols["running"].stats["final_train_loss"].mean == 4.5
    assert cols["running"].stats["best_val_loss"].n == 0
    assert cols["empty"].stats["params"].n == 1  # from the spec alone
    row = next(r for r in result.rows if r.key == "best_val_loss")
    assert result.cell(row, 0) == "-" and result.cell(row, 2) == "2.8000"
    # A group where only some runs have a value says so.
    partial = load_run(running)
    assert format_stat(compare_runs([partial, load_run(empty)], group_by="pos").columns[0].stats["final_train_loss"],
                       "loss") == "4.5000 (1 of 2)"


def test_the_runs_own_status_names_a_failed_or_interrupted_end(tmp_path):
    failed = make_run(tmp_path / "failed", train=[5.0, 4.5], steps=10)
    (failed / "status.json").write_text('{"status": "failed", "step": 2, "total_steps": 10, "error": "x"}')
    stopped = make_run(tmp_path / "stopped", train=[5.0], steps=10)
    (stopped / "status.json").write_text('{"status": "interrupted", "step": 1, "total_steps": 10}')
    live = make_run(tmp_path / "live", train=[5.0], steps=10)
    (live / "status.json").write_text('{"status": "running", "step": 1, "total_steps": 10}')
    done = make_run(tmp_path / "done", train=[5, 4, 3, 2])
    (done / "status.json").write_text("{damaged")
    unlogged = make_run(tmp_path / "unlogged", train=[5.0], steps=10)  # failed 3 steps past its last row
    (unlogged / "status.json").write_text('{"status": "failed", "step": 4, "total_steps": 10, "error": "x"}')
    statuses = {c.label: c.status for c in compare_paths([failed, stopped, live, done, unlogged],
                                                         group_seeds=False).columns}
    assert statuses == {"failed": "failed: step 2 of 10", "stopped": "interrupted: step 1 of 10",
                        "live": "partial: step 1 of 10", "done": "done", "unlogged": "failed: step 4 of 10"}


def test_a_torn_last_line_is_ignored(tmp_path):
    run = make_run(tmp_path / "run", val=[3.0, 2.8], train=[5, 4, 3, 2])
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"kind": "train", "step": 5, "tok')
    assert load_run(run).step == 4


def test_parent_folders_expand_into_their_runs(tmp_path):
    parent = tmp_path / "sweep"
    make_run(parent / "b", val=[3.0], train=[4, 3], steps=2)
    make_run(parent / "a", val=[3.1], train=[4, 3], steps=4, pos="rope")
    (parent / "notes").mkdir()
    assert [r.name for r in load_runs([parent])] == ["a", "b"]  # sorted, non-runs skipped
    manifest = {"kind": "gpt2-sweep", "version": 1, "runs": [
        {"name": "b", "dir": "b", "status": "done"}, {"name": "a", "dir": "a", "status": "failed"},
        {"name": "c", "dir": "c", "status": "pending"}]}
    (parent / "sweep.json").write_text(json.dumps(manifest), encoding="utf-8")
    runs = load_runs([parent, parent / "a"])  # manifest order; a run named twice counts once
    assert [(r.name, r.status) for r in runs] == [("b", "done"), ("a", "failed")]
    # Two sweeps with the same point names: the columns say which folder.
    for i, lr in enumerate((1e-3, 3e-4)):
        for seed in (0, 1):
            make_run(tmp_path / f"lr{i}" / f"pos=rope_seed={seed}", val=[3.0], train=[4, 3], steps=2,
                     seed=seed, pos="rope", lr=lr)
    labels = [c.label for c in compare_paths([tmp_path / "lr0", tmp_path / "lr1"]).columns]
    assert labels == ["lr0/pos=rope", "lr1/pos=rope"]


def test_folders_that_are_not_runs_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for bad, match in ((tmp_path / "empty", "not a run folder"), (tmp_path / "missing", "does not exist"),
                       (tmp_path / "file.txt", "not a run folder")):
        with pytest.raises(UserError, match=match) as exc:
            load_runs([bad])
        assert str(bad) in exc.value.message
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "spec.json").write_text("{not json")
    with pytest.raises(UserError, match="damaged"):
        load_runs([tmp_path / "damaged"])


# --------------------------------------------------------------------------------- plots


def test_plot_writes_a_valid_png_and_svg(tmp_path):
    runs = [make_run(tmp_path / f"r{i}", val=[4.0, 3.0 + i / 10], train=[5, 4, 3.5, 3], seed=i) for i in range(2)]
    runs.append(make_run(tmp_path / "rope", val=[3.9, 2.9], train=[5, 4, 3.4, 2.9], pos="rope"))
    runs.append(make_run(tmp_path / "no-eval", train=[5, 4.2], steps=4, pos="rope", attn="gqa"))
    result = compare_paths(runs, target=3.0)
    png = write_plot(result.columns, tmp_path / "out" / "curves.png", target=3.0)
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5_000
    svg = write_plot(result.columns, tmp_path / "curves.svg")
    assert "<svg" in svg.read_text(encoding="utf-8")
    with pytest.raises(UserError, match=r"\.png or \.svg"):
        write_plot(result.columns, tmp_path / "curves.gif")


def test_plot_vs_a_swept_field_groups_lines_by_the_other_fields(tmp_path, capsys):
    runs = []
    for pos, base in (("learned", 4.0), ("rope", 3.5)):
        for lr in (1e-3, 2e-3, 4e-3):
            for seed in (1, 2):
                val = base + abs(lr - 2e-3) * 100 + seed / 100
                runs.append(make_run(tmp_path / f"{pos}-{lr}-{seed}", val=[val + 1, val], train=[5, 4, 3, 2],
                                     seed=seed, pos=pos, lr=lr))
    result = compare_paths(runs, group_by="pos,lr")
    sweep = sweep_lines(result, "lr")
    # min_lr follows from lr (lr / 10) and does not split lines; pos does.
    assert sweep.field == "optim.lr" and sweep.metric == "best_val_loss"
    assert sorted(sweep.lines) == ["pos=learned", "pos=rope"]
    rope = sweep.lines["pos=rope"]
    assert [x for x, _ in rope] == [1e-3, 2e-3, 4e-3]
    assert rope[1][1].mean == pytest.approx(3.515) and rope[1][1].n == 2
    assert rope[0][1].mean == pytest.approx(3.5 + 0.1 + 0.015)

    code, _, err = cli(capsys, "compare", *map(str, runs), "--group-by", "pos,lr", "--plot", str(tmp_path / "s.png"),
                       "--plot-vs", "lr", "--format", "json")
    assert code == 0 and (tmp_path / "s.png").read_bytes()[:8] == PNG_SIGNATURE
    code, out, err = cli(capsys, "compare", *map(str, runs), "--plot", str(tmp_path / "t.png"), "--plot-vs", "pos")
    assert code == 2 and "not one number" in err and "--group-by pos" in err
    assert out == ""  # refused before the table is printed
    code, _, err = cli(capsys, "compare", *map(str, runs), "--group-by", "pos", "--plot", str(tmp_path / "u.png"),
                       "--plot-vs", "lr")
    assert code == 2 and "not one number" in err  # several lrs in one column
    code, _, err = cli(capsys, "compare", *map(str, runs), "--plot-vs", "lr")
    assert code == 2 and "--plot FILE" in err


def test_terminal_chart(tmp_path):
    a = make_run(tmp_path / "a", val=[4.0, 3.0], train=[5, 4, 3.5, 3])
    b = make_run(tmp_path / "b", val=[3.8, 2.5], train=[5, 4, 3.4, 2.9], pos="rope")
    text = terminal_chart(compare_paths([a, b]).columns, width=40, height=8)
    lines = text.splitlines()
    assert lines[0] == "val loss against tokens" and "  * a" in lines and "  o b" in lines
    assert lines[1].startswith("4.000 |") and lines[8].startswith("2.500 |")
    only_train = make_run(tmp_path / "c", train=[5, 4, 3.5, 3])
    assert terminal_chart(compare_paths([only_train]).columns).startswith("train loss")
    assert terminal_chart(compare_paths([make_run(tmp_path / "d")]).columns) == ""


def test_terminal_chart_marks_cells_where_curves_meet(tmp_path):
    """A later curve does not hide an earlier one: where both pass, the cell says so."""
    a = make_run(tmp_path / "a", val=[4.0, 3.0, 2.0], train=[5.0] * 6, steps=6)
    b = make_run(tmp_path / "b", val=[4.0, 3.5, 3.0], train=[5.0] * 6, steps=6, pos="rope")  # meets a at the start only
    lines = terminal_chart(compare_paths([a, b]).columns, width=40, height=8).splitlines()
    assert lines[1].startswith("4.000 |#")
    assert lines[-1] == "  # two or more of them"
    plot = "\n".join(lines[1:9])
    assert plot.count("*") > 5 and plot.count("o") > 5
    twins = terminal_chart(compare_paths([a, make_run(tmp_path / "c", val=[4.0, 3.0, 2.0], train=[5.0] * 6, steps=6,
                                                            pos="rope")]).columns).splitlines()
    same = "\n".join(twins[1:13])  # two columns, the same curve: every cell shows both
    assert "#" in same and "*" not in same and "o" not in same
    apart = terminal_chart(compare_paths([make_run(tmp_path / "d", val=[4.0, 3.0], train=[5.0] * 4),
                                          make_run(tmp_path / "e", val=[2.0, 1.0], train=[5.0] * 4, pos="rope")]).columns)
    assert "#" not in apart


# ----------------------------------------------------------------------------- the command


def test_cli_json_csv_and_markdown(tmp_path, capsys):
    runs = [make_run(tmp_path / f"rope-s{i}", val=[4.0, 3.0 + i / 10], train=[5, 4, 3, 2], seed=i, pos="rope")
            for i in range(2)]
    runs.append(make_run(tmp_path / "learned", val=[4.0, 3.5], train=[5, 4, 3, 2.5]))
    paths = [str(p) for p in runs]

    code, stdout, _ = cli(capsys, "compare", *paths, "--format", "json", "--target", "3.6")
    assert code == 0
    data = json.loads(stdout)
    assert [c["label"] for c in data["columns"]] == ["rope", "learned"]
    rope = data["columns"][0]
    assert rope["n"] == 2 and rope["spec"] == {"model.pos": "rope", "train.seed": [0, 1]} and rope["rank"] == 1
    assert rope["metrics"]["best_val_loss"]["mean"] == pytest.approx(3.05)
    assert rope["metrics"]["best_val_loss"]["std"] == pytest.approx(statistics.stdev([3.0, 3.1]))
    assert rope["metrics"]["tokens_to_target"]["values"] == [4 * TOKENS_PER_STEP] * 2
    assert "best_val_loss" in rope["best"] and len(data["runs"]) == 3

    code, stdout, _ = cli(capsys, "compare", *paths, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(stdout)))
    assert code == 0 and [r["label"] for r in rows] == ["rope", "learned"]
    assert float(rows[0]["best_val_loss"]) == pytest.approx(3.05) and rows[1]["best_val_loss_std"] == ""
    assert rows[0]["n"] == "2" and rows[0]["model.pos"] == "rope" and rows[1]["rank"] == "2"

    code, stdout, _ = cli(capsys, "compare", *paths, "--format", "markdown")
    lines = stdout.splitlines()
    assert code == 0 and lines[0] == "| | rope | learned |" and lines[1] == "|---|---:|---:|"
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines[2:])
    assert "| best val loss | **3.0500 ± 0.0707 (2)** | 3.5000 |" in lines
    assert "| model.pos | rope | learned |" in lines

    code, stdout, _ = cli(capsys, "compare", *paths, "--no-group-seeds", "--format", "markdown")
    assert stdout.splitlines()[0] == "| | rope-s0 | rope-s1 | learned |"

    (tmp_path / "folder.png").mkdir()
    bad = {"c.jpg": "must end in .png or .svg", ".png": "no file name", "folder.png": "is a folder",
           "rope-s0/spec.json/x.png": "which is a file, not a folder"}
    for name, says in bad.items():
        code, stdout, stderr = cli(capsys, "compare", *paths, "--plot", str(tmp_path / name))
        # refused before the table: nothing on stdout, one line on stderr
        assert code == 2 and stdout == "" and stderr.startswith("Error: --plot") and says in stderr, name
    for target, says in [("nan", "finite"), ("inf", "finite"), ("-1", "at least 0")]:
        code, stdout, stderr = cli(capsys, "compare", *paths, "--target", target)
        assert code == 2 and stdout == "" and says in stderr, target
    code, _, stderr = cli(capsys, "compare", *paths, "--metric", "val_ppl", "--target", "0.5")
    assert code == 2 and "at least 1" in stderr
    code, _, stderr = cli(capsys, "compare", *paths, "--metric", "hellaswag_acc_norm", "--target", "1.5")
    assert code == 2 and "between 0 and 1" in stderr


def test_real_command_table_plot_and_not_a_run(tmp_path):
    a = make_run(tmp_path / "runA", val=[4.0, 3.0], train=[5, 4, 3.5, 3])
    b = make_run(tmp_path / "runB", val=[3.8, 3.2], train=[5, 4, 3.4, 2.9], pos="rope")
    plot = tmp_path / "curves.png"
    proc = run_gpt2("compare", str(a), str(b), "--plot", str(plot), check=True)
    assert "runA" in proc.stdout and "runB" in proc.stdout and "model.pos" in proc.stdout
    assert "best val loss" in proc.stdout and "3.0000 *" in proc.stdout  # the best value is marked
    assert "best: runA" in proc.stdout and "\x1b[" not in proc.stdout
    assert plot.read_bytes()[:8] == PNG_SIGNATURE and "plot written" in proc.stderr

    (tmp_path / "notarun").mkdir()
    bad = run_gpt2("compare", str(a), str(tmp_path / "notarun"))
    assert bad.returncode == 2 and bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "notarun" in lines[0]


# ------------------------------------------------------------------ review fixes (ranks, seeds, ppl, segments)


def test_a_group_without_all_its_evals_ranks_after_complete_groups(tmp_path, capsys):
    """A sweep in progress: one run of a group has no eval rows yet. Its 1-of-2 mean is lower, but
    the complete group is ranked first and named best, as the best val loss row marks it."""
    a1 = make_run(tmp_path / "a" / "s1", val=[7.0, 6.6261], train=[8, 7, 6, 5], seed=1)
    make_run(tmp_path / "a" / "s2", train=[8, 7], seed=2)  # no eval rows yet
    make_run(tmp_path / "b" / "s1", val=[7.0, 6.8], train=[8, 7, 6, 5], seed=1, pos="rope")
    make_run(tmp_path / "b" / "s2", val=[7.0, 6.9], train=[8, 7, 6, 5], seed=2, pos="rope")
    result = compare_paths([tmp_path / "a", tmp_path / "b"])
    assert [len(c.runs) for c in result.columns] == [2, 2] and a1.exists()
    assert [c.rank for c in result.columns] == [2, 1]
    assert result.best["best_val_loss"] == [1] and result.best["rank"] == [1]
    assert result.best_columns() == [1]
    code, out, _ = cli(capsys, "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--no-chart")
    assert code == 0
    best_line = next(line for line in out.splitlines() if line.startswith("best:"))
    assert "(1 of 2)" not in best_line and "6.8500" in best_line


def test_copies_of_the_same_run_count_once(tmp_path, capsys):
    for folder in ("x", "y"):
        make_run(tmp_path / folder / "seed1337", val=[4.0, 3.5], train=[5, 4, 3, 2], seed=1337)
        make_run(tmp_path / folder / "seed1338", val=[4.0, 3.7], train=[5, 4, 3, 2], seed=1338)
    result = compare_paths([tmp_path / "x", tmp_path / "y"])
    assert len(result.columns) == 1 and len(result.columns[0].runs) == 2
    s = result.columns[0].stats["best_val_loss"]
    assert s.n == 2 and s.std == pytest.approx(statistics.stdev([3.5, 3.7]))
    assert sorted(r.fields["train.seed"] for r in result.columns[0].runs) == [1337, 1338]
    assert len(result.notes) == 2 and all("counted once" in n for n in result.notes)
    code, out, err = cli(capsys, "compare", str(tmp_path / "x"), str(tmp_path / "y"), "--no-chart")
    assert code == 0 and "(2)" in out and "(4)" not in out
    assert "have the same settings and seed; counted once" in err


def test_of_two_copies_the_one_that_kept_its_last_evaluation_counts(tmp_path):
    """A copy cut short after its last train row (same step, its final eval row lost) is the
    less complete one, whichever order the folders are given in."""
    whole = make_run(tmp_path / "whole", val=[4.0, 3.5], train=[5, 4, 3, 2], seed=1)
    cut = make_run(tmp_path / "cut", val=[4.0, 3.5], train=[5, 4, 3, 2], seed=1)
    rows = (cut / "metrics.jsonl").read_text().splitlines()
    last_eval = max(i for i, line in enumerate(rows) if '"kind": "eval"' in line)
    (cut / "metrics.jsonl").write_text("\n".join(rows[:last_eval] + rows[last_eval + 1:]) + "\n")
    for order in ([cut, whole], [whole, cut]):
        result = compare_paths(order)
        assert [r.path for r in result.columns[0].runs] == [whole] and "(kept " + str(whole) in result.notes[0]


def test_group_perplexity_is_exp_of_the_mean_loss_and_marks_as_the_loss_row(tmp_path):
    # Means of losses: a 3.30 < b 3.31; arithmetic means of perplexities would flip it (28.3 > 27.4).
    make_run(tmp_path / "a" / "s1", val=[4.0, 3.0], train=[5, 4, 3, 2], seed=1)
    make_run(tmp_path / "a" / "s2", val=[4.0, 3.6], train=[5, 4, 3, 2], seed=2)
    make_run(tmp_path / "b" / "s1", val=[4.0, 3.31], train=[5, 4, 3, 2], seed=1, pos="rope")
    make_run(tmp_path / "b" / "s2", val=[4.0, 3.31], train=[5, 4, 3, 2], seed=2, pos="rope")
    for metric in ("val_loss", "val_ppl"):
        result = compare_paths([tmp_path / "a", tmp_path / "b"], metric=metric)
        ppl = result.columns[0].stats["best_val_ppl"]
        assert ppl.mean == pytest.approx(math.exp(3.3)) and ppl.std is None
        assert "±" not in format_stat(ppl, "ppl")
        assert result.best["best_val_loss"] == result.best["best_val_ppl"] == [0]
        assert result.best["final_val_loss"] == result.best["final_val_ppl"] == [0]
        assert [c.rank for c in result.columns] == [1, 2]


def test_loss_and_perplexity_rows_always_mark_the_same_columns(tmp_path):
    import random

    rng = random.Random(0)
    runs = []
    for trial in range(4):
        for g in range(3):
            for seed in (1, 2):
                v = round(rng.uniform(3.0, 3.05), rng.choice([3, 4, 6]))
                runs.append(make_run(tmp_path / str(trial) / f"g{g}_s{seed}", val=[4.0, v], train=[5, 4, 3, 2],
                                     seed=seed, n_layer=g + 1))
    for trial in range(4):
        result = compare_paths([tmp_path / str(trial)])
        assert result.best["best_val_loss"] == result.best["best_val_ppl"]


def _with_start_steps(path: Path, starts: dict[int, int], strategies: dict[int, tuple[str, int]] | None = None,
                      drop_steps: tuple[int, ...] = ()) -> None:
    """Rewrite a run's rows as a resumed run writes them: start_step (and strategy) by segment."""
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    out = []
    for row in rows:
        start = max(s for s in starts if s < row["step"])
        if row["kind"] == "train" and row["step"] in drop_steps:
            continue
        row["start_step"] = starts[start]
        if strategies and row["kind"] == "train":
            row["strategy"], row["world_size"] = strategies[start]
        out.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")


def test_resume_segments_from_start_step_when_time_does_not_go_down(tmp_path):
    """Segment 2 (resumed at step 3) logs time_s 5, 6, 7: above segment 1's last 3, so only the
    start_step field shows the resume."""
    path = make_run(tmp_path / "run", val=[4.0, 3.5, 3.0], train=[5.0, 4.8, 4.6, 4.4, 4.2, 4.0], steps=6,
                    tokens_per_s=[10.0, 1000.0, 1100.0, 20.0, 1200.0, 1300.0], times=[1, 2, 3, 5, 6, 7])
    before = load_run(path)
    assert before.metrics["wall_time_s"] == 7.5  # the time_s heuristic sees one segment
    _with_start_steps(path, {0: 0, 3: 3}, {0: ("single", 1), 3: ("ddp", 2)})
    run = load_run(path)
    assert run.metrics["wall_time_s"] == 3 + 7.5  # each segment's last time_s, added up
    assert run.metrics["tokens_per_s"] == 1150.0  # first window of each segment left out
    assert [s[2] for s in run.segments] == [1, 4]
    assert time_to_target(run, "val_loss", 3.5) == (4 * TOKENS_PER_STEP, 3 + 5.5)
    assert time_to_target(run, "val_loss", 4.0) == (2 * TOKENS_PER_STEP, 2.5)
    # The first trained step of a segment is start_step + 1, whether or not that step was logged.
    other = make_run(tmp_path / "other", val=[4.0], train=[5.0, 4.8, 4.6, 4.4, 4.2, 4.0], steps=6,
                     times=[1, 2, 3, 5, 6, 7])
    _with_start_steps(other, {0: 0, 3: 3}, {0: ("single", 1), 3: ("ddp", 2)}, drop_steps=(4,))
    assert load_run(other).to_dict()["segments"] == [
        {"strategy": "single", "world_size": 1, "first_step": 1},
        {"strategy": "ddp", "world_size": 2, "first_step": 4},
    ]


def test_group_by_shows_fields_that_vary_within_a_column(tmp_path):
    for pos in ("learned", "rope"):
        for lr in (1e-3, 4e-3):
            make_run(tmp_path / f"{pos}_lr{lr:g}", val=[4.0, 3.5], train=[5, 4, 3, 2], pos=pos, lr=lr)
    result = compare_paths([tmp_path], group_by="model.pos")
    spec_rows = [r.key for r in result.rows if r.spec]
    assert spec_rows == ["model.pos", "optim.lr", "optim.min_lr"]
    lr_row = next(r for r in result.rows if r.key == "optim.lr")
    assert [result.cell(lr_row, i) for i in range(2)] == ["0.001, 0.004", "0.001, 0.004"]
    data = result.to_dict()
    assert data["columns"][0]["spec"]["optim.lr"] == [0.001, 0.004]
    assert "| optim.lr | 0.001, 0.004 | 0.001, 0.004 |" in result.to_markdown()
    rows = list(csv.DictReader(io.StringIO(result.to_csv())))
    assert rows[0]["optim.lr"] == "0.001;0.004"
    # Seeds of a column of seeds are not a row: n says it.
    make_run(tmp_path / "s" / "a1", val=[4.0], train=[5, 4], seed=1)
    make_run(tmp_path / "s" / "a2", val=[4.0], train=[5, 4], seed=2)
    assert not [r for r in compare_paths([tmp_path / "s"]).rows if r.spec]


def test_plot_vs_without_grouped_seeds_makes_one_point_per_x(tmp_path, capsys):
    runs = []
    for lr in (1e-3, 2e-3):
        for seed in (1, 2):
            runs.append(make_run(tmp_path / f"lr{lr:g}-s{seed}", val=[5.0, 3.0 + lr * 100 + seed / 10],
                                 train=[5, 4, 3, 2], seed=seed, lr=lr))
    result = compare_paths(runs, group_seeds=False)
    assert len(result.columns) == 4
    points = sweep_lines(result, "lr").lines[""]
    assert [x for x, _ in points] == [1e-3, 2e-3]  # the seeds of one lr are one point, not a zigzag
    assert points[0][1].n == 2 and points[0][1].mean == pytest.approx(3.25)
    code, _, _ = cli(capsys, "compare", *map(str, runs), "--no-group-seeds", "--plot", str(tmp_path / "p.svg"),
                     "--plot-vs", "lr", "--metric", "val_ppl", "--target", "1000", "--format", "json")
    assert code == 0
    svg = (tmp_path / "p.svg").read_text()
    assert "target ppl 1000 (loss 6.908)" in svg and "geometric mean" in svg


def test_a_metric_no_run_has_is_said_once(tmp_path, capsys):
    a = make_run(tmp_path / "a", val=[4.0, 3.0], train=[5, 4, 3, 2])
    b = make_run(tmp_path / "b", val=[4.0, 3.2], train=[5, 4, 3, 2], pos="rope")
    code, _, err = cli(capsys, "compare", str(a), str(b), "--metric", "hellaswag_acc_norm", "--no-chart")
    assert code == 0 and "note: no run has a hellaswag_acc_norm to rank by (train with --hellaswag" in err
    code, _, err = cli(capsys, "compare", str(a), str(b), "--no-chart")
    assert code == 0 and "note:" not in err
