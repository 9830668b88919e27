"""A decode step's attention through the KV cache: XLA's code (`attention.attend` over the cache,
as `cache.update_and_attend` ran it before) against the native kernel
(`cpu_matvec.decode_attention`), and the benchmark model's decoding with each.

    python experiments/2026-12-06-decode-attention/run.py      # writes attention.json + table.md here

Part 1, the attention alone (`cache._attend`, the function the model's cached step calls, with
`native` off and on): 12 layers chained (each its own cache, so together they exceed the L3
cache as a model's layers do), one new query per row; gpt-oss-20b's heads (64 query, 8 KV,
head_dim 64, bf16 cache) at 129 keys (a sliding layer: the 128-slot ring and the new key),
1,025 and 4,097 keys (full layers), and the benchmark model's (8 / 2 heads, fp32 and bf16 cache,
97 keys). Medians of `--repeats` timings, the sides alternating.

Part 2, greedy decoding of the benchmark model (`scripts/bench.py`'s config, batch 1 and 8, 64 new
tokens after 32; rate = B * 63 / (t(64) - t(1))) with the model's attention switched between the
two (everything else the same plan), interleaved; the tokens must agree.
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
from gptoss_jax import cache as cache_lib  # noqa: E402
from gptoss_jax import cpu_matvec, host  # noqa: E402
from gptoss_jax.bench import peers, records  # noqa: E402


def attention_case(name, B, N, K, H, S, dtype, window, repeats, calls=5, layers=12):
    rng = np.random.default_rng(S)
    q = jnp.asarray(rng.standard_normal((B, 1, N, H)), dtype)
    ks = [jnp.asarray(rng.standard_normal((B, S, K, H)), dtype) for _ in range(layers)]
    vs = [jnp.asarray(rng.standard_normal((B, S, K, H)), dtype) for _ in range(layers)]
    sinks = jnp.asarray(rng.standard_normal(N), jnp.float32)
    k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    pos = jnp.full((B, 1), S - 1, jnp.int32)

    def chain(native):
        def f(q, ks, vs):
            x, outs = q, []
            for k, v in zip(ks, vs):
                out, _ = cache_lib._attend(x, k, v, sinks, positions=pos, k_pos=k_pos, window=window, native=native)
                outs.append(out)
                x = out
            return jnp.stack(outs)

        return jax.jit(f)

    fns = {"xla": chain(False), "native": chain(True)}
    outs = {k: np.asarray(f(q, ks, vs), np.float32) for k, f in fns.items()}
    diff = float(np.abs(outs["native"] - outs["xla"]).max() / np.abs(outs["xla"]).max())
    ts = {k: [] for k in fns}
    for r in range(repeats):
        for k in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            t = time.perf_counter()
            for _ in range(calls):
                y = fns[k](q, ks, vs)
            jax.block_until_ready(y)
            ts[k].append((time.perf_counter() - t) / calls / layers)
    med = {k: statistics.median(v) for k, v in ts.items()}
    nbytes = 2 * B * S * K * H * jnp.dtype(dtype).itemsize
    row = {
        "case": name,
        "shape": dict(B=B, N=N, K=K, H=H, S=S, cache_dtype=jnp.dtype(dtype).name, window=window),
        "cache_bytes_per_layer": nbytes,
        "seconds_per_layer": ts,
        "us_per_layer": {k: 1e6 * v for k, v in med.items()},
        "cache_gb_per_s": {k: nbytes / v / 1e9 for k, v in med.items()},
        "native_over_xla": med["xla"] / med["native"],
        "max_rel_diff": diff,
    }
    print(
        f"{name:44s} XLA {row['us_per_layer']['xla']:8.1f} us  native {row['us_per_layer']['native']:7.1f} us/layer"
        f"  ({row['native_over_xla']:.1f}x)  rel diff {diff:.1e}",
        flush=True,
    )
    return row


def decode_case(models, dtype, B, repeats, prompt=32, new=64):
    cfg = models.cfg
    model = models.ours(dtype, "dense")
    prompts = np.random.default_rng(B).integers(0, cfg.vocab_size, (B, prompt)).tolist()
    orig = cache_lib.update_and_attend

    def run(native_attention, k):
        def patched(*a, native=False, **kw):
            return orig(*a, native=native and native_attention, **kw)

        cache_lib.update_and_attend = patched
        try:
            return gj.generate(
                model, None, prompts, max_new_tokens=k, temperature=0, stop_tokens=(), prefill_chunk=prompt, logprobs=True
            )
        finally:
            cache_lib.update_and_attend = orig

    gens = {}
    for side in ("xla", "native"):
        jax.clear_caches()  # the step is traced again with the attention switched
        gens[side] = run(side == "native", new)
    same = gens["xla"].tokens == gens["native"].tokens
    # where greedy choices part (near-ties of a random model), and how close the two were before
    rows = []
    for ta, tb, la, lb in zip(gens["xla"].tokens, gens["native"].tokens, gens["xla"].logprobs, gens["native"].logprobs):
        d = next((i for i, (a, b) in enumerate(zip(ta, tb)) if a != b), len(ta))
        rows.append(
            {
                "first_different_token": None if d == len(ta) else d,
                "max_abs_logprob_diff_before": max((abs(a - b) for a, b in zip(la[:d], lb[:d])), default=0.0),
                "logprob_of_choice_there": None if d == len(ta) else [la[d], lb[d]],
            }
        )
    rates = {"xla": [], "native": []}
    for r in range(repeats):
        for side in ("xla", "native") if r % 2 == 0 else ("native", "xla"):
            jax.clear_caches()
            run(side == "native", new), run(side == "native", 1)  # compile both lengths' programs
            t = time.perf_counter()
            run(side == "native", new)
            t_new = time.perf_counter() - t
            t = time.perf_counter()
            run(side == "native", 1)
            t_one = time.perf_counter() - t
            rates[side].append(B * (new - 1) / (t_new - t_one))
    med = {k: statistics.median(v) for k, v in rates.items()}
    row = {
        "case": f"decode {dtype} B={B}",
        "tokens_per_s": rates,
        "median_tokens_per_s": med,
        "native_over_xla": med["native"] / med["xla"],
        "same_tokens": same,
        "rows": rows,
    }
    print(
        f"{row['case']:44s} XLA {med['xla']:8.1f} tok/s  native {med['native']:7.1f} tok/s  ({row['native_over_xla']:.2f}x)"
        f"  same tokens: {same}; parted rows: {[i for i, r in enumerate(rows) if r['first_different_token'] is not None]}",
        flush=True,
    )
    return row


def main():
    host.reexec_with_huge_pages()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    cpu_matvec.require()
    bf, f32 = jnp.bfloat16, jnp.float32
    attention = [
        attention_case("20b sliding layer, 129 keys (bf16 cache)", 1, 64, 8, 64, 129, bf, 128, args.repeats),
        attention_case("20b full layer, 1,025 keys (bf16 cache)", 1, 64, 8, 64, 1025, bf, None, args.repeats),
        attention_case("20b full layer, 4,097 keys (bf16 cache)", 1, 64, 8, 64, 4097, bf, None, args.repeats),
        attention_case("20b full layer, 1,025 keys, batch 8", 8, 64, 8, 64, 1025, bf, None, args.repeats),
        attention_case("bench model, 97 keys (fp32 cache)", 1, 8, 2, 64, 97, f32, None, args.repeats),
        attention_case("bench model, 97 keys, batch 8 (fp32 cache)", 8, 8, 2, 64, 97, f32, None, args.repeats),
    ]
    models = peers.Models(gj.tiny(**peers.BENCH_CONFIG))
    decode = [decode_case(models, dt, B, args.repeats) for dt in ("float32", "bfloat16") for B in (1, 8)]
    rec = {"provenance": records.provenance(), "repeats": args.repeats, "attention": attention, "decode": decode}
    records.write(rec, os.path.join(args.out, "attention.json"))
    p = rec["provenance"]
    lines = [
        f"`{p['command']}`, {p['date_utc']}, {p['cpu']['model']}, {p['cpu']['cores']} cores; medians of {args.repeats}.",
        "",
        "| attention, one new query per row | XLA us/layer | native us/layer | native / XLA | cache GB/s (native) |",
        "|---|---|---|---|---|",
    ]
    for r in attention:
        us = r["us_per_layer"]
        lines.append(
            f"| {r['case']} | {us['xla']:.1f} | {us['native']:.1f} | {r['native_over_xla']:.1f}x | "
            f"{r['cache_gb_per_s']['native']:.1f} |"
        )
    lines += [
        "",
        "| benchmark model decoding | XLA attention tok/s | native attention tok/s | ratio | greedy tokens |",
        "|---|---|---|---|---|",
    ]
    for r in decode:
        m = r["median_tokens_per_s"]
        parted = [(i, x) for i, x in enumerate(r["rows"]) if x["first_different_token"] is not None]
        agree = "all equal" if not parted else "; ".join(
            f"row {i} from token {x['first_different_token']} (logprob of the choice {x['logprob_of_choice_there'][0]:.2f}"
            f" / {x['logprob_of_choice_there'][1]:.2f}; max |diff| before {x['max_abs_logprob_diff_before']:.1e})"
            for i, x in parted
        )
        lines.append(f"| {r['case']} | {m['xla']:.1f} | {m['native']:.1f} | {r['native_over_xla']:.2f}x | {agree} |")
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
