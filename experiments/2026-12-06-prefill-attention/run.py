"""An uncached forward's self-attention on the CPU: XLA's code (`attention.self_attention`, the
chunked paths the model ran before) against the native kernel (`cpu_matvec.prefill_attention`),
and the benchmark model's prefill with each.

    python experiments/2026-12-06-prefill-attention/run.py      # writes attention.json + table.md here

Part 1, the attention alone (jitted, one call per timing): the benchmark model's heads (8 query,
2 KV, head_dim 64) at T = 512, 2,048 and 8,192, full (causal) and sliding (window 128) layers, fp32
and bf16; gpt-oss-20b's heads (64 query, 8 KV) at T = 2,048 in bf16. GFLOP/s count the visible
(query, key) pairs only: 4 * pairs * N * H. Medians of `--repeats`, the sides alternating.

Part 2, the final norm and output head of every position at T = 2,048 and 8,192 rows: one dot (as
XLA fused it with the norm before) against the plan's 1,024-row chunks (`layers.unembed`).

Part 3, a prefill forward of the benchmark model (`scripts/bench.py`'s config, random dense
weights, all logits) built with `attention_impl="xla"` and with the default CPU plan (the native
kernel), same weights, interleaved (both sides with the plan's chunked head); the logits' largest
difference relative to their scale. In bf16 that difference is the random router's near-tied
expert choices flipping on bf16 roundings (XLA's path rounds the probabilities to bf16), not the
attention's error (per layer: bf16 roundings; the kernel's own tests bound it).
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
from gptoss_jax import attention, cpu_matvec, host, layers, plan  # noqa: E402
from gptoss_jax.bench import peers, records  # noqa: E402
from gptoss_jax.bench.flops import forward_flops_per_token  # noqa: E402


def alternating(fns, args, repeats):
    """{name: [seconds]} of one call each, the order alternating per repeat (after a warm-up)."""
    for f in fns.values():
        jax.block_until_ready(f(*args))
    ts = {k: [] for k in fns}
    for r in range(repeats):
        for k in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            t = time.perf_counter()
            jax.block_until_ready(fns[k](*args))
            ts[k].append(time.perf_counter() - t)
    return ts


def attention_case(name, T, N, K, H, dtype, window, repeats):
    rng = np.random.default_rng(T)
    q = jnp.asarray(rng.standard_normal((1, T, N, H)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((1, T, K, H)), dtype) for _ in range(2))
    sinks = jnp.asarray(rng.standard_normal(N), jnp.float32)
    pos, seg = jnp.arange(T, dtype=jnp.int32)[None], jnp.ones((1, T), jnp.int32)
    kw = dict(positions=pos, segment_ids=seg, window=window)
    fns = {
        "xla": jax.jit(lambda q, k, v, s: attention.self_attention(q, k, v, s, **kw)),
        "native": jax.jit(lambda q, k, v, s: cpu_matvec.prefill_attention(q, k, v, s, pos, seg, window=window)),
    }
    outs = {n: np.asarray(f(q, k, v, sinks)[0], np.float32) for n, f in fns.items()}
    diff = float(np.abs(outs["native"] - outs["xla"]).max() / np.abs(outs["xla"]).max())
    ts = alternating(fns, (q, k, v, sinks), repeats)
    med = {n: statistics.median(v) for n, v in ts.items()}
    pairs = sum(min(t + 1, window or T) for t in range(T))
    flops = 4 * pairs * N * H
    row = {
        "case": name,
        "shape": dict(T=T, N=N, K=K, H=H, dtype=jnp.dtype(dtype).name, window=window),
        "visible_pairs": pairs,
        "seconds": ts,
        "ms": {n: 1e3 * s for n, s in med.items()},
        "gflop_per_s": {n: flops / s / 1e9 for n, s in med.items()},
        "native_over_xla": med["xla"] / med["native"],
        "max_rel_diff": diff,
    }
    print(
        f"{name:46s} XLA {row['ms']['xla']:9.2f} ms  native {row['ms']['native']:8.2f} ms ({row['native_over_xla']:.2f}x)"
        f"  native {row['gflop_per_s']['native']:6.1f} GFLOP/s  rel diff {diff:.1e}",
        flush=True,
    )
    return row


def model_case(cfg, dtype, T, repeats):
    models = {
        "xla": gj.init(cfg, seed=0, dtype=dtype, experts="dense", kernel=gj.KernelOptions(attention_impl="xla")),
        "native": gj.init(cfg, seed=0, dtype=dtype, experts="dense"),
    }
    assert models["native"].plan(T).attention == "cpu_native"
    fns = {n: peers.compile_forward(m, 1, T)[0] for n, m in models.items()}
    tokens = jnp.asarray(np.random.default_rng(T).integers(0, cfg.vocab_size, (1, T)), jnp.int32)
    logits = {n: np.asarray(f(tokens), np.float32) for n, f in fns.items()}
    diff = float(np.abs(logits["native"] - logits["xla"]).max() / np.abs(logits["xla"]).max())
    ts = alternating(fns, (tokens,), repeats)
    med = {n: statistics.median(v) for n, v in ts.items()}
    flops = forward_flops_per_token(cfg, T) * T
    row = {
        "case": f"prefill {dtype} T={T}",
        "seconds": ts,
        "tokens_per_s": {n: T / s for n, s in med.items()},
        "gflop_per_s": {n: flops / s / 1e9 for n, s in med.items()},
        "native_over_xla": med["xla"] / med["native"],
        "logits_max_rel_diff": diff,
    }
    print(
        f"{row['case']:46s} XLA {row['tokens_per_s']['xla']:8.0f} tok/s  native {row['tokens_per_s']['native']:8.0f}"
        f" tok/s ({row['native_over_xla']:.2f}x)  logits rel diff {diff:.1e}",
        flush=True,
    )
    return row


def head_case(T, dtype, repeats, D=512, V=8192):
    """The final norm and output head at T rows: one dot (XLA fuses the norm into it) against
    `layers.unembed(..., chunk_rows=plan.UNEMBED_CHUNK_ROWS)` (the CPU plan since this change)."""
    rng = np.random.default_rng(T)
    h = jnp.asarray(rng.standard_normal((1, T, D)), dtype)
    w = jnp.asarray(0.02 * rng.standard_normal((V, D)), dtype)
    g = jnp.asarray(1 + 0.1 * rng.standard_normal(D), dtype)
    head = lambda rows: jax.jit(lambda h, w, g: layers.unembed(layers.rms_norm(h, g, 1e-5), w, chunk_rows=rows))
    fns = {"one dot": head(0), "chunks": head(plan.UNEMBED_CHUNK_ROWS)}
    outs = {n: np.asarray(f(h, w, g)) for n, f in fns.items()}
    diff = float(np.abs(outs["chunks"] - outs["one dot"]).max() / np.abs(outs["one dot"]).max())
    ts = alternating(fns, (h, w, g), repeats)
    med = {n: statistics.median(v) for n, v in ts.items()}
    row = {
        "case": f"norm + head, {T} rows, {jnp.dtype(dtype).name}",
        "seconds": ts,
        "ms": {n: 1e3 * s for n, s in med.items()},
        "gflop_per_s": {n: 2 * T * D * V / s / 1e9 for n, s in med.items()},
        "chunks_over_one_dot": med["one dot"] / med["chunks"],
        "max_rel_diff": diff,
    }
    print(
        f"{row['case']:46s} one dot {row['ms']['one dot']:8.1f} ms  chunks {row['ms']['chunks']:8.1f} ms"
        f" ({row['chunks_over_one_dot']:.2f}x)  rel diff {diff:.1e}",
        flush=True,
    )
    return row


def main():
    host.reexec_with_huge_pages()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    if not cpu_matvec.has_prefill_attention():
        raise SystemExit(f"prefill_attention is not built here: {cpu_matvec.unavailable_reason() or 'no AVX-512F'}")
    bf, f32 = jnp.bfloat16, jnp.float32
    attn = []
    for dt in (f32, bf):
        for T in (512, 2048, 8192):
            for W in (None, 128):
                kind = "sliding (128)" if W else "full"
                name = f"bench heads, T={T}, {kind}, {jnp.dtype(dt).name}"
                attn.append(attention_case(name, T, 8, 2, 64, dt, W, args.repeats))
    for W in (None, 128):
        kind = "sliding (128)" if W else "full"
        attn.append(attention_case(f"20b heads, T=2048, {kind}, bfloat16", 2048, 64, 8, 64, bf, W, args.repeats))
    heads = [head_case(T, dt, args.repeats) for dt in (f32, bf) for T in (2048, 8192)]
    cfg = gj.tiny(**peers.BENCH_CONFIG)
    model = [model_case(cfg, dt, T, max(3, args.repeats - 2)) for dt in ("float32", "bfloat16") for T in (512, 2048, 8192)]
    rec = {
        "provenance": records.provenance(),
        "repeats": args.repeats,
        "attention": attn,
        "head": heads,
        "prefill": model,
    }
    records.write(rec, os.path.join(args.out, "attention.json"))
    p = rec["provenance"]
    lines = [
        f"`{p['command']}`, {p['date_utc']}, {p['cpu']['model']}, {p['cpu']['cores']} cores; medians of "
        f"{args.repeats} (attention) / {max(3, args.repeats - 2)} (prefill).",
        "",
        "| self-attention | XLA ms | native ms | native / XLA | native GFLOP/s | XLA GFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in attn:
        lines.append(
            f"| {r['case']} | {r['ms']['xla']:.2f} | {r['ms']['native']:.2f} | {r['native_over_xla']:.2f}x | "
            f"{r['gflop_per_s']['native']:.1f} | {r['gflop_per_s']['xla']:.1f} |"
        )
    lines += [
        "",
        "| final norm + output head (d 512, vocab 8192) | one dot ms | 1,024-row chunks ms | ratio | max rel diff |",
        "|---|---|---|---|---|",
    ]
    for r in heads:
        lines.append(
            f"| {r['case']} | {r['ms']['one dot']:.1f} | {r['ms']['chunks']:.1f} | {r['chunks_over_one_dot']:.2f}x | "
            f"{r['max_rel_diff']:.1e} |"
        )
    lines += [
        "",
        "| benchmark model prefill | XLA attention tok/s | native attention tok/s | ratio | logits max rel diff |",
        "|---|---|---|---|---|",
    ]
    for r in model:
        t = r["tokens_per_s"]
        lines.append(
            f"| {r['case']} | {t['xla']:.0f} | {t['native']:.0f} | {r['native_over_xla']:.2f}x | "
            f"{r['logits_max_rel_diff']:.1e} |"
        )
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
