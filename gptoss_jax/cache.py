"""KV cache: a ring buffer of W entries for sliding layers, a full-length buffer for full layers.

A sliding layer never looks further back than W-1 tokens, so it keeps only W slots: the key of
absolute position p lives in slot p % W. Full layers keep slot = position. Every slot also stores
the absolute position it holds (-1 when empty), so masks are computed from positions exactly as
without a cache, and rows of a batch can hold sequences of different lengths.

Order of operations for new tokens (a prefill chunk or one decode step):
- full layers write the new keys first (slots never collide) and attend over the buffer;
- sliding layers attend over [ring ++ new keys] and only then fold the new keys into the ring,
  because within a chunk longer than one token, earlier queries still need keys that later
  tokens of the same chunk will overwrite.
Padding tokens (right padding of shorter prompts) are never written.

For gpt-oss-20b half of the layers are sliding, so the cache is about half of a full-length cache
on every layer (`cache_bytes`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax import cpu_matvec
from gptoss_jax.attention import attention_reference
from gptoss_jax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    k: jax.Array  # [B, S, K, H] post-RoPE keys
    v: jax.Array  # [B, S, K, H]
    pos: jax.Array  # [B, S] int32 absolute position held by each slot, -1 = empty
    window: int | None = dataclasses.field(default=None, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    layers: list[LayerCache]
    lengths: jax.Array  # [B] int32 tokens seen so far per row (the next token's position)

    @property
    def max_length(self) -> int:
        return max(l.k.shape[1] for l in self.layers)


def init_cache(cfg: ModelConfig, batch: int, max_length: int, dtype=jnp.bfloat16) -> KVCache:
    """Empty cache for `batch` rows of up to `max_length` tokens each."""
    if max_length > cfg.max_position:
        raise ValueError(f"max_length {max_length} exceeds the model's context of {cfg.max_position} tokens")
    layers = []
    for i in range(cfg.num_layers):
        window = cfg.sliding_window if cfg.is_sliding(i) else None
        size = min(window, max_length) if window is not None else max_length
        shape = (batch, size, cfg.num_kv_heads, cfg.head_dim)
        layers.append(
            LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, size), -1, jnp.int32), window)
        )
    return KVCache(layers, jnp.zeros((batch,), jnp.int32))


def cache_bytes(cfg: ModelConfig, batch: int, max_length: int, dtype=jnp.bfloat16) -> int:
    """Bytes of `init_cache(cfg, batch, max_length, dtype)`, computed without allocating."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, batch, max_length, dtype))
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def _scatter_rows(buf, slots, values):
    """buf [B, S, ...] with values [B, T, ...] written at slots [B, T]; slot S (out of range) drops."""
    b = jnp.arange(buf.shape[0])[:, None]
    return buf.at[b, slots].set(values, mode="drop")


def _attend(q, k, v, sinks, *, positions, k_pos, window, native):
    """The new queries q [B, T, N, H] over keys k/v [B, S, K, H] holding positions k_pos [B, S]
    (-1: empty). With `native` and one query per row (a decode step) through the CPU kernel
    (`cpu_matvec.decode_attention`), else XLA."""
    if native and q.shape[1] == 1:
        out, mass = cpu_matvec.decode_attention(q[:, 0], k, v, sinks, k_pos, positions[:, 0], window=window)
        return out[:, None].astype(q.dtype), mass[:, None]
    ones = jnp.ones((positions.shape[0], 1), jnp.int32)
    return attention_reference(
        q, k, v, sinks, q_pos=positions, k_pos=k_pos, q_seg=ones, k_seg=ones, window=window, k_valid=k_pos >= 0
    )


def write(layer: LayerCache, k, v, *, positions, valid) -> LayerCache:
    """`layer` with the new keys/values k, v [B, T, K, H] at positions [B, T] written in (padding,
    valid == False, is not). A sliding layer keeps each row's last S valid new tokens."""
    S = layer.k.shape[1]
    k, v = k.astype(layer.k.dtype), v.astype(layer.v.dtype)
    if layer.window is None:
        slots = jnp.where(valid, positions, S)
    else:
        # Only the last S valid new tokens: their slots are distinct, so the scatter is exact.
        T = positions.shape[1]
        n_valid = jnp.sum(valid, axis=1, keepdims=True)
        keep = valid & (n_valid - 1 - jnp.arange(T)[None, :] < S)
        slots = jnp.where(keep, positions % S, S)
    return LayerCache(
        _scatter_rows(layer.k, slots, k),
        _scatter_rows(layer.v, slots, v),
        _scatter_rows(layer.pos, slots, positions),
        layer.window,
    )


def update_and_attend(layer: LayerCache, q, k, v, sinks, *, positions, valid, native: bool = False):
    """Attention of new tokens through the cache. q [B, T, N, H], k/v [B, T, K, H],
    positions/valid [B, T]. Returns (out, sink_mass, new LayerCache). `native`: a decode step
    (T = 1) attends through the CPU kernel (the model's plan sets it where the kernels run)."""
    k, v = k.astype(layer.k.dtype), v.astype(layer.v.dtype)
    if layer.window is None:
        layer = write(layer, k, v, positions=positions, valid=valid)
        out, mass = _attend(
            q, layer.k, layer.v, sinks, positions=positions, k_pos=layer.pos, window=None, native=native
        )
        return out, mass, layer
    k_all = jnp.concatenate([layer.k, k], axis=1)
    v_all = jnp.concatenate([layer.v, v], axis=1)
    pos_all = jnp.concatenate([layer.pos, jnp.where(valid, positions, -1)], axis=1)
    out, mass = _attend(q, k_all, v_all, sinks, positions=positions, k_pos=pos_all, window=layer.window, native=native)
    return out, mass, write(layer, k, v, positions=positions, valid=valid)
