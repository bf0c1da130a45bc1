"""HellaSwag scoring (gpt2cli.hellaswag, `gpt2 eval --task hellaswag`): the reader and its errors,
the token rows and their cut to the context, ending losses equal to a plain full forward and to
transformers' model, the decision rules of acc and acc_norm, a trained model that finds the right
endings, and the command: table, JSON, batch-size independence, download into the cache (from a
file:// URL: no network), and one-line errors."""

from __future__ import annotations

import json
import math
import random
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2cli import downstream, hellaswag
from gpt2cli.downstream import ContinuationScores, cached_path
from gpt2cli.errors import UserError
from gpt2cli.hellaswag import (
    EncodedExample,
    Example,
    encode_examples,
    read_examples,
    score_examples,
)
from gpt2cli.loading import load_model
from gpt2cli.tokenizer import encode
from tests.conftest import random_hf_gpt2, run_gpt2
from tests.test_generate import cli, one_error_line, random_model, save_model, tiny_gpt2  # noqa: F401


def ending_losses(model, rows, starts, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, scored tokens) of each row's continuation, as the tasks score them."""
    scores = downstream.continuation_scores(model, rows, starts, **kwargs)
    return scores.sums, scores.counts


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def shakespeare_examples(n: int, seed: int = 0) -> list[dict]:
    """HellaSwag-shaped rows from the embedded corpus: a line as context, the next line as the right
    ending, three other lines as the wrong ones."""
    text = (resources.files("gpt2cli") / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) > 30]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        j = rng.randrange(len(lines) - 1)
        endings = [lines[j + 1]] + rng.sample(lines, 3)
        order = rng.sample(range(4), 4)
        rows.append({"ctx": lines[j], "endings": [endings[k] for k in order], "label": order.index(0),
                     "activity_label": "Shakespeare", "split": "val"})
    return rows


@pytest.fixture(scope="module")
def hs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("hellaswag") / "val.jsonl", shakespeare_examples(24))


# ------------------------------------------------------------------------------------ reading


def test_reads_the_original_and_hugging_face_forms(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"ctx": "A man sits", "ctx_a": "A man", "ctx_b": "sits", "endings": ["a", "b", "c", "d"], "label": 2},
        "",  # a blank line is skipped
        {"ctx": "She runs", "endings": ["e", "f", "g", "h"], "label": "3"},  # HF: the label is a string
        {"ctx_a": "They swim.", "ctx_b": "then they", "endings": ["i", "j"], "label": 0},  # no ctx: ctx_a + ctx_b
    ])
    assert read_examples(path) == [
        Example("A man sits", ("a", "b", "c", "d"), 2),
        Example("She runs", ("e", "f", "g", "h"), 3),
        Example("They swim. then they", ("i", "j"), 0),
    ]
    assert len(read_examples(path, limit=2)) == 2


@pytest.mark.parametrize("line,expected", [
    ("{not json", "bad.jsonl:2 is not JSON"),
    ("[1, 2]", "bad.jsonl:2 is not a JSON object"),
    ({"endings": ["a", "b"], "label": 0}, "bad.jsonl:2 has no context"),
    ({"ctx": "x", "endings": "ab", "label": 0}, "bad.jsonl:2: endings must be a list"),
    ({"ctx": "x", "endings": ["a", ""], "label": 0}, "bad.jsonl:2: endings must be a list"),
    ({"ctx": "x", "endings": ["a", "b"]}, "bad.jsonl:2 has no label (the test split has none"),
    ({"ctx": "x", "endings": ["a", "b"], "label": ""}, "bad.jsonl:2 has no label"),
    ({"ctx": "x", "endings": ["a", "b"], "label": 2}, "bad.jsonl:2: label 2 is not the index of one of its 2 endings"),
    ({"ctx": "x", "endings": ["a", "b"], "label": True}, "label True is not the index"),
    ({"ctx": "x", "endings": ["a", "b"], "label": 0.0}, "label 0.0 is not the index"),
])
def test_a_bad_line_is_named_with_its_number(tmp_path, line, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"ctx": "fine", "endings": ["a", "b"], "label": 1}, line])
    with pytest.raises(UserError) as exc:
        read_examples(path)
    assert expected in exc.value.render()


def test_an_empty_or_binary_file_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="holds no examples"):
        read_examples(tmp_path / "empty.jsonl")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        read_examples(tmp_path / "binary.jsonl")


# ------------------------------------------------------------------------------------ token rows


def test_rows_are_context_then_spaced_ending():
    example = Example("The cat sat on the", ("mat.", "moon and sang loudly"), 0)
    (encoded,) = encode_examples([example], block_size=64)
    context = encode(example.context)
    for row, start, ending in zip(encoded.rows, encoded.starts, example.endings, strict=True):
        assert row.tolist() == context + encode(" " + ending) and start == len(context)
    assert not encoded.truncated and encoded.label == 0


def test_rows_over_the_context_keep_their_end():
    context = "word " * 40
    example = Example(context, ("short", "a much longer ending with many more words in it"), 1)
    (encoded,) = encode_examples([example], block_size=16)
    assert encoded.truncated
    for row, start, ending in zip(encoded.rows, encoded.starts, example.endings, strict=True):
        whole = encode(context) + encode(" " + ending)
        ending_tokens = len(encode(" " + ending))
        assert row.tolist() == whole[-16:] and start == 16 - ending_tokens  # the ending whole, the context cut
    # An ending longer than the context itself: what fits of it is scored, from the second token on.
    (cut,) = encode_examples([Example("x", ("one two three four five six", "b"), 0)], block_size=4)
    assert len(cut.rows[0]) == 4 and cut.starts[0] == 1 and cut.truncated
    with pytest.raises(ValueError, match="block_size must be at least 2"):
        encode_examples([example], block_size=1)


# ------------------------------------------------------------------------------------ scoring


@torch.no_grad()
def reference_losses(model, rows, starts) -> list[float]:
    """Each row alone through the model's plain forward, its logits through log-softmax."""
    sums = []
    for row, start in zip(rows, starts, strict=True):
        x = torch.tensor(row)[None]
        logp = F.log_softmax(model(x).float(), dim=-1)[0]
        sums.append(-sum(float(logp[t - 1, row[t]]) for t in range(start, len(row))))
    return sums


@pytest.mark.parametrize("attn,pos", [("mha", "learned"), ("gqa", "rope")])
def test_batched_ending_losses_equal_one_row_at_a_time(attn, pos):
    model = tiny_gpt2(attn, pos, seed=3)
    examples = [Example(r["ctx"], tuple(r["endings"]), r["label"]) for r in shakespeare_examples(3, seed=5)]
    encoded = encode_examples(examples, block_size=64)
    rows = [row for e in encoded for row in e.rows]
    starts = [s for e in encoded for s in e.starts]
    sums, counts = ending_losses(model, rows, starts)  # padded to the longest row
    assert counts.tolist() == [len(r) - s for r, s in zip(rows, starts, strict=True)]
    np.testing.assert_allclose(sums.numpy(), reference_losses(model, rows, starts), rtol=1e-5, atol=1e-4)


def test_hf_model_scores_as_transformers_does(tmp_path, hs_file):
    """A Hugging Face GPT-2 folder loaded by gpt2 scores every ending as transformers' own model
    does (the computation of build-nanogpt's hellaswag.py), and picks the same endings."""
    pytest.importorskip("transformers")
    hf = random_hf_gpt2(0.05, seed=4, n_positions=128)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf").model
    examples = read_examples(hs_file, limit=6)
    encoded = encode_examples(examples, block_size=128)
    score = score_examples(ours, encoded, batch_size=4)
    correct = correct_norm = 0
    for e in encoded:
        totals, means = [], []
        for row, start in zip(e.rows, e.starts, strict=True):
            with torch.no_grad():
                logits = hf(torch.tensor(row)[None]).logits[0]
            losses = F.cross_entropy(logits[start - 1 : -1], torch.tensor(row[start:]), reduction="none")
            totals.append(float(losses.sum()))
            means.append(float(losses.mean()))
        ours_sums, ours_counts = ending_losses(ours, list(e.rows), list(e.starts))
        np.testing.assert_allclose(ours_sums.numpy(), totals, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose((ours_sums / ours_counts).numpy(), means, rtol=1e-5, atol=1e-5)
        correct += int(np.argmin(totals)) == e.label
        correct_norm += int(np.argmin(means)) == e.label
    assert (score.examples, score.correct, score.correct_norm) == (6, correct, correct_norm)


def test_acc_takes_the_lowest_sum_and_acc_norm_the_lowest_mean(monkeypatch):
    """Ending 1 has the lowest summed loss, ending 0 the lowest loss per token; a NaN score makes
    the example wrong and is counted."""
    examples = [
        EncodedExample(rows=(np.arange(12), np.arange(5), np.arange(5)), starts=(2, 2, 2), label=0, truncated=False),
        EncodedExample(rows=(np.arange(12), np.arange(5), np.arange(5)), starts=(2, 2, 2), label=1, truncated=True),
        EncodedExample(rows=(np.arange(12), np.arange(5), np.arange(5)), starts=(2, 2, 2), label=0, truncated=False),
    ]
    per_example = [([5.0, 4.0, 9.0], [10, 3, 3]), ([5.0, 4.0, 9.0], [10, 3, 3]), ([5.0, math.nan, 1.0], [10, 3, 3])]

    def fake_scores(model, rows, starts, autocast=None, device=None):
        batch = per_example[:len(rows) // 3]
        del per_example[:len(rows) // 3]
        sums = torch.tensor([s for sums, _ in batch for s in sums], dtype=torch.float64)
        counts = torch.tensor([c for _, counts in batch for c in counts], dtype=torch.float64)
        return ContinuationScores(sums, counts, torch.zeros(len(sums), dtype=torch.bool))

    monkeypatch.setattr(downstream, "continuation_scores", fake_scores)
    seen = []
    score = score_examples(torch.nn.Linear(1, 1), examples, batch_size=2, on_examples=seen.append)
    # example 0: sum picks 1 (wrong), mean picks 0 (right); example 1: sum picks 1 (right), mean 0 (wrong)
    assert (score.examples, score.correct, score.correct_norm, score.truncated, score.nonfinite) == (3, 1, 1, 1, 1)
    assert seen == [2, 3] and score.acc == pytest.approx(1 / 3)


def walk_and_its_model(seed: int = 0) -> tuple[np.ndarray, torch.nn.Module, np.random.Generator]:
    """A token sequence (a fixed permutation walk over a 512-token vocabulary), a small model trained
    on it for 150 steps (seconds), and the random generator, for picking passages of the walk."""
    vocab = 512
    walk = [0]
    for _ in range(4 * vocab):
        walk.append((walk[-1] * 7 + 3) % vocab)
    walk = np.array(walk)
    torch.manual_seed(0)
    model = random_model(std=0.02).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(seed)
    for _ in range(150):
        at = rng.integers(0, len(walk) - 33, 16)
        x = torch.tensor(np.stack([walk[s : s + 32] for s in at]))
        y = torch.tensor(np.stack([walk[s + 1 : s + 33] for s in at]))
        loss = model(x, targets=y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return walk, model.eval(), rng


def test_a_trained_model_picks_the_true_continuations():
    """A model trained on one token sequence tells its true continuation from passages of the same
    sequence that start elsewhere."""
    walk, model, rng = walk_and_its_model()
    examples = []
    for _ in range(40):
        s = int(rng.integers(0, len(walk) - 15))
        context, right = walk[s : s + 10], walk[s + 10 : s + 15]
        label = int(rng.integers(0, 4))
        rows = []
        for k in range(4):
            ending = right
            while k != label and ending[0] == right[0]:  # a wrong ending: another passage
                o = int(rng.integers(0, len(walk) - 5))
                ending = walk[o : o + 5]
            rows.append(np.concatenate([context, ending]))
        examples.append(EncodedExample(rows=tuple(rows), starts=(10,) * 4, label=label, truncated=False))
    untrained = score_examples(random_model(seed=1), examples, batch_size=8)
    trained = score_examples(model, examples, batch_size=8)
    assert trained.correct == trained.correct_norm == 40
    assert untrained.correct < 25  # chance is 10 of 40: the task is not given away by the rows


# ------------------------------------------------------------------------------------ gpt2 eval


@pytest.fixture(scope="module")
def hs_checkpoints(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("hs-ckpts")
    return [save_model(tiny_gpt2(seed=1), root / "mha.pt"), save_model(tiny_gpt2("gqa", "rope", seed=2), root / "rope.pt")]


def test_eval_hellaswag_table_and_json(hs_checkpoints, hs_file):
    table = run_gpt2("eval", *map(str, hs_checkpoints), "--task", "hellaswag", "--task-data", str(hs_file))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == f"HellaSwag {hs_file}: 24 examples, completion style (cpu, float32)"
    assert "acc_norm" in lines[2] and "truncated" in lines[2]
    assert sum(str(c) in table.stdout for c in hs_checkpoints) == 2

    as_json = run_gpt2("eval", *map(str, hs_checkpoints), "--task", "hellaswag", "--task-data", str(hs_file),
                       "--examples", "10", "--format", "json", "-b", "3")
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert (report["task"], report["examples"], report["unit"]) == ("hellaswag", 10, "examples")
    library = [score_examples(load_model(c).model, encode_examples(read_examples(hs_file, 10), 64), batch_size=10)
               for c in hs_checkpoints]
    for row, expected in zip(report["results"], library, strict=True):
        assert (row["examples"], row["correct"], row["correct_norm"]) == (10, expected.correct, expected.correct_norm)
        assert row["acc"] == expected.acc and row["error"] is None
        assert row["truncated"] == expected.truncated


def test_scores_do_not_depend_on_the_batch_size(capsys, hs_checkpoints, hs_file):
    results = []
    for batch in ("1", "7"):
        code, out, err = cli(capsys, "eval", hs_checkpoints[1], "--task", "hellaswag", "--task-data", hs_file,
                             "--format", "json", "--batch-size", batch)
        assert code == 0, err
        row = json.loads(out)["results"][0]
        results.append((row["correct"], row["correct_norm"]))
    assert results[0] == results[1]


def test_the_validation_set_downloads_once_into_the_cache(tmp_path, monkeypatch, capsys, hs_checkpoints):
    """A URL (here file://, so no network) is fetched into $GPT2_CACHE_DIR once and read from there
    afterwards; a file that is no HellaSwag data never enters the cache."""
    monkeypatch.setenv("GPT2_CACHE_DIR", str(tmp_path / "cache"))
    source = write_jsonl(tmp_path / "remote.jsonl", shakespeare_examples(5))
    url = source.as_uri()
    code, out, err = cli(capsys, "eval", hs_checkpoints[0], "--task", "hellaswag", "--task-data", url, "--format", "json")
    assert code == 0, err
    assert json.loads(out)["file"] == str(cached_path(url)) and cached_path(url).read_bytes() == source.read_bytes()
    source.unlink()  # the cached copy serves from now on
    code, out, err = cli(capsys, "eval", hs_checkpoints[0], "--task", "hellaswag", "--task-data", url, "--format", "json")
    assert code == 0 and json.loads(out)["examples"] == 5

    broken = tmp_path / "page.html"
    broken.write_text("<html>Not Found</html>\n")
    code, _, err = cli(capsys, "eval", hs_checkpoints[0], "--task", "hellaswag", "--task-data", broken.as_uri())
    assert f"{broken.as_uri()}:1 is not JSON" in one_error_line(code, err)
    assert not cached_path(broken.as_uri()).exists()
    assert [p.name for p in cached_path(url).parent.iterdir()] == [cached_path(url).name]  # no staging left

    code, _, err = cli(capsys, "eval", hs_checkpoints[0], "--task", "hellaswag", "--task-data",
                       (tmp_path / "missing.jsonl").as_uri())
    line = one_error_line(code, err)
    assert line.startswith(f"Error: could not download {(tmp_path / 'missing.jsonl').as_uri()}: ")
    assert "pass --task-data FILE" in line


def test_the_default_source_is_the_hellaswag_validation_url(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_CACHE_DIR", str(tmp_path))
    fetched = []
    monkeypatch.setattr(downstream, "download", lambda url, check, on_download=None: fetched.append(url) or tmp_path / "x")
    assert hellaswag.TASK.fetch(None) == tmp_path / "x"
    assert fetched == ["https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"]
    assert cached_path(fetched[0]).name.endswith("-hellaswag_val.jsonl")


@pytest.mark.parametrize("args,expected", [
    (["--examples", "3"], "--examples (examples) does not apply to task loss"),
    (["--task", "hellaswag", "--data", "x"], "--data (data) does not apply to task hellaswag"),
    (["--task", "hellaswag", "--tokens", "64", "--seq-len", "8"], "--tokens (tokens) and --seq-len (seq_len) do not apply to task hellaswag"),
    (["--task", "hellaswag", "--examples", "0"], "--examples"),
    (["--task", "hellaswag", "--task-data", "/no/such.jsonl"], "HellaSwag file '/no/such.jsonl' does not exist"),
])
def test_bad_task_settings_get_one_line(capsys, hs_checkpoints, args, expected):
    code, _, err = cli(capsys, "eval", hs_checkpoints[0], *args)
    assert expected in one_error_line(code, err)


def test_a_model_without_the_gpt2_vocabulary_is_refused(capsys, tmp_path, hs_file):
    small = save_model(random_model(), tmp_path / "v512.pt")
    code, _, err = cli(capsys, "eval", small, "--task", "hellaswag", "--task-data", hs_file)
    assert "has a vocabulary of 512 tokens, fewer than the GPT-2 tokenizer's 50,257" in one_error_line(code, err)


def test_nonfinite_scores_keep_every_row_and_exit_3(capsys, monkeypatch, hs_checkpoints, hs_file):
    """An example whose endings score NaN (as from NaN weights or an fp16 overflow) is wrong; the
    row says how many there were, every row is printed, and the command exits 3."""
    real = downstream.continuation_scores
    calls = []

    def nan_for_the_second_model(model, rows, starts, autocast=None, device=None):
        scores = real(model, rows, starts, autocast=autocast)
        calls.append(model)
        if model is not calls[0]:
            scores.sums[0] = math.nan  # the first example of every batch
        return scores

    monkeypatch.setattr(downstream, "continuation_scores", nan_for_the_second_model)
    code, out, err = cli(capsys, "eval", *hs_checkpoints, "--task", "hellaswag", "--task-data", hs_file,
                         "--examples", "6", "-b", "4", "--format", "json")
    rows = json.loads(out)["results"]
    assert code == 3 and rows[0]["error"] is None and rows[0]["acc"] is not None
    assert rows[1]["error"] == "2 of 6 examples have NaN/inf scores" and rows[1]["acc"] is None
    assert err.strip() == (f"Error: {str(hs_checkpoints[1])!r}: 2 of 6 examples have NaN/inf scores; "
                           "the other rows are valid (its weights hold NaN or inf)")


# ------------------------------------------------------------------ during training (--hellaswag)

TRAIN = ["--preset", "tiny", "--device", "cpu", "--steps", "6", "--eval-every", "3", "--eval-tokens", "256",
         "--batch-size", "2", "--quiet"]


def test_training_scores_hellaswag_at_every_evaluation(tmp_path, hs_file, cache_dir):
    """--hellaswag adds acc and acc_norm to each eval row; the last equals `gpt2 eval --task
    hellaswag` of the checkpoint written at that step, and compare shows it."""
    run = tmp_path / "run"
    proc = run_gpt2("train", *TRAIN, "--out", str(run), "--hellaswag", str(hs_file), "--hellaswag-examples", "9")
    assert proc.returncode == 0, proc.stderr
    from gpt2cli.metrics import read_metrics

    evals = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6] and all(r["hellaswag_examples"] == 9 for r in evals)
    scored = json.loads(run_gpt2("eval", str(run / "ckpt.pt"), "--task", "hellaswag", "--task-data", str(hs_file),
                                 "--examples", "9", "--format", "json", check=True).stdout)["results"][0]
    assert (evals[-1]["hellaswag_acc"], evals[-1]["hellaswag_acc_norm"]) == (scored["acc"], scored["acc_norm"])
    assert evals[-1]["hellaswag_truncated"] == scored["truncated"] and evals[-1]["hellaswag_nonfinite"] == 0
    table = run_gpt2("compare", str(run), check=True).stdout
    assert re.search(rf"final HellaSwag acc_norm +│ +{scored['acc_norm']:.4f}", table)


def test_hellaswag_settings_are_checked_before_the_run_folder(tmp_path, hs_file, cache_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"ctx": "x", "endings": ["a", "b"], "label": 5}])
    for args, expected in (
        (["--hellaswag", str(bad)], f"{bad}:1: label 5 is not the index of one of its 2 endings"),
        (["--hellaswag", str(tmp_path / "none.jsonl")], "does not exist"),
        (["--hellaswag-examples", "4"], "eval.hellaswag_examples needs eval.hellaswag"),
        (["--hellaswag", str(hs_file), "--set", "model.vocab_size=1000"], "eval.hellaswag needs the GPT-2 vocabulary"),
    ):
        proc = run_gpt2("train", *TRAIN, "--out", str(tmp_path / "run"), *args)
        assert proc.returncode == 2 and expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (
            args, proc.stderr)
        assert not (tmp_path / "run").exists()


def test_the_vocabulary_constants_agree():
    from gpt2cli.specs import GPT2_VOCAB_SIZE
    from gpt2cli.tokenizer import VOCAB_SIZE

    assert GPT2_VOCAB_SIZE == VOCAB_SIZE
