"""The pieces of a prefill forward or a training step (scripts/profile_prefill.py), each at the
input it has in the model (the residual stream of a forward on the same tokens), and the measured
whole beside them.

    layer_pieces(model, tokens, piece, train=...) -> {"attention i", "moe i", "head": ms}
    whole_ms(model, tokens, train=..., repeats=...) -> (ms, what was measured)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax import attention as attn_lib
from gptoss_jax import layers
from gptoss_jax import moe as moe_lib
from gptoss_jax.bench import flops as fm
from gptoss_jax.bench.pieces import FlopPieces, median_ms
from gptoss_jax.train.losses import next_token_loss
from gptoss_jax.train.step import OptimConfig, make_optimizer, make_trainer


def bucket_capacity(ids, rows: int, k: int, E: int) -> tuple[int, int]:
    """(the largest expert group among the chosen `ids`, the smallest bucket capacity of
    `moe.bucket_capacities(rows, k, E)` that holds it)."""
    largest = int(jnp.max(jnp.bincount(jnp.asarray(ids).reshape(-1), length=E)))
    return largest, next(c for c in moe_lib.bucket_capacities(rows, k, E) if c >= largest)


def layer_pieces(model, tokens, piece: FlopPieces, *, train: bool = False) -> dict[str, float]:
    """Times every layer's attention and MoE and the head with `piece` (printing its rows), plus,
    once per kind, their parts: the projections and the attention core (first layer of each
    kind), routing (layer 0), and the experts alone by chunks and by buckets (layer 0 and layers
    whose largest group is over twice the mean). -> ms of the whole pieces, which sum to a pass."""
    cfg = model.cfg
    B, T = tokens.shape
    D, E, k = cfg.d_model, cfg.num_experts, cfg.experts_per_token
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    seg = jnp.ones((B, T), jnp.int32)
    rope = layers.rope_cos_sin(positions, layers.rope_inv_freq(cfg), cfg.rope_concentration)
    plan = model.plan(B * T)  # the model's own choices for this prefill
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
        largest, cap = bucket_capacity(inter[i]["expert_ids"], B * T, k, E)
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

                expert_flops = B * T * fm.expert_flops(cfg)
                piece(f"  experts only, {name}", experts_fn, mlp.expert_weights(), h, expert_flops, routing)

    def head_fn(w, x):
        norm, table = w
        logits = layers.unembed(layers.rms_norm(x, norm, cfg.rms_eps), table, **plan.unembed_options()).astype(
            jnp.float32
        )
        return next_token_loss(logits, tokens)[0] if train else logits

    ms["head"] = piece(
        "final norm + unembedding" + (" + loss" if train else ""),
        head_fn,
        (model.norm[...], model.unembed[...]),
        inter[-1]["residual_out"],
        B * T * fm.unembed_flops(cfg),
    )
    return ms


def whole_ms(model, tokens, *, train: bool, repeats: int) -> tuple[float, str]:
    """The measured whole the pieces are set beside: a jitted forward of the model (all logits),
    or with `train` the trainer's step (forward, backward, global-norm clipping, AdamW)."""
    if train:
        opt = make_optimizer(OptimConfig(learning_rate=1e-4, warmup_steps=0, total_steps=10_000))
        trainer = make_trainer(model, opt)
        state = [trainer.init(model)]
        batch = {"tokens": tokens, "loss_mask": jnp.ones(tokens.shape, jnp.int32)}

        def whole():
            state[0], metrics = trainer.step(state[0], batch)
            return metrics["loss"]

        return median_ms(whole, (), repeats), "training step (trainer.step: forward, backward, clip, AdamW)"
    gd, st = nnx.split(model)
    fwd = jax.jit(lambda st, t: nnx.merge(gd, st)(t).logits)
    return median_ms(fwd, (st, tokens), repeats), "model forward (all logits)"
