"""`gpt2 generate`: Sample text from a checkpoint, a run folder or a GPT-2 model (KV-cached).

Text goes to stdout as it is sampled; timing (and with --verbose the model and cache) to stderr.
``--interactive`` loads the model once and samples for each line read from stdin.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from gpt2cli.cli.common import (
    FLAT_PRECEDENCE_HELP,
    ConfigOpt,
    err,
    field_help,
    flat_set_opt,
    plural,
)
from gpt2cli.errors import UserError
from gpt2cli.specs import GenerateSpec, build_spec

HELP = "Sample text from a checkpoint, a run folder or a GPT-2 model (KV-cached)."
SetOpt = flat_set_opt("generate")

# flag -> GenerateSpec field, so that errors name the flag the user typed.
FLAG_FOR_FIELD = {
    "max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
    "top_p": "--top-p", "seed": "--seed", "num_samples": "--num-samples", "stop": "--stop",
    "ignore_eos": "--ignore-eos", "device": "--device", "dtype": "--dtype", "compile": "--compile",
    "sync_every": "--sync-every", "quantize": "--quantize",
}


class OutputFormat(str, Enum):
    text = "text"
    jsonl = "jsonl"


def register(app: typer.Typer) -> None:
    app.command(
        "generate",
        help=HELP + " Text streams to stdout, timing goes to stderr. " + FLAT_PRECEDENCE_HELP,
        no_args_is_help=True,
    )(generate)


def _h(field: str) -> str:
    return field_help(GenerateSpec, field)


def generate(
    ckpt: Annotated[
        str,
        typer.Argument(
            metavar="CKPT",
            help="Checkpoint file (ckpt.pt, best.pt), run folder (its best.pt), Hugging Face GPT-2 "
            "folder or hub name, or a safetensors file from `gpt2 export`.",
            show_default=False,
        ),
    ],
    prompt: Annotated[
        str | None,
        typer.Argument(
            metavar="PROMPT",
            help="The prompt; - reads it from stdin. Omitted or empty: start of a document (<|endoftext|>).",
            show_default=False,
        ),
    ] = None,
    prompt_file: Annotated[
        str | None, typer.Option("--prompt-file", "-f", help="Read the prompt from this UTF-8 file.", show_default=False)
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", "-n", help=_h("max_new_tokens"), show_default=False)] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", "-t", help=_h("temperature"), show_default=False)] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help=_h("top_k"), show_default=False)] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help=_h("top_p"), show_default=False)] = None,
    seed: Annotated[int | None, typer.Option("--seed", help=_h("seed"), show_default=False)] = None,
    num_samples: Annotated[int | None, typer.Option("--num-samples", help=_h("num_samples"), show_default=False)] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help=_h("stop"), show_default=False)] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help=_h("ignore_eos"))] = False,
    device: Annotated[str | None, typer.Option("--device", help=_h("device"), show_default=False)] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help=_h("dtype") + " auto = bf16 on CUDA, else fp32.", show_default=False)] = None,
    compile_: Annotated[bool, typer.Option("--compile", help=_h("compile") + " Pays off for long outputs; costs seconds to start.")] = False,
    quantize: Annotated[str | None, typer.Option("--quantize", help=_h("quantize"), show_default=False)] = None,
    sync_every: Annotated[int | None, typer.Option("--sync-every", help=_h("sync_every") + " 1 streams every token as it comes.", show_default=False)] = None,
    output_format: Annotated[
        OutputFormat, typer.Option("--format", help="text: the prompt and the completion, streamed; jsonl: one JSON object per sample.")
    ] = OutputFormat.text,
    echo: Annotated[bool, typer.Option("--echo/--no-echo", help="Print the prompt before the completion (text format).")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also report the model, the KV cache (bytes per token) and window slides on stderr.")] = False,
    interactive: Annotated[bool, typer.Option(
        "--interactive", "-i", help="Load the model once, then sample for every line read from stdin (a prompt "
        "each; \\n in a line is a newline) until end of input (Ctrl-D). A bad prompt is one Error line and the "
        "session goes on; Ctrl-C stops the sample at hand (on a terminal).")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    flags: dict[str, Any] = {
        "max_new_tokens": max_new_tokens, "temperature": temperature,
        "top_k": top_k, "top_p": top_p, "seed": seed, "num_samples": num_samples, "stop": stop or None,
        "ignore_eos": True if ignore_eos else None, "device": device, "dtype": dtype,
        "compile": True if compile_ else None, "sync_every": sync_every, "quantize": quantize,
    }
    # --top-k 0 (no limit) is a value like any other: the spec stores it as None.
    spec = build_spec(GenerateSpec, config_file=config, flags=flags, sets=set_ or (), flag_names=FLAG_FOR_FIELD,
                      set_prefix="generate")
    if interactive:
        if prompt is not None or prompt_file is not None:
            raise UserError("--interactive reads its prompts from stdin, a line each",
                            "drop the PROMPT argument or --prompt-file")
        run_interactive(ckpt, spec, output_format=output_format.value, echo=echo, verbose=verbose)
        return
    text = _read_prompt(prompt, prompt_file)
    run(ckpt, text, spec, output_format=output_format.value, echo=echo, verbose=verbose)


def _read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise UserError("give the prompt as an argument or with --prompt-file, not both", "see gpt2 generate --help")
    if prompt_file is not None:
        path = Path(prompt_file).expanduser()
        if not path.is_file():
            raise UserError(f"prompt file {prompt_file!r} does not exist", "check the --prompt-file path")
        return _utf8(path.read_bytes(), f"prompt file {prompt_file!r}")
    if prompt == "-":
        stdin_bytes = getattr(sys.stdin, "buffer", None)  # absent where stdin was replaced by text (tests)
        return _utf8(stdin_bytes.read(), "the prompt on stdin") if stdin_bytes else sys.stdin.read()
    # Python hands undecodable argv bytes over as lone surrogates (PEP 383): text the tokenizer
    # would mangle and stdout could not write back as UTF-8, so refuse them like a bad file.
    return _utf8(os.fsencode(prompt), "the prompt argument") if prompt else ""


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} is not UTF-8 text (byte {exc.start}: {exc.reason})",
                        "give UTF-8 text, or convert it first with iconv -t UTF-8") from exc


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(ckpt: str, prompt: str, spec: GenerateSpec, *, output_format: str = "text", echo: bool = True,
        verbose: bool = False) -> None:
    generator = _load(ckpt, spec, verbose)
    generator.check_call(prompt, spec)  # refuse a prompt or a batch that cannot fit before printing anything
    _sample(generator, prompt, spec, output_format=output_format, echo=echo, verbose=verbose)


def run_interactive(ckpt: str, spec: GenerateSpec, *, output_format: str = "text", echo: bool = True,
                    verbose: bool = False) -> None:
    """`gpt2 generate CKPT --interactive`: the model is loaded (and compiled) once, then every line
    of stdin is a prompt, sampled and printed as a one-off call would, until end of input. On a
    terminal a "> " on stderr asks for the next one, and Ctrl-C stops the sample at hand (what it
    wrote stays) and asks again; piped, Ctrl-C ends the command as usual."""
    generator = _load(ckpt, spec, verbose)
    terminal = sys.stdin.isatty()
    stdin_bytes = getattr(sys.stdin, "buffer", None)  # absent where stdin was replaced by text (tests)
    while True:
        if terminal:
            err.print("> ", end="")
        try:
            line = stdin_bytes.readline() if stdin_bytes else sys.stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt: the session ends, as at a shell's
            err.print()
            raise
        if not line:  # end of input
            if terminal:
                err.print()
            return
        try:
            text = _utf8(line, "the prompt on stdin") if isinstance(line, bytes) else line
            prompt = text.rstrip("\r\n").replace("\\n", "\n")
            generator.check_call(prompt, spec)
            _sample(generator, prompt, spec, output_format=output_format, echo=echo, verbose=verbose)
        except UserError as exc:  # this prompt cannot be sampled; the next one may
            sys.stderr.write(exc.render() + "\n")  # as the command would end with it
        except KeyboardInterrupt:
            if not terminal:
                raise
            err.print("(stopped)")


def _load(ckpt: str, spec: GenerateSpec, verbose: bool):
    from gpt2cli.generate import Generator

    generator, source = Generator.from_source(ckpt, device=spec.device, dtype=spec.dtype, compile=spec.compile,
                                              quantize=spec.quantize)
    slow_int8 = _slow_int8_reason(spec, generator.device.type)
    if slow_int8:
        from rich.text import Text

        err.print(Text(f"warning: --quantize int8 {slow_int8}", style="yellow"), soft_wrap=True)
    if verbose:
        m = generator.spec
        from gpt2cli.quantize import weight_bytes

        sys.stderr.write(
            f"model: {source}: {generator.num_params:,} parameters, {m.n_layer} layers, attn={m.attn} "
            f"({plural(m.kv_heads, 'kv head')} of {m.n_head}), pos={m.pos}, context {m.block_size:,}; "
            f"weights {weight_bytes(generator.model) / 2**20:,.1f} MiB"
            f"{' (linear layers int8)' if generator.quantize == 'int8' else ''}\n"
        )
    return generator


def _sample(generator, prompt: str, spec: GenerateSpec, *, output_format: str, echo: bool, verbose: bool) -> None:
    """One call: the samples of ``prompt`` to stdout, the timing line to stderr."""
    text_mode = output_format == "text"
    several = spec.num_samples > 1
    pending: dict[int, list[str]] = {}

    def header(i: int) -> None:
        if several:
            _write(f"{'' if i == 0 else chr(10)}==> sample {i + 1}/{spec.num_samples} <==\n")
        if echo:
            _write(prompt)

    def on_text(index: int, piece: str) -> None:
        if index == 0:  # the first sample streams live; the others print when the batch is done
            _write(piece)
        else:
            pending.setdefault(index, []).append(piece)

    if text_mode:
        try:
            header(0)
            result = generator.generate(prompt, spec, on_text)
        except KeyboardInterrupt:  # during the prefill: nothing sampled, the echoed prompt ends its line
            if several or (echo and prompt):
                _write("\n")
            raise
    else:
        result = _generate_with_progress(generator, prompt, spec)

    if text_mode:
        for sample in result.samples[1:]:
            header(sample.index)
            _write("".join(pending.get(sample.index, [])))
        _write("\n")  # also after a Ctrl-C: "Aborted." then starts a line of its own
    else:
        for sample in result.samples:
            record = {
                "index": sample.index,
                "prompt": result.prompt,
                "completion": sample.completion,
                "prompt_tokens": len(result.prompt_tokens),
                "tokens": sample.num_tokens,
                "finish_reason": sample.finish_reason,
                "tokens_per_s": round(sample.tokens_per_s, 2),
            }
            _write(json.dumps(record, ensure_ascii=False) + "\n")

    if result.interrupted:
        # What was sampled is out (jsonl rows say "interrupted"); the command ends as any Ctrl-C.
        raise KeyboardInterrupt
    reasons = ", ".join(f"{n} {r}" for r, n in _count(s.finish_reason for s in result.samples).items())
    sys.stderr.write(
        f"{plural(result.new_tokens, 'token')} in {result.total_s:.2f} s = {result.tokens_per_s:,.1f} tokens/s "
        f"(prefill {plural(len(result.prompt_tokens), 'token')} {result.prefill_s * 1e3:.0f} ms"
        # one new token per sample comes from the prefill alone: no decode step to rate
        f"{f', decode {result.decode_tokens_per_s:,.1f} tokens/s' if result.decode_steps else ''}"
        f"; {result.device}, {result.dtype}{', int8 weights' if result.quantize == 'int8' else ''}"
        f"{_compiled_note(result)}; finished: {reasons})\n"
    )
    if verbose:
        m = generator.spec
        sys.stderr.write(
            f"KV cache: {result.cache_bytes_per_token:,} bytes per token per sample (2 x {m.n_layer} layers "
            f"x {plural(m.kv_heads, 'kv head')} x {m.head_dim} dims x {result.cache_bytes_per_token // (2 * m.n_layer * m.kv_heads * m.head_dim)} "
            f"bytes), {result.cache_bytes:,} bytes preallocated; window slides: {result.window_slides}\n"
        )


def _slow_int8_reason(spec: GenerateSpec, device_type: str) -> str | None:
    """Why int8 weights will decode slower than float ones here, or None. They are faster only
    where the step is compiled and, on a CPU, one sample long (docs/benchmarks.md, "Int8
    weight-only decoding"); elsewhere each int8 weight is converted to float at every use."""
    if spec.quantize != "int8":
        return None
    if not spec.compile:
        return "without --compile saves memory but decodes slower than float weights; add --compile for speed"
    if device_type == "cpu" and spec.num_samples > 1:
        return ("decodes several samples slower than float weights on a CPU (its fast path is one sample): "
                "it saves memory only")
    return None


def _generate_with_progress(generator, prompt: str, spec: GenerateSpec):
    """jsonl prints once the batch is done: until then a bar on a terminal's stderr (none when piped)."""
    if not err.is_terminal:
        return generator.generate(prompt, spec)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]sampling"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                  TimeElapsedColumn(), console=err, transient=True) as progress:
        task = progress.add_task("sampling", total=spec.max_new_tokens)
        return generator.generate(prompt, spec, on_progress=lambda n: progress.update(task, completed=n))


def _compiled_note(result) -> str:
    if not result.compiled:
        return ""
    if result.compile_s:
        return f", compiled in {result.compile_s:.1f} s (not counted)"
    return ", compiled"


def _count(items) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts
