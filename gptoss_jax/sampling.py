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
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.cache import KVCache, init_cache
from gptoss_jax.distributed import to_host
from gptoss_jax import harmony
from gptoss_jax.harmony import STOP_TOKENS_ASSISTANT as ASSISTANT_STOP_TOKENS  # <|return|>, <|call|>


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


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
    @jax.jit
    def prefill(state, cache: KVCache, tokens, n_valid, last_logits):
        """One chunk [B, C] of right-padded prompts; n_valid [B] real tokens in this chunk."""
        model = nnx.merge(graphdef, state)
        C = tokens.shape[1]
        seg = (jnp.arange(C)[None, :] < n_valid[:, None]).astype(jnp.int32)
        idx = jnp.clip(n_valid - 1, 0, C - 1)
        out = model(tokens, segment_ids=seg, cache=cache, logits_at=idx)
        logits = jnp.where((n_valid > 0)[:, None], out.logits[:, 0], last_logits)
        return out.cache, logits
    return prefill


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
                lp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1),
                                         tok[:, None], axis=-1)[:, 0]
                out_logprobs = out_logprobs.at[:, i].set(lp)
            produced = produced + active
            done = done | (active & jnp.isin(tok, stop)) | (produced >= limit)
            # The weights are tied to the step counter, so XLA cannot hoist loop-invariant work on
            # them out of the loop: on CPU it would convert every bf16 matrix (and decode every
            # packed expert) to an fp32 copy at the start of each block, held through the block.
            weights = jax.lax.optimization_barrier((state, i))[0] if TIE_WEIGHTS else state
            step_model = nnx.merge(graphdef, weights)
            # every row steps (fixed shapes); finished rows feed padding that is never cached
            step = step_model(jnp.where(active, tok, 0)[:, None],
                              segment_ids=active[:, None].astype(jnp.int32), cache=cache)
            return i + 1, step.cache, step.logits[:, 0], done, produced, out_tokens, out_logprobs, key

        carry = (jnp.int32(0), cache, logits, done, produced, out_tokens, out_logprobs, key)
        _, cache, logits, done, produced, out_tokens, out_logprobs, key = jax.lax.while_loop(cond, body, carry)
        return cache, logits, key, done, produced, out_tokens, out_logprobs
    return decode


def generate(model, tokenizer=None, prompts: Sequence = (), *, max_new_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             stop_tokens: Sequence[int] | None = None, stream: Callable[[int, list[int]], None] | None = None,
             prefill_chunk: int = 256, block: int | None = None, cache_dtype=None,
             logprobs: bool = False) -> Generation:
    """Generate continuations for a batch of prompts.

    prompts: token-id lists, or strings (encoded with `tokenizer`, no special-token parsing).
    stop_tokens: default `<|return|>`, `<|call|>` (the tokenizer's ids; o200k_harmony's without
        a tokenizer); pass () to run to max_new_tokens.
    stream(row, new_token_ids): called as tokens arrive (per decode block).
    logprobs: also return each generated token's log-probability under the model (`Generation.logprobs`).
    """
    cfg = model.cfg
    if not len(prompts):
        raise ValueError("no prompts given")
    ids = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("string prompts need a tokenizer")
            p = tokenizer.encode(p)
        p = [int(t) for t in p]
        if not p:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
        ids.append(p)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in ids)
    total = longest + max_new_tokens
    if total > cfg.max_position:
        raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the context "
                         f"of {cfg.max_position} tokens")
    params = SamplingParams(temperature, top_p, top_k)
    if stop_tokens is None:  # the tokenizer's own ids (a small trained BPE numbers them its way)
        stop_tokens = harmony.stop_tokens(tokenizer) if tokenizer is not None else ASSISTANT_STOP_TOKENS
    stop_ids = tuple(int(t) for t in stop_tokens)
    block = block or (1 if stream is not None else 16)
    B = len(ids)
    C = min(prefill_chunk, longest)
    n_chunks = -(-longest // C)
    cache = init_cache(cfg, B, total, cache_dtype or model.dtype)

    graphdef, state = nnx.split(model)
    prefill = _prefill_fn(graphdef)
    padded = np.zeros((B, n_chunks * C), np.int32)
    for b, p in enumerate(ids):
        padded[b, :len(p)] = p
    lengths = np.array([len(p) for p in ids])
    logits = jnp.zeros((B, cfg.vocab_size), jnp.float32)
    for c in range(n_chunks):
        n_valid = np.clip(lengths - c * C, 0, C).astype(np.int32)
        cache, logits = prefill(state, cache, jnp.asarray(padded[:, c * C:(c + 1) * C]),
                                jnp.asarray(n_valid), logits)

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
