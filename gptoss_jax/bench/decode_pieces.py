"""The pieces of a decode step (scripts/profile_decode.py) on a 2-layer model at full width (layer
0 sliding, 1 full), the step they predict for the full depth, and a real decode step of the
2-layer model through `gptoss_jax.sampling` to check that the pieces account for one.

    step_pieces(model, B, L, piece) -> {"embed", "attention": [sliding, full], "moe", "head"} in ms
    predicted_ms(full_cfg, ms)      -> ms per step of the full-depth model
    sampling_step_ms(model, cache, B, steps, repeats)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax import cache as cache_lib
from gptoss_jax import layers, sampling
from gptoss_jax.bench import timing
from gptoss_jax.bench.pieces import BytePieces, nbytes


def moe_read_bytes(routing_bytes: int, all_bytes: int, B: int, k: int, E: int) -> int:
    """Bytes an MoE block reads for B rows: its norm and router, and the share of the expert
    weights of the experts in use (at most all E; B*k when the rows choose distinct ones)."""
    active = min(E, B * k)
    return routing_bytes + (all_bytes - routing_bytes) * active // E


def step_pieces(model, B: int, L: int, piece: BytePieces, cache=None) -> dict:
    """Times the embedding rows, the attention of layers 0 (sliding) and 1 (full) over a cache of
    L + 1 slots (`cache`, made here when None), layer 0's MoE and the head, one decode position
    for B rows, with `piece` (printing its rows)."""
    cfg = model.cfg
    plan = model.plan(B)  # the model's own choices for a decode step of B rows
    D, E, k = cfg.d_model, cfg.num_experts, cfg.experts_per_token
    x0 = jnp.asarray(np.random.default_rng(1).standard_normal((B, 1, D)) * 0.5, model.dtype)
    positions = jnp.full((B, 1), L, jnp.int32)
    rope = layers.rope_cos_sin(positions, layers.rope_inv_freq(cfg), cfg.rope_concentration)
    seg = jnp.ones((B, 1), jnp.int32)
    # an empty cache costs the same as a full one: every step attends over all its slots (masked)
    cache = cache_lib.init_cache(cfg, B, L + 1, model.dtype) if cache is None else cache
    tok = jnp.zeros((B, 1), jnp.int32)
    ms = {}
    ms["embed"] = piece(
        "embedding rows",
        lambda w, x: x + layers.embed_lookup(w, tok + jnp.int32(x[0, 0, 0] > 9)),
        model.embed[...],
        x0,
        B * D * 2,
    )
    ms["attention"] = []
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
        read = nbytes(st) + 2 * B * ctx * cfg.num_kv_heads * cfg.head_dim * 2
        ms["attention"].append(piece(f"attention ({kind}, {ctx} keys)", attn_step, st, x0, read))
    mlp = model.layers[0].mlp
    gd, st = nnx.split(mlp)

    def moe_step(w, x):
        return x + nnx.merge(gd, w)(x, eps=cfg.rms_eps, plan=plan)[0]

    routing_bytes = nbytes([mlp.norm[...], mlp.router[...], mlp.router_bias[...]])
    read = moe_read_bytes(routing_bytes, nbytes(st), B, k, E)
    ms["moe"] = piece(f"MoE ({min(E, B * k)} of {E} experts, {model.experts})", moe_step, st, x0, read)

    def head_step(w, x):
        norm, table = w
        h = layers.rms_norm(x, norm, cfg.rms_eps)
        logits = layers.unembed(h, table, **plan.unembed_options())
        # consumed by a slice: a reduction of the logits in the same step (max, softmax) would be
        # fused into the head's own reduction by XLA:CPU and run ~9x slower; in decoding the
        # logits leave the step through the loop carry, so nothing is fused with them
        return x + (logits[..., :D] * 1e-3).astype(x.dtype)

    head = (model.norm[...], model.unembed[...])
    ms["head"] = piece("final norm + unembedding", head_step, head, x0, nbytes(model.unembed[...]))
    return ms


def predicted_ms(full_cfg, ms: dict) -> float:
    """A step of `full_cfg`'s depth from the pieces: embedding, each layer's attention of its kind
    and an MoE, the head."""
    n_sliding = sum(full_cfg.is_sliding(i) for i in range(full_cfg.num_layers))
    sliding, full = ms["attention"]
    return (
        ms["embed"]
        + n_sliding * sliding
        + (full_cfg.num_layers - n_sliding) * full
        + full_cfg.num_layers * ms["moe"]
        + ms["head"]
    )


def sampling_step_ms(model, cache, B: int, steps: int, repeats: int) -> float:
    """ms per decode step of `model` through `gptoss_jax.sampling`'s jitted greedy loop: the best
    of `repeats` calls of `steps` steps minus the best of 1-step calls, over steps - 1."""
    graphdef, state = nnx.split(model)
    dec = sampling._decode_fn(graphdef, sampling.SamplingParams(0.0, 1.0, 0), (-1,), steps, False)
    logits = jnp.zeros((B, model.cfg.vocab_size), jnp.float32)
    common = (jax.random.key(0), jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32))

    def decode(n):
        out = dec(state, cache, logits, *common, jnp.full((B,), n, jnp.int32))
        jax.block_until_ready(out)

    decode(1)
    decode(steps)
    t1 = timing.best(lambda: decode(1), repeats, warmup=0)
    tn = timing.best(lambda: decode(steps), repeats, warmup=0)
    return (tn - t1) / (steps - 1) * 1e3
