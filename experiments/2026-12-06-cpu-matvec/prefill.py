"""A gpt-oss-20b prefill (random weights, packed experts) through each MoE path the CPU plan can
take, to set where the native kernel's gather path ends (`plan.NATIVE_PACKED_GATHER_ROWS_PER_EXPERT`).

    python experiments/2026-12-06-cpu-matvec/prefill.py [--checkpoint runs/gpt-oss-20b-random] [--T 128]

`scripts/bench_20b.py --write-only` writes the checkpoint. One jitted forward over T random tokens
(the last position's logits), per path: `gather` (each (token, slot) row through the native
MXFP4 kernel, which groups the rows by expert), `chunks` (the chunk loop: each expert decoded to
memory, then matmuls; the CPU path without native kernels). The first call compiles; the second is
timed. Writes prefill.json beside this file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import gptoss_jax as gj  # noqa: E402
from gptoss_jax import host  # noqa: E402
from gptoss_jax.bench import records  # noqa: E402


def main():
    host.reexec_with_huge_pages()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/gpt-oss-20b-random")
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--paths", default="gather,chunks")
    args = ap.parse_args()
    model = gj.load(args.checkpoint)
    T = args.T
    toks = jnp.asarray(np.random.default_rng(0).integers(0, model.cfg.vocab_size, (1, T)), jnp.int32)
    rows = []
    for impl in args.paths.split(","):
        model.kernel = gj.KernelOptions(moe_impl=impl)
        gd, st = nnx.split(model)
        f = jax.jit(lambda st, t: nnx.merge(gd, st)(t, logits_at=jnp.full((1,), T - 1)).logits)
        t0 = time.perf_counter()
        jax.block_until_ready(f(st, toks))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(f(st, toks))
        second = time.perf_counter() - t0
        rows.append({"moe_impl": impl, "T": T, "first_s": first, "seconds": second, "tokens_per_s": T / second})
        print(f"{impl:8s} T={T}: first call {first:.1f} s, timed {second:.2f} s = {T / second:.1f} tok/s", flush=True)
    rec = {"provenance": records.provenance(), "checkpoint": os.path.basename(args.checkpoint), "rows": rows}
    records.write(rec, os.path.join(HERE, f"prefill_T{T}.json"))


if __name__ == "__main__":
    main()
