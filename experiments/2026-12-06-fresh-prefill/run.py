"""Generate's prefill with the first chunk of a new cache on the model's attention path (the native
CPU kernel here) against the same chunk through the cache (XLA's attention over every slot), the
benchmark model (random weights, dense experts; `scripts/bench.py`'s config), fp32 and bf16.

    python experiments/2026-12-06-fresh-prefill/run.py     # writes prefill.json here

Both sides in one process: `sampling._prefill_chunks(..., fresh=True)` (what `generate` now runs)
and `fresh=False` (what it ran before: every chunk through the cache). Each case is compiled and
warmed up on both sides (the first call's seconds are kept: the compile), then timed `--repeats`
times, the sides alternating; the record keeps every timing and the median. One prompt of T
tokens, prefilled in chunks of C; the cache holds T + 64 tokens (generate's prompt + new tokens).
Last, generate's default before (chunks of 256, all through the cache) against its default now
(up to `sampling.FIRST_CHUNK` tokens in one fresh chunk), from the same rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

DTYPES = ("float32", "bfloat16")
CASES = ((256, 256), (1024, 1024), (2048, 2048), (1024, 256), (2048, 256))  # (prompt tokens T, chunk C)
NEW = 64


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    from gptoss_jax import host

    host.reexec_with_huge_pages()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import gptoss_jax as gj
    from gptoss_jax import sampling
    from gptoss_jax.bench import records, timing
    from gptoss_jax.bench.peers import BENCH_CONFIG
    from gptoss_jax.bench.weights import random_model
    from gptoss_jax.cache import init_cache

    cfg = gj.tiny(**BENCH_CONFIG)
    rows, default_first = [], {}
    for dtype in DTYPES:
        model = random_model(cfg, dtype=jnp.dtype(dtype), experts="dense")
        default_first[dtype] = sampling.first_chunk(model, 1)
        graphdef, state = nnx.split(model)
        for T, C in CASES:
            ids = [np.random.default_rng(T).integers(0, cfg.vocab_size, T).tolist()]

            def run(fresh, ids=ids, C=C, T=T):
                cache = init_cache(cfg, 1, T + NEW, model.dtype)
                cache, logits = sampling._prefill_chunks(graphdef, state, cfg.vocab_size, ids, cache, C, fresh=fresh)
                return jax.block_until_ready(logits)

            first = {name: timing.once(lambda f=fresh: run(f)) for name, fresh in (("cache", False), ("fresh", True))}
            logits = {name: np.asarray(run(fresh)) for name, fresh in (("cache", False), ("fresh", True))}
            diff = float(np.abs(logits["fresh"] - logits["cache"]).max() / np.abs(logits["cache"]).max())
            times = {"cache": [], "fresh": []}
            for r in range(args.repeats):
                for name in ("cache", "fresh") if r % 2 == 0 else ("fresh", "cache"):
                    times[name].append(timing.once(lambda f=(name == "fresh"): run(f)))
            row = {"dtype": dtype, "prompt": T, "chunk": C, "max_rel_logit_diff": diff}
            for name in ("cache", "fresh"):
                med = statistics.median(times[name])
                row[name] = {"seconds": med, "all": times[name], "first_call_s": first[name], "tokens_per_s": T / med}
            row["fresh_over_cache"] = row["fresh"]["tokens_per_s"] / row["cache"]["tokens_per_s"]
            rows.append(row)
            print(
                f"{dtype:9s} T={T:5d} C={C:5d}  through the cache {row['cache']['tokens_per_s']:8.1f} tok/s"
                f"  fresh first chunk {row['fresh']['tokens_per_s']:8.1f} tok/s  {row['fresh_over_cache']:.2f}x"
                f"  (first calls {first['cache']:.1f} / {first['fresh']:.1f} s; logits rel diff {diff:.1e})",
                flush=True,
            )
    # generate's default before (chunks of 256, every one through the cache) and now (the model's
    # default first chunk, `sampling.first_chunk`: up to FIRST_CHUNK tokens in one fresh chunk)
    defaults = []
    for dtype in DTYPES:
        for T in sorted({t for t, _ in CASES}):
            before = [r for r in rows if (r["dtype"], r["prompt"], r["chunk"]) == (dtype, T, min(T, 256))]
            now = [r for r in rows if (r["dtype"], r["prompt"], r["chunk"]) == (dtype, T, min(T, default_first[dtype]))]
            if before and now:
                b, n = before[0]["cache"]["tokens_per_s"], now[0]["fresh"]["tokens_per_s"]
                defaults.append({"dtype": dtype, "prompt": T, "before_tokens_per_s": b, "now_tokens_per_s": n})
                print(
                    f"{dtype:9s} T={T:5d}  generate's default prefill: before {b:8.1f} tok/s, now {n:8.1f} {n / b:.2f}x"
                )
    rec = {
        "provenance": records.provenance(),
        "config": BENCH_CONFIG,
        "new_tokens": NEW,
        "first_chunk": sampling.FIRST_CHUNK,  # = first_chunk(model, 1) for both dtypes here
        "rows": rows,
        "defaults": defaults,
    }
    records.write(rec, os.path.join(args.out, "prefill.json"))


if __name__ == "__main__":
    main()
