"""The CPU MoE paths on the benchmark config's expert sizes, balanced and skewed routing.

    .venv/bin/python experiments/2026-12-02-prefill-train/moe_paths.py [--tokens 2048] [--dtype float32]

One MoE layer (16 experts of 512 -> 2 x 512 -> 512, top-4, dense weights) on T tokens, forward
alone and forward + backward (`jax.vjp`, gradients for the input and every weight), median of 5,
for: "buckets" (every group padded to the smallest static capacity holding the largest one),
"chunks" at its default chunk height and at a few others, and "dense" (every expert on every token).
Routing: "balanced" (a random router on random inputs) and "skewed" (a router bias that gives
expert 0 every token and spreads the other three slots; the random benchmark model routes close
to this: in its layers 1-3 one expert takes 66-86% of the tokens). The useful work is T * k rows.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax import moe

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from profile_prefill import median_ms  # noqa: E402  (jitted call, median of repeats, in ms)

D, F, E, K = 512, 512, 16, 4


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--chunks", default="32,64,128,256")
    args = p.parse_args()
    T, dt = args.tokens, jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    ew = moe.ExpertWeights(jnp.asarray(rng.normal(size=(E, D, 2 * F)) * 0.03, dt),
                           jnp.asarray(rng.normal(size=(E, 2 * F)) * 0.1, dt),
                           jnp.asarray(rng.normal(size=(E, F, D)) * 0.03, dt),
                           jnp.asarray(rng.normal(size=(E, D)) * 0.1, dt))
    x = jnp.asarray(rng.normal(size=(T, D)), dt)
    router = jnp.asarray(rng.normal(size=(D, E)) * 0.05, dt)
    flops = T * K * (2 * D * 2 * F + 2 * F * D)
    print(f"T={T}, {dt.name}; useful work {flops / 1e9:.2f} GFLOP forward; default chunk "
          f"{moe.chunk_rows(T * K, E)}", flush=True)
    for skew in ("balanced", "skewed"):
        rb = jnp.zeros((E,), dt) if skew == "balanced" else jnp.asarray(np.r_[50.0, np.zeros(E - 1)], dt)
        r = moe.route(x, router, rb, K)
        sizes = np.bincount(np.asarray(r.ids).ravel(), minlength=E)
        print(f"{skew}: largest group {sizes.max()} of {T} tokens (mean {T * K / E:.0f})", flush=True)
        impls = [("buckets", {})] + [(f"chunks m={m}", dict(chunk=int(m))) for m in args.chunks.split(",")] \
            + [("chunks (default)", {}), ("dense", {})]
        for name, kw in impls:
            impl = moe.MOE_IMPLS[name.split()[0]]
            f = lambda x, ew, r, kw=kw, impl=impl: impl(x, ew, r, alpha=1.702, limit=7.0, **kw)
            fwd = median_ms(jax.jit(f), (x, ew, r))  # routing is an argument, not a constant to fold
            ct = jnp.ones_like(x)
            fb = median_ms(jax.jit(lambda x, ew, r, ct, f=f: jax.vjp(lambda x, ew: f(x, ew, r), x, ew)[1](ct)),
                           (x, ew, r, ct))
            print(f"  {name:18s} forward {fwd:8.1f} ms ({flops / fwd / 1e6:5.1f} GFLOP/s useful)   "
                  f"fwd+bwd {fb:8.1f} ms ({3 * flops / fb / 1e6:5.1f} GFLOP/s useful)", flush=True)


if __name__ == "__main__":
    main()
