"""The two decode-step kernels changed here, old form against new, at gpt-oss-20b sizes, timed as
decoding runs them: `--steps` iterations of one jitted fori_loop, weights tied to the loop carry by
an optimization barrier (nothing hoisted), median of 3; plus XLA's temp buffer size.

    .venv/bin/python experiments/2026-12-02-cpu-decode/microbench.py

1. Four chosen packed experts' first matrix ([5760, 2880] each) times one token:
   old: gather the blocks, decode to bf16 [in, out], batched einsum (as moe_gather did);
   new: `mxfp4.gathered_matvec` (decoded inside the reduction, 64 output rows at a time).
2. The output head for one token, bf16 table [201088, 2880]:
   old: einsum with fp32 accumulation; new: `layers.unembed` (a multiply-reduce for a few rows).
"""
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax import layers, moe
from gptoss_jax.mxfp4 import MXFP4, gathered_matvec


def timed(name, step, w, x, steps):
    def f(w, x):
        def body(i, x):
            w2, x = jax.lax.optimization_barrier((w, x))
            y = step(w2, x, i)
            return x + 1e-3 * y.reshape(x.shape[0], -1)[:, : x.shape[-1]].astype(x.dtype)
        return jax.lax.fori_loop(0, steps, body, x)
    g = jax.jit(f)
    temp = g.lower(w, x).compile().memory_analysis().temp_size_in_bytes
    jax.block_until_ready(g(w, x))
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready(g(w, x))
        ts.append((time.perf_counter() - t) / steps * 1e3)
    print(f"  {name:58s} {statistics.median(ts):8.1f} ms/step   XLA temp {temp / 2**20:7.0f} MiB", flush=True)


def main():
    rng = np.random.default_rng(0)
    E, D, F, k = 32, 2880, 2880, 4
    blocks = jnp.asarray(rng.integers(0, 256, (E, 2 * F, D // 32, 16), dtype=np.uint8))
    scales = jnp.asarray(rng.integers(118, 123, (E, 2 * F, D // 32), dtype=np.uint8))
    x = jnp.asarray(rng.standard_normal((1, D)), jnp.float32)
    ids = lambda i: (jnp.arange(k, dtype=jnp.int32) * 7 + i) % E

    def old_experts(w, x, i):
        dense = moe.in_out(moe._take_experts(MXFP4(*w), ids(i)), jnp.bfloat16)  # [k, in, out]
        xs = jnp.repeat(x.astype(jnp.bfloat16), k, axis=0)
        return jnp.einsum("RI,RIO->RO", xs, dense, preferred_element_type=jnp.float32)

    def new_experts(w, x, i):
        return gathered_matvec(jnp.repeat(x, k, axis=0), MXFP4(*w), ids(i))

    print("4 of 32 packed experts, first matrix [5760, 2880], one token:")
    timed("old: decode to bf16, batched einsum", old_experts, (blocks, scales), x, 8)
    timed("new: mxfp4.gathered_matvec", new_experts, (blocks, scales), x, 8)
    del blocks, scales

    V = 201088
    table = jnp.asarray(rng.standard_normal((V, D), dtype=np.float32) * 0.02, jnp.bfloat16)
    print("output head, bf16 [201088, 2880], one token:")
    timed("old: einsum, fp32 accumulation",
          lambda w, x, i: jnp.einsum("TD,VD->TV", x.astype(w.dtype), w, preferred_element_type=jnp.float32),
          table, x, 4)
    timed("new: layers.unembed (multiply-reduce)", lambda w, x, i: layers.unembed(x, w), table, x, 4)


if __name__ == "__main__":
    main()
