"""A decode step of the bench config (4 layers, fp32, dense experts, batch 1, a 288-slot cache)
three ways: `gptoss_jax.sampling`'s greedy loop with the weights tied to the step counter and
without, and the bare model step in a fori_loop (argmax only, no sampling bookkeeping). Compare
with the summed pieces of
`scripts/profile_decode.py --config bench --dtype float32 --experts dense --batch 1 --context 160`.

    .venv/bin/python experiments/2026-12-02-cpu-decode/small_step.py
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, ROOT)

import gptoss_jax as gj  # noqa: E402
from gptoss_jax import cache as cache_lib  # noqa: E402
from gptoss_jax import sampling  # noqa: E402
from profile_prefill import BENCH  # noqa: E402

B, SLOTS, STEPS = 1, 288, 64


def best(fn, repeats=5):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main():
    cfg = gj.tiny(**BENCH)
    model = gj.init(cfg, seed=0, dtype=jnp.float32, experts="dense")
    graphdef, state = nnx.split(model)
    cache = cache_lib.init_cache(cfg, B, SLOTS, model.dtype)
    logits = jnp.zeros((B, cfg.vocab_size), jnp.float32)
    common = (jax.random.key(0), jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32))
    tie_default = sampling.TIE_WEIGHTS
    for tie in (True, False):
        sampling.TIE_WEIGHTS = tie
        dec = sampling._decode_fn(graphdef, sampling.SamplingParams(0.0, 1.0, 0), (-1,), STEPS, False)
        run = lambda n, dec=dec: jax.block_until_ready(dec(state, cache, logits, *common, jnp.full((B,), n, jnp.int32)))
        per_step = (best(lambda: run(STEPS)) - best(lambda: run(1))) / (STEPS - 1)
        print(f"sampling loop, weights {'tied to the step' if tie else 'not tied'}: {per_step * 1e3:.2f} ms/step")
    sampling.TIE_WEIGHTS = tie_default

    def loop(state, cache, tok):
        def body(i, carry):
            cache, tok = carry
            w = jax.lax.optimization_barrier((state, i))[0]
            out = nnx.merge(graphdef, w)(tok, segment_ids=jnp.ones_like(tok), cache=cache)
            return out.cache, jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32)[:, None]
        return jax.lax.fori_loop(0, STEPS, body, (cache, tok))
    f = jax.jit(loop)
    tok = jnp.zeros((B, 1), jnp.int32)
    t = best(lambda: jax.block_until_ready(f(state, cache, tok)))
    print(f"bare model step in a fori_loop: {t / STEPS * 1e3:.2f} ms/step")


if __name__ == "__main__":
    main()
