"""The benchmark model's MoE block in a decode step of B tokens, through each CPU path: `gather`
(each (token, slot) row through its expert by the native kernels, each chosen expert read once,
up to four rows sharing each load) against `buckets` (rows sorted into per-expert buckets, XLA's
batched matmuls; the default beyond E / 2 rows before this change) and `chunks`, fp32 and bf16
weights; each row records the plan's default before this change (`plan.default_moe_impl` without
the native dense gather) and now.

    python experiments/2026-12-06-matvec-rows/moe_decode.py     # writes moe_decode.json here

Each case: `scripts/profile_decode.py`'s way of timing a piece (`--steps` iterations in one jitted
loop, the weights tied to the loop's carry; each path compiled and warmed up once), median of
`--repeats` timings, the paths' order rotating.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

import gptoss_jax as gj  # noqa: E402
from gptoss_jax import host  # noqa: E402
from gptoss_jax.bench import records  # noqa: E402
from gptoss_jax.bench.peers import BENCH_CONFIG  # noqa: E402
from gptoss_jax.bench import timing  # noqa: E402
from gptoss_jax.bench.pieces import loop_fn  # noqa: E402
from gptoss_jax.bench.weights import random_model  # noqa: E402
from gptoss_jax.plan import default_moe_impl  # noqa: E402


def main():
    host.reexec_with_huge_pages()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,2,4,8,16,32")
    ap.add_argument("--paths", default="gather,buckets,chunks")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    cfg = dataclasses.replace(gj.tiny(**BENCH_CONFIG), num_layers=1, layer_types=None)
    paths = args.paths.split(",")
    rows = []
    for dtype in ("float32", "bfloat16"):
        model = random_model(cfg, dtype=jnp.dtype(dtype), experts="dense")
        mlp = model.layers[0].mlp
        gd, st = nnx.split(mlp)
        for B in [int(b) for b in args.tokens.split(",")]:
            x0 = jnp.asarray(np.random.default_rng(B).standard_normal((B, 1, cfg.d_model)) * 0.5, model.dtype)
            default = model.plan(B).moe
            k, E = cfg.experts_per_token, cfg.num_experts
            before = default_moe_impl(B, k, E, large_packed_on_cpu=False, platform="cpu")  # no native_dense
            fns = {}
            for p in paths:  # each path compiled once, warmed up, then timed in rotation
                plan = dataclasses.replace(model.plan(B), moe=p)

                def step(w, x, plan=plan):
                    return x + nnx.merge(gd, w)(x, eps=cfg.rms_eps, plan=plan)[0]

                fns[p] = loop_fn(step, steps=args.steps)
                timing.once(lambda f=fns[p]: f(st, x0))
            ms = {p: [] for p in paths}
            for r in range(args.repeats):
                for p in paths[r % len(paths) :] + paths[: r % len(paths)]:
                    ms[p].append(timing.once(lambda f=fns[p]: f(st, x0)) / args.steps * 1e3)
            med = {p: float(np.median(v)) for p, v in ms.items()}
            row = {
                "dtype": dtype,
                "tokens": B,
                "default_before": before,
                "default_now": default,
                "ms": med,
                "samples_ms": ms,
            }
            rows.append(row)
            print(
                f"{dtype:9s} B={B:3d} (default before {before:8s} now {default:8s}) "
                + "  ".join(f"{p} {med[p]:7.3f} ms" for p in paths)
                + f"  buckets/gather {med['buckets'] / med['gather']:.2f}x",
                flush=True,
            )
    rec = {"provenance": records.provenance(), "config": dataclasses.asdict(cfg), "steps": args.steps, "rows": rows}
    records.write(rec, os.path.join(args.out, "moe_decode.json"))


if __name__ == "__main__":
    main()
