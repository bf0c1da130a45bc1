"""Checkpoint files: round trip under weights_only, damage detection, refusal of foreign pickles,
atomic replacement."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from gpt2cli import checkpoint as ckpt
from gpt2cli.errors import UserError


def _payload() -> dict:
    torch.manual_seed(0)
    return {
        "spec": '{"model": {}}',
        "model": {"w": torch.randn(64, 32), "b": torch.zeros(32), "h": torch.randn(8).bfloat16()},
        "optimizer": {"state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.randn(64, 32)}},
                      "param_groups": [{"lr": 1e-3, "params": ["w"]}]},
        "rng": {"cpu": torch.get_rng_state()},
        "loader": {"epoch": 1, "position": 17},
        "step": 12,
        "tokens_seen": 4096,
        "best_val_loss": float("inf"),
    }


def test_round_trip_through_weights_only(tmp_path: Path):
    path = tmp_path / "ckpt.pt"
    payload = _payload()
    ckpt.save_checkpoint(path, payload)
    record = ckpt.load_checkpoint(path)
    assert record["format"] == ckpt.FORMAT and record["format_version"] == ckpt.FORMAT_VERSION
    assert torch.equal(record["model"]["w"], payload["model"]["w"])
    assert torch.equal(record["model"]["h"], payload["model"]["h"])
    assert record["optimizer"]["state"]["w"]["step"].item() == 3.0
    assert record["step"] == 12 and record["best_val_loss"] == float("inf")
    # The file itself loads with torch's safe loader, no gpt2 code involved.
    assert isinstance(torch.load(path, weights_only=True), dict)
    assert not list(tmp_path.glob(".*tmp*"))


def test_truncated_file_is_refused(tmp_path: Path):
    path = tmp_path / "ckpt.pt"
    ckpt.save_checkpoint(path, _payload())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="damaged, truncated"):
        ckpt.load_checkpoint(path)


def _detail(error: UserError) -> str:
    """The underlying error as the message quotes it: between the first ' (' and the last ')'."""
    message = error.message
    return message[message.index(" (") + 2 : message.rindex(")")]


def test_truncated_file_error_quotes_whole_words(tmp_path: Path):
    path = tmp_path / "ckpt.pt"
    ckpt.save_checkpoint(path, _payload())
    path.write_bytes(path.read_bytes()[:1000])
    try:
        torch.load(path, weights_only=True)
    except Exception as exc:  # what torch says, first line
        first_line = str(exc).strip().splitlines()[0]
    with pytest.raises(UserError) as info:
        ckpt.load_checkpoint(path)
    detail = _detail(info.value)
    assert first_line.startswith(detail.removesuffix(" ..."))
    # Whole: the first line, a run of whole sentences of it, or whole words marked as cut.
    assert detail == first_line or detail.endswith((".", " ...")), detail
    if detail.endswith(" ..."):
        assert first_line[len(detail) - 4] == " "


@pytest.mark.parametrize("text, expected", [
    ("short failure\nsecond line", "short failure"),
    ("failed reading zip archive: failed finding central directory. " + "This is filler text. " * 10,
     "failed reading zip archive: failed finding central directory. This is filler text. This is filler text."),
    ("word " * 40, ("word " * 24).strip() + " ..."),  # no sentence end within 120 characters
    ("x" * 300, "x" * 120 + " ..."),  # not even a space
])
def test_long_load_errors_are_cut_at_a_sentence_or_word(tmp_path: Path, monkeypatch, text, expected):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"whatever")

    def failing_load(*args, **kwargs):
        raise RuntimeError(text)

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(UserError) as info:
        ckpt.load_checkpoint(path)
    assert _detail(info.value) == expected


@pytest.mark.parametrize("where", [0.3, 0.5, 0.7])
def test_flipped_byte_is_refused(tmp_path: Path, where: float):
    path = tmp_path / "ckpt.pt"
    ckpt.save_checkpoint(path, _payload())
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="damaged"):
        ckpt.load_checkpoint(path)


def test_wrong_format_version_and_foreign_files(tmp_path: Path):
    newer = tmp_path / "newer.pt"
    record = {**_payload(), "format": ckpt.FORMAT, "format_version": 999}
    record["digest"] = ckpt.payload_digest(record)
    torch.save(record, newer)
    with pytest.raises(UserError, match="upgrade gpt2"):
        ckpt.load_checkpoint(newer)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, plain)
    with pytest.raises(UserError, match="not a gpt2 checkpoint"):
        ckpt.load_checkpoint(plain)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(UserError):
        ckpt.load_checkpoint(text)
    with pytest.raises(UserError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_never_executed(tmp_path: Path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "model": _Evil(str(marker))}, evil, pickle_protocol=2)
    with pytest.raises(UserError, match="nothing was executed"):
        ckpt.load_checkpoint(evil)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(UserError):
        ckpt.load_checkpoint(raw)
    assert not marker.exists()


def test_failed_rename_keeps_the_old_file(tmp_path: Path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    ckpt.save_checkpoint(path, _payload())
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(path, {**_payload(), "step": 99})
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*tmp*"))


def test_a_full_disk_is_an_oserror_on_the_checkpoint_path(tmp_path: Path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError of its zip writer around the OSError;
    the caller gets that OSError, naming the checkpoint, and the old file is kept."""
    import errno

    path = tmp_path / "ckpt.pt"
    ckpt.save_checkpoint(path, _payload())
    before = path.read_bytes()

    def full_disk(obj, f):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 13299008") from None

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as info:
        ckpt.save_checkpoint(path, {**_payload(), "step": 99})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_bytes() == before and not list(tmp_path.glob(".*tmp*"))

    def bug(obj, f):
        raise RuntimeError("not about space")

    monkeypatch.setattr(torch, "save", bug)
    with pytest.raises(RuntimeError, match="not about space"):  # other errors stay what they were
        ckpt.save_checkpoint(path, _payload())


def test_latest_checkpoint_skips_damaged(tmp_path: Path):
    ckpt.save_checkpoint(tmp_path / ckpt.step_checkpoint_name(4), _payload())
    ckpt.save_checkpoint(tmp_path / ckpt.CKPT_NAME, _payload())
    (tmp_path / ckpt.CKPT_NAME).write_bytes(b"garbage")
    warnings = []
    assert ckpt.latest_checkpoint(tmp_path, warnings.append) == tmp_path / ckpt.step_checkpoint_name(4)
    assert warnings and "damaged" in warnings[0]


@pytest.mark.parametrize("device", ["tpu", "cuda", "cuda:0", torch.device("cuda")])
def test_load_model_on_a_device_this_machine_lacks_is_a_user_error(tmp_path: Path, monkeypatch, device):
    from gpt2cli.loading import load_model, save_safetensors
    from gpt2cli.model import GPT
    from gpt2cli.specs import ModelSpec

    path = save_safetensors(GPT(ModelSpec(preset="tiny")), tmp_path / "model.safetensors")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as info:
        load_model(path, device=device)
    assert ("unknown device 'tpu'" if device == "tpu" else "no CUDA GPU") in info.value.message
    assert load_model(path, device="cpu").model.lm_head.weight.device.type == "cpu"
