"""Sweeps: a grid of training runs in one parent folder, run one after another.

``gpt2 train ... --sweep pos=learned,rope --sweep attn=mha,gqa --seeds 3`` becomes
2 x 2 x 3 = 12 runs; ``--sweep variants.toml`` adds an axis of hand-picked variants (each a set
of settings) instead of one setting's values. Each point of the grid is the command's own settings plus the point's values,
applied last (like ``--set``), plus ``train.seed`` = the command's seed + i for i < --seeds. The
specs of all points are built and validated before anything is trained or written.

The parent folder holds one run folder per point (named after its values, e.g.
``pos=rope_attn=gqa_seed=1338``) and ``sweep.json``, a manifest rewritten atomically as runs
start and finish: the axes, the seeds and, per run, its folder, values, seed and status
(pending, running, done, failed, interrupted). Runs go seed by seed (every variant with the first
seed, then every variant with the second...), so a sweep cut short still compares variants.
Rerunning the same command with ``--resume auto`` skips finished runs and resumes the others.

This module imports no torch; training is the caller's ``train_one`` callback.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from gpt2cli.compare import SPEC_NAME, SWEEP_MANIFEST, Comparison, compare_paths, resolve_field
from gpt2cli.errors import NonFiniteLossError, UserError
from gpt2cli.specs import TrainSpec

MANIFEST_KIND = "gpt2-sweep"
MANIFEST_VERSION = 1
SEED_PATH = "train.seed"

# What train_one reports back.
DONE, INTERRUPTED = "done", "interrupted"


@dataclass(frozen=True)
class Axis:
    """One ``--sweep``: either ``key=v1,v2`` (the key as typed, the spec field it sets, the raw
    values) or a variants file (``key`` is the file; each variant a name and its settings)."""

    key: str
    path: str
    values: tuple[str, ...] = ()
    variants: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()

    def options(self) -> list[tuple[str, dict[str, str]]]:
        """(name part, {spec path: raw value}) for each value of this axis."""
        if self.variants:
            return [(name, dict(settings)) for name, settings in self.variants]
        return [(f"{self.key}={_safe(v)}", {self.path: v}) for v in self.values]

    @property
    def paths(self) -> list[str]:
        if not self.variants:
            return [self.path]
        return list(dict.fromkeys(p for _, settings in self.variants for p, _ in settings))

    def to_dict(self) -> dict[str, Any]:
        if self.variants:
            return {"file": self.key, "variants": [{"name": n, "overrides": dict(o)} for n, o in self.variants]}
        return {"key": self.key, "path": self.path, "values": list(self.values)}


@dataclass
class Point:
    """One run of the grid."""

    name: str
    overrides: dict[str, str]  # spec path -> raw value (read like --set)
    seed: int
    spec: TrainSpec
    status: str = "pending"
    error: str | None = None
    # Done, but a stop (Ctrl-C, SIGTERM) came during its last step: the sweep stops after it.
    stop_after: bool = False

    def run_dir(self, parent: Path) -> Path:
        return parent / self.name


@dataclass
class Sweep:
    parent: Path
    axes: list[Axis]
    seeds: list[int]
    points: list[Point] = field(default_factory=list)
    prepared: bool = False  # prepare_folder has checked the folder (and read a resumed manifest)

    @property
    def manifest_path(self) -> Path:
        return self.parent / SWEEP_MANIFEST

    def to_manifest(self) -> dict[str, Any]:
        return {
            "kind": MANIFEST_KIND,
            "version": MANIFEST_VERSION,
            "updated": datetime.now().isoformat(timespec="seconds"),
            "axes": [a.to_dict() for a in self.axes],
            "seeds": self.seeds,
            "runs": [{"name": p.name, "dir": p.name, "overrides": p.overrides, "seed": p.seed,
                      "status": p.status, "error": p.error} for p in self.points],
        }

    def write_manifest(self) -> None:
        self.parent.mkdir(parents=True, exist_ok=True)
        path = self.manifest_path
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_manifest(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)


# ------------------------------------------------------------------------------- parsing


def spec_paths(cls: type[BaseModel] = TrainSpec) -> list[str]:
    """Every leaf field of TrainSpec as a dotted path (model.pos, optim.lr, ...)."""
    paths = []
    for section, info in cls.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            paths += [f"{section}.{name}" for name in sub.model_fields]
        else:
            paths.append(section)
    return paths


def _split_values(text: str) -> list[str]:
    """Split on commas outside brackets, so ``betas=[0.9,0.95],[0.9,0.99]`` has two values."""
    values, depth, current = [], 0, ""
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    values.append(current.strip())
    return values


def resolve_key(key: str, aliases: Mapping[str, str] | None = None) -> str:
    """A flag name (pos, kv-heads, lr), a dotted path (model.pos) or a field name that is
    unique across sections (n_kv_head) -> the dotted spec path."""
    return resolve_field(key, spec_paths(), aliases, what="--sweep key ", unknown="is not a setting",
                         hint="use a flag name such as pos, attn, lr, kv-heads or a dotted path such as model.pos")


VARIANT_FILE_SUFFIXES = (".toml", ".yaml", ".yml", ".json")


def parse_axes(texts: Sequence[str], aliases: Mapping[str, str] | None = None) -> list[Axis]:
    """Parse ``--sweep`` options into axes, in the order given: ``key=v1,v2``, or the name of a
    TOML/YAML/JSON file listing variants (see :func:`read_variants`)."""
    axes: list[Axis] = []
    for text in texts:
        if "=" not in text and text.lower().endswith(VARIANT_FILE_SUFFIXES):
            axis = read_variants(text, aliases)
        else:
            key, sep, raw = text.partition("=")
            if not sep or not key.strip() or not raw.strip():
                raise UserError(f"--sweep {text!r} is not of the form key=value1,value2",
                                "e.g. --sweep pos=learned,rope, or a variants file variants.toml")
            path = _sweepable(resolve_key(key, aliases))
            values = _split_values(raw)
            if any(not v for v in values):
                raise UserError(f"--sweep {text!r} has an empty value", "separate values with single commas")
            if len(set(values)) != len(values):
                raise UserError(f"--sweep {text!r} repeats a value", "list each value once")
            axis = Axis(key.strip().lstrip("-"), path, tuple(values))
        for path in axis.paths:
            if any(path in a.paths for a in axes):
                raise UserError(f"--sweep sets {path} twice", "give each setting one --sweep with all its values")
        axes.append(axis)
    return axes


def _sweepable(path: str) -> str:
    if path.startswith("run.") or path == SEED_PATH:
        hint = "use --seeds N for seeds" if path == SEED_PATH else "--out names the sweep's folder"
        raise UserError(f"--sweep cannot vary {path}", hint)
    return path


def _raw(value: Any) -> str:
    """A value read from a variants file, written as --set reads it (YAML)."""
    return value if isinstance(value, str) else json.dumps(value)


def read_variants(path: str, aliases: Mapping[str, str] | None = None) -> Axis:
    """A variants file: a list ``variants`` of tables, each a run's settings (flag names, dotted
    paths or sections, as in a config file) and an optional ``name``::

        [[variants]]
        name = "gpt2"
        pos = "learned"
        attn = "mha"

        [[variants]]
        name = "rope-gqa"
        model = { pos = "rope", attn = "gqa" }
    """
    from gpt2cli.compare import flatten
    from gpt2cli.specs import read_config_file

    data = read_config_file(path, flag="--sweep")
    variants = data.get("variants")
    if set(data) != {"variants"} or not isinstance(variants, list) or not variants \
            or not all(isinstance(v, dict) for v in variants):
        raise UserError(f"--sweep file {path!r} must hold only a non-empty list `variants` of tables",
                        "see docs/compare.md")
    parsed: list[tuple[str, tuple[tuple[str, str], ...]]] = []
    for i, variant in enumerate(variants):
        variant = dict(variant)
        name = variant.pop("name", None)
        settings: dict[str, str] = {}
        for key, value in flatten(variant).items():
            settings[_sweepable(resolve_key(key, aliases))] = _raw(list(value) if isinstance(value, tuple) else value)
        if not settings:
            raise UserError(f"--sweep file {path!r}: variant {i + 1} sets nothing", "give it at least one setting")
        default = "_".join(f"{k.split('.')[-1]}={_safe(v)}" for k, v in settings.items())
        parsed.append((_safe(str(name)) if name is not None else default, tuple(settings.items())))
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise UserError(f"--sweep file {path!r} names two variants alike (unnamed ones are named by their settings)",
                        "give each variant its own name")
    return Axis(Path(path).name, "", variants=tuple(parsed))


def check_conflicts(axes: Sequence[Axis], explicit: Mapping[str, str]) -> None:
    """A swept setting also given by a flag or --set (``explicit``: path -> how it was given)."""
    for axis in axes:
        for path in axis.paths:
            if path in explicit:
                raise UserError(f"--sweep {axis.key} and {explicit[path]} both set {path}", "drop one of them")


# ------------------------------------------------------------------------------- the grid


def _safe(text: str) -> str:
    return re.sub(r"[\s/\\:*?\"<>|]+", "-", text).strip("-") or "_"


def point_name(parts: Sequence[str], seed: int, with_seed: bool) -> str:
    parts = list(parts)
    if with_seed or not parts:
        parts.append(f"seed={seed}")
    return "_".join(parts)


Builder = Callable[[dict[str, str], int, Path], TrainSpec]


def plan_sweep(parent: str | Path, axes: Sequence[Axis], seeds: int, base_seed: int, build: Builder) -> Sweep:
    """Every point of the grid with its validated spec. ``build(overrides, seed, run_dir)``
    returns the spec of one point (the caller layers the overrides over its own settings)."""
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}", "e.g. --seeds 3")
    sweep = Sweep(Path(parent), list(axes), [base_seed + i for i in range(seeds)])
    names: set[str] = set()
    for seed in sweep.seeds:
        for combo in itertools.product(*(a.options() for a in axes)):
            name = point_name([part for part, _ in combo], seed, with_seed=seeds > 1)
            if name in names:  # two values that look the same as folder names
                name = f"{name}-{len(names)}"
            names.add(name)
            overrides = {path: raw for _, settings in combo for path, raw in settings.items()}
            try:
                spec = build(overrides, seed, sweep.parent / name)
            except UserError as exc:
                raise UserError(f"sweep run {name}: {exc.message}", exc.hint) from exc
            sweep.points.append(Point(name, overrides, seed, spec))
    _refuse_identical_points(sweep.points)
    return sweep


def _refuse_identical_points(points: Sequence[Point]) -> None:
    """Two points that train the same run (values spelled two ways, 1e-3 and 0.001, or variants
    with the same settings) would be one run twice, counted as two in the comparison."""
    seen: dict[str, str] = {}
    for point in points:
        settings = point.spec.model_dump(mode="json")
        settings["run"] = {k: v for k, v in settings["run"].items() if k not in ("out", "wandb_name")}
        key = json.dumps(settings, sort_keys=True)
        if key in seen:
            raise UserError(f"--sweep points {seen[key]} and {point.name} are the same run (the same settings and "
                            "seed)", "list each value once; values spelled two ways (1e-3, 0.001) are one value")
        seen[key] = point.name


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("kind") != MANIFEST_KIND or not isinstance(data.get("runs"), list):
            raise ValueError("not a gpt2 sweep manifest")
        return data
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"cannot read {path}: {exc}", "the sweep folder is damaged") from exc


def prepare_folder(sweep: Sweep, resume: bool) -> None:
    """Refuse a folder that holds a run or another sweep; on resume, take over the recorded
    statuses of a sweep with the same grid."""
    sweep.prepared = False
    if (sweep.parent / SPEC_NAME).exists():
        raise UserError(f"{str(sweep.parent)!r} is a run folder", "choose another --out for the sweep")
    if not sweep.manifest_path.exists():
        sweep.prepared = True
        return
    if not resume:
        raise UserError(f"{str(sweep.parent)!r} already holds a sweep",
                        "continue it with --resume auto, or choose another --out")
    recorded = {r.get("name"): r for r in _read_manifest(sweep.manifest_path)["runs"]}
    planned = {p.name: p for p in sweep.points}
    if set(recorded) != set(planned) or any(recorded[n].get("overrides") != planned[n].overrides
                                            for n in planned):
        raise UserError(f"the sweep in {str(sweep.parent)!r} has a different grid",
                        "resume it with the same --sweep and --seeds, or choose another --out")
    for name, point in planned.items():
        point.status = recorded[name].get("status") or "pending"
        point.error = recorded[name].get("error")
    sweep.prepared = True


def run_sweep(sweep: Sweep, train_one: Callable[[Point, int], str], *, resume: bool = False,
              on_skip: Callable[[Point, int], None] | None = None) -> Sweep:
    """Train every point not yet done, one after another, keeping sweep.json current.

    ``train_one(point, index)`` trains one run and returns "done" or "interrupted" (and sets
    ``point.stop_after`` when a stop came too late to interrupt a run that completed). A run that
    stops on a non-finite loss is recorded as failed and the sweep goes on (a learning-rate
    sweep may diverge at its largest rate); an interruption stops the sweep; any other error is
    recorded and raised."""
    if not sweep.prepared:
        prepare_folder(sweep, resume)
    sweep.write_manifest()
    for i, point in enumerate(sweep.points):
        if point.status == DONE:
            if on_skip is not None:
                on_skip(point, i)
            continue
        point.status, point.error = "running", None
        sweep.write_manifest()
        try:
            point.status = train_one(point, i)
        except NonFiniteLossError as exc:
            point.status, point.error = "failed", exc.message
        except BaseException as exc:
            point.status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            point.error = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            sweep.write_manifest()
            raise
        sweep.write_manifest()
        if point.status == INTERRUPTED or point.stop_after:
            break
    return sweep


def failed(sweep: Sweep) -> list[Point]:
    return [p for p in sweep.points if p.status == "failed"]


def compare_sweep(sweep: Sweep, **kwargs: Any) -> Comparison:
    """The comparison of the sweep's runs (what `gpt2 compare PARENT` shows)."""
    return compare_paths([sweep.parent], **kwargs)
