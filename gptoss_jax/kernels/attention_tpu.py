"""Block-sparse flash attention with sinks for TPU (Pallas on Mosaic), forward and fused backward.

    attention(q, k, v, sinks, *, sliding_window=None, segment_ids=None, sm_scale=None,
              interpret=False, block_sizes=None) -> out [B, T, N, H]

Same contract as `gptoss_jax.kernels.attention.attention_reference`: q [B, T, N, H], k/v
[B, T, K, H] (GQA, N = K * G, query head n reads KV head n // G), sinks [N] fp32, segment_ids
[B, T] int32; key j is visible from query i iff j <= i, i - j < W (sliding) and same segment.

What is notable:

- GQA layout: the G query heads of one KV head are folded into the rows of one tile. q goes to
  [B, K, G, T, H]; a query tile is block_q tokens x G heads = G * block_q rows (row g * block_q + t),
  so one K/V tile DMA feeds all G heads and the MXU sees M = G * block_q (1024 at gpt-oss shapes).
  The positional and segment masks are computed once per token pair and tiled over the G heads.
- Block sparsity is the trace-time `attention_block_map`. The grid is (B, K, q blocks, max_visits);
  the visit list (kv_index) and tile kinds are scalar-prefetched into SMEM and the K/V index maps
  read kv_index, so KV blocks outside the causal triangle / window are never DMA'd. Padding visits
  (SKIP) repeat the last visited block (no new DMA: the block index does not change) and run no
  compute; FULL tiles skip the positional mask (only the segment mask, if any, is applied).
- Sinks: the running max starts at the head's sink logit and the denominator at 1 (= exp(sink -
  max)); the sink contributes no value. The sink is not scaled by sm_scale. Every row therefore has
  a finite max and a positive denominator, so padded or fully-masked rows never produce NaN.
- Residual: the per-row logsumexp *including the sink*, stored lane-dense per query tile
  ([B, K, num_q_blocks, 1, G * block_q]) so the backward reads it as a (1, rows) row vector (the
  dk/dv kernel works in the transposed orientation, keys in sublanes and query rows in lanes, where
  that row vector broadcasts for free) or as a column (dq kernel).
- Backward (custom_vjp): D = rowsum(dO * O) in XLA, then two Pallas kernels: dq (same grid and
  visit map as the forward) and dk/dv (grid (B, K, KV blocks, max_visitors) over the transposed
  visit map: for each KV block the query blocks that visit it, with the same FULL/PARTIAL kinds).
  dsinks needs no kernel: d out_row / d sink = -p_sink * out_row with p_sink = exp(sink - lse), so
  dsinks[n] = -sum over the rows of head n of p_sink * D_row.
- bf16 or fp32 inputs; all matmuls accumulate in fp32 (preferred_element_type); probabilities are
  cast to the value dtype for the PV / dS matmuls (standard flash attention practice).
- T need not be a multiple of the block sizes: q is zero-padded to a multiple of block_q, k/v to a
  multiple of block_k. Padded keys only appear in PARTIAL tiles (the map guarantees it), where the
  causal mask hides them from every real query; padded query rows are discarded (their dO is 0).
- Mosaic tiling: block_q and block_k must be multiples of 128 (they appear as lane dims of the
  segment-id and logsumexp tiles and of the score tiles); head_dim is always the full dim. Interpret
  mode accepts any positive block sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gptoss_jax.kernels.block_map import FULL, PARTIAL, BlockMap, BlockSizes, attention_block_map, transpose_block_map

NUM_LANES = 128
NUM_SUBLANES = 8
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: exp(MASK_VALUE - m) == 0 for any finite m
_NN = (((1,), (0,)), ((), ()))  # [m, k] @ [k, n]


def _dot(a, b, dims):
    """fp32-accumulated dot; exact fp32 for fp32 operands, the MXU's native pass for bf16 (Mosaic
    rejects bf16 operands at fp32 precision, which a global `jax_default_matmul_precision`
    would otherwise request)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


_NT = (((1,), (1,)), ((), ()))  # [m, k] @ [n, k]^T


# ----------------------------------------------------------------------------------------------
# Visit plan (trace-time numpy)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VisitPlan:
    """What the kernels iterate over. `fwd` drives the forward and dq grids (per query block, the
    KV blocks to visit); q_index/q_kind/q_num are its transpose and drive the dk/dv grid (per KV
    block, the query blocks that visit it, in increasing order; padding repeats the last one)."""

    fwd: BlockMap
    q_index: np.ndarray  # [num_kv_blocks, max_visitors] int32
    q_kind: np.ndarray  # [num_kv_blocks, max_visitors] int32 (FULL / PARTIAL / SKIP)
    q_num: np.ndarray  # [num_kv_blocks] int32

    @property
    def num_q_blocks(self) -> int:
        return self.fwd.kv_index.shape[0]

    @property
    def num_kv_blocks(self) -> int:
        return self.q_index.shape[0]

    @property
    def max_visits(self) -> int:
        return self.fwd.kv_index.shape[1]

    @property
    def max_visitors(self) -> int:
        return self.q_index.shape[1]


@functools.lru_cache(maxsize=64)
def visit_plan(T: int, block_q: int, block_k: int, sliding_window: int | None) -> VisitPlan:
    """The exact maps the kernels are launched with (cached per static configuration)."""
    bm = attention_block_map(T, block_q=block_q, block_k=block_k, sliding_window=sliding_window)
    nk = math.ceil(T / block_k)
    tm = transpose_block_map(bm, nk)
    q_index, q_kind, q_num = tm.kv_index, tm.kind, tm.num_visits
    return VisitPlan(bm, q_index, q_kind, q_num)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static configuration of one call (hashable: a nondiff argument of the custom_vjp)."""

    T: int
    G: int
    H: int
    block_q: int
    block_k: int
    window: int | None
    scale: float
    interpret: object  # bool or pltpu.InterpretParams

    @property
    def plan(self) -> VisitPlan:
        return visit_plan(self.T, self.block_q, self.block_k, self.window)

    @property
    def Tq(self) -> int:
        return self.plan.num_q_blocks * self.block_q

    @property
    def Tk(self) -> int:
        return self.plan.num_kv_blocks * self.block_k

    @property
    def rows(self) -> int:  # rows of a query tile: G heads x block_q tokens
        return self.G * self.block_q


# ----------------------------------------------------------------------------------------------
# Masks (inside kernels)
# ----------------------------------------------------------------------------------------------


def _stack(x, G: int, axis: int):
    """G copies of a tile side by side along `axis` (a tile-aligned concatenation for Mosaic, used
    instead of jnp.tile, whose intermediate reshapes insert unit dims in the tiled dimensions)."""
    return x if G == 1 else jnp.concatenate([x] * G, axis=axis)


def _mask_rows(cfg: _Cfg, i, j, positional: bool, qseg_ref, kseg_ref):
    """[G*bq, bk] visibility for query tile i (rows g*bq + t) against KV tile j, or None."""
    G, bq, bk = cfg.G, cfg.block_q, cfg.block_k
    mask = None
    if positional:
        qp = i * bq + _stack(lax.broadcasted_iota(jnp.int32, (bq, bk), 0), G, 0)
        kp = j * bk + lax.broadcasted_iota(jnp.int32, (G * bq, bk), 1)
        mask = kp <= qp
        if cfg.window is not None:
            mask = jnp.logical_and(mask, qp - kp < cfg.window)
    if qseg_ref is not None:
        qs = _stack(qseg_ref[...], G, 0)[:, :1]  # (G*bq, 1) from lane-replicated (bq, 128)
        ks = kseg_ref[...][:1, :]  # (1, bk) from sublane-replicated (8, bk)
        seg = qs == ks
        mask = seg if mask is None else jnp.logical_and(mask, seg)
    return mask


def _mask_cols(cfg: _Cfg, i, j, positional: bool, qseg_ref, kseg_ref):
    """[bk, G*bq] visibility, transposed orientation (keys in sublanes, query rows in lanes)."""
    G, bq, bk = cfg.G, cfg.block_q, cfg.block_k
    mask = None
    if positional:
        kp = j * bk + lax.broadcasted_iota(jnp.int32, (bk, G * bq), 0)
        qp = i * bq + _stack(lax.broadcasted_iota(jnp.int32, (bk, bq), 1), G, 1)
        mask = kp <= qp
        if cfg.window is not None:
            mask = jnp.logical_and(mask, qp - kp < cfg.window)
    if qseg_ref is not None:
        qs = _stack(qseg_ref[...], G, 1)[:1, :]  # (1, G*bq) from sublane-replicated (8, bq)
        ks = kseg_ref[...][:, :1]  # (bk, 1) from lane-replicated (bk, 128)
        seg = ks == qs
        mask = seg if mask is None else jnp.logical_and(mask, seg)
    return mask


def _dispatch_visit(kind, visit):
    """Run `visit(positional)` for FULL (no positional mask) and PARTIAL tiles; SKIP does nothing."""
    pl.when(kind == FULL)(lambda: visit(False))
    pl.when(kind == PARTIAL)(lambda: visit(True))


# ----------------------------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------------------------


def _fwd_kernel(kv_index_ref, kind_ref, q_ref, k_ref, v_ref, sinks_ref, *refs, cfg: _Cfg, width: int, segmented: bool):
    if segmented:
        qseg_ref, kseg_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
    else:
        qseg_ref = kseg_ref = None
        o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
    G, bq, H, R = cfg.G, cfg.block_q, cfg.H, cfg.rows
    h, i, n = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    kind = kind_ref[i * width + n]
    j = kv_index_ref[i * width + n]

    @pl.when(n == 0)
    def _init():
        for g in range(G):  # running max starts at the sink logit, denominator at exp(0) = 1
            m_scr[pl.ds(g * bq, bq), :] = jnp.full((bq, NUM_LANES), sinks_ref[h * G + g], jnp.float32)
        l_scr[...] = jnp.ones_like(l_scr)
        acc_scr[...] = jnp.zeros_like(acc_scr)

    def visit(positional: bool):
        q = q_ref[...].reshape(R, H)
        s = _dot(q, k_ref[...], _NT) * cfg.scale
        mask = _mask_rows(cfg, i, j, positional, qseg_ref, kseg_ref)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev, l_prev = m_scr[...], l_scr[...]  # (R, 128), replicated over lanes
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new[:, :1])
        l_scr[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_new
        v = v_ref[...]
        pv = _dot(p.astype(v.dtype), v, _NN)
        acc_scr[...] = alpha[:, :1] * acc_scr[...] + pv

    _dispatch_visit(kind, visit)

    @pl.when(n == width - 1)
    def _finish():
        l = l_scr[...]
        o_ref[...] = (acc_scr[...] / l[:, :1]).reshape(G, bq, H).astype(o_ref.dtype)
        lse = m_scr[...] + jnp.log(l)  # (R, 128) replicated -> lane-dense (1, R) via a transpose
        lse_ref[...] = lse.T[:1, :]


def _segment_layouts(segment_ids, Tq: int, Tk: int):
    """Segment ids padded with -1 in the four tile layouts the kernels read."""
    B, T = segment_ids.shape
    seg = segment_ids.astype(jnp.int32)
    sq = jnp.pad(seg, ((0, 0), (0, Tq - T)), constant_values=-1)
    sk = jnp.pad(seg, ((0, 0), (0, Tk - T)), constant_values=-1)
    return dict(
        q_col=jnp.broadcast_to(sq[:, :, None], (B, Tq, NUM_LANES)),
        q_row=jnp.broadcast_to(sq[:, None, :], (B, NUM_SUBLANES, Tq)),
        k_row=jnp.broadcast_to(sk[:, None, :], (B, NUM_SUBLANES, Tk)),
        k_col=jnp.broadcast_to(sk[:, :, None], (B, Tk, NUM_LANES)),
    )


def _q_layout(x, cfg: _Cfg, K: int):
    """[B, T, N, H] -> [B, K, G, Tq, H] (zero-padded tokens)."""
    B, T, N, H = x.shape
    x = jnp.pad(x, ((0, 0), (0, cfg.Tq - T), (0, 0), (0, 0)))
    return x.reshape(B, cfg.Tq, K, cfg.G, H).transpose(0, 2, 3, 1, 4)


def _q_unlayout(x5, T: int):
    B, K, G, Tq, H = x5.shape
    return x5.transpose(0, 3, 1, 2, 4).reshape(B, Tq, K * G, H)[:, :T]


def _kv_layout(x, cfg: _Cfg):
    """[B, T, K, H] -> [B, K, Tk, H]."""
    x = jnp.pad(x, ((0, 0), (0, cfg.Tk - x.shape[1]), (0, 0), (0, 0)))
    return x.transpose(0, 2, 1, 3)


def _row_stats_layout(x5, cfg: _Cfg):
    """Per-row [B, K, G, Tq] -> tile-major lane-dense [B, K, nq, 1, G*bq] (row g*bq + t of a tile)."""
    B, K, G, Tq = x5.shape
    nq, bq = cfg.plan.num_q_blocks, cfg.block_q
    return x5.reshape(B, K, G, nq, bq).transpose(0, 1, 3, 2, 4).reshape(B, K, nq, 1, G * bq)


def _row_stats_unlayout(x, cfg: _Cfg):
    """Inverse of `_row_stats_layout`: -> [B, K, G, Tq]."""
    B, K, nq = x.shape[:3]
    return x.reshape(B, K, nq, cfg.G, cfg.block_q).transpose(0, 1, 3, 2, 4).reshape(B, K, cfg.G, cfg.Tq)


def _cost(cfg: _Cfg, B: int, K: int, H: int, matmuls: int, *arrays) -> pl.CostEstimate:
    """What XLA's cost analysis should count for a kernel over the visited tiles: `matmuls`
    [G bq, H] x [H, bk]-sized products per visited (query tile, key tile) pair, one exp per score,
    and every operand and result read or written once."""
    pairs = B * K * cfg.plan.fwd.total_visits * cfg.rows * cfg.block_k
    return pl.CostEstimate(
        flops=2 * H * pairs * matmuls,
        transcendentals=pairs,
        bytes_accessed=sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(arrays)),
    )


def _compiler_params(n_parallel: int):
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel + ("arbitrary",))


def _forward(cfg: _Cfg, q5, k4, v4, sinks, seg):
    """q5 [B, K, G, Tq, H], k4/v4 [B, K, Tk, H] -> (o5 like q5, lse [B, K, nq, 1, G*bq] fp32)."""
    B, K, G, Tq, H = q5.shape
    plan = cfg.plan
    width, bq, bk, R = plan.max_visits, cfg.block_q, cfg.block_k, cfg.rows

    def q_map(b, h, i, n, kv_ref, kind_ref):
        return b, h, 0, i, 0

    def kv_map(b, h, i, n, kv_ref, kind_ref):
        return b, h, kv_ref[i * width + n], 0

    in_specs = [
        pl.BlockSpec((None, None, G, bq, H), q_map),
        pl.BlockSpec((None, None, bk, H), kv_map),
        pl.BlockSpec((None, None, bk, H), kv_map),
        pl.BlockSpec(memory_space=pltpu.SMEM),
    ]
    args = [q5, k4, v4, sinks.astype(jnp.float32)]
    if seg is not None:
        in_specs += [
            pl.BlockSpec((None, bq, NUM_LANES), lambda b, h, i, n, kv_ref, kind_ref: (b, i, 0)),
            pl.BlockSpec((None, NUM_SUBLANES, bk), lambda b, h, i, n, kv_ref, kind_ref: (b, 0, kv_ref[i * width + n])),
        ]
        args += [seg["q_col"], seg["k_row"]]
    out_specs = [
        pl.BlockSpec((None, None, G, bq, H), q_map),
        pl.BlockSpec((None, None, None, 1, R), lambda b, h, i, n, kv_ref, kind_ref: (b, h, i, 0, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct(q5.shape, q5.dtype),
        jax.ShapeDtypeStruct((B, K, plan.num_q_blocks, 1, R), jnp.float32),
    ]
    kernel = functools.partial(_fwd_kernel, cfg=cfg, width=width, segmented=seg is not None)
    o5, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, K, plan.num_q_blocks, width),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[
                pltpu.VMEM((R, NUM_LANES), jnp.float32),
                pltpu.VMEM((R, NUM_LANES), jnp.float32),
                pltpu.VMEM((R, H), jnp.float32),
            ],
        ),
        out_shape=out_shape,
        compiler_params=_compiler_params(3),
        interpret=cfg.interpret,
        cost_estimate=_cost(cfg, B, K, H, 2, args, out_shape),
        name="gptoss_flash_attention_fwd",
    )(jnp.asarray(plan.fwd.kv_index.reshape(-1)), jnp.asarray(plan.fwd.kind.reshape(-1)), *args)
    return o5, lse


# ----------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------


def _dq_kernel(
    kv_index_ref, kind_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, *refs, cfg: _Cfg, width: int, segmented: bool
):
    if segmented:
        qseg_ref, kseg_ref, dq_ref, acc_scr = refs
    else:
        qseg_ref = kseg_ref = None
        dq_ref, acc_scr = refs
    G, bq, H, R = cfg.G, cfg.block_q, cfg.H, cfg.rows
    i, n = pl.program_id(2), pl.program_id(3)
    kind = kind_ref[i * width + n]
    j = kv_index_ref[i * width + n]

    @pl.when(n == 0)
    def _init():
        acc_scr[...] = jnp.zeros_like(acc_scr)

    def visit(positional: bool):
        q = q_ref[...].reshape(R, H)
        do = do_ref[...].reshape(R, H)
        k, v = k_ref[...], v_ref[...]
        s = _dot(q, k, _NT) * cfg.scale
        mask = _mask_rows(cfg, i, j, positional, qseg_ref, kseg_ref)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        p = jnp.exp(s - lse_ref[0][:, None])  # lse includes the sink: p are the final probabilities
        dp = _dot(do, v, _NT)
        ds = p * (dp - d_ref[0][:, None])
        acc_scr[...] += _dot(ds.astype(k.dtype), k, _NN)

    _dispatch_visit(kind, visit)

    @pl.when(n == width - 1)
    def _finish():
        dq_ref[...] = (acc_scr[...] * cfg.scale).reshape(G, bq, H).astype(dq_ref.dtype)


def _dkv_kernel(
    q_index_ref, kind_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, *refs, cfg: _Cfg, width: int, segmented: bool
):
    if segmented:
        qseg_ref, kseg_ref, dk_ref, dv_ref, dk_scr, dv_scr = refs
    else:
        qseg_ref = kseg_ref = None
        dk_ref, dv_ref, dk_scr, dv_scr = refs
    H, R = cfg.H, cfg.rows
    j, n = pl.program_id(2), pl.program_id(3)
    kind = kind_ref[j * width + n]
    i = q_index_ref[j * width + n]

    @pl.when(n == 0)
    def _init():
        dk_scr[...] = jnp.zeros_like(dk_scr)
        dv_scr[...] = jnp.zeros_like(dv_scr)

    def visit(positional: bool):
        q = q_ref[...].reshape(R, H)
        do = do_ref[...].reshape(R, H)
        k, v = k_ref[...], v_ref[...]
        st = _dot(k, q, _NT) * cfg.scale  # (bk, R)
        mask = _mask_cols(cfg, i, j, positional, qseg_ref, kseg_ref)
        if mask is not None:
            st = jnp.where(mask, st, MASK_VALUE)
        pt = jnp.exp(st - lse_ref[...])  # lse (1, R) broadcasts over the key sublanes
        dv_scr[...] += _dot(pt.astype(do.dtype), do, _NN)
        dpt = _dot(v, do, _NT)
        dst = pt * (dpt - d_ref[...])
        dk_scr[...] += _dot(dst.astype(q.dtype), q, _NN)

    _dispatch_visit(kind, visit)

    @pl.when(n == width - 1)
    def _finish():
        dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _backward(cfg: _Cfg, q5, k4, v4, seg, o5, lse, do5):
    """Returns dq5, dk4, dv4 (kernel layouts) and D = rowsum(dO * O) [B, K, G, Tq] fp32."""
    B, K, G, Tq, H = q5.shape
    plan = cfg.plan
    bq, bk, R = cfg.block_q, cfg.block_k, cfg.rows
    nq, nk = plan.num_q_blocks, plan.num_kv_blocks

    d5 = jnp.sum(do5.astype(jnp.float32) * o5.astype(jnp.float32), axis=-1)  # [B, K, G, Tq]
    d = _row_stats_layout(d5, cfg)

    # ---- dq: same grid and visit list as the forward
    wq = plan.max_visits

    def q_map(b, h, i, n, idx_ref, kind_ref):
        return b, h, 0, i, 0

    def kv_map(b, h, i, n, idx_ref, kind_ref):
        return b, h, idx_ref[i * wq + n], 0

    def stat_map(b, h, i, n, idx_ref, kind_ref):
        return b, h, i, 0, 0

    in_specs = [
        pl.BlockSpec((None, None, G, bq, H), q_map),
        pl.BlockSpec((None, None, bk, H), kv_map),
        pl.BlockSpec((None, None, bk, H), kv_map),
        pl.BlockSpec((None, None, G, bq, H), q_map),
        pl.BlockSpec((None, None, None, 1, R), stat_map),
        pl.BlockSpec((None, None, None, 1, R), stat_map),
    ]
    args = [q5, k4, v4, do5, lse, d]
    if seg is not None:
        in_specs += [
            pl.BlockSpec((None, bq, NUM_LANES), lambda b, h, i, n, idx_ref, kind_ref: (b, i, 0)),
            pl.BlockSpec((None, NUM_SUBLANES, bk), lambda b, h, i, n, idx_ref, kind_ref: (b, 0, idx_ref[i * wq + n])),
        ]
        args += [seg["q_col"], seg["k_row"]]
    dq5 = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, width=wq, segmented=seg is not None),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, K, nq, wq),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, G, bq, H), q_map),
            scratch_shapes=[pltpu.VMEM((R, H), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q5.shape, q5.dtype),
        compiler_params=_compiler_params(3),
        interpret=cfg.interpret,
        cost_estimate=_cost(cfg, B, K, H, 3, args, q5),  # s, dp, dq
        name="gptoss_flash_attention_dq",
    )(jnp.asarray(plan.fwd.kv_index.reshape(-1)), jnp.asarray(plan.fwd.kind.reshape(-1)), *args)

    # ---- dk/dv: grid over KV blocks and, innermost, the query blocks that visit each one
    wk = plan.max_visitors

    def qt_map(b, h, j, n, idx_ref, kind_ref):
        return b, h, 0, idx_ref[j * wk + n], 0

    def kt_map(b, h, j, n, idx_ref, kind_ref):
        return b, h, j, 0

    def statt_map(b, h, j, n, idx_ref, kind_ref):
        return b, h, idx_ref[j * wk + n], 0, 0

    in_specs = [
        pl.BlockSpec((None, None, G, bq, H), qt_map),
        pl.BlockSpec((None, None, bk, H), kt_map),
        pl.BlockSpec((None, None, bk, H), kt_map),
        pl.BlockSpec((None, None, G, bq, H), qt_map),
        pl.BlockSpec((None, None, None, 1, R), statt_map),
        pl.BlockSpec((None, None, None, 1, R), statt_map),
    ]
    args = [q5, k4, v4, do5, lse, d]
    if seg is not None:
        in_specs += [
            pl.BlockSpec((None, NUM_SUBLANES, bq), lambda b, h, j, n, idx_ref, kind_ref: (b, 0, idx_ref[j * wk + n])),
            pl.BlockSpec((None, bk, NUM_LANES), lambda b, h, j, n, idx_ref, kind_ref: (b, j, 0)),
        ]
        args += [seg["q_row"], seg["k_col"]]
    dk4, dv4 = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, width=wk, segmented=seg is not None),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, K, nk, wk),
            in_specs=in_specs,
            out_specs=[pl.BlockSpec((None, None, bk, H), kt_map), pl.BlockSpec((None, None, bk, H), kt_map)],
            scratch_shapes=[pltpu.VMEM((bk, H), jnp.float32), pltpu.VMEM((bk, H), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k4.shape, k4.dtype), jax.ShapeDtypeStruct(v4.shape, v4.dtype)],
        compiler_params=_compiler_params(3),
        interpret=cfg.interpret,
        cost_estimate=_cost(cfg, B, K, H, 4, args, k4, v4),  # s, dv, dp, dk
        name="gptoss_flash_attention_dkv",
    )(jnp.asarray(plan.q_index.reshape(-1)), jnp.asarray(plan.q_kind.reshape(-1)), *args)
    return dq5, dk4, dv4, d5


# ----------------------------------------------------------------------------------------------
# custom_vjp and public wrapper
# ----------------------------------------------------------------------------------------------


def _prepare(cfg: _Cfg, q, k, v, segment_ids):
    K = k.shape[2]
    seg = None if segment_ids is None else _segment_layouts(segment_ids, cfg.Tq, cfg.Tk)
    return _q_layout(q, cfg, K), _kv_layout(k, cfg), _kv_layout(v, cfg), seg


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Cfg, q, k, v, sinks, segment_ids):
    q5, k4, v4, seg = _prepare(cfg, q, k, v, segment_ids)
    o5, _ = _forward(cfg, q5, k4, v4, sinks, seg)
    return _q_unlayout(o5, cfg.T)


def _attention_fwd(cfg: _Cfg, q, k, v, sinks, segment_ids):
    q5, k4, v4, seg = _prepare(cfg, q, k, v, segment_ids)
    o5, lse = _forward(cfg, q5, k4, v4, sinks, seg)
    return _q_unlayout(o5, cfg.T), (q5, k4, v4, sinks, segment_ids, o5, lse)


def _attention_bwd(cfg: _Cfg, res, do):
    q5, k4, v4, sinks, segment_ids, o5, lse = res
    K = k4.shape[1]
    seg = None if segment_ids is None else _segment_layouts(segment_ids, cfg.Tq, cfg.Tk)
    do5 = _q_layout(do.astype(o5.dtype), cfg, K)
    dq5, dk4, dv4, d5 = _backward(cfg, q5, k4, v4, seg, o5, lse, do5)
    T = cfg.T
    # dsinks[n] = -sum over the real rows of head n of p_sink * D_row, p_sink = exp(sink_n - lse_row):
    # d out_row / d sink_n = -p_sink * out_row (the sink only enters through the denominator).
    lse5 = _row_stats_unlayout(lse, cfg)[..., :T]  # [B, K, G, T]
    p_sink = jnp.exp(sinks.astype(jnp.float32).reshape(1, K, cfg.G, 1) - lse5)
    dsinks = -jnp.sum(p_sink * d5[..., :T], axis=(0, 3)).reshape(K * cfg.G).astype(sinks.dtype)
    dq = _q_unlayout(dq5, T)
    dk = dk4.transpose(0, 2, 1, 3)[:, :T]
    dv = dv4.transpose(0, 2, 1, 3)[:, :T]
    return dq, dk, dv, dsinks, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _check_blocks(bq: int, bk: int, interpret) -> None:
    if interpret:
        return
    for name, b in (("block_q", bq), ("block_k", bk)):
        if b % NUM_LANES:
            raise ValueError(
                f"{name}={b} must be a multiple of {NUM_LANES} for Mosaic (TPU); any size works with interpret=True"
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
    sm_scale: float | None = None,
    interpret=False,
    block_sizes: BlockSizes | None = None,
):
    """Block-sparse flash attention with sinks (see the module docstring). Differentiable in q, k,
    v and sinks. `interpret`: False (Mosaic), True (Pallas interpret mode, runs anywhere) or a
    `pltpu.InterpretParams` (the TPU-faithful interpreter)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    if k.shape != (B, T, K, H) or v.shape != k.shape or N % K:
        raise ValueError(f"need q [B,T,N,H] and k/v [B,T,K,H] with N % K == 0; got {q.shape} {k.shape} {v.shape}")
    if sinks.shape != (N,):
        raise ValueError(f"sinks must have shape ({N},), got {sinks.shape}")
    if segment_ids is not None and segment_ids.shape != (B, T):
        raise ValueError(f"segment_ids must have shape ({B}, {T}), got {segment_ids.shape}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    bs = block_sizes or BlockSizes()
    _check_blocks(bs.block_q, bs.block_k, interpret)
    scale = float(H**-0.5 if sm_scale is None else sm_scale)
    cfg = _Cfg(
        T=T,
        G=N // K,
        H=H,
        block_q=bs.block_q,
        block_k=bs.block_k,
        window=sliding_window,
        scale=scale,
        interpret=interpret,
    )
    return _attention(cfg, q, k, v, sinks, segment_ids)
