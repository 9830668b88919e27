"""gpt-oss-20b (random weights, the checkpoint `scripts/bench_20b.py` writes) prefilled through
`sampling.prefill` with generate's default chunking (one fresh chunk up to `sampling.FIRST_CHUNK`
tokens) against explicit chunks of 256 (the default before, its first chunk now fresh): does the
longer first chunk keep its gain at full size, where the MoE's path depends on the tokens a chunk
holds (`plan.NATIVE_PACKED_GATHER_ROWS_PER_EXPERT`)?

    python experiments/2026-12-06-fresh-prefill/prefill_20b.py [--checkpoint runs/gpt-oss-20b-random] [--prompt 1024]

One process; each side's first call compiles (its seconds kept), then `--repeats` timings, the
sides alternating. Writes prefill_20b_T{prompt}.json here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=os.path.join(ROOT, "runs", "gpt-oss-20b-random"))
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    from gptoss_jax import host

    host.reexec_with_huge_pages()

    import jax
    import numpy as np

    import gptoss_jax as gj
    from gptoss_jax import sampling
    from gptoss_jax.bench import records, timing
    from gptoss_jax.cache import init_cache

    model = gj.load(args.checkpoint)
    T = args.prompt
    prompt = np.random.default_rng(T).integers(0, model.cfg.vocab_size, T).tolist()
    sides = {"default": None, "chunks of 256": 256}

    def run(chunk):
        cache = init_cache(model.cfg, 1, T + 16, model.dtype)
        return jax.block_until_ready(sampling.prefill(model, [prompt], cache, prefill_chunk=chunk)[1])

    first = {}
    for name, chunk in sides.items():
        first[name] = timing.once(lambda c=chunk: run(c))
        print(f"{name}: first call {first[name]:.1f} s", flush=True)
    times = {name: [] for name in sides}
    for r in range(args.repeats):
        for name in sides if r % 2 == 0 else reversed(list(sides)):
            times[name].append(timing.once(lambda c=sides[name]: run(c)))
            print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    rows, default_first = {}, sampling.first_chunk(model, 1)
    for name, chunk in sides.items():
        chunks = sampling._chunks(T, chunk, default_first)
        med = statistics.median(times[name])
        rows[name] = {
            "prefill_chunk": chunk,
            "chunks": chunks,
            "moe_first_chunk": model.plan(chunks[0][1]).moe,
            "seconds": med,
            "all": times[name],
            "first_call_s": first[name],
            "tokens_per_s": T / med,
        }
    ratio = rows["default"]["tokens_per_s"] / rows["chunks of 256"]["tokens_per_s"]
    print(
        f"T={T}: default {rows['default']['tokens_per_s']:.1f} tok/s ({rows['default']['moe_first_chunk']}), "
        f"chunks of 256 {rows['chunks of 256']['tokens_per_s']:.1f} tok/s: {ratio:.2f}x",
        flush=True,
    )
    rec = {
        "provenance": records.provenance(),
        "prompt": T,
        "first_chunk": sampling.FIRST_CHUNK,
        "sides": rows,
        "default_over_chunks_of_256": ratio,
    }
    records.write(rec, os.path.join(args.out, f"prefill_20b_T{T}.json"))


if __name__ == "__main__":
    main()
