"""Attention with learned sinks, GQA, causal / sliding-window masks and packed segments.

Masks are data computed from absolute positions and segment ids, never from array indices, so the
same code serves training on packed sequences, left-padded batches and cached decoding:

  key j is visible from query i  <=>  valid_j and seg_i == seg_j and pos_j <= pos_i
                                       and (full layer or pos_i - pos_j < W)

W counts keys *including* the current one: a sliding query sees exactly min(pos+1, W) keys.

The sink S_n of query head n is an extra logit in every row's softmax whose probability mass is
dropped (a virtual key with value 0). It never scales with 1/sqrt(H) or the YaRN factor. A row with
no visible key therefore outputs 0, not NaN.

`attention_reference` materialises the whole [T, S] score matrix and is the obvious oracle (the
kernels' `gptoss_jax.kernels.attention.attention_reference` is it, for their calling convention);
`softmax_with_sink` is the softmax every path here shares.
`sliding_attention` is the O(T*W) XLA path for sliding layers: queries are cut into chunks of W and
each chunk attends to its own and the previous chunk's keys, which hold every key it may see.
`causal_attention` is the full layers' XLA path: query chunks that attend only to the keys up to
their own end, skipping most of the upper triangle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(q_pos, k_pos, q_seg, k_seg, *, window: int | None, k_valid=None) -> jax.Array:
    """[B, T, S] bool from positions/segments [B, T] (queries) and [B, S] (keys)."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = (kp <= qp) & (q_seg[:, :, None] == k_seg[:, None, :])
    if window is not None:
        mask &= (qp - kp) < window
    if k_valid is not None:
        mask &= k_valid[:, None, :]
    return mask


def softmax_with_sink(s, sink):
    """The softmax of masked scores s [..., S] (-inf where masked) with one more logit, the sink
    [...] (broadcast against s's leading axes), whose probability is set aside.

    Returns (p [..., S], the sink's probability [...]): each row of p plus its sink entry sums to
    1, and a row with no visible key gives all its mass to the sink (p = 0, not NaN)."""
    m = jnp.maximum(jnp.max(s, axis=-1), sink)  # finite thanks to the sink
    p = jnp.exp(s - m[..., None])
    p_sink = jnp.exp(sink - m)
    denom = jnp.sum(p, axis=-1) + p_sink
    return p / denom[..., None], p_sink / denom


def attend(q, k, v, sinks, mask, *, scale: float | None = None):
    """Softmax attention with sinks over an explicit mask.

    q [B, T, N, H], k/v [B, S, K, H], sinks [N], mask [B, T, S].
    Returns (out [B, T, N, H] in q's dtype, sink_mass [B, T, N] fp32: the probability each row
    gave its sink)."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    scale = H**-0.5 if scale is None else scale
    # The G query heads of a KV head as one [G*T, H] matrix: a plain batched matmul over (B, K),
    # which XLA:CPU runs 2-3x faster (forward and backward) than the 5-D einsum of the same product.
    qg = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    s = jnp.einsum("BKMH,BKSH->BKMS", qg, kt, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask[:, None, None, :, :], s.reshape(B, K, G, T, S), -jnp.inf)
    sink = sinks.astype(jnp.float32).reshape(1, K, G, 1)  # query head n = K*G index, kv head n // G
    p, sink_mass = softmax_with_sink(s, sink)  # [B, K, G, T, S], [B, K, G, T]
    out = jnp.einsum(
        "BKMS,BKSH->BKMH", p.astype(v.dtype).reshape(B, K, G * T, S), vt, preferred_element_type=jnp.float32
    )
    out = out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
    sink_mass = sink_mass.transpose(0, 3, 1, 2).reshape(B, T, N)
    return out.astype(q.dtype), sink_mass


def attention_reference(
    q, k, v, sinks, *, q_pos, k_pos, q_seg, k_seg, window, k_valid=None, scale: float | None = None
):
    """The obviously-right [T, S] path (also the decode path: S is the cache); `scale` of the
    scores as in `attend` (default 1/sqrt(H))."""
    mask = attention_mask(q_pos, k_pos, q_seg, k_seg, window=window, k_valid=k_valid)
    return attend(q, k, v, sinks, mask, scale=scale)


def sliding_attention(q, k, v, sinks, *, positions, segment_ids, window: int):
    """Self-attention of a sliding layer in O(T*W) memory and compute.

    q [B, T, N, H], k/v [B, T, K, H], positions/segment_ids [B, T]. Keys and queries are the same
    tokens in the same order, and each segment is contiguous with consecutive positions (true for
    packed and padded batches), so every key visible to a query lies within W-1 array slots."""
    B, T, N, H = q.shape
    C = window
    if T <= C:
        return attention_reference(
            q, k, v, sinks, q_pos=positions, k_pos=positions, q_seg=segment_ids, k_seg=segment_ids, window=window
        )
    n = -(-T // C)
    pad = n * C - T

    def chunks(x, fill):
        # Prepend one chunk of filler (the "previous chunk" of chunk 0) and pad the tail.
        x = jnp.pad(x, [(0, 0), (C, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return x.reshape(B, n + 1, C, *x.shape[2:])

    def with_previous(x):  # [B, n+1, C, ...] -> [B, n, 2C, ...]: chunk c-1 followed by chunk c
        return jnp.concatenate([x[:, :-1], x[:, 1:]], axis=2)

    qc = chunks(q, 0)[:, 1:]
    kc, vc = with_previous(chunks(k, 0)), with_previous(chunks(v, 0))
    qpos, qseg = chunks(positions, 0)[:, 1:], chunks(segment_ids, 0)[:, 1:]
    kpos, kseg = with_previous(chunks(positions, 0)), with_previous(chunks(segment_ids, 0))
    kvalid = with_previous(chunks(jnp.ones((B, T), bool), False))

    flat = lambda x: x.reshape(B * n, *x.shape[2:])  # chunks become batch rows
    mask = attention_mask(flat(qpos), flat(kpos), flat(qseg), flat(kseg), window=window, k_valid=flat(kvalid))
    out, sink_mass = attend(flat(qc), flat(kc), flat(vc), sinks, mask)
    out = out.reshape(B, n * C, N, H)[:, :T]
    sink_mass = sink_mass.reshape(B, n * C, N)[:, :T]
    return out, sink_mass


# Full layers: queries in at most this many chunks of at least CAUSAL_MIN_CHUNK rows.
CAUSAL_MAX_CHUNKS = 16
CAUSAL_MIN_CHUNK = 256


def causal_chunk(T: int) -> int:
    """Query rows per chunk of `causal_attention` at length T."""
    return max(CAUSAL_MIN_CHUNK, 8 * -(-T // (8 * CAUSAL_MAX_CHUNKS)))


def causal_attention(q, k, v, sinks, *, positions, segment_ids):
    """Self-attention of a full layer, causal in array order, without the upper triangle: the
    queries are cut into n chunks (an unrolled loop of static shapes) and chunk i attends only to
    keys 0 .. its own end, so the scores cost (n + 1) / 2n of a [T, T] in compute and memory and
    at most T^2 / n live at once. Same contract as `sliding_attention` (queries and keys are the
    same tokens, segments contiguous with increasing positions), so no visible key is skipped."""
    T = q.shape[1]
    C = causal_chunk(T)
    outs, masses = [], []
    for start in range(0, T, C):
        end = min(start + C, T)
        o, m = attention_reference(
            q[:, start:end],
            k[:, :end],
            v[:, :end],
            sinks,
            q_pos=positions[:, start:end],
            k_pos=positions[:, :end],
            q_seg=segment_ids[:, start:end],
            k_seg=segment_ids[:, :end],
            window=None,
        )
        outs.append(o)
        masses.append(m)
    if len(outs) == 1:
        return outs[0], masses[0]
    return jnp.concatenate(outs, axis=1), jnp.concatenate(masses, axis=1)


def self_attention(q, k, v, sinks, *, positions, segment_ids, window: int | None):
    """Training/prefill self-attention on the XLA path: chunked for sliding layers (O(T W)),
    causal chunks without the upper triangle for full layers."""
    if window is not None:
        return sliding_attention(q, k, v, sinks, positions=positions, segment_ids=segment_ids, window=window)
    return causal_attention(q, k, v, sinks, positions=positions, segment_ids=segment_ids)
