"""Where a prefill forward and a training step of the benchmark config spend their time, piece by piece.

    .venv/bin/python scripts/profile_prefill.py                         # prefill, batch 1 x 2048, fp32
    .venv/bin/python scripts/profile_prefill.py --mode train            # training, batch 4 x 512, fp32
    .venv/bin/python scripts/profile_prefill.py --seq 8192 --dtype bfloat16 --json runs/profile.json

The model is `scripts/bench.py`'s BENCH config (4 layers: 2 sliding, window 128, and 2 full;
d_model 512, 8 query / 2 KV heads of 64, 16 experts top-4 of width 512, vocab 8192) with random
dense weights. Each piece is run at the real activation shape on random inputs, jitted on its own,
median of `--repeats` (after a warm-up):

  attention     RMSNorm, q/k/v projections, RoPE, attention with sinks, output projection; split
                into the projections alone and the attention core alone (`self_attention`)
  MoE           RMSNorm, router, top-4, the experts (the default CPU path, `moe.moe_chunks`);
                split into routing alone and the experts alone, beside the bucket path
                (`moe.moe_buckets`, the CPU default before) on the same routing
  head          final RMSNorm and the unembedding of every position (+ in training the mean
                next-token cross-entropy)

In `--mode train` each piece is its forward and backward (`jax.vjp` with a random cotangent:
gradients for the inputs and every weight), which is what a training step runs per piece; the
step itself adds global-norm clipping and AdamW. For each piece: ms, the FLOPs it must do (2 per
multiply-add, causal/sliding attention counting only the keys a query may see; backward = 2x
forward) and that as a share of the machine's peak matmul rate in the run's dtype, measured here
(jitted `jnp.dot` of 2048 x 2048, median of 5). The pieces are summed over the 4 layers and set
beside the measured whole: a jitted forward of the model (prefill), or the trainer's step
(`gptoss_jax.train.step.make_trainer`, AdamW + clipping: train).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gptoss_jax as gj
from gptoss_jax import attention as attn_lib
from gptoss_jax import host, layers
from gptoss_jax import moe as moe_lib
from gptoss_jax.bench import flops as fm
from gptoss_jax.bench import peaks, records, timing
from gptoss_jax.bench.peers import BENCH_CONFIG as BENCH
from gptoss_jax.train.losses import next_token_loss


def median_ms(fn, args, repeats=5):
    return 1e3 * timing.median(lambda: fn(*args), repeats)


def main():
    host.reexec_with_huge_pages()  # first: huge pages for XLA's host buffers (gptoss_jax/host.py)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("prefill", "train"), default="prefill")
    p.add_argument("--batch", type=int, default=None, help="default 1 (prefill) / 4 (train)")
    p.add_argument("--seq", type=int, default=None, help="default 2048 (prefill) / 512 (train)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    train = args.mode == "train"
    B = args.batch or (4 if train else 1)
    T = args.seq or (512 if train else 2048)
    dtype = jnp.dtype(args.dtype)
    cfg = gj.tiny(**BENCH)
    D, V = cfg.d_model, cfg.vocab_size
    E, k = cfg.num_experts, cfg.experts_per_token
    print(
        f"{args.mode}: batch {B} x {T}, {dtype.name}, BENCH config; {jax.devices()[0].platform}, "
        f"{os.cpu_count()} cores",
        flush=True,
    )
    peak = peaks.jax_matmul(2048, dtype, 5, accumulate=jnp.float32) / 1e9
    print(f"peak matmul ({dtype.name} in, fp32 out, n=2048, median of 5): {peak:.0f} GFLOP/s", flush=True)

    model = gj.init(cfg, seed=0, dtype=dtype, experts="dense")
    rng = np.random.default_rng(1)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    seg = jnp.ones((B, T), jnp.int32)
    rope = layers.rope_cos_sin(positions, layers.rope_inv_freq(cfg), cfg.rope_concentration)
    plan = model.plan(B * T)  # the model's own choices for this prefill
    bwd = 3.0 if train else 1.0  # forward + backward = 3x the forward's FLOPs
    rows = []

    def piece(name, f, weights, x, flops, *extra):
        """Time f(weights, x, *extra) -> array (forward), or its VJP for (weights, x) with a random
        cotangent (train); `extra` (e.g. a routing) is an argument, not a constant to fold."""
        if train:
            ct = jnp.asarray(rng.standard_normal(jax.eval_shape(f, weights, x, *extra).shape), dtype)

            def run(w, x, ct, *extra):
                out, vjp = jax.vjp(lambda w, x: f(w, x, *extra), w, x)
                return vjp(ct.astype(out.dtype))

            ms = median_ms(jax.jit(run), (weights, x, ct) + extra, args.repeats)
        else:
            ms = median_ms(jax.jit(f), (weights, x) + extra, args.repeats)
        flops *= bwd
        share = flops / (ms * 1e-3) / 1e9 / peak
        rows.append(dict(piece=name, ms=ms, gflop=flops / 1e9, of_peak=share))
        print(f"  {name:38s} {ms:9.1f} ms  {flops / 1e9:7.2f} GFLOP  {100 * share:5.1f}% of peak", flush=True)
        return ms

    tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    # each piece gets the input it has in the model: the residual stream of a forward on `tokens`
    gd, st = nnx.split(model)
    inter = jax.jit(lambda st, t: nnx.merge(gd, st)(t, capture=True).intermediates)(st, tokens)
    proj_flops = B * T * fm.projection_flops(cfg)
    moe_flops = B * T * fm.moe_flops(cfg)
    ms = {}
    for i in range(cfg.num_layers):
        attn, mlp = model.layers[i].attn, model.layers[i].mlp
        kind = "sliding" if attn.window else "full"
        first = i == min(j for j in range(cfg.num_layers) if cfg.is_sliding(j) == cfg.is_sliding(i))
        x = inter[i]["residual"]
        gd, st = nnx.split(attn)
        core_flops = B * T * fm.attention_core_flops(cfg, T, attn.window)

        def attn_fn(w, x, gd=gd):
            out, _, _ = nnx.merge(gd, w)(x, rope, positions=positions, segment_ids=seg, eps=cfg.rms_eps, plan=plan)
            return out

        ms[f"attention {i}"] = piece(f"layer {i}: attention ({kind})", attn_fn, st, x, proj_flops + core_flops)
        if first:

            def proj_fn(w, x, gd=gd):
                a = nnx.merge(gd, w)
                q, kk, v = a.qkv(x, rope, eps=cfg.rms_eps)
                o = jnp.einsum("BTNH,NHD->BTD", q, a.o[...], preferred_element_type=jnp.float32)
                return (o + (kk.sum() + v.sum()) * 1e-9).astype(x.dtype)

            piece("  projections only", proj_fn, st, x, proj_flops)
            q, kk, v = jax.jit(lambda st, x: nnx.merge(gd, st).qkv(x, rope, eps=cfg.rms_eps))(st, x)

            def core_fn(w, q, window=attn.window):
                sinks, kk, v = w
                return attn_lib.self_attention(q, kk, v, sinks, positions=positions, segment_ids=seg, window=window)[0]

            piece("  attention core only", core_fn, (attn.sinks[...], kk, v), q, core_flops)

        x = inter[i]["residual_mid"]
        ids = inter[i]["expert_ids"].reshape(-1, k)
        largest = int(jnp.max(jnp.bincount(ids.reshape(-1), length=E)))
        cap = next(c for c in moe_lib.bucket_capacities(B * T, k, E) if c >= largest)
        gd, st = nnx.split(mlp)

        def moe_fn(w, x, gd=gd):
            return nnx.merge(gd, w)(x, eps=cfg.rms_eps, plan=plan)[0]

        ms[f"moe {i}"] = piece(f"layer {i}: MoE (largest group {largest} of {B * T})", moe_fn, st, x, moe_flops)
        if i == 0 or largest > 2 * B * T * k / E:
            h = layers.rms_norm(x, mlp.norm[...], cfg.rms_eps).reshape(B * T, D)
            if i == 0:

                def route_fn(w, h):
                    r = moe_lib.route(h, w[0], w[1], k)
                    return r.weights + r.ids * 0

                piece("  routing only", route_fn, (mlp.router[...], mlp.router_bias[...]), h, B * T * 2 * D * E)
            routing = moe_lib.route(h, mlp.router[...], mlp.router_bias[...], k)
            m = moe_lib.chunk_rows(B * T * k, E)
            for name, impl in ((f"chunks of {m} rows", moe_lib.moe_chunks), (f"buckets of {cap}", moe_lib.moe_buckets)):

                def experts_fn(ew, h, r, mlp=mlp, impl=impl):
                    return impl(h, ew, r, alpha=mlp.alpha, limit=mlp.limit)

                piece(
                    f"  experts only, {name}",
                    experts_fn,
                    mlp.expert_weights(),
                    h,
                    B * T * fm.expert_flops(cfg),
                    routing,
                )

    def head_fn(w, x):
        norm, table = w
        logits = layers.unembed(
            layers.rms_norm(x, norm, cfg.rms_eps), table, reduction_rows=plan.unembed_reduction_rows
        ).astype(jnp.float32)
        return next_token_loss(logits, tokens)[0] if train else logits

    ms["head"] = piece(
        "final norm + unembedding" + (" + loss" if train else ""),
        head_fn,
        (model.norm[...], model.unembed[...]),
        inter[-1]["residual_out"],
        B * T * fm.unembed_flops(cfg),
    )

    n_sliding = sum(cfg.is_sliding(i) for i in range(cfg.num_layers))
    total = sum(ms.values())
    if train:
        from gptoss_jax.train.step import OptimConfig, make_optimizer, make_trainer

        opt = make_optimizer(OptimConfig(learning_rate=1e-4, warmup_steps=0, total_steps=10_000))
        trainer = make_trainer(model, opt)
        state = [trainer.init(model)]
        batch = {"tokens": tokens, "loss_mask": jnp.ones((B, T), jnp.int32)}

        def whole():
            state[0], metrics = trainer.step(state[0], batch)
            return metrics["loss"]

        measured = median_ms(lambda: whole(), (), args.repeats)
        what = "training step (trainer.step: forward, backward, clip, AdamW)"
    else:
        gd, st = nnx.split(model)
        fwd = jax.jit(lambda st, t: nnx.merge(gd, st)(t).logits)
        measured = median_ms(fwd, (st, tokens), args.repeats)
        what = "model forward (all logits)"
    print(
        f"sum of pieces for {cfg.num_layers} layers ({n_sliding} sliding): {total:.0f} ms; "
        f"measured {what}: {measured:.0f} ms; {B * T / measured * 1e3:.0f} tokens/s",
        flush=True,
    )
    if args.json:
        records.write(
            dict(
                mode=args.mode,
                batch=B,
                seq=T,
                dtype=dtype.name,
                peak_gflops=peak,
                pieces=rows,
                summed_ms=total,
                measured_ms=measured,
            ),
            args.json,
        )


if __name__ == "__main__":
    main()
