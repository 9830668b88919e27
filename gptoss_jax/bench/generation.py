"""Timing `gj.generate` as the package runs it: one call's wall time, when each token reached the
host, and the chosen tokens' log-probabilities (finite logprobs mean finite logits); and the
prefill alone (`sampling.prefill`: the same jitted function and chunking generate uses, so nothing
compiles again). With one decode step per block (`block=1`) every token reaches the host as it is
made, and the decode rate is (new - 1) / (arrival of the last token - arrival of the first): the
prefill, which makes the first token, is excluded without subtracting a separately timed one.
"""

from __future__ import annotations

import time

import jax
import numpy as np

import gptoss_jax as gj
from gptoss_jax import sampling
from gptoss_jax.bench import timing
from gptoss_jax.cache import init_cache


def run_generate(model, prompt, n_new: int, block: int | None) -> dict:
    """One greedy `gj.generate` call (decode in blocks of `block` steps inside one jitted
    while-loop; None = generate's default, 16), with logprobs."""
    arrivals = []
    t0 = time.perf_counter()
    gen = gj.generate(
        model,
        None,
        [prompt],
        max_new_tokens=n_new,
        temperature=0,
        stop_tokens=(),
        block=block,
        logprobs=True,
        stream=lambda row, ids: arrivals.extend([time.perf_counter() - t0] * len(ids)),
    )
    wall = time.perf_counter() - t0
    lp = np.asarray(gen.logprobs[0], np.float64)
    return {
        "wall_s": wall,
        "arrival_s": arrivals,
        "tokens": gen.tokens[0],
        "stop_reason": gen.stop_reason[0],
        "logprobs_finite": bool(np.all(np.isfinite(lp))),
        "logprob_min": float(lp.min()),
        "logprob_max": float(lp.max()),
    }


def time_prefill(model, prompt, n_new: int, repeats: int = 2, prefill_chunk: int | None = None) -> list[float]:
    """Seconds of `repeats` prefills of `prompt` into a fresh cache sized for `n_new` more tokens,
    each from the cache's allocation (untimed) to the logits being ready; no warm-up (generate
    compiled the function)."""
    caches = []

    def run():
        return sampling.prefill(model, [prompt], caches.pop(), prefill_chunk=prefill_chunk)[1]

    times = []
    for _ in range(repeats):
        caches.append(jax.block_until_ready(init_cache(model.cfg, 1, len(prompt) + n_new, model.dtype)))
        times += timing.seconds(run, 1, warmup=0)
    return times
