"""Sampling text from a model: KV-cached prefill + decode, temperature / top-k / top-p, stop rules.

``Generator(model).generate(prompt, spec)`` is the whole of `gpt2 generate` minus the printing::

    from gpt2cli.generate import Generator
    from gpt2cli.loading import load_model
    from gpt2cli.specs import GenerateSpec

    loaded = load_model("runs/nano-mha-learned-20250101-120000")
    gen = Generator(loaded.model, device="auto", dtype="auto")
    result = gen.generate("To be, or not to be", GenerateSpec(max_new_tokens=50, seed=1))
    print(result.samples[0].completion)

How a call runs:

- **Prefill**: the prompt is encoded (GPT-2 BPE) and run through the model once, filling a
  preallocated per-layer key/value cache (:meth:`GPT.setup_kv_cache`; under GQA/MQA it holds only
  the key/value heads). ``num_samples`` copies of the prompt form one batch.
- **Decode**: one token per step for the whole batch; each step feeds only the new tokens and their
  positions (learned or RoPE alike) and attends over the cache, and the next token is drawn in
  the same function. With ``compile`` that function is ``torch.compile``d (static shapes; CUDA
  graphs on GPU via ``mode="reduce-overhead"``): one graph per token, model and sampling. On an
  accelerator the host queues ``sync_every`` steps (16) before it reads their tokens back: the
  device never waits for Python, and streamed text arrives in groups of tokens.
- **Sampling**: temperature 0 is greedy (argmax; top-k/top-p ignored). Otherwise logits / T, then
  top-k, then top-p (the smallest set of tokens whose probability reaches p), then a draw by the
  Gumbel-max trick from uniform noise of a ``torch.Generator`` seeded with ``seed`` (one draw per
  token): same seed, settings, model and device -> same text. Models with a vocabulary larger
  than the tokenizer's (padded) never sample the padding ids.
- **Ending a sample**: ``<|endoftext|>`` ends it (finish reason ``eos``) unless ``ignore_eos``; a
  stop string ends it with the text cut *before* the stop string (``stop``); otherwise it runs to
  ``max_new_tokens`` (``length``). The batch stops as soon as every sample has ended.
- **Streaming**: ``on_text(index, text)`` receives each sample's new text as tokens arrive. Bytes
  of a multi-byte UTF-8 character split across tokens are held back until the character is
  complete, and text that could still turn out to be the start of a stop string is held back until
  it cannot; the pieces joined equal the final completion exactly.
- **Longer than the context** (prompt + new tokens > ``block_size``): a sliding window. When the
  window is full, its oldest quarter is dropped and the rest is run through the model again at
  positions 0.. (one prefill), after which cached decoding continues; every token is predicted from
  at least the last 3/4 of a context's worth of tokens. A *prompt* longer than the context is
  refused (UserError) rather than silently cut.

Token counts: a sample's ``tokens`` are the ids it sampled, including the ``<|endoftext|>`` or the
token that completed a stop string. Times are wall-clock from the start of the prefill.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gpt2cli.cpu_decoding import (
    available_memory_bytes,
    lay_out_weights_for_decoding,
    mkl_packing_available,
    pack_for_decoding,
    pack_linears,
)
from gpt2cli.errors import UserError
from gpt2cli.model import GPT, kv_cache_bytes_per_token
from gpt2cli.quantize import QUANTIZE_CHOICES, quantize_int8
from gpt2cli.specs import GenerateSpec
from gpt2cli.tokenizer import EOT_ID, VOCAB_SIZE, encode, get_tokenizer

TextCallback = Callable[[int, str], None]


# --------------------------------------------------------------------------------- results


@dataclass
class Sample:
    """One completion of the prompt."""

    index: int
    completion: str
    tokens: list[int]
    finish_reason: str  # "length" | "eos" | "stop" | "interrupted" (Ctrl-C)
    elapsed_s: float  # from the start of the call to this sample's last token

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class Generation:
    """The result of one :meth:`Generator.generate` call."""

    prompt: str
    prompt_tokens: list[int]
    samples: list[Sample]
    prefill_s: float  # includes setting up the KV cache when this call allocated it
    decode_s: float
    decode_steps: int  # forward passes after the prefill (batched: one per step)
    window_slides: int  # re-prefills because the context was full
    cache_bytes_per_token: int  # per sequence, all layers, keys and values
    cache_bytes: int  # the whole preallocated cache
    device: str
    dtype: str
    compiled: bool
    # The first compiled step of a new shape or sampling setting traces and compiles (seconds to
    # a minute): its time is here, and left out of every other time and rate.
    compile_s: float = 0.0
    quantize: str = "none"  # "int8": the linear layers' weights were int8 (gpt2cli.quantize)

    @property
    def new_tokens(self) -> int:
        return sum(s.num_tokens for s in self.samples)

    @property
    def interrupted(self) -> bool:
        """A Ctrl-C (KeyboardInterrupt) stopped the decoding: the samples hold what was sampled."""
        return any(s.finish_reason == "interrupted" for s in self.samples)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        """New tokens of all samples per second, prefill included."""
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode steps alone (batch x steps / decode time)."""
        n = self.decode_steps * len(self.samples)
        return n / self.decode_s if self.decode_s > 0 else 0.0


# --------------------------------------------------------------------------------- sampling


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V), given uniform noise ``uniform`` (B, V)
    in [0, 1) (ignored, and may be None, when ``temperature`` is 0: greedy argmax).

    The draw is the Gumbel-max trick: argmax(logits / T + g) with g = -log(-log(u)) is distributed
    as softmax(logits / T) over the tokens that top-k and top-p keep. Taking the noise as an
    argument instead of a ``torch.Generator`` keeps the function free of random state: it compiles
    into the decode step's graph (CUDA graphs included), and the same noise gives the same token
    in the eager, compiled and uncached paths."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if uniform is None:
        raise ValueError("sampling with temperature > 0 needs uniform noise")
    # Shift the best logit to 0 before dividing: a tiny temperature (1e-40) then sends the others
    # to -inf and the draw tends to greedy, where logits / T alone overflowed to a row of +inf ties.
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    vocab = logits.size(-1)
    if top_k is not None and top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float32).tiny)))
    return (logits + gumbel).argmax(dim=-1)


# --------------------------------------------------------------------------------- streaming


class TextStream:
    """Turns one sample's token ids into text as they arrive: incremental UTF-8 decoding, stop
    strings, and ``on_text`` calls that never split a character or show part of a stop string.

    ``add(token)`` per sampled id; ``end("length")`` when the budget is spent (``"interrupted"``
    on a Ctrl-C). ``text`` is the completion so far, ``finish_reason`` None until it has ended."""

    def __init__(self, index: int, stops: Sequence[str], ignore_eos: bool, on_text: TextCallback | None):
        self.index = index
        self.stops = [s for s in stops if s]
        self.ignore_eos = ignore_eos
        self.on_text = on_text
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.emitted = 0
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.elapsed_s = 0.0
        self._enc = get_tokenizer()
        self._longest_stop = max((len(s) for s in self.stops), default=0)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> None:
        self.tokens.append(token)
        if token == EOT_ID and not self.ignore_eos:
            self._finish("eos")
            return
        before = len(self.text)
        self.text += self.decoder.decode(self._enc.decode_single_token_bytes(token))
        if self.stops and len(self.text) > before:
            lo = max(0, before - self._longest_stop + 1)
            hits = [i for i in (self.text.find(s, lo) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self._finish("stop")
                return
        self._emit(self._safe_end())

    def end(self, reason: str) -> None:
        """End a sample that no token ended: its text so far is final (held-back text included)."""
        if not self.done:
            self._finish(reason)

    def _finish(self, reason: str) -> None:
        if reason != "stop":
            self.text += self.decoder.decode(b"", final=True)  # an unfinished character -> U+FFFD
        self.finish_reason = reason
        self._emit(len(self.text))

    def _safe_end(self) -> int:
        """Text that cannot become part of a stop string may be shown."""
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), hold, -1):
                if self.text.endswith(stop[:k]):
                    hold = k
                    break
        return len(self.text) - hold

    def _emit(self, end: int) -> None:
        if end > self.emitted:
            if self.on_text is not None:
                self.on_text(self.index, self.text[self.emitted : end])
            self.emitted = end


# --------------------------------------------------------------------------------- generator


# A compiled generator's cache grows in steps of this many positions (Generator._cache_length).
CACHE_GROWTH = 64
# Graphs a compiled decode step may have: one per (batch, cache length, sampling setting); dynamo's
# default of 8 would fail a long interactive session outright (fullgraph=True).
DECODE_RECOMPILE_LIMIT = 64


def _with_recompile_limit(compiled: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Call the compiled decode step under DECODE_RECOMPILE_LIMIT (dynamo reads it per call)."""
    from torch._dynamo import config as dynamo_config

    # torch 2.4-2.5 call the setting cache_size_limit.
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    return _under(dynamo_config, {name: DECODE_RECOMPILE_LIMIT}, compiled)


def _frozen(compiled: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Call a compiled CPU decode step with inductor's freezing on: the weights become constants
    of the graph, which lets inductor pre-pack them for the BLAS (as pack_linears does for eager
    steps): 1.5x at batch 8, +5-10% at batch 1 (docs/benchmarks.md). Dynamo reads the setting
    while it traces, at the first call, so it is scoped to every call rather than passed as a
    compile option."""
    from torch._inductor import config as inductor_config

    return _under(inductor_config, {"freezing": True}, compiled)


def _under(config: Any, settings: dict[str, Any], call: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``call`` with the torch config module ``config`` patched with ``settings`` for each call."""

    def step(*args: object) -> torch.Tensor:
        with config.patch(settings):
            return call(*args)

    return step


def _cast_keeping_rope_fp32(model: GPT, device: torch.device, dtype: torch.dtype) -> GPT:
    """Move and cast the model, with the rotary frequencies kept in fp32 at their exact values:
    in bf16 a learned frequency is off by 0.3%, and its angle by radians at position 1,000. They
    are taken before the cast, which would round them first."""
    inv_freq = model.rope.inv_freq.detach().float().clone() if model.rope is not None else None
    model = model.to(device=device, dtype=dtype)
    if inv_freq is not None and model.rope.inv_freq.dtype != torch.float32:
        model.rope.inv_freq.data = inv_freq.to(device)
    return model


class Generator:
    """A model made ready for sampling: moved to ``device``, cast to ``dtype`` (weights and cache;
    ``auto`` = bf16 on CUDA with bf16 support, else fp32), optionally with a compiled decode step.

    The model is changed in place: device, dtype (rotary frequencies stay fp32), eval mode, and on
    the CPU its weights laid out for decoding and, in fp32, its ``nn.Linear`` layers replaced by
    :class:`~gpt2cli.cpu_decoding.PackedLinear` (same parameters, same ``state_dict``). The model
    stays usable as before: the packed copies are used only without gradients, are made again
    when a weight changes in place (``load_state_dict``, an optimizer step; not writes through
    ``.data``), and are left out when the model is pickled or deep-copied.

    ``quantize="int8"`` first replaces the model's linear layers by int8 weight-only ones
    (:mod:`gpt2cli.quantize`; then nothing is packed, and a compiled CPU step is not frozen).

    ``generate`` takes ``max_new_tokens``, sampling and stop settings from its spec; device,
    dtype, compile and quantize are this object's (a spec's own are for :func:`generate`)."""

    def __init__(
        self,
        model: GPT,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        compile: bool = False,
        quantize: str = "none",
    ) -> None:
        from gpt2cli.parallel.base import resolve_device
        from gpt2cli.train import resolve_dtype

        if quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, not {quantize!r}")
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, self.device)
        self.quantize = quantize
        self.num_params = sum(p.numel() for p in model.parameters())  # before int8 turns weights into buffers
        if quantize == "int8":  # before the cast: scales from the fp32 weights round less
            quantize_int8(model)
        self.model = _cast_keeping_rope_fp32(model, self.device, self.dtype).eval()
        on_cpu = self.device.type == "cpu"
        self._weights_mapping = lay_out_weights_for_decoding(self.model) if on_cpu else None
        # MKL-packed weights for batches of 2+ rows (eager fp32 only: inductor cannot lower the
        # packed op, and packs weights its own way).
        packable = on_cpu and self.dtype == torch.float32 and not compile and mkl_packing_available()
        self._packed_linears = pack_linears(self.model) if packable else []
        self.spec = model.spec
        self.compiled = compile
        # Eager steps attend over the filled cache slots only (on the CPU, 16% of a step went to
        # attention over the empty ones). Not on CUDA: there the attention kernel may be cuDNN's,
        # which builds an execution plan for every new key length; an H200's first eager call
        # decoded at 19 tokens/s against 246 once every length had been seen. The whole-cache
        # shape is the same at every step, as the compiled graph needs anyway.
        self._attend_filled_slots_only = not compile and self.device.type != "cuda"
        self._caches: list = []
        self._cache_key: tuple[int, int] | None = None
        self._decode: Callable[..., torch.Tensor] = self._decode_step
        self._compiled_for: set[tuple] = set()  # (batch, cache length, sampling) already compiled
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs
            self._decode = torch.compile(self._decode_step, mode=mode, fullgraph=True, dynamic=False)
            # Not with int8 weights: freezing would fold their conversion to float into float
            # constants, and the step would read four times the bytes again.
            if on_cpu and quantize == "none":
                self._decode = _frozen(self._decode)
        # A call that compiles (a new batch, cache length or sampling setting) runs under the
        # raised recompile limit; the others skip the config patch (tens of microseconds of host
        # time per token, which CUDA-graph decoding exists to avoid).
        self._decode_compiling = _with_recompile_limit(self._decode) if compile else self._decode

    @classmethod
    def from_source(cls, source: str, *, device: str = "auto", dtype: str = "auto",
                    compile: bool = False, quantize: str = "none") -> tuple[Generator, str]:
        """Load CKPT (see :func:`gpt2cli.loading.load_model`); returns the generator and the
        description of the source."""
        from gpt2cli.loading import load_model, refuse_nonfinite_weights
        from gpt2cli.parallel.base import resolve_device

        loaded = load_model(source, device=resolve_device(device))
        refuse_nonfinite_weights(loaded.model, loaded.source)
        generator = cls(loaded.model, device=device, dtype=dtype, compile=compile, quantize=quantize)
        return generator, loaded.source

    # ------------------------------------------------------------------------------ pieces

    def _cache_length(self, batch: int, needed: int) -> int:
        """The cache length for a call that needs ``needed`` positions. Exact for eager CUDA steps
        (they attend over the whole cache). Compiled steps and eager CPU steps (which attend over
        the filled slots only) keep using the cache they have when it is long enough. A compiled
        step is a graph per cache: new buffers (even of a length seen before) would compile it
        again, as would every new prompt length of an interactive session. So a compiled
        generator's cache only grows, in steps of CACHE_GROWTH positions: at most
        block_size / CACHE_GROWTH compilations per batch size and sampling setting."""
        if not (self.compiled or self._attend_filled_slots_only):
            return needed
        if self._cache_key is not None and self._cache_key[0] == batch and self._cache_key[1] >= needed:
            return self._cache_key[1]
        if not self.compiled:
            return needed
        rounded = -(-needed // CACHE_GROWTH) * CACHE_GROWTH
        return min(self.spec.block_size, rounded)

    def _attach_cache(self, batch: int, length: int) -> None:
        """Give every layer its preallocated cache; a call with the same batch and length reuses
        the previous buffers (same addresses: no recompilation, no re-recorded CUDA graph).
        Stale entries need no clearing: slots beyond the current position are masked, and the
        prefill rewrites every slot before it."""
        blocks = self.model.transformer.h
        if self._cache_key != (batch, length):
            self._caches = []
            self.model.setup_kv_cache(batch, length, dtype=self.dtype, device=self.device)
            self._caches = [block.attn.kv_cache for block in blocks]
            self._cache_key = (batch, length)
            pack_for_decoding(self._packed_linears, rows=batch)  # a decode step feeds `batch` rows
        else:
            for block, cache in zip(blocks, self._caches, strict=True):
                block.attn.kv_cache = cache

    def _decode_step(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor,
        uniform: torch.Tensor | None,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """The compiled unit: one token per sequence through the cache, and the next token drawn,
        so that a step is one graph (one CUDA graph replay) with no host work between the two.
        Eager CPU steps pass ``kv_len`` (attend over the filled slots only); compiled and CUDA
        steps keep the static shape of the whole cache."""
        logits = self.model(idx, input_pos, kv_len=kv_len)[:, -1, :VOCAB_SIZE].float()
        return sample_next(logits, temperature, top_k, top_p, uniform)

    def _full(self, idx: torch.Tensor) -> torch.Tensor:
        """Last-position logits of a window run from position 0 (prefill, or no-cache mode)."""
        T = idx.shape[1]
        if not self.model.has_kv_cache:
            return self.model(idx, last_only=True)[:, -1, :VOCAB_SIZE].float()
        positions = torch.arange(T, device=self.device)
        return self.model(idx, positions, kv_len=T, last_only=True)[:, -1, :VOCAB_SIZE].float()

    @staticmethod
    def _hand_over(buf: torch.Tensor, prompt_len: int, seen: int, end: int, states: list[TextStream],
                   t0: float) -> bool:
        """Give the streams the tokens ``buf[:, seen:end]`` sampled since the last hand-over (one
        host sync); True once every sample has ended. Tokens after a sample's end are dropped. A
        stream that took some of them already (a hand-over cut short by Ctrl-C, given again)
        gets only the rest: it has taken ``len(state.tokens)`` after the prompt."""
        rows = buf[:, seen:end].tolist()
        now = time.perf_counter()
        for state, row in zip(states, rows, strict=True):
            if state.done:
                continue
            for token in row[prompt_len + len(state.tokens) - seen:]:
                state.add(token)
                if state.done:
                    state.elapsed_s = now - t0
                    break
        return all(s.done for s in states)

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt (text, or ids as they are); the empty prompt is <|endoftext|>,
        GPT-2's start of a document. Refuses what the model cannot take."""
        ids = encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            ids = [EOT_ID]
        block, vocab = self.spec.block_size, self.spec.vocab_size
        if len(ids) > block:
            raise UserError(
                f"the prompt has {len(ids):,} tokens, more than the model's context of {block:,}: "
                "no room left to generate",
                f"shorten the prompt to at most {block:,} tokens",
            )
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise UserError(
                f"the prompt holds token id {bad[0]}, outside this model's vocabulary of {vocab:,}",
                "the model was trained on a smaller vocabulary than GPT-2's tokenizer",
            )
        return ids

    def bytes_per_sample(self, prompt_len: int, spec: GenerateSpec, cache_len: int) -> int:
        """An upper estimate of the memory one sample of a call adds (beyond the weights):

        - its key/value cache (``cache_len`` slots, 0 without a cache);
        - the prefill's activations over a window of up to ``block_size`` tokens (residual,
          query/key/value, attention output and the 4x-wide MLP, a few of each alive at once);
        - the last position's logits in fp32 and what sampling makes of them: greedy only an
          argmax; top-k a tempered copy, the mask and the noise; top-p also sorted values and
          their order, probabilities and cumulative sums (measured peaks, CPU, 4,000 samples:
          1.2 MB per sample with top-k, 2.2 MB with top-p, for a vocabulary of 50,257);
        - the token buffer."""
        total_len = prompt_len + spec.max_new_tokens
        cache = kv_cache_bytes_per_token(self.spec, self.dtype.itemsize) * cache_len
        activations = 16 * min(self.spec.block_size, total_len) * self.spec.n_embd * self.dtype.itemsize
        if spec.temperature == 0:
            copies = 3
        elif spec.top_p is not None and spec.top_p < 1.0:
            copies = 12
        else:
            copies = 7
        return cache + activations + copies * 4 * self.spec.vocab_size + 8 * total_len

    def check_call(self, prompt: str | Sequence[int], spec: GenerateSpec, *, use_cache: bool = True) -> list[int]:
        """The prompt's token ids, once it is known that a call with ``spec`` can run: the prompt
        fits the context (:meth:`encode_prompt`), and the batch fits in the memory left. Raises
        UserError otherwise, before anything is allocated: an out-of-memory kill (CPU) or error
        (CUDA) midway would lose the whole call, and on a shared machine may take other processes
        with it."""
        ids = self.encode_prompt(prompt)
        batch, cache_len = spec.num_samples, min(self.spec.block_size, len(ids) + spec.max_new_tokens)
        if not use_cache:
            cache_len = 0
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            available = free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu":
            available = available_memory_bytes()
        else:
            available = None  # no portable way to ask (mps): the allocator's own error stands
        if available is None:
            return ids
        if use_cache:
            cache_len = self._cache_length(batch, cache_len)
        reused = self._cache_key == (batch, cache_len)  # the last call's cache is reused: nothing new
        per_sample = self.bytes_per_sample(len(ids), spec, 0 if reused else cache_len)
        if batch * per_sample <= available:
            return ids
        fit = available // per_sample
        gib = 1024**3
        if fit >= 1:
            hint = f"use --num-samples {fit:,} or fewer"
        elif spec.max_new_tokens > self.spec.block_size:
            # Beyond the context the cache stops growing; what grows is the output itself.
            hint = "ask for fewer tokens with --max-new-tokens (-n), or free some memory"
        else:
            hint = "free some memory, or use a smaller model"
        samples = "1 sample of {:,} tokens needs" if batch == 1 else f"{batch:,} samples of {{:,}} tokens need"
        raise UserError(
            f"{samples.format(len(ids) + spec.max_new_tokens)} about "
            f"{batch * per_sample / gib:,.1f} GiB, more than the {available / gib:,.1f} GiB of "
            f"{self.device.type} memory available",
            hint,
        )

    # ------------------------------------------------------------------------------ generate

    @torch.inference_mode()
    def generate(
        self,
        prompt: str | Sequence[int],
        spec: GenerateSpec | None = None,
        on_text: TextCallback | None = None,
        *,
        use_cache: bool = True,
        on_progress: Callable[[int], None] | None = None,
    ) -> Generation:
        """Sample ``spec.num_samples`` completions of ``prompt`` as one batch.

        ``use_cache=False`` recomputes the whole window at every step (the reference the cached
        path is tested against; same window rule, same results). ``on_progress(n)`` is told the
        tokens sampled per sample so far at every hand-over (no extra device sync).

        A Ctrl-C (KeyboardInterrupt) during decoding returns what was sampled so far, each sample
        unfinished by then with ``finish_reason == "interrupted"`` (``Generation.interrupted``);
        during the prefill it propagates, as nothing was sampled yet."""
        spec = spec or GenerateSpec()
        ids = self.check_call(prompt, spec, use_cache=use_cache)
        # Reading a token back waits for the device, which then idles while Python prepares the
        # next step: on an accelerator, queue several steps per read. On the CPU every op runs in
        # the host thread anyway, so read each token at once.
        sync_every = spec.sync_every or (1 if self.device.type == "cpu" else 16)
        B, P, new = spec.num_samples, len(ids), spec.max_new_tokens
        block = self.spec.block_size
        shift = max(1, block // 4)
        cache_len = self._cache_length(B, min(block, P + new))
        device = self.device

        buf = torch.zeros(B, P + new, dtype=torch.long, device=device)
        buf[:, :P] = torch.tensor(ids, dtype=torch.long, device=device)
        rng = torch.Generator(device=device).manual_seed(spec.seed)
        sampling = (spec.temperature, spec.top_k, spec.top_p)
        noise_shape = (B, min(self.spec.vocab_size, VOCAB_SIZE))

        def noise() -> torch.Tensor | None:
            """Uniform noise for one token of every sample: one draw per token, whichever path
            (cached, compiled, uncached, window slide) samples it, so all paths agree."""
            if spec.temperature == 0:
                return None
            return torch.rand(noise_shape, generator=rng, device=device)

        states = [TextStream(i, spec.stop, spec.ignore_eos, on_text) for i in range(B)]
        per_token = kv_cache_bytes_per_token(self.spec, self.dtype.itemsize)
        pos_buf = torch.zeros(1, dtype=torch.long, device=device)

        # The clock starts before the cache is set up: a call that allocates it (and, on the CPU,
        # packs the weights for its batch) pays for that, and its times and rates say so.
        t0 = time.perf_counter()
        if use_cache:
            self._attach_cache(B, cache_len)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        slides = steps = 0
        compile_s = 0.0
        compile_key = (B, cache_len, *sampling)
        start = 0  # first position of the window in buf
        try:
            logits = self._full(buf[:, :P])
            sync()
            t_prefill = time.perf_counter()
            next_ids = sample_next(logits, *sampling, noise())
            buf[:, P] = next_ids
            end = P + 1  # tokens in buf
            seen = P  # tokens in buf already handed to the streams
            interrupted = False
            try:
                while True:
                    if end == P + new or end - seen >= sync_every:
                        finished = self._hand_over(buf, P, seen, end, states, t0)
                        seen = end
                        if on_progress is not None:
                            on_progress(end - P)
                        if finished or end == P + new:
                            break
                    steps += 1
                    slid = end - start > block  # the window is full: slide it
                    if slid:
                        start += shift
                        slides += 1
                    if not use_cache or slid:
                        logits = self._full(buf[:, start:end])  # re-prefill the cache from position 0
                        next_ids = sample_next(logits, *sampling, noise())
                    else:
                        pos_buf.fill_(end - 1 - start)
                        # clone: a CUDA graph's output is overwritten by its next replay
                        kv_len = end - start if self._attend_filled_slots_only else None
                        compiles = self.compiled and compile_key not in self._compiled_for
                        if compiles:
                            sync()
                            t_compile = time.perf_counter()
                        decode = self._decode_compiling if compiles else self._decode
                        next_ids = decode(next_ids[:, None], pos_buf, noise(), *sampling, kv_len).clone()
                        if compiles:
                            sync()
                            compile_s = time.perf_counter() - t_compile
                            t0 += compile_s  # every time and rate leaves the compilation out
                            t_prefill += compile_s
                            self._compiled_for.add(compile_key)
                    buf[:, end] = next_ids
                    end += 1
            except KeyboardInterrupt:
                # Ctrl-C keeps what was sampled: the streams get the tokens up to `end` (again if
                # the interrupt cut a hand-over short), then the unfinished end as "interrupted".
                interrupted = True
                self._hand_over(buf, P, seen, end, states, t0)
            sync()
            t_end = time.perf_counter()
        finally:
            if use_cache:
                self.model.clear_kv_cache()
        for state in states:
            if not state.done:
                state.end("interrupted" if interrupted else "length")
                state.elapsed_s = t_end - t0
        samples = [Sample(s.index, s.text, s.tokens, s.finish_reason or "length", s.elapsed_s) for s in states]
        return Generation(
            prompt=prompt if isinstance(prompt, str) else get_tokenizer().decode(ids),
            prompt_tokens=ids,
            samples=samples,
            prefill_s=t_prefill - t0,
            decode_s=t_end - t_prefill,
            decode_steps=steps,
            window_slides=slides,
            cache_bytes_per_token=per_token,
            cache_bytes=per_token * B * cache_len if use_cache else 0,
            device=str(device),
            dtype=str(self.dtype).removeprefix("torch."),
            compiled=self.compiled,
            compile_s=compile_s,
            quantize=self.quantize,
        )


def generate(
    source: str,
    prompt: str | Sequence[int],
    spec: GenerateSpec | None = None,
    on_text: TextCallback | None = None,
) -> Generation:
    """Load ``source`` (any CKPT form) and sample from it with ``spec`` (device, dtype, compile and
    quantize come from the spec)."""
    spec = spec or GenerateSpec()
    gen, _ = Generator.from_source(source, device=spec.device, dtype=spec.dtype, compile=spec.compile,
                                   quantize=spec.quantize)
    return gen.generate(prompt, spec, on_text)

