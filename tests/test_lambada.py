"""LAMBADA (gpt2cli.lambada, `gpt2 eval --task lambada`): the reader and its errors, the target cut
from the passage, accuracy (every target token the model's most likely one) and perplexity equal to
a plain computation with transformers' model, a trained model that predicts its sequence's next
tokens, and the command's table, JSON and errors."""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2cli import downstream, lambada
from gpt2cli.downstream import ContinuationScores
from gpt2cli.errors import UserError
from gpt2cli.lambada import EncodedPassage, Passage, encode_passages, read_passages, score_passages
from gpt2cli.loading import load_model
from gpt2cli.tokenizer import encode
from tests.conftest import random_hf_gpt2, run_gpt2
from tests.test_generate import cli, one_error_line, random_model, save_model, tiny_gpt2  # noqa: F401
from tests.test_hellaswag import walk_and_its_model, write_jsonl


def shakespeare_passages(n: int) -> list[dict]:
    text = (resources.files("gpt2cli") / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    paragraphs = [p.replace("\n", " ").strip() for p in text.split("\n\n") if len(p) > 200]
    return [{"text": p} for p in paragraphs[:n]]


@pytest.fixture(scope="module")
def lambada_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("lambada") / "test.jsonl", shakespeare_passages(12))


def test_the_target_is_the_last_word_after_a_space(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "He opened the door and saw his friend Paul"}, "",
                                              {"text": "  The end of it all.  \n"}])
    assert read_passages(path) == [Passage("He opened the door and saw his friend", " Paul"),
                                   Passage("The end of it", " all.")]
    assert len(read_passages(path, limit=1)) == 1


@pytest.mark.parametrize("line,expected", [
    ("{oops", "bad.jsonl:1 is not JSON"),
    ({"txt": "a b"}, "bad.jsonl:1 has no text"),
    ({"text": "single"}, "bad.jsonl:1: the text has no last word after a space"),
    (["a b"], "bad.jsonl:1 has no text"),
])
def test_a_bad_line_is_named(tmp_path, line, expected):
    with pytest.raises(UserError) as exc:
        read_passages(write_jsonl(tmp_path / "bad.jsonl", [line]))
    assert expected in exc.value.render()


def test_rows_keep_the_target_whole():
    passage = Passage("word " * 40 + "and then", " Paul")
    (short,) = encode_passages([passage], block_size=8)
    whole = encode(passage.context) + encode(passage.target)
    assert short.row.tolist() == whole[-8:] and short.start == 8 - len(encode(" Paul")) and short.truncated
    (full,) = encode_passages([passage], block_size=128)
    assert full.row.tolist() == whole and full.start == len(encode(passage.context)) and not full.truncated


@torch.no_grad()
def test_greedy_and_losses_equal_a_plain_computation():
    """continuation_scores' greedy flag: every target token is the argmax of the logits before it.
    A target made of the model's own greedy tokens is greedy; one token changed, it is not."""
    model = tiny_gpt2(seed=5)
    context = torch.tensor(encode("To be, or not to be, that is the"))
    greedy_tokens = []
    x = context
    for _ in range(3):
        nxt = int(model(x[None])[0, -1].argmax())
        greedy_tokens.append(nxt)
        x = torch.cat([x, torch.tensor([nxt])])
    rows = [x.numpy(), x.clone().numpy()]
    rows[1][-2] = (rows[1][-2] + 1) % 50257  # the second target token changed
    starts = [len(context)] * 2
    scores = downstream.continuation_scores(model, rows, starts)
    assert scores.greedy.tolist() == [True, False] and scores.counts.tolist() == [3.0, 3.0]
    for i, row in enumerate(rows):
        logp = F.log_softmax(model(torch.tensor(row)[None])[0].float(), dim=-1)
        expected = -sum(float(logp[t - 1, row[t]]) for t in range(starts[i], len(row)))
        assert float(scores.sums[i]) == pytest.approx(expected, rel=1e-5)


def test_hf_model_scores_as_transformers_does(tmp_path, lambada_file):
    """A Hugging Face GPT-2 folder through gpt2: the same greedy hits and per-word perplexity as
    transformers' own model scoring the same tokens (lm-evaluation-harness's computation)."""
    pytest.importorskip("transformers")
    hf = random_hf_gpt2(0.05, seed=6, n_positions=256)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf").model
    encoded = encode_passages(read_passages(lambada_file), block_size=256)
    score = score_passages(ours, encoded, batch_size=5)
    hits, losses = 0, []
    for p in encoded:
        with torch.no_grad():
            logits = hf(torch.tensor(p.row)[None]).logits[0, p.start - 1 : -1]
        target = torch.tensor(p.row[p.start :])
        losses.append(float(F.cross_entropy(logits, target, reduction="sum")))
        hits += bool((logits.argmax(-1) == target).all())
    assert (score.examples, score.correct) == (12, hits)
    assert score.ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_a_trained_model_predicts_the_last_tokens():
    """Trained on one token sequence, a model predicts a passage's last two tokens of it; an
    untrained one does not."""
    walk, model, rng = walk_and_its_model(seed=1)
    passages = [EncodedPassage(row=walk[s : s + 12], start=10, truncated=False)
                for s in rng.integers(0, len(walk) - 12, 30)]
    trained = score_passages(model, passages, batch_size=8)
    untrained = score_passages(random_model(seed=1), passages, batch_size=8)
    assert trained.correct == 30 and trained.ppl < 1.5
    assert untrained.correct < 3 and untrained.ppl > 50


def test_perplexity_is_of_the_mean_summed_loss_and_leaves_out_nonfinite(monkeypatch):
    passages = [EncodedPassage(row=np.arange(4), start=2, truncated=i == 1) for i in range(3)]

    def fake_scores(model, rows, starts, autocast=None, device=None):
        return ContinuationScores(torch.tensor([2.0, 4.0, math.nan], dtype=torch.float64)[: len(rows)],
                                  torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64)[: len(rows)],
                                  torch.tensor([True, False, True])[: len(rows)])

    monkeypatch.setattr(downstream, "continuation_scores", fake_scores)
    score = score_passages(torch.nn.Linear(1, 1), passages, batch_size=3)
    assert (score.examples, score.correct, score.truncated, score.nonfinite) == (3, 1, 1, 1)
    assert score.ppl == pytest.approx(math.exp(3.0)) and score.acc == pytest.approx(1 / 3)


def test_eval_lambada_table_json_and_errors(capsys, tmp_path, lambada_file):
    ckpt = save_model(tiny_gpt2(seed=3), tmp_path / "tiny.pt")
    table = run_gpt2("eval", str(ckpt), "--task", "lambada", "--task-data", str(lambada_file))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == f"LAMBADA {lambada_file}: 12 examples, last word (cpu, float32)"
    assert "acc" in lines[2] and "ppl" in lines[2] and "truncated" in lines[2]

    code, out, err = cli(capsys, "eval", ckpt, "--task", "lambada", "--task-data", lambada_file, "--examples", "5",
                         "--format", "json", "-b", "2")
    assert code == 0, err
    report = json.loads(out)
    row = report["results"][0]
    expected = score_passages(load_model(ckpt).model, encode_passages(read_passages(lambada_file, 5), 64),
                              batch_size=5)
    assert (report["task"], report["examples"], row["examples"]) == ("lambada", 5, 5)
    assert (row["correct"], row["truncated"]) == (expected.correct, expected.truncated)
    assert row["ppl"] == pytest.approx(expected.ppl, rel=1e-5) and row["error"] is None  # other batches: other rounding

    code, _, err = cli(capsys, "eval", ckpt, "--task", "lambada", "--task-data", tmp_path / "none.jsonl")
    assert "LAMBADA file" in one_error_line(code, err) and "does not exist" in err
    code, _, err = cli(capsys, "eval", ckpt, "--task", "lambada", "--data", "x")
    assert "--data (data) does not apply to task lambada" in one_error_line(code, err)


def test_the_published_set_is_openais_test_file(tmp_path, monkeypatch):
    fetched = []
    monkeypatch.setattr(downstream, "download", lambda url, check, on_download=None: fetched.append(url) or tmp_path)
    for source in (None, "val"):
        lambada.TASK.fetch(source)
    assert fetched == ["https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"] * 2
