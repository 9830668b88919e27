"""gpt-oss as Flax NNX modules: the modules declare weights, `layers`/`attention`/`moe` do the math.

Each weight is declared once (`_declare`: shape, dtype, logical axes, initializer); abstract shapes
(`nnx.eval_shape`), shardings and the checkpoint key map all derive from those declarations.
Weights are stored in the layout their matmul consumes ([in, out], heads split out), so XLA never
copies them per call; the checkpoint loader does the one-time transposes.

MXFP4 experts are two `PackedWeight` variables (blocks, scales) per matrix, not `nnx.Param`s: an
optimizer filtering on `nnx.Param` never sees the frozen packed base. `__call__` reassembles them
into an `MXFP4` pytree for `moe.moe`.

How the math runs is the model's `KernelOptions` (`gptoss_jax.plan`): `__call__` resolves them once
into a `Plan` for its devices and shapes and hands that to every layer. LoRA adapters, when
attached (`gptoss_jax.lora`), sit beside the frozen weights: `layers.linear` adds the attention
projections' updates, the MoE paths the experts'.

    model(tokens, *, positions=None, segment_ids=None, cache=None, capture=False) -> ModelOutput
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax import attention as attn_lib
from gptoss_jax import cache as cache_lib
from gptoss_jax import cpu_matvec, expert_parallel, kernels, layers
from gptoss_jax import moe as moe_lib
from gptoss_jax import sharding as sharding_lib
from gptoss_jax.adapters import AttentionLoRA, ExpertLoRA, LoRAConfig
from gptoss_jax.cache import KVCache
from gptoss_jax.config import ModelConfig
from gptoss_jax.mxfp4 import BLOCK, MXFP4, quantize
from gptoss_jax.plan import KernelOptions, Plan

EXPERT_FORMATS = ("mxfp4", "dense")


class PackedWeight(nnx.Variable):
    """uint8 storage of a frozen MXFP4 weight (blocks or scales); never a trainable Param."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
    logits: jax.Array  # [B, T, V] float32 unless asked otherwise
    cache: Any = None
    intermediates: Any = None  # with capture=True: one dict per layer, see Block.__call__
    router_loss: Any = None  # with router_loss=True: the load-balancing loss, mean over layers
    hidden: Any = None  # with head=False: the final-normed hidden states [B, T, D] (logits is None)


def _normal(std=0.02):
    return lambda key, shape, dtype: (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def _ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


class _Keys:
    """Per-weight PRNG keys folded from one base key. Drawing every key from `nnx.Rngs` instead
    updates an RNG counter variable per weight, which makes tracing the full model quadratic."""

    def __init__(self, key):
        self.key, self.count = key, 0

    def __call__(self):
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


def _declare(keys: _Keys, shape, axes, dtype, init, kind=nnx.Param):
    assert len(shape) == len(axes), (shape, axes)
    return kind(init(keys(), tuple(shape), dtype), axes=tuple(axes), eager_sharding=False)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, keys: _Keys):
        D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = cfg.sliding_window if cfg.is_sliding(layer) else None
        self.norm = _declare(keys, (D,), ("embed",), jnp.float32, _ones)
        self.q = _declare(keys, (D, N, H), ("embed", "q_heads", "head_dim"), dtype, _normal())
        self.q_bias = _declare(keys, (N, H), ("q_heads", "head_dim"), dtype, _zeros)
        self.k = _declare(keys, (D, K, H), ("embed", "kv_heads", "head_dim"), dtype, _normal())
        self.k_bias = _declare(keys, (K, H), ("kv_heads", "head_dim"), dtype, _zeros)
        self.v = _declare(keys, (D, K, H), ("embed", "kv_heads", "head_dim"), dtype, _normal())
        self.v_bias = _declare(keys, (K, H), ("kv_heads", "head_dim"), dtype, _zeros)
        self.o = _declare(keys, (N, H, D), ("q_heads", "head_dim", "embed"), dtype, _normal())
        self.o_bias = _declare(keys, (D,), ("embed",), dtype, _zeros)
        # Stored fp32 (an exact upcast of the bf16 checkpoint values), as every reference does.
        self.sinks = _declare(keys, (N,), ("q_heads",), jnp.float32, _zeros)
        self.lora: AttentionLoRA | None = nnx.data(None)  # adapters, attached by lora.add_lora

    def adapter(self, name: str):
        return None if self.lora is None else self.lora.adapter(name)

    def qkv(self, x, rope, *, eps, mesh=None, native_rows: int = 0):
        """Residual input x [B, T, D] -> rotated q [B, T, N, H], rotated k and v [B, T, K, H]."""
        cos, sin = rope
        h = layers.rms_norm(x, self.norm[...], eps)

        def proj(name, spec):
            y = layers.linear(h, getattr(self, name)[...], spec, adapter=self.adapter(name), native_rows=native_rows)
            y = (y + getattr(self, name + "_bias")[...].astype(jnp.float32)).astype(x.dtype)
            # batch over the batch axes and heads over tensor, both at once
            return sharding_lib.constrain(y, ("batch", "length", "act_heads", None), mesh)

        q = layers.apply_rope(proj("q", "BTD,DNH->BTNH"), cos, sin)
        k = layers.apply_rope(proj("k", "BTD,DKH->BTKH"), cos, sin)
        return q, k, proj("v", "BTD,DKH->BTKH")

    def __call__(
        self,
        x,
        rope,
        *,
        positions,
        segment_ids,
        eps,
        cache=None,
        valid=None,
        plan: Plan,
        capture=False,
        mesh=None,
        empty_cache=False,
    ):
        q, k, v = self.qkv(x, rope, eps=eps, mesh=mesh, native_rows=plan.native_rows)
        written = None
        if cache is not None and empty_cache:
            # Nothing to read from the cache: the new tokens attend among themselves on the plan's
            # path (the kernels), with their keys and values rounded as the cache holds them, the
            # padding (segment 0) apart; then they are written.
            written = cache_lib.write(cache, k, v, positions=positions, valid=valid)
            k, v = (t.astype(cache.k.dtype).astype(t.dtype) for t in (k, v))
            segment_ids, cache = valid.astype(jnp.int32), None
        impl = plan.attention if cache is None and not capture else "xla"
        if impl == "cpu_native" and q.shape[-1] % 16 == 0:
            out, sink_mass = cpu_matvec.prefill_attention(
                q, k, v, self.sinks[...], positions, segment_ids, window=self.window
            )
        elif impl not in ("xla", "cpu_native"):
            # The kernels mask by index within segments: equal to the position mask for packed or
            # padded rows. They do not report the sink mass, so capture=True stays on XLA.
            out = _kernel_attention(
                q,
                k,
                v,
                self.sinks[...],
                segment_ids,
                window=self.window,
                impl=impl,
                interpret=plan.interpret,
                mesh=mesh,
            )
            sink_mass = None
        elif cache is None:
            out, sink_mass = attn_lib.self_attention(
                q, k, v, self.sinks[...], positions=positions, segment_ids=segment_ids, window=self.window
            )
        else:
            out, sink_mass, cache = cache_lib.update_and_attend(
                cache, q, k, v, self.sinks[...], positions=positions, valid=valid, native=plan.native_rows > 0
            )
        o = layers.linear(out, self.o[...], "BTNH,NHD->BTD", adapter=self.adapter("o"), native_rows=plan.native_rows)
        return (
            (o + self.o_bias[...].astype(jnp.float32)).astype(x.dtype),
            sink_mass,
            cache if written is None else written,
        )


def _kernel_attention(q, k, v, sinks, segment_ids, *, window, impl, interpret, mesh):
    """The Pallas attention kernel; on a mesh one call per device on its own rows and heads
    (XLA cannot partition a Pallas call: Mosaic refuses, and a Triton call would be replicated)."""
    call = lambda q, k, v, sinks, seg: kernels.attention(
        q, k, v, sinks, sliding_window=window, segment_ids=seg, implementation=impl, interpret=interpret
    )
    if mesh is None or mesh.size == 1:
        return call(q, k, v, sinks, segment_ids)
    axes = ("batch", None, "act_heads", None)
    q_spec, k_spec = (sharding_lib.logical_to_spec(axes, a.shape, mesh) for a in (q, k))
    if q_spec[2] != k_spec[2]:  # query and kv heads must split alike, or the groups would not align
        q_spec = k_spec = jax.sharding.PartitionSpec(q_spec[0], None, None, None)
    P = jax.sharding.PartitionSpec
    fn = jax.shard_map(
        call,
        mesh=mesh,
        in_specs=(q_spec, k_spec, k_spec, P(q_spec[2]), P(q_spec[0], None)),
        out_specs=q_spec,
        check_vma=False,
    )
    return fn(q, k, v, sinks, segment_ids)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, experts: str, keys: _Keys):
        D, E, F = cfg.d_model, cfg.num_experts, cfg.expert_dim
        self.k, self.alpha, self.limit = cfg.experts_per_token, cfg.swiglu_alpha, cfg.swiglu_limit
        self.experts = experts
        self.norm = _declare(keys, (D,), ("embed",), jnp.float32, _ones)
        self.router = _declare(keys, (D, E), ("embed", "experts"), dtype, _normal())
        self.router_bias = _declare(keys, (E,), ("experts",), dtype, _zeros)
        self.b1 = _declare(keys, (E, 2 * F), ("experts", "expert_mlp"), dtype, _zeros)
        self.b2 = _declare(keys, (E, D), ("experts", "embed"), dtype, _zeros)
        if experts == "dense":
            self.w1 = _declare(keys, (E, D, 2 * F), ("experts", "embed", "expert_mlp"), dtype, _normal())
            self.w2 = _declare(keys, (E, F, D), ("experts", "expert_mlp", "embed"), dtype, _normal())
        elif experts == "mxfp4":
            cfg.validate_mxfp4()
            # Checkpoint layout: [E, out, in/32, 16] blocks and [E, out, in/32] scales.
            w1 = quantize(_normal()(keys(), (E, 2 * F, D), jnp.float32))
            w2 = quantize(_normal()(keys(), (E, D, F), jnp.float32))
            ax1 = ("experts", "expert_mlp", "embed_blocks")
            ax2 = ("experts", "embed", "expert_mlp_blocks")
            self.w1_blocks = PackedWeight(w1.blocks, axes=ax1 + (None,), eager_sharding=False)
            self.w1_scales = PackedWeight(w1.scales, axes=ax1, eager_sharding=False)
            self.w2_blocks = PackedWeight(w2.blocks, axes=ax2 + (None,), eager_sharding=False)
            self.w2_scales = PackedWeight(w2.scales, axes=ax2, eager_sharding=False)
        else:
            raise ValueError(f"experts must be one of {EXPERT_FORMATS}, got {experts!r}")
        self.lora: ExpertLoRA | None = nnx.data(None)  # per-expert adapters, attached by lora.add_lora

    def expert_weights(self) -> moe_lib.ExpertWeights:
        if self.experts == "mxfp4":
            w1 = MXFP4(self.w1_blocks[...], self.w1_scales[...])
            w2 = MXFP4(self.w2_blocks[...], self.w2_scales[...])
        else:
            w1, w2 = self.w1[...], self.w2[...]
        lora1 = lora2 = None
        if self.lora is not None:
            lora1, lora2 = self.lora.adapter("w1"), self.lora.adapter("w2")
        return moe_lib.ExpertWeights(w1, self.b1[...], w2, self.b2[...], lora1, lora2)

    def __call__(self, x, *, eps, plan: Plan, mesh=None):
        """-> (out, routing, dropped): `dropped` counts (token, expert) assignments lost to a
        capacity limit (always 0 unless `KernelOptions.capacity_factor` is set on a mesh)."""
        B, T, D = x.shape
        h = layers.rms_norm(x, self.norm[...], eps).reshape(B * T, D)
        if mesh is not None and mesh.size > 1:
            y, routing, dropped = expert_parallel.moe_sharded(
                h,
                self.router[...],
                self.router_bias[...],
                self.expert_weights(),
                mesh=mesh,
                k=self.k,
                alpha=self.alpha,
                limit=self.limit,
                dispatch=plan.expert_dispatch,
                capacity_factor=plan.capacity_factor,
                local_impl=plan.moe,
                mxfp4_impl=plan.mxfp4,
                interpret=plan.interpret,
                emulate_ragged=plan.emulate_ragged,
                platform=plan.platform,
            )
        else:
            y, routing = moe_lib.moe(
                h,
                self.router[...],
                self.router_bias[...],
                self.expert_weights(),
                k=self.k,
                alpha=self.alpha,
                limit=self.limit,
                impl=plan.moe,
                **plan.moe_options(),
            )
            dropped = jnp.zeros((), jnp.int32)
        return y.reshape(B, T, D), routing, dropped

    def expert_outputs(self, x, routing: moe_lib.Routing, *, eps):
        """[B, T, k, D] fp32: each chosen expert's output for each token, before the routing
        weights (see `moe.expert_outputs`)."""
        B, T, D = x.shape
        h = layers.rms_norm(x, self.norm[...], eps).reshape(B * T, D)
        y = moe_lib.expert_outputs(h, self.expert_weights(), routing, alpha=self.alpha, limit=self.limit)
        return y.reshape(B, T, self.k, D)


CAPTURE_MODES = (False, True, "experts")


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, experts: str, keys: _Keys):
        self.attn = Attention(cfg, layer, dtype=dtype, keys=keys)
        self.mlp = MoE(cfg, dtype=dtype, experts=experts, keys=keys)

    def __call__(
        self,
        x,
        rope,
        *,
        positions,
        segment_ids,
        eps,
        plan: Plan,
        capture=False,
        cache=None,
        valid=None,
        mesh=None,
        router_loss=False,
        empty_cache=False,
    ):
        """-> (out, cache, intermediates or None, load-balancing loss or None)."""
        with jax.named_scope("attention"):
            a, sink_mass, cache = self.attn(
                x,
                rope,
                positions=positions,
                segment_ids=segment_ids,
                eps=eps,
                cache=cache,
                valid=valid,
                plan=plan,
                capture=capture,
                mesh=mesh,
                empty_cache=empty_cache,
            )
        x_mid = x + a
        with jax.named_scope("moe"):
            m, routing, dropped = self.mlp(x_mid, eps=eps, plan=plan, mesh=mesh)
        out = x_mid + m
        balance = None
        if router_loss:
            mask = None if valid is None else valid.reshape(-1)
            balance = moe_lib.load_balancing_loss(routing, mask)
        if not capture:
            return out, cache, None, balance
        B, T = x.shape[:2]
        inter = {
            "residual": x,  # [B, T, D] the stream entering this layer
            "attn_out": a,  # [B, T, D] what attention added (after the output projection)
            "residual_mid": x_mid,  # residual + attn_out: the MoE's input
            "mlp_out": m,  # [B, T, D] what the MoE added
            "residual_out": out,  # residual_mid + mlp_out: the stream leaving this layer
            "sink_mass": sink_mass,  # [B, T, N] probability each query head gave its sink
            "router_logits": routing.logits.reshape(B, T, -1),  # [B, T, E] fp32
            "expert_ids": routing.ids.reshape(B, T, -1),  # [B, T, k] best first
            "expert_weights": routing.weights.reshape(B, T, -1),  # [B, T, k] softmax over the k
            "dropped": dropped,  # (token, expert) assignments dropped for capacity (mesh only)
        }
        if capture == "experts":  # [B, T, k, D] each chosen expert's output, before its weight
            inter["expert_out"] = self.mlp.expert_outputs(x_mid, routing, eps=eps)
        return out, cache, inter, balance


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}  # keys: plan.REMAT


def _rematerialized(block: Block, policy):
    """`block` as a function whose activations the backward pass recomputes under `policy`."""
    graphdef, state = nnx.split(block)

    @functools.partial(jax.checkpoint, policy=policy, static_argnums=(5,))
    def run(state, x, rope, positions, segment_ids, kw):
        return nnx.merge(graphdef, state)(
            x, rope, positions=positions, segment_ids=segment_ids, valid=segment_ids != 0, **dict(kw)
        )

    return lambda x, rope, *, positions, segment_ids, valid, **kw: run(
        state, x, rope, positions, segment_ids, tuple(sorted(kw.items()))
    )


class GptOss(nnx.Module):
    """The gpt-oss decoder. `dtype` is the parameter and activation dtype (bf16 by default; fp32 is
    the parity mode); norm gains and sinks are always fp32. `experts` picks packed MXFP4 or dense
    expert weights."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.bfloat16,
        experts: str = "mxfp4",
        kernel: KernelOptions | None = None,
        mesh=None,
    ):
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.kernel = kernel or KernelOptions()  # how the math runs: resolved into a `Plan` per call
        self.mesh = mesh  # where the weights live; set by init/load(mesh=...) or sharding.shard_model
        self.lora_config: LoRAConfig | None = None  # set by lora.add_lora
        keys = _Keys(rngs.params())
        self.embed = _declare(keys, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), dtype, _normal())
        self.layers = nnx.List([Block(cfg, i, dtype=dtype, experts=experts, keys=keys) for i in range(cfg.num_layers)])
        self.norm = _declare(keys, (cfg.d_model,), ("embed",), jnp.float32, _ones)
        self.unembed = _declare(keys, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), dtype, _normal())

    @property
    def experts(self) -> str:
        return self.layers[0].mlp.experts

    def plan(self, tokens: int) -> Plan:
        """How a call on `tokens` rows (batch x length) runs on this model's devices: `self.kernel`
        with every open choice made (`plan.KernelOptions.resolve`)."""
        cfg = self.cfg
        packed = 4 * cfg.num_experts * 3 * cfg.expert_dim * cfg.d_model if self.experts == "mxfp4" else 0
        return self.kernel.resolve(
            self.mesh,
            tokens=tokens,
            num_experts=cfg.num_experts,
            k=cfg.experts_per_token,
            packed_bytes=packed,
            bf16=jnp.dtype(self.dtype) == jnp.bfloat16,
        )

    def __call__(
        self,
        tokens,
        *,
        positions=None,
        segment_ids=None,
        cache: KVCache | None = None,
        capture=False,
        logits_at=None,
        logits_dtype=jnp.float32,
        router_loss=False,
        head: bool = True,
        empty_cache: bool = False,
    ) -> ModelOutput:
        """tokens [B, T] int, ids in [0, vocab_size): others raise `TokenIdError`, on the host for a
            concrete array and from inside the program under jit (on a mesh or a TPU they are
            logged; see `traced_token_check`).

        positions: absolute positions [B, T]; default 0..T-1, or continuing from the cache.
        segment_ids: [B, T] documents packed in a row attend only within themselves. With a cache,
            a row holds one sequence and segment_ids == 0 marks right padding (not written).
        cache: a `KVCache` (see `gptoss_jax.cache.init_cache`); the updated one is returned.
        empty_cache: the caller's promise that `cache` holds no tokens yet (a prompt's first
            chunk): the new tokens then attend among themselves on the plan's attention path (the
            Pallas or native CPU kernel where one runs; through the cache it is XLA's, over every
            slot) and are written after. The same function as through the cache; static.
        logits_at: [B] index per row; return logits [B, 1, V] of that token only (prefill).
        capture: False (the default: nothing extra is computed or returned) | True: return
            `ModelOutput.intermediates`, one dict per layer (residual stream before/after each
            block, attention and MoE outputs, per-head sink mass, router logits, top-k ids and
            weights; see `Block.__call__`) | "experts": also each chosen expert's own output.
            Attention then runs on the XLA path (the kernels do not report the sink mass).
        head: False skips the output head and returns the final-normed hidden states as
            `ModelOutput.hidden` (for a loss that makes the logits in chunks,
            `train.losses.chunked_token_cross_entropy`).
        router_loss: also return the router's load-balancing loss (`moe.load_balancing_loss` over
            the non-padding tokens, averaged over layers) as `ModelOutput.router_loss`.
        """
        cfg = self.cfg
        tokens = _check_tokens(tokens, cfg.vocab_size, self.mesh)
        B, T = tokens.shape
        if positions is None:
            start = cache.lengths[:, None] if cache is not None else 0
            positions = start + jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
            if tuple(arr.shape) != (B, T):
                raise ValueError(f"{name} must have the tokens' shape {(B, T)}, got {tuple(arr.shape)}")
        valid = segment_ids != 0
        if not any(capture is m for m in CAPTURE_MODES) and capture != "experts":
            raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {capture!r}")
        if cache is not None and len(cache.layers) != cfg.num_layers:
            raise ValueError(f"cache has {len(cache.layers)} layers, the model {cfg.num_layers}")

        with jax.named_scope("embed"):
            x = layers.embed_lookup(self.embed[...], tokens).astype(self.dtype)
            x = sharding_lib.constrain(x, ("batch", "length", "act_embed"), self.mesh)
        rope = layers.rope_cos_sin(positions, layers.rope_inv_freq(cfg), cfg.rope_concentration)
        captured, new_layers, balance = [], [], []
        plan = self.plan(B * T)
        policy = REMAT_POLICIES[plan.remat]
        for i, block in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                run = block if plan.remat == "none" or cache is not None else _rematerialized(block, policy)
                x, layer_cache, inter, lb = run(
                    x,
                    rope,
                    positions=positions,
                    segment_ids=segment_ids,
                    eps=cfg.rms_eps,
                    plan=plan,
                    capture=capture,
                    cache=None if cache is None else cache.layers[i],
                    valid=valid,
                    mesh=self.mesh,
                    router_loss=router_loss,
                    empty_cache=empty_cache,
                )
            captured.append(inter)
            new_layers.append(layer_cache)
            balance.append(lb)
        if cache is not None:
            cache = KVCache(new_layers, cache.lengths + jnp.sum(valid, axis=1).astype(jnp.int32))
        with jax.named_scope("unembed"):
            if logits_at is not None:
                x = jnp.take_along_axis(x, jnp.asarray(logits_at)[:, None, None], axis=1)
            h = layers.rms_norm(x, self.norm[...], cfg.rms_eps)
            if not head:
                return ModelOutput(
                    None,
                    cache,
                    captured if capture else None,
                    jnp.mean(jnp.stack(balance)) if router_loss else None,
                    hidden=h,
                )
            logits = layers.unembed(h, self.unembed[...], **plan.unembed_options())
            logits = logits.astype(logits_dtype)
            logits = sharding_lib.constrain(logits, ("batch", "length", "act_vocab"), self.mesh)
        return ModelOutput(
            logits, cache, captured if capture else None, jnp.mean(jnp.stack(balance)) if router_loss else None
        )


class TokenIdError(ValueError):
    """Token ids outside the model's vocabulary [0, vocab_size)."""


def _token_range_message(lo: int, hi: int, vocab_size: int) -> str:
    return f"token ids must lie in [0, {vocab_size}); got values in [{lo}, {hi}]"


# Whether a traced forward (under jax.jit and friends) checks its token ids on the device; the
# library's own loops whose ids are checked on the host (generate) switch it off while tracing.
_TRACED_CHECK = contextvars.ContextVar("gptoss_jax_traced_token_check", default=True)


@contextlib.contextmanager
def traced_token_check(enabled: bool):
    """Turn the in-program token-id check of forwards *traced* inside this block on or off.

    A concrete token array is always checked on the host. Under a transformation (`jax.jit`,
    `nnx.jit`, `jax.grad`, ...) the ids are values inside the program; by default the forward then
    adds a host callback that raises `TokenIdError` when min/max fall outside [0, vocab_size)
    (the call fails with a `jax.errors.JaxRuntimeError` carrying that message) instead of letting
    the embedding gather clamp them (id -1 would read the last row). It costs one reduction and one
    device-to-host transfer of two scalars per forward. `enabled=False` leaves it out of programs
    traced in the block (callers that checked their ids on the host, as `generate` does). The
    setting is read when a function is traced, not when an already compiled one runs.

    Where a device stopping alone could leave the others waiting in a collective, the check logs
    the error (logger `gptoss_jax.model`) and the program runs on with the clamped ids instead:
    for a model sharded over several devices (`model.mesh`), and on TPU (no per-device callbacks
    there). Programs lowered for a platform this host has no backend for (compile-only targets,
    `gptoss compile`) carry no check."""
    token = _TRACED_CHECK.set(bool(enabled))
    try:
        yield
    finally:
        _TRACED_CHECK.reset(token)


def _raise_on_bad_token_range(lo, hi, *, vocab_size: int) -> None:
    lo, hi = int(np.min(lo)), int(np.max(hi))
    if lo < 0 or hi >= vocab_size:
        raise TokenIdError(_token_range_message(lo, hi, vocab_size))


def _log_bad_token_range(lo, hi, *, vocab_size: int) -> None:
    lo, hi = int(np.min(lo)), int(np.max(hi))
    if lo < 0 or hi >= vocab_size:
        logging.getLogger(__name__).error(
            "%s (this jitted forward runs on a mesh or a TPU, where it cannot stop: the embedding clamped them)",
            _token_range_message(lo, hi, vocab_size),
        )


def _backend_present(platform: str) -> bool:
    try:
        return bool(jax.devices(platform))
    except RuntimeError:
        return False


def _traced_token_range_check(tokens, vocab_size: int, sharded: bool) -> None:
    """Adds the in-program check to the traced computation (see `traced_token_check`)."""

    def callback(fn, partitioned: bool):
        def branch(lo, hi):
            jax.debug.callback(functools.partial(fn, vocab_size=vocab_size), lo, hi, partitioned=partitioned)
            return jnp.zeros((), jnp.int32)

        return branch

    def skip(lo, hi):
        return jnp.zeros((), jnp.int32)

    # A raising callback stops the device it runs on. With the weights sharded, the other devices
    # may then wait forever in a collective (seen on CPU, whose devices run concurrently), so a
    # sharded model only logs, once. Otherwise the callback runs on every device of the program
    # (partitioned: same global min/max everywhere), which then all stop at the check. TPU has no
    # partitioned callbacks: it logs too. A platform without a local backend (a compile-only
    # target) cannot lower a callback at all and gets none.
    logged = callback(_log_bad_token_range, False)
    raising = logged if sharded else callback(_raise_on_bad_token_range, True)
    gpu = raising if _backend_present("gpu") else skip
    jax.lax.platform_dependent(
        jnp.min(tokens),
        jnp.max(tokens),
        cpu=raising if _backend_present("cpu") else skip,
        cuda=gpu,
        rocm=gpu,
        tpu=logged if _backend_present("tpu") else skip,
        default=skip,
    )


class _QuietTokenIdErrors(logging.Filter):
    """JAX logs a callback's exception with its traceback before re-raising it; a TokenIdError is
    a user error whose message the raised JaxRuntimeError already carries."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], TokenIdError))


logging.getLogger("jax._src.debugging").addFilter(_QuietTokenIdErrors())


def _check_tokens(tokens, vocab_size: int, mesh=None):
    """Shape, dtype and id range of `tokens` [B, T].

    Ids outside [0, vocab_size) are an error, never clamped: a concrete array is checked here on
    the host (`TokenIdError`, a ValueError); a traced one (under jit) gets an in-program check that
    fails the call when it runs (see `traced_token_check`, also for what TPUs do)."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim == 1:
        raise ValueError(f"tokens must be [batch, time]; got shape {tokens.shape} (add a batch axis)")
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array [batch, time], got {tokens.dtype}{list(tokens.shape)}")
    if not tokens.size:
        return tokens
    if not isinstance(tokens, jax.core.Tracer):
        host = np.asarray(tokens)  # numpy: inside jit a closed-over array's min() would be traced
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= vocab_size:
            raise TokenIdError(_token_range_message(lo, hi, vocab_size))
    elif _TRACED_CHECK.get():
        _traced_token_range_check(tokens, vocab_size, sharded=mesh is not None and mesh.size > 1)
    return tokens


# ------------------------------------------------------------------------------- construction
def init(
    cfg: ModelConfig,
    *,
    seed: int = 0,
    dtype=jnp.bfloat16,
    experts: str = "mxfp4",
    kernel: KernelOptions | None = None,
    mesh=None,
) -> GptOss:
    """A model with random weights (normal(0.02) matrices, zero biases and sinks, unit norms).

    With `mesh`, every weight is created already sharded by its logical axes (never whole on one
    device, nor on one host); JAX's partitionable threefry makes the values independent of the
    mesh, so one seed gives the same weights on every mesh."""
    build = lambda: GptOss(cfg, rngs=nnx.Rngs(seed), dtype=dtype, experts=experts, kernel=kernel, mesh=mesh)
    if mesh is None:
        return build()
    graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
    paths = [p for p, _ in nnx.to_flat_state(abstract_state)]
    shardings = sharding_lib.variable_shardings(abstract_state, mesh)
    make = jax.jit(
        lambda: [v.get_value() for _, v in nnx.to_flat_state(nnx.split(build())[1])],
        out_shardings=[shardings[p] for p in paths],
    )
    values = dict(zip(paths, make()))
    for p, var in nnx.to_flat_state(abstract_state):
        var.set_value(values[p])
    return nnx.merge(graphdef, abstract_state)


def abstract(
    cfg: ModelConfig, *, dtype=jnp.bfloat16, experts: str = "mxfp4", kernel: KernelOptions | None = None, mesh=None
) -> GptOss:
    """The model with `jax.ShapeDtypeStruct` leaves: no memory, for shapes, counts and loading."""
    return nnx.eval_shape(lambda: GptOss(cfg, rngs=nnx.Rngs(0), dtype=dtype, experts=experts, kernel=kernel, mesh=mesh))


def parameter_count(model: GptOss) -> int:
    """Logical parameter count: a packed MXFP4 byte holds two weights; scales are not counted."""
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
        shape = var.get_value().shape
        if isinstance(var, PackedWeight):
            total += int(np.prod(shape)) * 2 if str(path[-1]).endswith("_blocks") else 0
        else:
            total += int(np.prod(shape))
    return total


def parameter_bytes(model: GptOss) -> int:
    """Bytes the parameters occupy as stored (packed experts at about 4.25 bits per weight)."""
    return sum(
        int(np.prod(v.get_value().shape)) * jnp.dtype(v.get_value().dtype).itemsize
        for _, v in nnx.to_flat_state(nnx.state(model))
    )


__all__ = [
    "GptOss",
    "ModelOutput",
    "PackedWeight",
    "init",
    "abstract",
    "parameter_count",
    "parameter_bytes",
    "EXPERT_FORMATS",
    "BLOCK",
]
