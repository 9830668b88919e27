"""The benchmark model's greedy decoding at B tokens per step, with the CPU plan before and after
this change, fp32 and bf16 (random weights, dense experts; `scripts/bench.py`'s config, prompt and
rate: B x 63 tokens over the time of 64 new tokens less that of 1).

    python experiments/2026-12-06-matvec-rows/decode_rows.py     # writes decode_rows.json here

Before: the projections and the head of an fp32 model through the native kernels up to 2 rows
(now 8 where the kernels share loads among rows, `plan.NATIVE_MATVEC_ROWS_SHARED`), and dense
experts gathered only up to E / 2 rows (now up to 4 rows per expert on average,
`plan.NATIVE_DENSE_GATHER_ROWS_PER_EXPERT`). Both sides run the kernels of this commit; `before`
sets the plan's two choices back. Each side is its own process (the plan is read when a program is
traced), the sides alternating `--repeats` times; within a process every row is timed `--inner`
times after a warm-up, and the record keeps every timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

DTYPES = ("float32", "bfloat16")
PROMPT, NEW = 32, 64


def side(name: str, tokens: list[int], inner: int) -> dict:
    """One process's timings: {dtype: {B: [tokens/s, ...]}}."""
    import jax.numpy as jnp
    import numpy as np

    import gptoss_jax as gj
    from gptoss_jax import cpu_matvec, plan
    from gptoss_jax.bench import timing
    from gptoss_jax.bench.peers import BENCH_CONFIG
    from gptoss_jax.bench.weights import random_model

    if name == "before":
        shared = lambda bf16: bf16 and cpu_matvec.has_bf16_dot()  # noqa: E731  (fp32 never shared before)
        plan.native_matvec_rows = (
            lambda bf16: plan.NATIVE_MATVEC_ROWS_SHARED if shared(bf16) else plan.NATIVE_MATVEC_ROWS
        )
        plan.NATIVE_DENSE_GATHER_ROWS_PER_EXPERT = 0
    cfg = gj.tiny(**BENCH_CONFIG)
    out = {}
    for dtype in DTYPES:
        model = random_model(cfg, dtype=jnp.dtype(dtype), experts="dense")
        out[dtype] = {}
        for B in tokens:
            prompts = np.random.default_rng(B).integers(0, cfg.vocab_size, (B, PROMPT)).tolist()
            gen = lambda k, p=prompts: gj.generate(  # noqa: E731
                model, None, p, max_new_tokens=k, temperature=0, stop_tokens=(), prefill_chunk=PROMPT
            )
            timing.once(lambda: gen(NEW)), timing.once(lambda: gen(1))  # compile and warm up
            rates = []
            for _ in range(inner):
                t_new, t_one = timing.once(lambda: gen(NEW)), timing.once(lambda: gen(1))
                rates.append(B * (NEW - 1) / (t_new - t_one))
            p = model.plan(B)
            out[dtype][str(B)] = {"tokens_per_s": rates, "moe": p.moe, "native_rows": p.native_rows}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=2, help="processes per side, alternating")
    ap.add_argument("--inner", type=int, default=3)
    ap.add_argument("--side", choices=("before", "after"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    tokens = [int(b) for b in args.tokens.split(",")]
    if args.side:  # a child process: print its timings as the last line
        print(json.dumps(side(args.side, tokens, args.inner)))
        return
    from gptoss_jax import host
    from gptoss_jax.bench import records

    host.reexec_with_huge_pages()
    runs = {"before": [], "after": []}
    for r in range(args.repeats):
        for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
            cmd = [sys.executable, __file__, "--side", name, "--tokens", args.tokens, "--inner", str(args.inner)]
            res = subprocess.run(
                cmd, capture_output=True, text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}
            )
            runs[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"  {name} process {r + 1} done", flush=True)
    rows = []
    for dtype in DTYPES:
        for B in tokens:
            row = {"dtype": dtype, "tokens": B}
            for name, procs in runs.items():
                rates = [x for p in procs for x in p[dtype][str(B)]["tokens_per_s"]]
                row[name] = {
                    "tokens_per_s": statistics.median(rates),
                    "all": rates,
                    "moe": procs[0][dtype][str(B)]["moe"],
                    "native_rows": procs[0][dtype][str(B)]["native_rows"],
                }
            row["after_over_before"] = row["after"]["tokens_per_s"] / row["before"]["tokens_per_s"]
            rows.append(row)
            b, a = row["before"], row["after"]
            print(
                f"{dtype:9s} B={B:3d}  before {b['tokens_per_s']:8.1f} tok/s ({b['moe']}, native rows {b['native_rows']})"
                f"  after {a['tokens_per_s']:8.1f} tok/s ({a['moe']}, native rows {a['native_rows']})"
                f"  {row['after_over_before']:.2f}x",
                flush=True,
            )
    rec = {"provenance": records.provenance(), "prompt": PROMPT, "new": NEW, "rows": rows}
    records.write(rec, os.path.join(args.out, "decode_rows.json"))


if __name__ == "__main__":
    main()
