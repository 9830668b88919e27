"""Flash attention with sinks, GQA, causal / sliding-window masks and packed segments, in Pallas
on Triton (GPU); `interpret=True` runs the very same kernels on CPU.

    attention(q, k, v, sinks, *, sliding_window=None, segment_ids=None, sm_scale=None,
              interpret=False, block_sizes=None) -> [B, T, N, H] in q's dtype

q [B, T, N, H], k/v [B, T, K, H] (N = K*G), sinks [N] fp32, segment_ids [B, T] int32; the mask is
the one of `gptoss_jax.kernels.attention` (j <= i, i - j < W, same segment). Differentiable in q,
k, v and sinks through a `jax.custom_vjp` whose backward is two fused Pallas kernels.

What is notable:

* GQA without copies. One program owns one (batch, KV head, query block) and loads the q tile as
  the [block_q, G, H] slab of q [B, T, N, H] holding all G query heads of that KV head, reshaped in
  registers to block_q*G rows, token-major (row r is token r // G, head r % G). Every K/V tile is
  therefore loaded once for its G heads and no transpose of q, o, lse or dq is ever written to HBM.
  `block_q` counts *tokens*, as in `attention_block_map`; a tile has R = block_q*G rows. The default
  block_q is 128 // G tokens (R = 128 rows, the usual Triton flash tile at head_dim 64), block_k 64.
* Sinks are folded into the online softmax: each row starts with m = sink and l = 1 (the sink's own
  exp(sink - m)), acc = 0. The running max is then always finite, a masked score is plain -inf, and
  a row that sees no key ends with acc = 0, i.e. output 0, exactly as the reference. The saved
  log-sum-exp includes the sink: lse = m + log(l).
* Block sparsity is trace-time data: `attention_block_map` gives, per query block, the KV blocks to
  visit (kv_index), their kind (FULL / PARTIAL) and their number. The kernel loops `fori_loop(0,
  num_visits[i])` reading kv_index, and a FULL tile takes a branch with no positional mask at all
  (with segment ids it still compares segments, which are data). The dK/dV kernel walks the
  transposed map (`block_map.transpose_block_map`): for each KV block, the query blocks that visit it.
* Backward. With p = exp(s - lse) (s scaled scores), D = rowsum(dO * O):
    dV = p^T dO,  dS = p * (dO V^T - D),  dQ = scale dS K,  dK = scale dS^T Q,
  and the sink, a logit with value 0, gets dsink_row = p_sink * (0 - D) = -exp(sink - lse) * D,
  summed over batch and tokens per head. D is one elementwise reduction in XLA (not a forward
  re-run); the dQ kernel also emits the per-row dsink terms. dK/dV sum over the G heads for free
  (they are rows of the same tile) and over the query blocks of the transposed map.
* Padding. T is padded (outside the kernels) to a multiple of both block sizes; keys >= T are
  masked in the PARTIAL tiles the map marks for them, padded queries are sliced off and get dO = 0,
  so they contribute nothing to dK/dV/dsinks. A G that is not a power of two is padded with zero
  heads (Triton needs power-of-two tiles).
* Triton: every pallas_call gets `plgpu.CompilerParams(num_warps, num_stages)`, which selects the
  Triton lowering for cuda. fp32 inputs use IEEE dots (precision HIGHEST; Triton's default would be
  TF32), bf16 inputs bf16 dots with fp32 accumulation. Block sizes must be powers of two and the
  tile dims >= 16 (Triton's dot); they are clamped to the sequence for short inputs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gptoss_jax.kernels.block_map import FULL, BlockMap, BlockSizes, attention_block_map, transpose_block_map

TILE_ROWS = 128  # default rows (tokens x heads) of a query tile
DEFAULT_BLOCK_K = 64
MIN_DOT = 16  # Triton's tl.dot needs every dim >= 16


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


# --------------------------------------------------------------------------------------------
# Static configuration and block maps (trace time)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
    T: int  # real sequence length
    Tp: int  # padded sequence length (multiple of both block sizes)
    K: int  # KV heads
    G: int  # real query heads per KV head
    Gp: int  # padded (power-of-two) query heads per KV head
    H: int
    block_q: int  # query tokens per tile (rows = block_q * Gp)
    block_k: int
    window: int | None
    sm_scale: float
    has_seg: bool
    fp32: bool  # inputs are fp32: IEEE dots
    interpret: bool

    @property
    def rows(self) -> int:
        return self.block_q * self.Gp

    @property
    def nq(self) -> int:
        return -(-self.T // self.block_q)

    @property
    def nk(self) -> int:
        return -(-self.T // self.block_k)

    @property
    def precision(self):
        return lax.Precision.HIGHEST if self.fp32 else lax.Precision.DEFAULT

    def compiler_params(self):
        num_warps = 4 if self.rows * self.block_k <= 128 * 64 else 8
        return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)


def effective_block_sizes(T: int, G: int, block_sizes: BlockSizes | None) -> tuple[int, int]:
    """(block_q tokens, block_k) actually used: defaults, then clamped to the (power-of-two rounded)
    sequence, with block_q * Gp and block_k kept >= 16 for Triton's dot."""
    Gp = _next_pow2(G)
    if block_sizes is None:
        bq, bk = max(1, TILE_ROWS // Gp), DEFAULT_BLOCK_K
    else:
        bq, bk = block_sizes.block_q, block_sizes.block_k
    if not (_is_pow2(bq) and _is_pow2(bk)):
        raise ValueError(f"pallas_gpu attention needs power-of-two block sizes, got {bq}, {bk}")
    tp = _next_pow2(T)
    bq = max(min(bq, tp), -(-MIN_DOT // Gp))
    bk = max(min(bk, tp), MIN_DOT)
    return bq, bk


def _block_map(cfg: _Config) -> BlockMap:
    return attention_block_map(cfg.T, block_q=cfg.block_q, block_k=cfg.block_k, sliding_window=cfg.window)


# --------------------------------------------------------------------------------------------
# In-kernel helpers
# --------------------------------------------------------------------------------------------


def _rows(x, bq: int, G: int):
    """[bq] per-token vector -> [bq*G] per-row (token-major: row r is token r // G)."""
    return jnp.broadcast_to(x[:, None], (bq, G)).reshape(bq * G)


def _head_rows(x, bq: int, G: int):
    """[G] per-head vector -> [bq*G] per-row (row r is head r % G)."""
    return jnp.broadcast_to(x[None, :], (bq, G)).reshape(bq * G)


def _scores(q, k, cfg: _Config):
    """q [R, H] . k [bk, H]^T -> [R, bk] fp32, scaled."""
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=cfg.precision, preferred_element_type=jnp.float32)
    return s * cfg.sm_scale


def _mask(s, *, q_tok, k_tok, q_seg, k_seg, positional: bool, cfg: _Config):
    """-inf where the key is invisible; the positional terms only when `positional`."""
    mask = None
    if positional:
        mask = (k_tok[None, :] <= q_tok[:, None]) & (k_tok[None, :] < cfg.T)
        if cfg.window is not None:
            mask = mask & (q_tok[:, None] - k_tok[None, :] < cfg.window)
    if cfg.has_seg:
        seg = q_seg[:, None] == k_seg[None, :]
        mask = seg if mask is None else mask & seg
    if mask is None:
        return s
    return jnp.where(mask, s, -jnp.inf)


def _masked(s, is_full, cfg: _Config, **kw):
    """The mask of one tile as a branch on its kind: FULL tiles never compute the positional mask
    (and are returned untouched without segment ids). Only this select sits under the branch; the
    loads and dots stay at loop level, where Triton can pipeline them."""
    return lax.cond(
        is_full,
        lambda s: _mask(s, positional=False, cfg=cfg, **kw),
        lambda s: _mask(s, positional=True, cfg=cfg, **kw),
        s,
    )


def _dot(a, b, dims, cfg):
    return lax.dot_general(a, b, (dims, ((), ())), precision=cfg.precision, preferred_element_type=jnp.float32)


def _visit_loop(nv, kind_ref, tile, carry, count: bool):
    """fori_loop over the num_visits visits of this block; tile(n, carry, is_full). With count,
    the loop also carries (visits, full visits) int32 counters, returned after carry."""

    def body(n, c):
        if count:
            c, (nvis, nfull) = c[:-2], c[-2:]
        is_full = kind_ref[n] == FULL
        out = tile(n, c, is_full)
        if count:
            out = (*out, nvis + 1, nfull + is_full.astype(jnp.int32))
        return out

    if count:
        carry = (*carry, jnp.int32(0), jnp.int32(0))
    return lax.fori_loop(0, nv, body, carry)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


def _fwd_kernel(*refs, cfg: _Config, count: bool):
    kvi_ref, kind_ref, nv_ref, q_ref, k_ref, v_ref, sink_ref, *refs = refs
    if cfg.has_seg:
        qseg_ref, kseg_ref, *refs = refs
    o_ref, lse_ref, *count_refs = refs
    bq, bk, G, R, H = cfg.block_q, cfg.block_k, cfg.Gp, cfg.rows, cfg.H
    i = pl.program_id(2)

    q = q_ref[...].reshape(R, H)
    sink = _head_rows(sink_ref[...].astype(jnp.float32), bq, G)
    q_tok = _rows(i * bq + lax.broadcasted_iota(jnp.int32, (bq,), 0), bq, G)
    q_seg = _rows(qseg_ref[...], bq, G) if cfg.has_seg else None

    def tile(n, carry, is_full):
        acc, m, l = carry
        start = pl.multiple_of(kvi_ref[n] * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s = _scores(q, k, cfg)
        k_tok = start + lax.broadcasted_iota(jnp.int32, (bk,), 0)
        k_seg = kseg_ref[pl.ds(start, bk)] if cfg.has_seg else None
        s = _masked(s, is_full, cfg, q_tok=q_tok, k_tok=k_tok, q_seg=q_seg, k_seg=k_seg)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))  # finite: m starts at the sink
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, ((1,), (0,)), cfg)
        return acc, m_new, l

    carry = (jnp.zeros((R, H), jnp.float32), sink, jnp.ones((R,), jnp.float32))
    out = _visit_loop(nv_ref[0], kind_ref, tile, carry, count)
    acc, m, l = out[:3]
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype).reshape(bq, G, H)
    lse_ref[...] = (m + jnp.log(l)).reshape(bq, G)
    if count:
        count_refs[0][...] = jnp.stack([out[3], out[4]]).reshape(1, 2)


def _forward(q, k, v, sinks, segment_ids, cfg: _Config, count: bool = False):
    """Padded-layout forward. q [B, Tp, K*Gp, H], k/v [B, Tp, K, H], sinks [K*Gp] fp32,
    segment_ids [B, Tp] or None -> o [B, Tp, K*Gp, H], lse [B, Tp, K*Gp] fp32
    (+ per-program (visits, full visits) [B, K, nq, 1, 2] with count)."""
    B = q.shape[0]
    bm = _block_map(cfg)
    bq, G, H, Tp = cfg.block_q, cfg.Gp, cfg.H, cfg.Tp
    width = bm.kv_index.shape[1]
    grid = (B, cfg.K, cfg.nq)
    in_specs = [
        pl.BlockSpec((None, width), lambda b, h, i: (i, 0)),  # kv_index
        pl.BlockSpec((None, width), lambda b, h, i: (i, 0)),  # kind
        pl.BlockSpec((None, 1), lambda b, h, i: (i, 0)),  # num_visits
        pl.BlockSpec((None, bq, G, H), lambda b, h, i: (b, i, h, 0)),  # q: G heads of KV head h
        pl.BlockSpec((None, Tp, None, H), lambda b, h, i: (b, 0, h, 0)),  # k
        pl.BlockSpec((None, Tp, None, H), lambda b, h, i: (b, 0, h, 0)),  # v
        pl.BlockSpec((G,), lambda b, h, i: (h,)),  # sinks
    ]
    args = [jnp.asarray(bm.kv_index), jnp.asarray(bm.kind), jnp.asarray(bm.num_visits[:, None]), q, k, v, sinks]
    if cfg.has_seg:
        in_specs += [pl.BlockSpec((None, bq), lambda b, h, i: (b, i)), pl.BlockSpec((None, Tp), lambda b, h, i: (b, 0))]
        args += [segment_ids, segment_ids]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape[:3], jnp.float32)]
    out_specs = [
        pl.BlockSpec((None, bq, G, H), lambda b, h, i: (b, i, h, 0)),
        pl.BlockSpec((None, bq, G), lambda b, h, i: (b, i, h)),
    ]
    if count:
        out_shape.append(jax.ShapeDtypeStruct((B, cfg.K, cfg.nq, 1, 2), jnp.int32))
        out_specs.append(pl.BlockSpec((None, None, None, 1, 2), lambda b, h, i: (b, h, i, 0, 0)))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, count=count),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=cfg.compiler_params(),
        interpret=cfg.interpret,
        name="attention_sink_fwd",
    )(*args)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


def _dq_kernel(*refs, cfg: _Config):
    kvi_ref, kind_ref, nv_ref, q_ref, k_ref, v_ref, sink_ref, do_ref, lse_ref, d_ref, *refs = refs
    if cfg.has_seg:
        qseg_ref, kseg_ref, *refs = refs
    dq_ref, dsink_ref = refs
    bq, bk, G, R, H = cfg.block_q, cfg.block_k, cfg.Gp, cfg.rows, cfg.H
    i = pl.program_id(2)

    q = q_ref[...].reshape(R, H)
    do = do_ref[...].reshape(R, H)
    lse = lse_ref[...].reshape(R)
    d = d_ref[...].reshape(R)
    sink = _head_rows(sink_ref[...].astype(jnp.float32), bq, G)
    q_tok = _rows(i * bq + lax.broadcasted_iota(jnp.int32, (bq,), 0), bq, G)
    q_seg = _rows(qseg_ref[...], bq, G) if cfg.has_seg else None

    def tile(n, dq, is_full):
        start = pl.multiple_of(kvi_ref[n] * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s = _scores(q, k, cfg)
        k_tok = start + lax.broadcasted_iota(jnp.int32, (bk,), 0)
        k_seg = kseg_ref[pl.ds(start, bk)] if cfg.has_seg else None
        s = _masked(s, is_full, cfg, q_tok=q_tok, k_tok=k_tok, q_seg=q_seg, k_seg=k_seg)
        p = jnp.exp(s - lse[:, None])
        dp = _dot(do, v, ((1,), (1,)), cfg)  # [R, bk]
        ds = p * (dp - d[:, None])
        return dq + _dot(ds.astype(k.dtype), k, ((1,), (0,)), cfg)

    dq = _visit_loop(
        nv_ref[0], kind_ref, lambda n, c, full: (tile(n, c[0], full),), (jnp.zeros((R, H), jnp.float32),), count=False
    )[0]
    dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype).reshape(bq, G, H)
    dsink_ref[...] = (-jnp.exp(sink - lse) * d).reshape(bq, G)


def _dkdv_kernel(*refs, cfg: _Config):
    qi_ref, kind_ref, nv_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, *refs = refs
    if cfg.has_seg:
        qseg_ref, kseg_ref, *refs = refs
    dk_ref, dv_ref = refs
    bq, bk, G, R, H = cfg.block_q, cfg.block_k, cfg.Gp, cfg.rows, cfg.H
    j = pl.program_id(2)

    k = k_ref[...]
    v = v_ref[...]
    k_tok = j * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    k_seg = kseg_ref[...] if cfg.has_seg else None

    def tile(n, carry, is_full):
        dk, dv = carry
        start = pl.multiple_of(qi_ref[n] * bq, bq)
        q = q_ref[pl.ds(start, bq), :, :].reshape(R, H)
        do = do_ref[pl.ds(start, bq), :, :].reshape(R, H)
        lse = lse_ref[pl.ds(start, bq), :].reshape(R)
        d = d_ref[pl.ds(start, bq), :].reshape(R)
        q_tok = _rows(start + lax.broadcasted_iota(jnp.int32, (bq,), 0), bq, G)
        q_seg = _rows(qseg_ref[pl.ds(start, bq)], bq, G) if cfg.has_seg else None
        s = _scores(q, k, cfg)
        s = _masked(s, is_full, cfg, q_tok=q_tok, k_tok=k_tok, q_seg=q_seg, k_seg=k_seg)
        p = jnp.exp(s - lse[:, None])  # [R, bk]
        dv = dv + _dot(p.astype(do.dtype), do, ((0,), (0,)), cfg)
        dp = _dot(do, v, ((1,), (1,)), cfg)
        ds = p * (dp - d[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, ((0,), (0,)), cfg)
        return dk, dv

    zeros = jnp.zeros((bk, H), jnp.float32)
    dk, dv = _visit_loop(nv_ref[0], kind_ref, tile, (zeros, zeros), count=False)
    dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, sinks, segment_ids, o, lse, do, cfg: _Config):
    """Padded-layout backward; returns dq, dk, dv (input dtypes) and dsinks [K*Gp] fp32."""
    B = q.shape[0]
    bm = _block_map(cfg)
    tm = transpose_block_map(bm)
    bq, bk, G, H, Tp = cfg.block_q, cfg.block_k, cfg.Gp, cfg.H, cfg.Tp
    # D_row = sum(dO * O): one fused elementwise reduction, zero on padded rows (dO = 0 there).
    d = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    seg_args = [segment_ids, segment_ids] if cfg.has_seg else []

    w = bm.kv_index.shape[1]
    q_spec = pl.BlockSpec((None, bq, G, H), lambda b, h, i: (b, i, h, 0))
    row_spec = pl.BlockSpec((None, bq, G), lambda b, h, i: (b, i, h))
    kv_full = pl.BlockSpec((None, Tp, None, H), lambda b, h, i: (b, 0, h, 0))
    in_specs = [
        pl.BlockSpec((None, w), lambda b, h, i: (i, 0)),
        pl.BlockSpec((None, w), lambda b, h, i: (i, 0)),
        pl.BlockSpec((None, 1), lambda b, h, i: (i, 0)),
        q_spec,
        kv_full,
        kv_full,
        pl.BlockSpec((G,), lambda b, h, i: (h,)),
        q_spec,
        row_spec,
        row_spec,
    ]
    if cfg.has_seg:
        in_specs += [pl.BlockSpec((None, bq), lambda b, h, i: (b, i)), pl.BlockSpec((None, Tp), lambda b, h, i: (b, 0))]
    dq, dsink_rows = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(B, cfg.K, cfg.nq),
        in_specs=in_specs,
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape[:3], jnp.float32)],
        compiler_params=cfg.compiler_params(),
        interpret=cfg.interpret,
        name="attention_sink_bwd_dq",
    )(
        jnp.asarray(bm.kv_index),
        jnp.asarray(bm.kind),
        jnp.asarray(bm.num_visits[:, None]),
        q,
        k,
        v,
        sinks,
        do,
        lse,
        d,
        *seg_args,
    )

    w = tm.kv_index.shape[1]
    kv_spec = pl.BlockSpec((None, bk, None, H), lambda b, h, j: (b, j, h, 0))
    q_full = pl.BlockSpec((None, Tp, G, H), lambda b, h, j: (b, 0, h, 0))
    rows_full = pl.BlockSpec((None, Tp, G), lambda b, h, j: (b, 0, h))
    in_specs = [
        pl.BlockSpec((None, w), lambda b, h, j: (j, 0)),
        pl.BlockSpec((None, w), lambda b, h, j: (j, 0)),
        pl.BlockSpec((None, 1), lambda b, h, j: (j, 0)),
        q_full,
        kv_spec,
        kv_spec,
        q_full,
        rows_full,
        rows_full,
    ]
    if cfg.has_seg:
        in_specs += [pl.BlockSpec((None, Tp), lambda b, h, j: (b, 0)), pl.BlockSpec((None, bk), lambda b, h, j: (b, j))]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        grid=(B, cfg.K, cfg.nk),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=cfg.compiler_params(),
        interpret=cfg.interpret,
        name="attention_sink_bwd_dkdv",
    )(
        jnp.asarray(tm.kv_index),
        jnp.asarray(tm.kind),
        jnp.asarray(tm.num_visits[:, None]),
        q,
        k,
        v,
        do,
        lse,
        d,
        *seg_args,
    )
    dsinks = jnp.sum(dsink_rows[:, : cfg.T], axis=(0, 1))
    return dq, dk, dv, dsinks


# --------------------------------------------------------------------------------------------
# Layout (pad T and G) and the differentiable entry point
# --------------------------------------------------------------------------------------------


def _pad_in(q, k, v, sinks, segment_ids, cfg: _Config):
    B, T, N, H = q.shape
    pt = cfg.Tp - T
    qg = q.reshape(B, T, cfg.K, cfg.G, H)
    qg = jnp.pad(qg, ((0, 0), (0, pt), (0, 0), (0, cfg.Gp - cfg.G), (0, 0)))
    qp = qg.reshape(B, cfg.Tp, cfg.K * cfg.Gp, H)
    kp = jnp.pad(k, ((0, 0), (0, pt), (0, 0), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (0, pt), (0, 0), (0, 0)))
    sp = jnp.pad(sinks.astype(jnp.float32).reshape(cfg.K, cfg.G), ((0, 0), (0, cfg.Gp - cfg.G)))
    sp = sp.reshape(cfg.K * cfg.Gp)
    segp = None
    if segment_ids is not None:  # padded tokens: their own segment, after every real one
        segp = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pt)), constant_values=-1)
    return qp, kp, vp, sp, segp


def _unpad_heads(x, cfg: _Config):
    """[B, Tp, K*Gp, ...] -> [B, T, N, ...]"""
    B = x.shape[0]
    x = x[:, : cfg.T].reshape(B, cfg.T, cfg.K, cfg.Gp, *x.shape[3:])[:, :, :, : cfg.G]
    return x.reshape(B, cfg.T, cfg.K * cfg.G, *x.shape[4:])


def _pad_rows(x, cfg: _Config):
    """[B, T, N, ...] -> [B, Tp, K*Gp, ...] with zeros."""
    B = x.shape[0]
    x = x.reshape(B, cfg.T, cfg.K, cfg.G, *x.shape[3:])
    pads = [(0, 0), (0, cfg.Tp - cfg.T), (0, 0), (0, cfg.Gp - cfg.G)] + [(0, 0)] * (x.ndim - 4)
    return jnp.pad(x, pads).reshape(B, cfg.Tp, cfg.K * cfg.Gp, *x.shape[4:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, sinks, segment_ids, cfg: _Config):
    return _attention_fwd(q, k, v, sinks, segment_ids, cfg)[0]


def _attention_fwd(q, k, v, sinks, segment_ids, cfg: _Config):
    qp, kp, vp, sp, segp = _pad_in(q, k, v, sinks, segment_ids, cfg)
    o, lse = _forward(qp, kp, vp, sp, segp, cfg)
    out = _unpad_heads(o, cfg)
    return out, (q, k, v, sinks, segment_ids, out, lse)


def _attention_bwd(cfg: _Config, res, dout):
    q, k, v, sinks, segment_ids, out, lse = res
    qp, kp, vp, sp, segp = _pad_in(q, k, v, sinks, segment_ids, cfg)
    op, dop = _pad_rows(out, cfg), _pad_rows(dout.astype(q.dtype), cfg)
    dq, dk, dv, dsinks = _backward(qp, kp, vp, sp, segp, op, lse, dop, cfg)
    dq = _unpad_heads(dq, cfg)
    dsinks = dsinks.reshape(cfg.K, cfg.Gp)[:, : cfg.G].reshape(-1).astype(sinks.dtype)
    dseg = None if segment_ids is None else np.zeros(segment_ids.shape, jax.dtypes.float0)
    return dq, dk[:, : cfg.T], dv[:, : cfg.T], dsinks, dseg


_attention.defvjp(_attention_fwd, _attention_bwd)


def _config(q, k, segment_ids, *, sliding_window, sm_scale, interpret, block_sizes) -> _Config:
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    bq, bk = effective_block_sizes(T, G, block_sizes)
    Tp = -(-T // max(bq, bk)) * max(bq, bk)
    scale = float(H**-0.5 if sm_scale is None else sm_scale)
    return _Config(
        T=T,
        Tp=Tp,
        K=K,
        G=G,
        Gp=_next_pow2(G),
        H=H,
        block_q=bq,
        block_k=bk,
        window=None if sliding_window is None else int(sliding_window),
        sm_scale=scale,
        has_seg=segment_ids is not None,
        fp32=jnp.dtype(q.dtype) == jnp.float32,
        interpret=bool(interpret),
    )


@functools.partial(jax.jit, static_argnames=("sliding_window", "sm_scale", "interpret", "block_sizes"))
def attention(
    q,
    k,
    v,
    sinks,
    *,
    sliding_window: int | None = None,
    segment_ids=None,
    sm_scale=None,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
):
    """Self-attention with sinks (see the module docstring); differentiable in q, k, v, sinks.
    `block_sizes.block_q` counts query tokens (a tile holds block_q * G rows)."""
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    cfg = _config(
        q,
        k,
        segment_ids,
        sliding_window=sliding_window,
        sm_scale=sm_scale,
        interpret=interpret,
        block_sizes=block_sizes,
    )
    return _attention(q, k, v, sinks, segment_ids, cfg)


def forward_visit_counts(
    q, k, v, sinks, *, sliding_window=None, segment_ids=None, sm_scale=None, interpret=True, block_sizes=None
):
    """Runs the forward kernel with its visit counters on and returns (out, visits, full_visits,
    block_map): visits/full_visits [B, K, num_q_blocks] are the KV tiles each program actually
    processed (all / FULL branch), block_map the map it was given. For tests and tuning."""
    cfg = _config(
        q,
        k,
        segment_ids,
        sliding_window=sliding_window,
        sm_scale=sm_scale,
        interpret=interpret,
        block_sizes=block_sizes,
    )
    qp, kp, vp, sp, segp = _pad_in(q, k, v, sinks, segment_ids, cfg)
    o, _, counts = _forward(qp, kp, vp, sp, segp, cfg, count=True)
    counts = np.asarray(counts)[:, :, :, 0]
    return _unpad_heads(o, cfg), counts[..., 0], counts[..., 1], _block_map(cfg)
