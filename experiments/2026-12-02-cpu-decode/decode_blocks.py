"""First step and later steps of a decode block, and prefill, on a reduced-depth gpt-oss-20b (full widths and
vocabulary, random weights): the figures of "What the profile showed" in README.md here. Run it on a commit
with a git worktree on PYTHONPATH to compare (the "before" figures came from 6f32de0).

    .venv/bin/python experiments/2026-12-02-cpu-decode/decode_blocks.py --layers 2
"""
import argparse, dataclasses, time, jax, jax.numpy as jnp, numpy as np
import gptoss_jax as gj
from flax import nnx
from gptoss_jax import config as C, sampling
import os, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from profile_decode import random_model  # noqa: E402
p = argparse.ArgumentParser(); p.add_argument("--layers", type=int, default=2); p.add_argument("--steps", type=int, default=8)
p.add_argument("--batch", type=int, default=1)
a = p.parse_args()
cfg = dataclasses.replace(C.gpt_oss_20b(), num_layers=a.layers, layer_types=None)
t = time.perf_counter()
model = random_model(cfg)  # scripts/profile_decode.py's random fill
print("init %.1fs" % (time.perf_counter() - t), flush=True)
from gptoss_jax.cache import init_cache
B = a.batch
graphdef, state = nnx.split(model)
prefill = sampling._prefill_fn(graphdef)
def timed(f, *args, n=3):
    out = jax.block_until_ready(f(*args)); ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
    return out, min(ts), ts
cache = init_cache(cfg, B, 16 + 64, model.dtype)
toks = jnp.asarray(np.tile(np.arange(1, 17, dtype=np.int32), (B, 1)))
(cache2, logits), tp, ts = timed(prefill, state, cache, toks, jnp.full((B,), 16, jnp.int32), jnp.zeros((B, cfg.vocab_size), jnp.float32))
print(f"prefill 16 tokens: {tp:.2f}s {ts}", flush=True)
c = prefill.lower(state, cache, toks, jnp.full((B,), 16, jnp.int32), jnp.zeros((B, cfg.vocab_size), jnp.float32)).compile()
print("prefill temp GiB %.2f" % (c.memory_analysis().temp_size_in_bytes / 2**30))
for steps in (1, a.steps):
    dec = sampling._decode_fn(graphdef, sampling.SamplingParams(0.0, 1.0, 0), (-1,), steps, False)
    args = (state, cache2, logits, jax.random.key(0), jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32), jnp.full((B,), 1000, jnp.int32))
    _, td, ts = timed(dec, *args)
    print(f"decode block of {steps}: {td:.3f}s {ts}", flush=True)
    if steps > 1: print(f"per step {1e3 * (td - t1) / (steps - 1):.1f} ms; first step {1e3*t1:.1f} ms")
    else: t1 = td
    c = dec.lower(*args).compile()
    print("decode temp GiB %.2f" % (c.memory_analysis().temp_size_in_bytes / 2**30))
import resource; print("maxrss GiB %.2f" % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))
