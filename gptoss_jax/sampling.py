"""Sampling and batched generation with the KV cache.

- Prefill runs the prompts in fixed-size chunks (one compilation for any prompt length); rows
  shorter than the longest prompt are right-padded and their padding is never cached.
- Decoding is a `lax.while_loop` inside one jitted function that runs up to `block` steps and
  stops early once every row has stopped. The host only wakes between blocks: to stream tokens to
  a callback and to check whether all rows are done. Shapes never change, so nothing retraces.
- Sampling: greedy at temperature 0, else temperature -> top-k -> top-p (nucleus) on fp32 logits.
- Stop tokens default to the harmony assistant stops `<|return|>` and `<|call|>`; `<|end|>` is not
  one (the model ends its analysis message with it and goes on to the final one).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import operator
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax import harmony
from gptoss_jax.cache import KVCache, init_cache
from gptoss_jax.distributed import to_host
from gptoss_jax.harmony import STOP_TOKENS_ASSISTANT as ASSISTANT_STOP_TOKENS  # <|return|>, <|call|>
from gptoss_jax.model import traced_token_check


def _real(value) -> float | None:
    """`value` as a finite float, or None when it is not a finite real number."""
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _integer(value) -> int | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def check_sampling_options(
    *,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    max_new_tokens=None,
    seed=None,
    vocab_size: int | None = None,
    names: Mapping[str, str] | None = None,
) -> None:
    """Raise ValueError for a sampling setting that cannot mean what it says: a temperature that is
    not a finite number >= 0 (nan would sample token 0 forever), top_p outside (0, 1], top_k not an
    integer in [0, vocab_size], max_new_tokens below 1, a seed outside [0, 2**63). Options left
    None are not checked; `names` spells them in the messages (the CLI passes its flags)."""

    def name(key):
        return (names or {}).get(key, key)

    t = _real(temperature)
    if t is None or t < 0:
        raise ValueError(f"{name('temperature')} must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    p = _real(top_p)
    if p is None or not 0 < p <= 1:
        raise ValueError(f"{name('top_p')} must be a number in (0, 1] (1 = no nucleus cut), got {top_p!r}")
    k = _integer(top_k)
    limit = f"the vocabulary size {vocab_size}" if vocab_size is not None else "the vocabulary size"
    if k is None or k < 0 or (vocab_size is not None and k > vocab_size):
        raise ValueError(f"{name('top_k')} must be an integer from 0 (no top-k cut) to {limit}, got {top_k!r}")
    if max_new_tokens is not None:
        n = _integer(max_new_tokens)
        if n is None or n < 1:
            raise ValueError(f"{name('max_new_tokens')} must be an integer >= 1, got {max_new_tokens!r}")
    if seed is not None:
        s = _integer(seed)
        if s is None or not 0 <= s < 2**63:
            raise ValueError(f"{name('seed')} must be an integer in [0, 2**63), got {seed!r}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut

    def __post_init__(self):
        check_sampling_options(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "top_k", int(self.top_k))


def sample(logits, key, params: SamplingParams):
    """logits [B, V] -> token ids [B] (int32)."""
    logits = logits.astype(jnp.float32)
    if params.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / params.temperature
    if params.top_k:
        kth = jax.lax.top_k(logits, params.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if params.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # drop a token when the mass before it already reaches top_p (the first always survives)
        drop_sorted = (jnp.cumsum(probs, axis=-1) - probs) >= params.top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt, the stop token included when one was hit
    stop_reason: list[str]  # "stop" (a stop token) or "length"
    prompt_lengths: list[int]
    # with logprobs=True: log p(token) under the model's own distribution (temperature 1, no
    # top-k/top-p cut), fp32, one per generated token: what a training forward recomputes
    logprobs: list[list[float]] | None = None


# Tie the weights to the decode loop's step counter (see decode). False lets XLA hoist work on them
# out of the loop: on the bench config (bf16, block 16) that was 2.4x slower for dense experts at
# batch 1 and 1.6x for packed ones, 1.4x faster for packed experts at batch 8 (their decode is then
# cached as fp32 copies), and at gpt-oss-20b size GiBs of fp32 copies and seconds per block.
TIE_WEIGHTS = True


# Cached on (graphdef, ...) so that every generate() call with the same model structure and
# sampling settings reuses one compilation.
@functools.lru_cache(maxsize=16)
def _prefill_fn(graphdef):
    @functools.partial(jax.jit, static_argnames="empty")
    def prefill(state, cache: KVCache, tokens, n_valid, last_logits, *, empty: bool):
        """One chunk [B, C] of right-padded prompts; n_valid [B] real tokens in this chunk.
        empty: the cache holds nothing yet (the first chunk of a new cache)."""
        model = nnx.merge(graphdef, state)
        C = tokens.shape[1]
        seg = (jnp.arange(C)[None, :] < n_valid[:, None]).astype(jnp.int32)
        idx = jnp.clip(n_valid - 1, 0, C - 1)
        with traced_token_check(False):  # generate() checked the prompt ids on the host
            out = model(tokens, segment_ids=seg, cache=cache, logits_at=idx, empty_cache=empty)
        logits = jnp.where((n_valid > 0)[:, None], out.logits[:, 0], last_logits)
        return out.cache, logits

    return prefill


# generate's default chunking (prefill_chunk=None): a new cache's first chunk attends among its
# own tokens on the model's attention path (a kernel, or XLA's query-chunked attention), so it
# takes up to FIRST_CHUNK tokens at once over the batch's rows (but PREFILL_CHUNK a row at least:
# a chunk never holds more tokens than the larger of FIRST_CHUNK and the chunking before, so its
# activations stay within that); later chunks read the whole cache through XLA's dense attention
# (scores [B, heads, chunk, cache]) and take PREFILL_CHUNK. On the benchmark model a
# 1,024-token prompt in one fresh chunk ran 1.43x (fp32) / 1.42x (bf16) the rate of chunks of 256
# through the cache (the default before), a 2,048-token one 1.43x / 1.80x
# (experiments/2026-12-06-fresh-prefill/prefill.json). The first chunk is halved while the MoE
# would take another path than at PREFILL_CHUNK: gpt-oss-20b's packed experts leave the native
# gathered path beyond 512 tokens on CPU, and a 1,024-token chunk then ran 0.37x the rate of
# chunks of 256 (experiments/2026-12-06-fresh-prefill/prefill_20b_T1024_unhalved.json).
FIRST_CHUNK = 2048
PREFILL_CHUNK = 256


def first_chunk(model, rows: int) -> int:
    """Tokens a row of a new cache's first prefill chunk takes by default: FIRST_CHUNK // rows
    (PREFILL_CHUNK at least), halved while the model's MoE would run on another path than at
    PREFILL_CHUNK tokens a row."""
    size = max(FIRST_CHUNK // rows, PREFILL_CHUNK)
    path = model.plan(rows * PREFILL_CHUNK).moe
    while size > PREFILL_CHUNK and model.plan(rows * size).moe != path:
        size = max(size // 2, PREFILL_CHUNK)
    return size


def _chunks(longest: int, prefill_chunk: int | None, first: int) -> list[tuple[int, int]]:
    """(start, size) of each prefill chunk of prompts of up to `longest` tokens: every chunk
    `prefill_chunk` tokens (the last one padded), or by default a first chunk of up to `first`
    tokens, then PREFILL_CHUNK; no chunk longer than the longest prompt."""
    rest = prefill_chunk or PREFILL_CHUNK
    out = [(0, min(prefill_chunk or first, longest))]
    while (end := out[-1][0] + out[-1][1]) < longest:
        out.append((end, rest))
    return out


def _prefill_chunks(
    graphdef,
    state,
    vocab_size: int,
    ids: Sequence[Sequence[int]],
    cache: KVCache,
    prefill_chunk: int | None,
    *,
    fresh: bool,
    first: int = PREFILL_CHUNK,
):
    """The prompts `ids` through `cache` in chunks (`_chunks`; `first`: the default first chunk's
    tokens). fresh: `cache` holds nothing yet, so the first chunk attends on the model's attention
    path without reading it (the kernels where they run; a prompt of several chunks compiles its
    first chunk apart)."""
    B, longest = len(ids), max(len(p) for p in ids)
    chunks = _chunks(longest, prefill_chunk, first)
    prefill_step = _prefill_fn(graphdef)
    padded = np.zeros((B, chunks[-1][0] + chunks[-1][1]), np.int32)
    for b, p in enumerate(ids):
        padded[b, : len(p)] = p
    lengths = np.array([len(p) for p in ids])
    logits = jnp.zeros((B, vocab_size), jnp.float32)
    for c, (start, size) in enumerate(chunks):
        n_valid = np.clip(lengths - start, 0, size).astype(np.int32)
        cache, logits = prefill_step(
            state,
            cache,
            jnp.asarray(padded[:, start : start + size]),
            jnp.asarray(n_valid),
            logits,
            empty=fresh and c == 0,
        )
    return cache, logits


def prefill(model, prompts: Sequence[Sequence[int]], cache: KVCache, *, prefill_chunk: int | None = None):
    """`generate`'s prefill alone, with the same jitted function, chunking and padding: the token-id
    lists `prompts` (unchecked) written into `cache` (from `init_cache`, one row per prompt; one
    that already holds tokens is continued, its first chunk read through the cache).
    -> (cache, fp32 logits [B, V] at each prompt's last token)."""
    graphdef, state = nnx.split(model)
    lengths = cache.lengths
    fresh = lengths.is_fully_addressable and not np.asarray(lengths).any()
    ids = [list(p) for p in prompts]
    first = first_chunk(model, len(ids)) if fresh else PREFILL_CHUNK
    return _prefill_chunks(graphdef, state, model.cfg.vocab_size, ids, cache, prefill_chunk, fresh=fresh, first=first)


@functools.lru_cache(maxsize=16)
def _decode_fn(graphdef, params: SamplingParams, stop_ids: tuple[int, ...], block: int, logprobs: bool):
    stop = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)

    @jax.jit
    def decode(state, cache: KVCache, logits, key, done, produced, limit):
        """Up to `block` steps. produced [B] tokens generated so far; limit [B] per-row budget."""
        B = logits.shape[0]
        out_tokens = jnp.full((B, block), -1, jnp.int32)
        out_logprobs = jnp.zeros((B, block if logprobs else 0), jnp.float32)

        def cond(carry):
            i, _, _, done, *_ = carry
            return (i < block) & ~jnp.all(done)

        def body(carry):
            i, cache, logits, done, produced, out_tokens, out_logprobs, key = carry
            key, sub = jax.random.split(key)
            tok = sample(logits, sub, params)
            active = ~done
            out_tokens = out_tokens.at[:, i].set(jnp.where(active, tok, -1))
            if logprobs:
                lp = jnp.take_along_axis(
                    jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), tok[:, None], axis=-1
                )[:, 0]
                out_logprobs = out_logprobs.at[:, i].set(lp)
            produced = produced + active
            done = done | (active & jnp.isin(tok, stop)) | (produced >= limit)
            # The weights are tied to the step counter, so XLA cannot hoist loop-invariant work on
            # them out of the loop: on CPU it would convert every bf16 matrix (and decode every
            # packed expert) to an fp32 copy at the start of each block, held through the block.
            weights = jax.lax.optimization_barrier((state, i))[0] if TIE_WEIGHTS else state
            step_model = nnx.merge(graphdef, weights)
            # every row steps (fixed shapes); finished rows feed padding that is never cached.
            # The sampled ids lie in [0, vocab_size) by construction: no in-program id check.
            with traced_token_check(False):
                step = step_model(
                    jnp.where(active, tok, 0)[:, None], segment_ids=active[:, None].astype(jnp.int32), cache=cache
                )
            return i + 1, step.cache, step.logits[:, 0], done, produced, out_tokens, out_logprobs, key

        carry = (jnp.int32(0), cache, logits, done, produced, out_tokens, out_logprobs, key)
        _, cache, logits, done, produced, out_tokens, out_logprobs, key = jax.lax.while_loop(cond, body, carry)
        return cache, logits, key, done, produced, out_tokens, out_logprobs

    return decode


def generate(
    model,
    tokenizer=None,
    prompts: Sequence = (),
    *,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    stop_tokens: Sequence[int] | None = None,
    stream: Callable[[int, list[int]], None] | None = None,
    prefill_chunk: int | None = None,
    block: int | None = None,
    cache_dtype=None,
    logprobs: bool = False,
) -> Generation:
    """Generate continuations for a batch of prompts.

    prompts: token-id lists, or strings (encoded with `tokenizer`, no special-token parsing).
    stop_tokens: default `<|return|>`, `<|call|>` (the tokenizer's ids; o200k_harmony's without
        a tokenizer); pass () to run to max_new_tokens.
    stream(row, new_token_ids): called as tokens arrive (per decode block).
    logprobs: also return each generated token's log-probability under the model (`Generation.logprobs`).
    prefill_chunk: the prompts go through the cache this many tokens at a time; default: the first
        FIRST_CHUNK tokens of the batch at once (FIRST_CHUNK // rows of each row, PREFILL_CHUNK at
        least, fewer where the MoE would change path: `first_chunk`; they attend among
        themselves, on the attention kernels where they run), the rest PREFILL_CHUNK at a time
        (each such chunk reads the whole cache).

    Every argument is checked on the host before anything runs (ValueError): prompt ids must be
    integers in [0, vocab_size), as must explicit stop tokens (one outside the vocabulary could
    never be sampled); the sampling options as `check_sampling_options` says, top_k at most the
    vocabulary size; prompt + max_new_tokens within the model's context. The jitted prefill and
    decode therefore leave out the in-program id check of traced forwards (see
    `gptoss_jax.model.traced_token_check`).
    """
    cfg = model.cfg
    if not len(prompts):
        raise ValueError("no prompts given")
    ids = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("string prompts need a tokenizer")
            p = tokenizer.encode(p, disallowed_special=())
        try:
            p = [operator.index(t) for t in p]
        except TypeError:
            raise ValueError(
                f"prompt {i} must be a string or a sequence of integer token ids, got {type(p).__name__} {str(p)[:60]}"
            ) from None
        if not p:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
        ids.append(p)
    check_sampling_options(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        seed=seed,
        vocab_size=cfg.vocab_size,
    )
    for what, value in (("prefill_chunk", prefill_chunk), ("block", block)):
        if value is not None and (_integer(value) is None or value < 1):
            raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    longest = max(len(p) for p in ids)
    total = longest + max_new_tokens
    if total > cfg.max_position:
        raise ValueError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the context of {cfg.max_position} tokens"
        )
    params = SamplingParams(temperature, top_p, top_k)
    if stop_tokens is None:  # the tokenizer's own ids (a small trained BPE numbers them its way)
        stop_tokens = harmony.stop_tokens(tokenizer) if tokenizer is not None else ASSISTANT_STOP_TOKENS
    else:
        bad = [t for t in stop_tokens if _integer(t) is None or not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(
                f"stop_tokens outside the vocabulary [0, {cfg.vocab_size}) can never be sampled: {bad[:5]}"
            )
    stop_ids = tuple(int(t) for t in stop_tokens)
    block = block or (1 if stream is not None else 16)
    B = len(ids)
    cache = init_cache(cfg, B, total, cache_dtype or model.dtype)

    graphdef, state = nnx.split(model)
    cache, logits = _prefill_chunks(
        graphdef, state, cfg.vocab_size, ids, cache, prefill_chunk, fresh=True, first=first_chunk(model, B)
    )

    decode = _decode_fn(graphdef, params, stop_ids, block, logprobs)
    key = jax.random.key(seed)
    done = jnp.zeros((B,), bool)
    produced = jnp.zeros((B,), jnp.int32)
    limit = jnp.full((B,), max_new_tokens, jnp.int32)
    out: list[list[int]] = [[] for _ in range(B)]
    out_lp: list[list[float]] = [[] for _ in range(B)]
    while True:
        cache, logits, key, done, produced, toks, lps = decode(state, cache, logits, key, done, produced, limit)
        toks = to_host(toks)  # on several processes the rows may live on other hosts
        lps = to_host(lps) if logprobs else None
        for b in range(B):
            keep = toks[b] >= 0
            new = [int(t) for t in toks[b][keep]]
            if new:
                out[b].extend(new)
                if logprobs:
                    out_lp[b].extend(float(x) for x in lps[b][keep])
                if stream is not None:
                    stream(b, new)
        if bool(np.all(to_host(done))):
            break
    reasons = ["stop" if r and r[-1] in stop_ids else "length" for r in out]
    return Generation(out, reasons, [len(p) for p in ids], out_lp if logprobs else None)
