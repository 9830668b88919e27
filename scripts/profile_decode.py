"""Where a gpt-oss-20b decode step spends its time on this machine, piece by piece.

    .venv/bin/python scripts/profile_decode.py                 # batch 1, context 1024
    .venv/bin/python scripts/profile_decode.py --batch 8 --context 4096 --json runs/profile.json
    .venv/bin/python scripts/profile_decode.py --config bench --dtype float32 --experts dense --batch 8 --context 160

A decode step at batch B is: the embedding rows, then per layer an attention block (RMSNorm,
q/k/v projections, RoPE, attention over the KV cache, output projection) and an MoE block
(RMSNorm, router, top-4 of 32 experts, the chosen experts' MLPs), then the final norm and the
unembedding. This script builds each piece at gpt-oss-20b's real sizes (random bf16 weights,
random packed MXFP4 experts with scales 2^-9..2^-5, a cache filled to `--context` tokens; no
checkpoint is needed: ~4 GB of memory) and times it the way decoding runs it: `--steps`
iterations inside one jitted `lax.fori_loop`, the weights passed through
`lax.optimization_barrier` with the loop's carry, as `gptoss_jax.sampling` ties them to its
step counter (so nothing is hoisted out of the loop), median of `--repeats`. For each piece it
prints ms per step, the bytes it must read (weights in their stored format, the cache), the rate
that implies, and that as a share of the machine's stream bandwidth (measured here as
`scripts/bench.py` does: a jitted add into a donated buffer, bytes read + written, median of 5).
The pieces are summed for the model's layers (20b: 24, 12 sliding and 12 full; `--config bench`:
scripts/bench.py's small config, 4 layers, any dtype and expert format), and, as a check that
they account for a step, a real decode step of the 2-layer model through `gptoss_jax.sampling` is
timed beside the sum of its own pieces.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gptoss_jax as gj
from gptoss_jax import cache as cache_lib
from gptoss_jax import host, layers, sampling
from gptoss_jax.bench import peaks, records, timing, weights
from gptoss_jax.bench.peers import BENCH_CONFIG


def time_loop(step, weights, x, *, steps, repeats):
    """ms per iteration of `x = step(weights, x)` run `steps` times in one jitted fori_loop."""

    def run(weights, x):
        def body(i, x):
            w, x = jax.lax.optimization_barrier((weights, x))  # (XLA sees through a fori_loop's i)
            return step(w, x)

        return jax.lax.fori_loop(0, steps, body, x)

    f = jax.jit(run)
    return timing.median(lambda: f(weights, x), repeats) / steps * 1e3


def nbytes(tree) -> int:
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def main():
    host.reexec_with_huge_pages()  # first: huge pages for XLA's host buffers (gptoss_jax/host.py)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=1024, help="tokens already in the KV cache")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument(
        "--config",
        choices=("20b", "bench"),
        default="20b",
        help="bench: scripts/bench.py's small config (4 layers, d_model 512, 16 experts top-4)",
    )
    p.add_argument("--dtype", default="bfloat16", help="weights' dtype (experts too when --experts dense)")
    p.add_argument("--experts", choices=("mxfp4", "dense"), default="mxfp4")
    args = p.parse_args()

    full = gj.tiny(**BENCH_CONFIG) if args.config == "bench" else gj.gpt_oss_20b()
    cfg = dataclasses.replace(full, num_layers=2, layer_types=None)  # layer 0 sliding, 1 full
    B, L = args.batch, args.context
    name = "gpt-oss-20b" if args.config == "20b" else "bench config"
    print(
        f"{name} decode step pieces ({args.dtype}, {args.experts} experts), batch {B}, context {L}; "
        f"{jax.devices()[0].platform}, {jax.local_device_count()} device(s)",
        flush=True,
    )
    bw = peaks.jax_add_stream(2**30, 5, operands=1) / 1e9
    print(f"stream bandwidth (jitted add, donated, read + write, median of 5): {bw:.1f} GB/s", flush=True)
    t = time.perf_counter()
    model = weights.random_model(cfg, dtype=jnp.dtype(args.dtype), experts=args.experts)
    print(f"random 2-layer model at full width in {time.perf_counter() - t:.0f} s", flush=True)

    plan = model.plan(B)  # the model's own choices for a decode step of B rows
    D, E, k = cfg.d_model, cfg.num_experts, cfg.experts_per_token
    x0 = jnp.asarray(np.random.default_rng(1).standard_normal((B, 1, D)) * 0.5, model.dtype)
    positions = jnp.full((B, 1), L, jnp.int32)
    rope = layers.rope_cos_sin(positions, layers.rope_inv_freq(cfg), cfg.rope_concentration)
    seg = jnp.ones((B, 1), jnp.int32)
    # an empty cache costs the same as a full one: every step attends over all its slots (masked)
    cache = cache_lib.init_cache(cfg, B, L + 1, model.dtype)
    rows = []

    def piece(name, step, weights, x, read):
        ms = time_loop(step, weights, x, steps=args.steps, repeats=args.repeats)
        gbs = read / (ms * 1e-3) / 1e9
        rows.append(dict(piece=name, ms=ms, bytes=read, gbs=gbs, of_bandwidth=gbs / bw))
        print(
            f"  {name:34s} {ms:8.2f} ms  reads {read / 1e6:8.1f} MB  {gbs:6.1f} GB/s  {100 * gbs / bw:5.1f}% of stream",
            flush=True,
        )
        return ms

    tok = jnp.zeros((B, 1), jnp.int32)
    ms_embed = piece(
        "embedding rows",
        lambda w, x: x + layers.embed_lookup(w, tok + jnp.int32(x[0, 0, 0] > 9)),
        model.embed[...],
        x0,
        B * D * 2,
    )

    ms_layers = {}
    for i, kind in ((0, "sliding"), (1, "full")):
        attn = model.layers[i].attn
        lc = cache.layers[i]
        gd, st = nnx.split(attn)

        def attn_step(w, x, gd=gd, lc=lc):
            a = nnx.merge(gd, w)
            out, _, _ = a(
                x, rope, positions=positions, segment_ids=seg, eps=cfg.rms_eps, cache=lc, valid=seg != 0, plan=plan
            )
            return x + out

        ctx = min(L + 1, lc.k.shape[1])
        ms_a = piece(
            f"attention ({kind}, {ctx} keys)",
            attn_step,
            st,
            x0,
            nbytes(st) + 2 * B * ctx * cfg.num_kv_heads * cfg.head_dim * 2,
        )
        ms_layers.setdefault("attention", []).append(ms_a)
    mlp = model.layers[0].mlp
    gd, st = nnx.split(mlp)

    def moe_step(w, x):
        return x + nnx.merge(gd, w)(x, eps=cfg.rms_eps, plan=plan)[0]

    routing_bytes = nbytes([mlp.norm[...], mlp.router[...], mlp.router_bias[...]])
    active = min(E, B * k)  # at batch 8 the union of the chosen experts, at most all of them
    read = routing_bytes + (nbytes(st) - routing_bytes) * active // E
    ms_moe = piece(f"MoE ({active} of {E} experts, {args.experts})", moe_step, st, x0, read)

    def head_step(w, x):
        norm, table = w
        h = layers.rms_norm(x, norm, cfg.rms_eps)
        logits = layers.unembed(h, table, reduction_rows=plan.unembed_reduction_rows)
        # consumed by a slice: a reduction of the logits in the same step (max, softmax) would be
        # fused into the head's own reduction by XLA:CPU and run ~9x slower; in decoding the
        # logits leave the step through the loop carry, so nothing is fused with them
        return x + (logits[..., :D] * 1e-3).astype(x.dtype)

    ms_head = piece(
        "final norm + unembedding", head_step, (model.norm[...], model.unembed[...]), x0, nbytes(model.unembed[...])
    )

    n_sliding = sum(full.is_sliding(i) for i in range(full.num_layers))
    per_layer_attn = dict(zip(("sliding", "full"), ms_layers["attention"]))
    predicted = (
        ms_embed
        + n_sliding * per_layer_attn["sliding"]
        + (full.num_layers - n_sliding) * per_layer_attn["full"]
        + full.num_layers * ms_moe
        + ms_head
    )
    print(
        f"sum for {full.num_layers} layers ({n_sliding} sliding): {predicted:.0f} ms per step "
        f"= {1e3 * B / predicted:.2f} tokens/s",
        flush=True,
    )

    # a real decode step of the 2-layer model through gptoss_jax.sampling's jitted loop
    graphdef, state = nnx.split(model)
    dec = sampling._decode_fn(graphdef, sampling.SamplingParams(0.0, 1.0, 0), (-1,), args.steps, False)
    logits = jnp.zeros((B, cfg.vocab_size), jnp.float32)
    common = (jax.random.key(0), jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32))

    def decode(n):
        out = dec(state, cache, logits, *common, jnp.full((B,), n, jnp.int32))
        jax.block_until_ready(out)

    decode(1)
    decode(args.steps)
    t1 = timing.best(lambda: decode(1), args.repeats, warmup=0)
    tn = timing.best(lambda: decode(args.steps), args.repeats, warmup=0)
    step2 = (tn - t1) / (args.steps - 1) * 1e3
    pieces2 = ms_embed + sum(ms_layers["attention"]) + 2 * ms_moe + ms_head
    print(
        f"measured 2-layer decode step (sampling loop): {step2:.1f} ms; sum of its pieces {pieces2:.1f} ms", flush=True
    )
    if args.json:
        records.write(
            dict(
                config=args.config,
                dtype=args.dtype,
                experts=args.experts,
                batch=B,
                context=L,
                stream_gbs=bw,
                pieces=rows,
                predicted_all_layers_ms=predicted,
                measured_2_layer_step_ms=step2,
                pieces_2_layer_ms=pieces2,
            ),
            args.json,
        )


if __name__ == "__main__":
    main()
