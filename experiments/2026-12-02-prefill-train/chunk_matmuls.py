"""The matmuls of one chunk of the chunked MoE at the benchmark config's shapes, timed alone, and
a whole chunk's forward and backward, to split the MoE's time into matmul rate and loop overhead.

    .venv/bin/python experiments/2026-12-02-prefill-train/chunk_matmuls.py

Shapes (D = 512, F = 512, chunk m rows): forward h = x W1 [m, D] x [D, 2F], y = a W2 [m, F] x [F, D];
backward dW2 = a^T dy, da = dy W2^T, dW1 = x^T dh, dx = dh W1^T. Each matmul is jitted alone and
run 32 times inside one jitted fori_loop, each step's first operand depending on the previous
step's result (so the product is neither hoisted nor dispatched per call), fp32.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from profile_prefill import median_ms  # noqa: E402

D, F2, F = 512, 1024, 512
REPS = 32


def rate(name, fn, shapes, flops):
    r = np.random.default_rng(0)
    args = [jnp.asarray(r.standard_normal(s), jnp.float32) for s in shapes]

    def loop(*args):
        def body(i, acc):  # the first operand depends on the step, so the product is not hoisted
            out = fn(args[0] + acc * 1e-30, *args[1:])
            return jnp.sum(out) * 1e-30  # the whole product is used
        return jax.lax.fori_loop(0, REPS, body, jnp.float32(0))
    ms = median_ms(jax.jit(loop), args, 5) / REPS
    print(f"  {name:34s} {ms:7.3f} ms  {flops / ms / 1e6:6.0f} GFLOP/s", flush=True)
    return ms


def main():
    for m in (128, 256, 512):
        print(f"chunk of {m} rows")
        tot = 0.0
        tot += rate("fwd x W1 [m,D]x[D,2F]", lambda x, w: x @ w, [(m, D), (D, F2)], 2 * m * D * F2)
        tot += rate("fwd a W2 [m,F]x[F,D]", lambda a, w: a @ w, [(m, F), (F, D)], 2 * m * F * D)
        fwd = tot
        tot += rate("bwd dW2 = a^T dy", lambda a, d: a.T @ d, [(m, F), (m, D)], 2 * m * F * D)
        tot += rate("bwd da = dy W2^T", lambda d, w: d @ w.T, [(m, D), (F, D)], 2 * m * F * D)
        tot += rate("bwd dW1 = x^T dh", lambda x, d: x.T @ d, [(m, D), (m, F2)], 2 * m * D * F2)
        tot += rate("bwd dx = dh W1^T", lambda d, w: d @ w.T, [(m, F2), (D, F2)], 2 * m * D * F2)
        print(f"  matmuls of one chunk: forward {fwd:.2f} ms, forward + backward {tot:.2f} ms; per 1,000 rows "
              f"{1000 / m * fwd:.1f} / {1000 / m * tot:.1f} ms")


if __name__ == "__main__":
    main()
