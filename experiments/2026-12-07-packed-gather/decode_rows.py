"""The benchmark model with packed MXFP4 experts. (1) Greedy decoding at B tokens per step: its MoE
through XLA's buckets (the CPU plan's choice beyond E / 2 rows for small packed experts before
this change) against the gather path through the native packed kernel (`cpu_matvec.mxfp4_matvec`),
fp32 and bf16; `scripts/bench.py`'s config, prompt and rate (B x 63 tokens over the time of 64
new tokens less that of 1), random weights.

    python experiments/2026-12-07-packed-gather/decode_rows.py     # writes decode_rows.json here

Both paths are forced (`KernelOptions(moe_impl=...)`) on two models holding the same weights, in
one process; in each round every (dtype, B) is timed on both sides, the order alternating between
rounds; medians of `--repeats` rounds. (2) An uncached forward (batch 1, full logits) of T tokens:
the MoE through XLA's chunk loop (the CPU plan's bulk path) against the gather path, timed the
same way, to place the point where the bulk path takes over.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

import gptoss_jax as gj  # noqa: E402
from gptoss_jax.bench import records, timing  # noqa: E402
from gptoss_jax.bench.peers import BENCH_CONFIG, compile_forward  # noqa: E402
from gptoss_jax.bench.weights import random_model  # noqa: E402
from gptoss_jax.plan import KernelOptions  # noqa: E402

DTYPES = ("float32", "bfloat16")
PATHS = ("buckets", "gather")
PROMPT, NEW = 32, 64


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--prefill", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=os.path.join(HERE, "decode_rows.json"))
    args = ap.parse_args()
    cfg = gj.tiny(**BENCH_CONFIG)
    kept = {**vars(args), "json": os.path.relpath(args.json, ROOT)}  # no path of the machine in the record
    rec = {"provenance": records.provenance(), "args": kept, "config": BENCH_CONFIG, "rows": [], "prefill": []}
    for dtype in DTYPES:
        models = {}
        for path in PATHS:
            models[path] = random_model(cfg, dtype=jnp.dtype(dtype), experts="mxfp4")
            models[path].kernel = KernelOptions(moe_impl=path)
        for B in args.tokens:
            prompts = np.random.default_rng(B).integers(0, cfg.vocab_size, (B, PROMPT)).tolist()

            def gen(model, k, p=prompts):
                return gj.generate(
                    model, None, p, max_new_tokens=k, temperature=0, stop_tokens=(), prefill_chunk=PROMPT
                )

            outs = {}
            for path in PATHS:  # compile and warm up; both paths decode the same tokens
                outs[path] = gen(models[path], NEW)
                gen(models[path], 1)
            same = outs["buckets"] == outs["gather"]
            rates = {p: [] for p in PATHS}
            for r in range(args.repeats):
                for path in PATHS if r % 2 == 0 else PATHS[::-1]:
                    t1 = timing.once(lambda m=models[path]: gen(m, 1))
                    tn = timing.once(lambda m=models[path]: gen(m, NEW))
                    rates[path].append(B * (NEW - 1) / (tn - t1))
            med = {p: statistics.median(v) for p, v in rates.items()}
            row = {
                "dtype": dtype,
                "tokens": B,
                "rows_per_expert": B * cfg.experts_per_token / cfg.num_experts,
                "same_tokens": same,
                "tokens_per_s": rates,
                "median": med,
                "gather_over_buckets": med["gather"] / med["buckets"],
            }
            rec["rows"].append(row)
            print(
                f"{dtype:8s} B={B:3d} ({row['rows_per_expert']:.2f} rows/expert) buckets {med['buckets']:8.1f} "
                f"gather {med['gather']:8.1f} tok/s  gather/buckets {row['gather_over_buckets']:.2f}x  "
                f"same tokens: {same}",
                flush=True,
            )
            records.write(rec, args.json)
        for T in args.prefill:
            tokens = jnp.asarray(np.random.default_rng(T).integers(0, cfg.vocab_size, (1, T)), jnp.int32)
            fwd = {}
            for path, model in (("chunks", models["buckets"]), ("gather", models["gather"])):
                model.kernel = KernelOptions(moe_impl=path)  # the decode rows of this dtype are done
                fwd[path] = compile_forward(model, 1, T)[0]
                fwd[path](tokens)
            rates = {p: [] for p in fwd}
            for r in range(args.repeats):
                for path in list(fwd) if r % 2 == 0 else list(fwd)[::-1]:
                    rates[path].append(T / timing.once(lambda f=fwd[path]: f(tokens)))
            med = {p: statistics.median(v) for p, v in rates.items()}
            row = {
                "dtype": dtype,
                "T": T,
                "rows_per_expert": T * cfg.experts_per_token / cfg.num_experts,
                "tokens_per_s": rates,
                "median": med,
                "gather_over_chunks": med["gather"] / med["chunks"],
            }
            rec["prefill"].append(row)
            print(
                f"{dtype:8s} prefill T={T:4d} ({row['rows_per_expert']:.0f} rows/expert) chunks {med['chunks']:8.1f} "
                f"gather {med['gather']:8.1f} tok/s  gather/chunks {row['gather_over_chunks']:.2f}x",
                flush=True,
            )
            records.write(rec, args.json)


if __name__ == "__main__":
    main()
