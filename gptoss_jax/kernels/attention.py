"""Attention kernels: one entry point, the block-sparsity map, and the reference they must match.

    attention(q, k, v, sinks, *, sliding_window=None, segment_ids=None, sm_scale=None,
              implementation="xla", interpret=False, block_sizes=None)

q [B, T, N, H], k/v [B, T, K, H] (self-attention, token i at position i within its row), sinks [N]
fp32, segment_ids [B, T] int32. Key j is visible from query i iff j <= i, i - j < W (sliding) and
both tokens share a segment. Within a segment, index differences equal position differences, so
this is the model's position-based mask for packed and padded batches.

`implementation`: "xla" (the chunked O(T*W) XLA path of `gptoss_jax.attention`, also the CPU
default), "pallas_gpu" (Pallas on Triton), "pallas_tpu" (Pallas on Mosaic TPU).

Block sparsity is data computed at trace time (`attention_block_map`): for each query block, the
KV blocks it must visit, each marked FULL (every pair visible by position: no mask needed) or
PARTIAL (needs the mask). A sliding layer with block_q == block_k visits at most
ceil((W-1)/block_k) + 1 KV blocks per query block instead of all of them.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from gptoss_jax import attention as xla_attention
from gptoss_jax.kernels import attention_gpu, attention_tpu
from gptoss_jax.kernels.block_map import (  # noqa: F401  (re-exported: the public names of the map)
    FULL,
    PARTIAL,
    SKIP,
    BlockMap,
    BlockSizes,
    attention_block_map,
    transpose_block_map,
)

IMPLEMENTATIONS = ("xla", "pallas_gpu", "pallas_tpu")


def _positions_and_segments(q, segment_ids):
    """Self-attention's positions (token i at position i of its row) and segment ids (default:
    one segment per row), [B, T] int32 each."""
    B, T = q.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return pos, jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids


def attention_reference(q, k, v, sinks, *, sliding_window=None, segment_ids=None, sm_scale=None):
    """The obvious [T, T] computation in fp32 (returns q's dtype): `gptoss_jax.attention`'s
    `attention_reference` under this module's calling convention."""
    pos, seg = _positions_and_segments(q, segment_ids)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out, _ = xla_attention.attention_reference(
        *f32, sinks, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, window=sliding_window, scale=sm_scale
    )
    return out.astype(q.dtype)


def _check(q, k, v, sinks, segment_ids):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"need q [B,T,N,H] and k/v [B,T,K,H]; got q{q.shape} k{k.shape} v{v.shape}")
    B, T, N, H = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != H or N % k.shape[2]:
        raise ValueError(f"k/v {k.shape} do not fit q {q.shape} (self-attention, N divisible by K)")
    if sinks.shape != (N,):
        raise ValueError(f"sinks must have shape ({N},), got {sinks.shape}")
    if segment_ids is not None and segment_ids.shape != (B, T):
        raise ValueError(f"segment_ids must have shape ({B}, {T}), got {segment_ids.shape}")


def attention(
    q,
    k,
    v,
    sinks,
    *,
    sliding_window: int | None = None,
    segment_ids=None,
    sm_scale=None,
    implementation: str = "xla",
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
):
    """Self-attention with sinks; see the module docstring. Differentiable in q, k, v and sinks."""
    _check(q, k, v, sinks, segment_ids)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if implementation == "xla":
        pos, seg = _positions_and_segments(q, segment_ids)
        if sm_scale is not None:  # the XLA path scales by 1/sqrt(H); fold any other scale into q
            q = (q.astype(jnp.float32) * (sm_scale * math.sqrt(q.shape[-1]))).astype(q.dtype)
        out, _ = xla_attention.self_attention(q, k, v, sinks, positions=pos, segment_ids=seg, window=sliding_window)
        return out
    if implementation == "pallas_gpu":
        return attention_gpu.attention(
            q,
            k,
            v,
            sinks,
            sliding_window=sliding_window,
            segment_ids=segment_ids,
            sm_scale=sm_scale,
            interpret=interpret,
            block_sizes=block_sizes,
        )
    return attention_tpu.attention(
        q,
        k,
        v,
        sinks,
        sliding_window=sliding_window,
        segment_ids=segment_ids,
        sm_scale=sm_scale,
        interpret=interpret,
        block_sizes=block_sizes,
    )
