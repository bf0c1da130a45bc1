"""Specs: defaults, validation messages, config files, precedence, JSON round trip."""

from __future__ import annotations

import json

import pytest

from gpt2cli.errors import UserError
from gpt2cli.specs import (
    CompareSpec,
    EvaluateSpec,
    GenerateSpec,
    ModelSpec,
    OptimSpec,
    PrepareSpec,
    TrainSpec,
    build_spec,
    spec_from_json,
    spec_to_json,
)

ALL_SPECS = [TrainSpec, PrepareSpec, EvaluateSpec, GenerateSpec, CompareSpec]


def _models(cls):
    yield cls
    for f in cls.model_fields.values():
        ann = f.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            yield from _models(ann)


@pytest.mark.parametrize("spec_cls", ALL_SPECS)
def test_every_field_is_documented(spec_cls):
    for cls in _models(spec_cls):
        for name, info in cls.model_fields.items():
            assert info.description, f"{cls.__name__}.{name} has no description"


def test_default_train_spec_is_nano_gpt2_shape():
    spec = TrainSpec()
    assert spec.model.preset == "nano"
    assert (spec.model.attn, spec.model.pos, spec.model.n_kv_head) == ("mha", "learned", spec.model.n_head)
    assert spec.seq_len == spec.model.block_size


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"n_embd": 100, "n_head": 8}, "divisible by n_head"),
        ({"attn": "gqa", "n_head": 8, "n_kv_head": 3}, "divisible by n_kv_head"),
        ({"attn": "mha", "n_head": 8, "n_kv_head": 2}, "attn=mha"),
        ({"attn": "mqa", "n_kv_head": 2}, "attn=mqa"),
        ({"pos": "rope", "n_embd": 36, "n_head": 4}, "even head size"),
        ({"n_layer": 0}, "greater than 0"),
        ({"preset": "gpt5"}, "unknown preset"),
        ({"rope_learnable": True}, "needs pos=rope"),
        ({"attn": "gqa", "n_head": 5, "n_embd": 80}, "5 has none; use attn=mqa"),
        ({"attn": "gqa", "n_head": 2, "n_embd": 64}, "2 has none; use attn=mqa"),
    ],
)
def test_model_validation_messages(fields, message):
    with pytest.raises(UserError) as info:
        build_spec(ModelSpec, flags=fields)
    assert message in info.value.message


def test_kv_heads_are_resolved_into_the_spec():
    assert ModelSpec(preset="gpt2", attn="gqa").n_kv_head == 3
    assert ModelSpec(preset="nano", attn="gqa").n_kv_head == 2
    assert ModelSpec(preset="nano", attn="mqa").n_kv_head == 1
    assert ModelSpec(preset="nano", attn="gqa", n_kv_head=4).n_kv_head == 4
    assert ModelSpec(preset="tiny", attn="gqa").n_kv_head == 2  # 1 < K < H: 4 heads -> 2, never 1


def test_gqa_with_one_kv_head_is_named_mqa():
    """One group of all query heads is MQA: a user's --attn gqa --kv-heads 1, and a checkpoint of
    an older version that stored tiny's default (gqa, 1), both load as mqa, the same computation."""
    for spec in (ModelSpec(preset="tiny", attn="gqa", n_kv_head=1),
                 ModelSpec.model_validate({**ModelSpec(preset="tiny").model_dump(), "attn": "gqa", "n_kv_head": 1})):
        assert (spec.attn, spec.n_kv_head) == ("mqa", 1)


def test_unknown_setting_is_refused():
    with pytest.raises(UserError, match="unknown setting"):
        build_spec(TrainSpec, sets=["optim.learning_rate=1"])


def test_precedence_defaults_file_flags_set(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[optim]\nlr = 0.002\nwarmup = 7\n[train]\nsteps = 50\n[model]\npreset = "tiny"\n')
    spec = build_spec(TrainSpec, config_file=cfg, flags={"optim": {"lr": 0.003, "warmup": None}},
                      sets=["train.steps=60"])
    assert spec.optim.lr == 0.003  # flag beats file
    assert spec.optim.warmup == 7  # file beats default; an absent flag (None) does not override
    assert spec.train.steps == 60  # --set beats file
    assert spec.model.preset == "tiny" and spec.model.n_layer == 2
    assert spec.optim.min_lr == pytest.approx(0.0003)
    # the derived min_lr prints as the user would write it (3e-05, not 2.9999999999999997e-05)
    assert [repr(OptimSpec(lr=lr).min_lr) for lr in (3e-4, 6e-4, 7e-5)] == ["3e-05", "6e-05", "7e-06"]


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "optim:\n  lr: 0.004\nmodel:\n  preset: tiny\n  pos: rope\n"),
    (".json", json.dumps({"optim": {"lr": 0.004}, "model": {"preset": "tiny", "pos": "rope"}})),
    (".toml", '[optim]\nlr = 0.004\n[model]\npreset = "tiny"\npos = "rope"\n'),
])
def test_config_formats(tmp_path, suffix, text):
    path = tmp_path / f"cfg{suffix}"
    path.write_text(text)
    spec = build_spec(TrainSpec, config_file=path)
    assert spec.optim.lr == 0.004 and spec.model.pos == "rope"


def test_bad_config_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_spec(TrainSpec, config_file=tmp_path / "missing.toml")
    with pytest.raises(UserError, match="is a folder"):
        build_spec(TrainSpec, config_file=tmp_path)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"optim:\n  lr: \xff\xfe\n")
    with pytest.raises(UserError, match=r"is not UTF-8 text \(byte 0xff at offset 13\)"):
        build_spec(TrainSpec, config_file=binary)
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr=")
    with pytest.raises(UserError, match="cannot parse"):
        build_spec(TrainSpec, config_file=bad)
    odd = tmp_path / "cfg.ini"
    odd.write_text("x")
    with pytest.raises(UserError, match="unknown type"):
        build_spec(TrainSpec, config_file=odd)


def test_set_parsing_types_and_errors():
    spec = build_spec(TrainSpec, sets=["optim.betas=[0.8, 0.9]", "train.compile=true", "train.seq_len=null",
                                       "model.preset=tiny"])
    assert spec.optim.betas == (0.8, 0.9) and spec.train.compile is True and spec.train.seq_len is None
    with pytest.raises(UserError, match="section.field=value"):
        build_spec(TrainSpec, sets=["optim.lr"])


def test_flag_names_appear_in_errors():
    with pytest.raises(UserError) as info:
        build_spec(TrainSpec, flags={"train": {"batch_size": 0}}, flag_names={"train.batch_size": "--batch-size"})
    assert "--batch-size (train.batch_size)" in info.value.message


@pytest.mark.parametrize("spec", [
    TrainSpec(),
    build_spec(TrainSpec, flags={"model": {"preset": "tiny", "attn": "gqa", "pos": "rope", "rope_learnable": True},
                                 "optim": {"lr": 3e-4, "betas": (0.9, 0.99)}, "train": {"steps": 7}}),
    GenerateSpec(stop=["\n\n"], top_p=0.9),
    EvaluateSpec(checkpoints=["a.pt"]),
])
def test_json_round_trip_is_exact(spec):
    text = spec_to_json(spec)
    again = spec_from_json(type(spec), text)
    assert again == spec
    assert spec_to_json(again) == text


def test_cross_section_validation():
    with pytest.raises(UserError, match="exceeds model.block_size"):
        build_spec(TrainSpec, flags={"model": {"preset": "tiny"}, "train": {"seq_len": 65}})
    with pytest.raises(UserError, match="steps or tokens"):
        build_spec(TrainSpec, flags={"train": {"steps": 1, "tokens": 10}})
    with pytest.raises(UserError, match="--strategy ddp or --strategy fsdp"):
        build_spec(TrainSpec, flags={"parallel": {"nproc": 2}})
    with pytest.raises(UserError, match="rdzv_endpoint"):
        build_spec(TrainSpec, flags={"parallel": {"strategy": "ddp", "nnodes": 2}})
    with pytest.raises(UserError, match="min_lr"):
        build_spec(TrainSpec, flags={"optim": {"lr": 1e-4, "min_lr": 1e-3}})


def test_shape_fields_ignore_training_only_settings():
    a = ModelSpec(preset="tiny")
    b = ModelSpec(preset="tiny", dropout=0.1, rope_base=500.0)
    assert a.shape_fields() == b.shape_fields()
    assert a.shape_fields() != ModelSpec(preset="tiny", n_layer=3).shape_fields()


# ------------------------------------------------------------------------------------ device


def _device_specs() -> list[tuple[type, str]]:
    """(spec, dotted path) of every device field of every command's spec."""
    found = []
    for top in ALL_SPECS:
        for name, info in top.model_fields.items():
            ann = info.annotation
            if name == "device":
                found.append((top, name))
            elif isinstance(ann, type) and "device" in getattr(ann, "model_fields", {}):
                found.append((top, f"{name}.device"))
    return found


def test_train_eval_and_generate_have_a_device_field():
    assert {(cls.__name__, path) for cls, path in _device_specs()} == {
        ("TrainSpec", "train.device"), ("EvaluateSpec", "device"), ("GenerateSpec", "device")}


def _device_flags(path: str, device: str) -> dict:
    section, _, name = path.rpartition(".")
    return {section: {name: device}} if section else {name: device}


@pytest.mark.parametrize("spec_cls, path", _device_specs())
@pytest.mark.parametrize("device", ["tpu", "cuda:", "cuda:x", "CPU", "cpu "])
def test_every_device_field_refuses_unknown_devices_alike(spec_cls, path, device):
    with pytest.raises(UserError) as info:
        build_spec(spec_cls, flags=_device_flags(path, device), flag_names={path: "--device"})
    assert info.value.message == (
        f"invalid settings: --device ({path}): must be auto, cpu, cuda, cuda:N or mps, got {device!r}")


@pytest.mark.parametrize("spec_cls, path", _device_specs())
@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3", "mps"])
def test_every_device_field_accepts_the_known_devices(spec_cls, path, device):
    spec = build_spec(spec_cls, flags=_device_flags(path, device))
    for part in path.split("."):
        spec = getattr(spec, part)
    assert spec == device


# ---------------------------------------------------------------- errors the user can act on


@pytest.mark.parametrize("lr", [-1, 0, "nan"])
def test_an_invalid_lr_is_reported_once_not_again_for_the_derived_min_lr(lr):
    with pytest.raises(UserError) as info:
        build_spec(TrainSpec, sets=[f"optim.lr={lr}"], flag_names={"optim.lr": "--lr", "optim.min_lr": "--min-lr"})
    assert "--set optim.lr:" in info.value.message
    assert "min_lr" not in info.value.message and "--min-lr" not in info.value.message


def test_both_ways_of_one_budget_in_one_layer_stay_an_error(tmp_path):
    """--set steps and --set tokens together (one layer, as two flags are): refused, not the last
    one silently winning; a file under them gives way."""
    with pytest.raises(UserError, match="give steps or tokens, not both"):
        build_spec(TrainSpec, sets=["train.steps=4", "train.tokens=256"])
    with pytest.raises(UserError, match="give grad_accum or batch_tokens, not both"):
        build_spec(TrainSpec, sets=["train.grad_accum=2", "train.batch_tokens=256"])
    config = tmp_path / "run.toml"
    config.write_text("[train]\ntokens = 640\n")
    assert build_spec(TrainSpec, config_file=config, sets=["train.steps=3"]).train.tokens is None


def test_a_config_file_name_with_braces_is_named_as_it_is(tmp_path):
    config = tmp_path / "c{lr}.toml"
    config.write_text("[optim]\nlr = -1.0\n")
    with pytest.raises(UserError) as info:
        build_spec(TrainSpec, config_file=config)
    assert info.value.message.startswith(f"invalid settings: optim.lr (in {config}): ")


def test_seq_len_is_one_or_more():
    assert build_spec(TrainSpec, flags={"train": {"seq_len": 1}}).seq_len == 1
    with pytest.raises(UserError, match=r"train.seq_len: Input should be greater than 0"):
        build_spec(TrainSpec, flags={"train": {"seq_len": 0}})


def test_a_bad_value_is_named_by_the_route_it_came_by(tmp_path):
    """The flag the user typed, the --set they wrote, or the file (not a flag they never typed)."""
    names = {"optim.lr": "--lr", "train.batch_size": "--batch-size"}
    config = tmp_path / "run.toml"
    config.write_text("[optim]\nlr = -1\n")

    def message(**layers):
        with pytest.raises(UserError) as info:
            build_spec(TrainSpec, flag_names=names, **layers)
        return info.value.message

    assert message(config_file=config) == f"invalid settings: optim.lr (in {config}): Input should be greater than 0"
    assert message(flags={"optim": {"lr": -1}}).startswith("invalid settings: --lr (optim.lr): ")
    assert message(sets=["optim.lr=-1"]).startswith("invalid settings: --set optim.lr: ")
    # the last route wins, as the value does
    assert message(config_file=config, flags={"optim": {"lr": -2}}).startswith("invalid settings: --lr (optim.lr)")
    assert message(base={"optim": {"lr": -1}}).startswith("invalid settings: optim.lr (stored in the resumed run)")
    assert message(config_file=config, flags={"train": {"batch_size": 0}}) == (
        f"invalid settings: optim.lr (in {config}): Input should be greater than 0; "
        "--batch-size (train.batch_size): Input should be greater than 0")


def test_a_min_lr_the_user_set_is_still_checked():
    with pytest.raises(UserError, match="--min-lr"):
        build_spec(TrainSpec, flags={"optim": {"lr": 1e-3, "min_lr": -1}}, flag_names={"optim.min_lr": "--min-lr"})
    assert build_spec(TrainSpec, flags={"optim": {"lr": 1e-3}}).optim.min_lr == pytest.approx(1e-4)


def _parallel_error(**flags) -> str:
    train = {k: flags.pop(k) for k in ("device",) if k in flags}
    with pytest.raises(UserError) as info:
        build_spec(TrainSpec, flags={"parallel": flags, "train": train})
    return info.value.message


def test_several_processes_without_a_strategy_name_the_flags():
    message = _parallel_error(nproc=2)
    assert "2 processes (--nproc 2) need --strategy ddp or --strategy fsdp" in message
    assert "4 processes (--nproc 2, --nnodes 2)" in _parallel_error(nproc=2, nnodes=2, rdzv_endpoint="h:1")


def test_gpus_on_the_cpu_says_gpus_needs_cuda_and_how_to_run_on_the_cpu():
    for strategy in ("single", "ddp", "fsdp"):
        message = _parallel_error(gpus=2, device="cpu", strategy=strategy)
        assert "--gpus needs CUDA GPUs, not --device cpu" in message
        assert "--strategy ddp --nproc 2 --device cpu" in message
        assert "need --strategy" not in message
    assert "takes --device auto or cuda, not cuda:1" in _parallel_error(gpus=2, device="cuda:1", strategy="ddp")


@pytest.mark.parametrize("strategy", ["single", "ddp"])
@pytest.mark.parametrize(("setting", "flag", "undo"), [
    ({"fsdp_cpu_offload": True}, "--fsdp-cpu-offload", "--no-fsdp-cpu-offload"),
    ({"fsdp_reshard_after_forward": False}, "--no-fsdp-reshard-after-forward", "--fsdp-reshard-after-forward"),
])
def test_fsdp_settings_under_another_strategy_are_refused_not_ignored(strategy, setting, flag, undo):
    message = _parallel_error(strategy=strategy, device="cpu", **setting)
    assert f"{flag} (" in message and f"does nothing under --strategy {strategy}" in message
    assert f"use --strategy fsdp or {undo}" in message
    # Their defaults, given explicitly, are fine anywhere; under fsdp every value is.
    build_spec(TrainSpec, flags={"parallel": {"strategy": strategy, "fsdp_cpu_offload": False,
                                              "fsdp_reshard_after_forward": True}})
    build_spec(TrainSpec, flags={"parallel": {"strategy": "fsdp", **setting}, "train": {"device": "cuda"}})


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_fsdp_cpu_offload_needs_a_cuda_device(device):
    message = _parallel_error(strategy="fsdp", nproc=2, fsdp_cpu_offload=True, device=device)
    assert f"--fsdp-cpu-offload (parallel.fsdp_cpu_offload) needs a CUDA device, not --device {device}" in message
    for accepted in ("auto", "cuda", "cuda:1"):  # auto: checked where the device is resolved (cli/train.py)
        build_spec(TrainSpec, flags={"parallel": {"strategy": "fsdp", "fsdp_cpu_offload": True},
                                     "train": {"device": accepted}})


def test_gpus_without_a_strategy_also_says_what_to_do_without_cuda():
    message = _parallel_error(gpus=2)  # device auto: the spec cannot know whether CUDA is there
    assert "2 processes (--gpus 2) need --strategy ddp or --strategy fsdp" in message
    assert "without CUDA GPUs use --strategy ddp --nproc 2 --device cpu" in message


@pytest.mark.parametrize("text", [
    '[model]\npreset = "tiny"\n[train]\nsteps = 3\n',  # TOML
    "model:\n  preset: tiny\n",  # YAML
    b"PK\x03\x04\x80\xff binary",  # a checkpoint (zip), not even UTF-8
    "[1, 2]",  # JSON, but not an object
])
def test_a_file_that_is_not_a_json_spec_is_called_that(text):
    with pytest.raises(UserError) as info:
        spec_from_json(TrainSpec, text, source="run.toml")
    assert info.value.message.startswith("'run.toml' is not a JSON spec as written by gpt2")
    assert "--config" in info.value.hint and "this version" not in info.value.render()


def test_a_json_spec_of_another_version_is_still_called_that():
    with pytest.raises(UserError) as info:
        spec_from_json(TrainSpec, json.dumps({"optim": {"learning_rate": 1}}))
    assert "unknown setting" in info.value.message and "this version of gpt2" in info.value.hint
    assert spec_from_json(TrainSpec, spec_to_json(TrainSpec()).encode()) == TrainSpec()  # bytes are read too


@pytest.mark.parametrize("spec_cls, section", [(TrainSpec, {"train": {"seed": 2**32}}),
                                               (GenerateSpec, {"seed": 99999999999999999999})])
def test_seeds_are_32_bit(spec_cls, section):
    """A larger seed overflowed torch's 64-bit seeding mid-output (generate) or in the per-step seeds."""
    with pytest.raises(UserError, match="less than or equal to 4294967295"):
        build_spec(spec_cls, flags=section)


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_sampling_settings_must_be_finite(field, value):
    with pytest.raises(UserError, match=f"{field}: Input should be a finite number"):
        build_spec(GenerateSpec, flags={field: float(value)})


def test_top_k_zero_means_no_limit_by_every_route(tmp_path):
    """--top-k 0 is "no limit"; --set top_k=0 and a config file's top_k = 0 say the same."""
    config = tmp_path / "g.toml"
    config.write_text("top_k = 0\n")
    assert build_spec(GenerateSpec, flags={"top_k": 0}).top_k is None
    assert build_spec(GenerateSpec, sets=["top_k=0"]).top_k is None
    assert build_spec(GenerateSpec, config_file=config).top_k is None
    assert build_spec(GenerateSpec, config_file=config, flags={"top_k": 40}).top_k == 40
    with pytest.raises(UserError, match=r"--top-k \(top_k\): Input should be greater than or equal to 0"):
        build_spec(GenerateSpec, flags={"top_k": -1}, flag_names={"top_k": "--top-k"})


def test_an_empty_stop_string_is_refused():
    with pytest.raises(UserError, match=r"--stop \(stop\): a stop string must not be empty"):
        build_spec(GenerateSpec, flags={"stop": ["\n\n", ""]}, flag_names={"stop": "--stop"})
    assert build_spec(GenerateSpec, flags={"stop": ["\n\n"]}).stop == ["\n\n"]


@pytest.mark.parametrize("flag, value", [("lr", 1e38), ("lr", 11.0), ("lr", "inf"), ("min_lr", "inf")])
def test_absurd_learning_rates_are_refused(flag, value):
    """lr 1e38 overflowed inside Adam with a traceback; no learning rate above 10 trains anything."""
    with pytest.raises(UserError, match=f"optim.{flag}"):
        build_spec(TrainSpec, sets=[f"optim.{flag}={value}"])
    assert build_spec(TrainSpec, flags={"optim": {"lr": 10.0}}).optim.lr == 10.0


@pytest.mark.parametrize("spec_cls, prefix, assignment, field, value", [
    (GenerateSpec, "generate", "generate.max_new_tokens=3", "max_new_tokens", 3),
    (EvaluateSpec, "eval", "eval.batch_size=2", "batch_size", 2),
    (CompareSpec, "compare", "compare.metric=val_ppl", "metric", "val_ppl"),
    (PrepareSpec, "data", "data.val_fraction=0.2", "val_fraction", 0.2),
])
def test_set_takes_the_command_name_as_a_section_of_a_flat_spec(spec_cls, prefix, assignment, field, value):
    """`--set section.field=value`, as every command's help says, works where the spec has no sections."""
    assert getattr(build_spec(spec_cls, sets=[assignment], set_prefix=prefix), field) == value
    assert getattr(build_spec(spec_cls, sets=[assignment.partition(".")[2]], set_prefix=prefix), field) == value
    with pytest.raises(UserError, match="unknown setting"):
        build_spec(spec_cls, sets=[f"other.{field}=1"], set_prefix=prefix)


def test_a_model_spec_object_gets_its_presets_learning_rate_like_a_dict():
    assert TrainSpec(model=ModelSpec(preset="tiny")).optim.lr == TrainSpec(model={"preset": "tiny"}).optim.lr
    assert TrainSpec(model=ModelSpec(preset="gpt2")).optim.lr == TrainSpec(model={"preset": "gpt2"}).optim.lr
    # an object is taken as built: without a preset it is GPT-2's shape (a dict would start from nano)
    assert TrainSpec(model=ModelSpec(n_layer=2)).model.n_embd == 768
    assert TrainSpec(model={"n_layer": 2}).model.n_embd == ModelSpec(preset="nano").n_embd


def test_every_field_description_survives_rich_markup_in_help():
    """--help renders descriptions as rich markup: "[tensorboard]" in a description vanished from
    the help (it read "pip install 'gpt2cli'"). Every description must render as written."""
    from rich.text import Text

    from gpt2cli import specs

    classes, pending = set(), [specs._Spec]
    while pending:
        cls = pending.pop()
        classes.add(cls)
        pending.extend(cls.__subclasses__())
    checked = 0
    for cls in classes:
        for name, field in cls.model_fields.items():
            if field.description:
                assert Text.from_markup(field.description).plain == field.description, f"{cls.__name__}.{name}"
                checked += 1
    assert checked > 50


def test_true_or_false_is_not_a_number():
    with pytest.raises(UserError, match="must be a number, not true"):
        build_spec(TrainSpec, sets=["train.steps=true"])
    with pytest.raises(UserError, match="must be a number, not false"):
        build_spec(TrainSpec, sets=["optim.lr=false"])
    assert build_spec(TrainSpec, sets=["train.compile=true", "train.steps=3"]).train.steps == 3
