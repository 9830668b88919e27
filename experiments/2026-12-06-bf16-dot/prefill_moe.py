"""One MoE layer of a prefill (bf16 and fp32) on the benchmark model's shapes (`scripts/bench.py`'s config:
d_model 512, 16 experts of width 512, top-4): XLA's chunk loop (`moe.moe_chunks`, what the plan
ran before) against the same layer through `cpu_matvec.grouped_matmul` (`native=True`), in one
process, interleaved.

    python experiments/2026-12-06-bf16-dot/prefill_moe.py     # writes prefill_moe.json here

The routing comes from a random router as in the benchmark's random model (skewed: most rows go
to a few experts). Per T: `--repeats` rotated timings of `--calls` calls each, medians; the FLOP
figure counts the rows' two products (2 * T * k * D * (2 F + F)), no padding.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import gptoss_jax as gj  # noqa: E402
from gptoss_jax import cpu_matvec, host, moe  # noqa: E402
from gptoss_jax.bench import records  # noqa: E402
from gptoss_jax.bench.peers import BENCH_CONFIG  # noqa: E402


def main():
    host.reexec_with_huge_pages()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", default="512,2048,8192")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    cpu_matvec.require()
    cfg = gj.tiny(**BENCH_CONFIG)
    D, F, k = cfg.d_model, cfg.expert_dim, cfg.experts_per_token
    rows = []
    for dtype, T in [(d, int(t)) for d in args.dtypes.split(",") for t in args.T.split(",")]:
        if not (cpu_matvec.has_bf16_dot() if dtype == "bfloat16" else cpu_matvec.has_grouped_f32()):
            print(f"{dtype}: grouped_matmul is not built for it on this CPU; skipped")
            continue
        model = gj.init(cfg, seed=0, experts="dense", dtype=dtype)
        mlp = model.layers[0].mlp
        ew = mlp.expert_weights()
        x = jnp.asarray(np.random.default_rng(T).standard_normal((T, D)), dtype)
        routing = moe.route(x, mlp.router[...], mlp.router_bias[...], k)
        sizes = np.bincount(np.asarray(routing.ids).reshape(-1), minlength=cfg.num_experts)
        fns = {
            name: jax.jit(lambda x, ew, r, native=native: moe.moe_chunks(x, ew, r, alpha=mlp.alpha, limit=mlp.limit, native=native))
            for name, native in (("chunk_loop", False), ("grouped", True))
        }
        outs = {n: np.asarray(f(x, ew, routing), np.float32) for n, f in fns.items()}
        rel = float(np.abs(outs["grouped"] - outs["chunk_loop"]).max() / np.abs(outs["chunk_loop"]).max())
        ts = {n: [] for n in fns}
        names = list(fns)
        for r in range(args.repeats):
            for n in names if r % 2 == 0 else names[::-1]:
                t = time.perf_counter()
                for _ in range(args.calls):
                    y = fns[n](x, ew, routing)
                jax.block_until_ready(y)
                ts[n].append((time.perf_counter() - t) / args.calls)
        med = {n: statistics.median(v) for n, v in ts.items()}
        flops = 2 * T * k * D * 3 * F
        row = {
            "dtype": dtype,
            "T": T,
            "group_sizes": sizes.tolist(),
            "seconds": ts,
            "ms": {n: 1e3 * v for n, v in med.items()},
            "gflops": {n: flops / v / 1e9 for n, v in med.items()},
            "speedup": med["chunk_loop"] / med["grouped"],
            "max_rel_diff": rel,
        }
        rows.append(row)
        print(
            f"{dtype:8s} T={T:5d} largest group {sizes.max():5d} of {T * k}: chunk loop {row['ms']['chunk_loop']:7.2f} ms "
            f"({row['gflops']['chunk_loop']:5.0f} GFLOP/s)  grouped {row['ms']['grouped']:7.2f} ms "
            f"({row['gflops']['grouped']:5.0f} GFLOP/s)  {row['speedup']:.2f}x  max rel diff {rel:.1e}",
            flush=True,
        )
    rec = {"provenance": records.provenance(), "config": BENCH_CONFIG, "rows": rows}
    records.write(rec, os.path.join(args.out, "prefill_moe.json"))


if __name__ == "__main__":
    main()
