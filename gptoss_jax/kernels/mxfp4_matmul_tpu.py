"""Grouped matmul against packed MXFP4 expert weights for TPU (Pallas on Mosaic), with a Pallas
backward for the input gradient.

    mxfp4_grouped_matmul(x, blocks, scales, group_sizes, *, bias=None, swiglu=None,
                         interpret=False, block_sizes=None) -> [M, Nout] or [M, Nout/2]
    dequantize_tiles(blocks, scales, *, block_n, block_k, interpret=False) -> [E, Nout, Kin] fp32

Same contract as `gptoss_jax.kernels.mxfp4_matmul` (see its docstring): x [M, Kin] rows sorted by
expert, blocks [E, Nout, Kin/32, 16] uint8 / scales [E, Nout, Kin/32] uint8 in the checkpoint
layout, group_sizes [E] (zeros allowed, sum <= M, rows past the sum give 0), optional bias [E, Nout]
and optional fused SwiGLU over interleaved gate/up columns. Gradients w.r.t. x and bias; the packed
weight and the group sizes get float0 zeros.

What is notable:

- Layout of the packed weight. Byte j of a packed row (blocks viewed as [E, Nout, Kin/2], a free
  reshape of the contiguous checkpoint array) holds input channels 2j (low nibble) and 2j+1 (high
  nibble), for every j: the 32-blocks are contiguous. So instead of interleaving nibbles back into
  [bn, bk] inside the kernel (a lane shuffle Mosaic has no cheap form for), the kernel decodes a
  [bn, bk/2] byte tile into two planes lo, hi [bn, bk/2] and x is split ONCE outside the kernel into
  x2 = [x[:, 0::2], x[:, 1::2]] ([2, M, Kin/2]); the tile product is x2[0] @ lo^T + x2[1] @ hi^T.
  The backward writes dx in the same two-plane form and XLA interleaves it back. The packed
  weight itself is never rewritten (on TPU the 4-D -> 3-D reshape may still be a relayout in HBM
  if XLA keeps the checkpoint array in its 4-D tiled layout; keep the experts as [E, Nout, Kin/2]
  to make it free). Only the small scale array is copied (zero-padded, see below).
- Scales. A [bn, bk/32] scale tile would have a lane dim of 16 or 24 (Mosaic wants multiples of
  128 or the full dim), so the scale BlockSpec takes the whole (zero-padded to a multiple of 128)
  group axis of bn rows, [bn, Gp] uint8: its index does not depend on the K step, so it is DMA'd
  once per (expert, N tile). The per-element exponent for the current K tile is produced by a
  0/1 matmul on the MXU: (s + 1)[bn, Gp] @ R[Gp, bk/2] with R[g, j] = (g == kt*bk/32 + j//16 and
  g < G), exact in bf16 (integers <= 256, one nonzero term per output). A result of 0 marks
  "no group" (K edge past G), and 2**(s-127) is then built from bits: ((t - 1) << 23). Values are
  E2M1 (bit construction, as `mxfp4._e2m1_to_f32`) times that power of two, in fp32, so they equal
  `mxfp4.dequantize` bit for bit wherever the result is a normal float (scale 255, NaN in E8M0,
  gives inf like the reference; scale 0 decodes to 0 where the reference gives tiny subnormals).
- Decode once per (expert, N tile), not once per M tile: the grid is (N tiles, visits, K tiles)
  and a VMEM scratch holds the decoded [nk, 2, bn, bk/2] weight of the current expert. A visit
  whose expert equals the previous visit's reuses it, and its weight index map points at the
  block already resident (the last K block), so no weight DMA is issued either. At 20b shapes
  (about 512 rows per expert) this should remove most of the VPU decode cost, which by a rough
  op count rivals the MXU time of a 256-row tile (an estimate: nothing here was timed on a TPU).
- Group metadata (scalar prefetch, computed in XLA): the rows [0, Mpad) are split into the E
  groups plus a pseudo-group for the rows past sum(group_sizes); every (M tile, group) pair that
  overlaps is one visit, in order, so a tile straddling group boundaries is visited once per
  group with a row mask (at most tiles_m + E visits; the static grid pads with no-op visits that
  repeat the last one). Per visit: M tile, expert, row range, "first visit of this tile" (writes
  zeros outside the range, later visits merge with `where` into the resident output block), and
  "decode needed". Empty experts get no visit; pseudo-group visits only write zeros.
- Accumulation in an fp32 VMEM scratch over the K grid axis (preferred_element_type=float32);
  bias and the SwiGLU epilogue at the last K step. SwiGLU: at decode time the interleaved weight
  rows are split with stride-2 sublane loads from an fp32 scratch into [gate rows; up rows], so
  the accumulated tile is [gate | up] halves (lane-aligned slices) and the output tile is
  [bm, bn/2]; the bias is permuted the same way outside (E x Nout, tiny).
- Edges. Kin = 2880 is 90 groups = 22.5 x 128 lanes: block_k must be a multiple of 256 (bk/2 bytes
  are the lane dim of the weight tile) or all of Kin; the default 512 gives 6 K tiles with a
  partial last one. Its out-of-range bytes are garbage but always finite E2M1 codes, and R gives
  them a multiplier of exactly 0; x2 is zero-padded (it is a copy anyway). Nout = 5760 / 2880 is not
  a multiple of 256: the last N tile is partial; its garbage weight rows get multiplier 0 from
  zero-padded scale rows, and the output block write is clipped. The M edge is padded in x2.
- Backward (custom_vjp): with SwiGLU, h is recomputed in fp32 by the same kernel without the
  epilogue (no [M, Nout] residual is saved) and the SwiGLU derivative applied in XLA; dbias is a
  segment sum of dh in XLA; dx = dh @ W_e by a second kernel on the packed weight, grid
  (K tiles, visits, N tiles) with N the contraction axis and the same decode reuse (scratch
  [nn, 2, bn, bk/2]); it uses block_k = min(block_k, 256) to bound that scratch (3 MB at
  Nout = 5760, bf16).
- VMEM at the defaults with bf16 x: about 5 MB per kernel (forward: decoded-weight scratch 1.5 MB,
  double-buffered x tiles 0.5 MB, decode temporaries ~1.5 MB; dx: scratch 3 MB), under the default
  scoped VMEM limit of every TPU generation, so no vmem_limit_bytes is set.
- Block sizes (Mosaic): block_m a multiple of 8 (16 for bf16), block_n a multiple of 128 (256 with
  SwiGLU, whose output tile is bn/2 wide) or all of Nout, block_k a multiple of 256 or all of Kin.
  Interpret mode accepts any block_m, block_n even (SwiGLU), block_k a multiple of 32.
  Defaults: (256, 256, 512).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gptoss_jax.kernels import vma
from gptoss_jax.kernels.groups import MatmulBlockSizes, row_experts
from gptoss_jax.layers import swiglu_halves
from gptoss_jax.mxfp4 import BLOCK

NUM_LANES = 128
DEFAULT_BLOCK_SIZES = MatmulBlockSizes(block_m=256, block_n=256, block_k=512)
BWD_BLOCK_K = 256
_NT = (((1,), (1,)), ((), ()))  # [m, k] @ [n, k]^T
_NN = (((1,), (0,)), ((), ()))  # [m, k] @ [k, n]


def _cdiv(a, b):
    return -(-a // b)


def _round_up(a, b):
    return _cdiv(a, b) * b


# ----------------------------------------------------------------------------------------------
# In-kernel decode
# ----------------------------------------------------------------------------------------------


def _e2m1_bits_to_f32(code):
    """int32 E2M1 codes 0..15 -> float32 by building the bits (sign bit 3, exponent bits 2..1 with
    bias 1, mantissa bit 0; exponent 0 is 0 or 0.5)."""
    sign = (code & 8) << 28
    e = (code >> 1) & 3
    m = code & 1
    normal = ((e + 126) << 23) | (m << 22)
    bits = jnp.where(e == 0, m * (126 << 23), normal)
    return lax.bitcast_convert_type(bits | sign, jnp.float32)


def _decode_tile(packed, scales, kt, *, block_k: int, num_groups: int):
    """packed [bn, bk/2] uint8 (K tile `kt`), scales [bn, Gp] uint8 (all groups) ->
    (lo, hi) [bn, bk/2] float32: lo[:, j] is input channel kt*bk + 2j, hi[:, j] channel kt*bk + 2j + 1.
    Bytes of groups >= num_groups (the K edge) decode to exactly 0."""
    half = block_k // 2
    gp = scales.shape[1]
    b = packed.astype(jnp.int32)
    t = (scales.astype(jnp.int32) + 1).astype(jnp.float32).astype(jnp.bfloat16)  # 1..256, exact
    g = lax.broadcasted_iota(jnp.int32, (gp, half), 0)
    j = lax.broadcasted_iota(jnp.int32, (gp, half), 1)
    sel = (g == kt * (block_k // BLOCK) + (j >> 4)) & (g < num_groups)
    r = jnp.where(sel, 1.0, 0.0).astype(jnp.bfloat16)
    t = lax.dot_general(
        t, r, _NN, precision=lax.Precision.DEFAULT, preferred_element_type=jnp.float32
    )  # [bn, bk/2], exact integers
    mult = lax.bitcast_convert_type(jnp.maximum(t.astype(jnp.int32) - 1, 0) << 23, jnp.float32)
    lo = _e2m1_bits_to_f32(b & 15) * mult
    hi = _e2m1_bits_to_f32((b >> 4) & 15) * mult
    return lo, hi


def _pad_scales(scales, n_pad: int):
    """[E, N, G] -> [E, n_pad, Gp] zero-padded (Gp a multiple of 128): padded rows decode to 0."""
    E, N, G = scales.shape
    return jnp.pad(scales, ((0, 0), (0, n_pad - N), (0, _round_up(G, NUM_LANES) - G)))


# ----------------------------------------------------------------------------------------------
# Group metadata (traced, XLA)
# ----------------------------------------------------------------------------------------------


def group_metadata(group_sizes, M: int, block_m: int):
    """Visit list for the M tiles. Returns (tile, expert, lo, hi, first, decode), each int32 [V]
    with V = ceil(M / block_m) + E static, and the number of real visits."""
    E = group_sizes.shape[0]
    tiles_m = _cdiv(M, block_m)
    m_pad = tiles_m * block_m
    V = tiles_m + E
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    total = ends[-1]
    st = jnp.concatenate([ends - sizes, total[None]])  # E real groups + the tail pseudo-group
    sz = jnp.concatenate([sizes, (m_pad - total)[None]])
    en = st + sz
    ntile = jnp.where(sz > 0, (en - 1) // block_m - st // block_m + 1, 0)
    cum = jnp.cumsum(ntile)
    num_visits = cum[-1]
    v = jnp.minimum(jnp.arange(V, dtype=jnp.int32), num_visits - 1)  # padding repeats the last visit
    g = jnp.searchsorted(cum, v, side="right").astype(jnp.int32)
    tile = st[g] // block_m + v - (cum[g] - ntile[g])
    real = (g < E) & (jnp.arange(V) < num_visits)
    lo = jnp.where(real, st[g], 0)
    hi = jnp.where(real, en[g], 0)
    last_nonempty = jnp.max(jnp.where(sizes > 0, jnp.arange(E, dtype=jnp.int32), 0))
    expert = jnp.where(g < E, g, last_nonempty)  # tail visits keep the resident weight
    prev = lambda a: jnp.concatenate([jnp.full((1,), -1, a.dtype), a[:-1]])
    first = (tile != prev(tile)).astype(jnp.int32)
    decode = (expert != prev(expert)).astype(jnp.int32)
    i32 = lambda a: a.astype(jnp.int32)
    return (i32(tile), i32(expert), i32(lo), i32(hi), first, decode), num_visits


def _split_x(x, m_pad: int, k_pad: int):
    """[M, Kin] -> [2, m_pad, k_pad/2]: even input channels, odd input channels, zero-padded."""
    M, K = x.shape
    x = jnp.pad(x, ((0, m_pad - M), (0, k_pad - K)))
    return jnp.moveaxis(x.reshape(m_pad, k_pad // 2, 2), 2, 0)


def _merge_x(x2, M: int, K: int):
    return jnp.moveaxis(x2, 0, 2).reshape(x2.shape[1], -1)[:M, :K]


# ----------------------------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------------------------


def _store_decoded(dec_ref, idx, lo, hi, tmp_ref, *, deinterleave: bool):
    """Write the decoded planes into dec_ref[idx, 0/1] ([bn, bk/2] each). With `deinterleave` the
    rows (output channels) are reordered [even rows; odd rows], i.e. [gate | up] for the
    interleaved gate/up weight. Mosaic's strided (sublane) load wants a memref exactly one lane
    tile wide, so the planes pass through `tmp_ref` [bn, 128], 128 lanes at a time."""
    if not deinterleave:
        dec_ref[idx, 0] = lo.astype(dec_ref.dtype)
        dec_ref[idx, 1] = hi.astype(dec_ref.dtype)
        return
    bn, half = lo.shape
    for p, plane in enumerate((lo, hi)):
        for c0 in range(0, half, NUM_LANES):
            w = min(NUM_LANES, half - c0)
            tmp_ref[:, :w] = plane[:, c0 : c0 + w]
            for r in range(2):
                rows = tmp_ref[pl.ds(r, bn // 2, stride=2), :]
                dec_ref[idx, p, r * (bn // 2) : (r + 1) * (bn // 2), c0 : c0 + w] = rows[:, :w].astype(dec_ref.dtype)


def _fwd_kernel(
    tile_ref,
    exp_ref,
    lo_ref,
    hi_ref,
    first_ref,
    dec_flag_ref,  # scalar prefetch
    x_ref,
    w_ref,
    s_ref,
    *rest,
    bm: int,
    bn: int,
    bk: int,
    nk: int,
    G: int,
    has_bias: bool,
    swiglu,
    deinterleave: bool,
    precision,
):
    if has_bias:
        b_ref, o_ref, acc_ref, dec_ref, *tmp = rest
    else:
        b_ref = None
        o_ref, acc_ref, dec_ref, *tmp = rest
    v, k = pl.program_id(1), pl.program_id(2)

    @pl.when(dec_flag_ref[v] == 1)
    def _decode():
        lo, hi = _decode_tile(w_ref[...], s_ref[...], k, block_k=bk, num_groups=G)
        _store_decoded(dec_ref, k, lo, hi, *(tmp or [None]), deinterleave=deinterleave)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    row_lo, row_hi = lo_ref[v], hi_ref[v]

    @pl.when(row_hi > row_lo)
    def _matmul():
        x = x_ref[...]
        acc = lax.dot_general(x[0], dec_ref[k, 0], _NT, precision=precision, preferred_element_type=jnp.float32)
        acc += lax.dot_general(x[1], dec_ref[k, 1], _NT, precision=precision, preferred_element_type=jnp.float32)
        acc_ref[...] += acc

    @pl.when(k == nk - 1)
    def _epilogue():
        y = acc_ref[...]
        if has_bias:
            y = y + b_ref[0]
        if swiglu is not None:
            alpha, limit = swiglu
            gate = jnp.minimum(y[:, : bn // 2], limit)
            up = jnp.clip(y[:, bn // 2 :], -limit, limit)
            y = gate * jax.nn.sigmoid(alpha * gate) * (up + 1.0)
        rows = tile_ref[v] * bm + lax.broadcasted_iota(jnp.int32, y.shape, 0)
        mask = (rows >= row_lo) & (rows < row_hi)

        @pl.when(first_ref[v] == 1)
        def _first():
            o_ref[...] = jnp.where(mask, y, 0.0).astype(o_ref.dtype)

        @pl.when(first_ref[v] == 0)
        def _merge():
            o_ref[...] = jnp.where(mask, y.astype(o_ref.dtype), o_ref[...])


def _cost(M: int, N: int, K: int, *arrays) -> pl.CostEstimate:
    """Every row multiplied once by its expert's [N, K] weight; each operand and result moved
    once (the packed weight at its packed size)."""
    return pl.CostEstimate(
        flops=2 * M * N * K,
        transcendentals=0,
        bytes_accessed=sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(arrays)),
    )


def _precision(dtype):
    # explicit for bf16 too: Mosaic rejects bf16 operands at fp32 precision, which a global
    # `jax_default_matmul_precision = "highest"` would otherwise request
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _forward(
    x,
    blocks,
    scales,
    group_sizes,
    bias,
    *,
    swiglu,
    bs: MatmulBlockSizes,
    interpret,
    out_dtype,
    deinterleave: bool = False,
):
    """[M, Nout] (or [M, Nout/2] with `swiglu`). `deinterleave` (implied by swiglu): each N tile's
    columns come out as [even columns | odd columns] ([gate | up]), over the padded width
    [M, tiles_n * bn] — the backward's pre-activation, split without lane shuffles."""
    deinterleave = deinterleave or swiglu is not None
    M, K = x.shape
    E, N, G, _ = blocks.shape
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    nk, nn = _cdiv(K, bk), _cdiv(N, bn)
    meta, _ = group_metadata(group_sizes, M, bm)
    V = meta[0].shape[0]
    x2 = _split_x(x, _cdiv(M, bm) * bm, nk * bk)
    w = blocks.reshape(E, N, G * BLOCK // 2)
    s = _pad_scales(scales, nn * bn)
    gp = s.shape[2]

    def wmap(n, v, k, tile, exp, lo, hi, first, dec):
        return exp[v], n, jnp.where(dec[v] == 1, k, nk - 1)  # reuse: stay on the resident block

    in_specs = [
        pl.BlockSpec((2, bm, bk // 2), lambda n, v, k, tile, *_: (0, tile[v], k)),
        pl.BlockSpec((None, bn, bk // 2), wmap),
        pl.BlockSpec((None, bn, gp), lambda n, v, k, tile, exp, *_: (exp[v], n, 0)),
    ]
    args = [x2, w, s]
    if bias is not None:
        b = bias.astype(jnp.float32)  # with deinterleave in the tile order, matching the weight rows
        b = to_tiles(b, bn) if deinterleave else jnp.pad(b, ((0, 0), (0, nn * bn - N)))
        args.append(b[:, None, :])
        in_specs.append(pl.BlockSpec((None, 1, bn), lambda n, v, k, tile, exp, *_: (exp[v], 0, n)))
    if swiglu is not None:
        out_n, out_bn = N // 2, bn // 2
    else:
        out_n, out_bn = (nn * bn if deinterleave else N), bn
    scratch = [pltpu.VMEM((bm, bn), jnp.float32), pltpu.VMEM((nk, 2, bn, bk // 2), x.dtype)]
    if deinterleave:
        scratch.append(pltpu.VMEM((bn, NUM_LANES), jnp.float32))  # 128 lanes of lo / hi before the row split
    kernel = functools.partial(
        _fwd_kernel,
        bm=bm,
        bn=bn,
        bk=bk,
        nk=nk,
        G=G,
        has_bias=bias is not None,
        swiglu=swiglu,
        deinterleave=deinterleave,
        precision=_precision(x.dtype),
    )
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(meta),
            grid=(nn, V, nk),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((bm, out_bn), lambda n, v, k, tile, *_: (tile[v], n)),
            scratch_shapes=scratch,
        ),
        out_shape=vma.out_struct((M, out_n), out_dtype, *meta, *args),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        cost_estimate=_cost(M, N, K, args, jax.ShapeDtypeStruct((M, out_n), out_dtype)),
        name="mxfp4_grouped_matmul_fwd",
    )(*meta, *args)


# ----------------------------------------------------------------------------------------------
# Backward kernel: dx = dh @ W_e (contract Nout)
# ----------------------------------------------------------------------------------------------


def _dx_kernel(
    tile_ref,
    exp_ref,
    lo_ref,
    hi_ref,
    first_ref,
    dec_flag_ref,
    dh_ref,
    w_ref,
    s_ref,
    o_ref,
    acc_ref,
    dec_ref,
    *tmp,
    bm: int,
    bk: int,
    nn: int,
    G: int,
    deinterleave: bool,
    precision,
):
    kt, v, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(dec_flag_ref[v] == 1)
    def _decode():
        lo, hi = _decode_tile(w_ref[...], s_ref[...], kt, block_k=bk, num_groups=G)
        _store_decoded(dec_ref, n, lo, hi, *(tmp or [None]), deinterleave=deinterleave)

    @pl.when(n == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    row_lo, row_hi = lo_ref[v], hi_ref[v]

    @pl.when(row_hi > row_lo)
    def _matmul():
        dh = dh_ref[...]
        acc_ref[0] += lax.dot_general(dh, dec_ref[n, 0], _NN, precision=precision, preferred_element_type=jnp.float32)
        acc_ref[1] += lax.dot_general(dh, dec_ref[n, 1], _NN, precision=precision, preferred_element_type=jnp.float32)

    @pl.when(n == nn - 1)
    def _epilogue():
        rows = tile_ref[v] * bm + lax.broadcasted_iota(jnp.int32, (bm, bk // 2), 0)
        mask = (rows >= row_lo) & (rows < row_hi)
        for p in range(2):

            @pl.when(first_ref[v] == 1)
            def _first():
                o_ref[p] = jnp.where(mask, acc_ref[p], 0.0).astype(o_ref.dtype)

            @pl.when(first_ref[v] == 0)
            def _merge():
                o_ref[p] = jnp.where(mask, acc_ref[p].astype(o_ref.dtype), o_ref[p])


def _input_grad(dh, blocks, scales, group_sizes, *, bs: MatmulBlockSizes, interpret, deinterleave: bool = False):
    """dh [M, Nout] (compute dtype) -> dx [M, Kin] in dh's dtype. With `deinterleave`, dh is
    [M, tiles_n * bn] with each N tile's columns in `_forward(deinterleave=True)`'s order, and the
    weight rows are decoded in that same order."""
    M = dh.shape[0]
    E, N, G, _ = blocks.shape
    K = G * BLOCK
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    nk, nn = _cdiv(K, bk), _cdiv(N, bn)
    meta, _ = group_metadata(group_sizes, M, bm)
    V = meta[0].shape[0]
    m_pad = _cdiv(M, bm) * bm
    dh = jnp.pad(dh, ((0, m_pad - M), (0, nn * bn - dh.shape[1])))
    w = blocks.reshape(E, N, K // 2)
    s = _pad_scales(scales, nn * bn)
    gp = s.shape[2]

    def wmap(kt, v, n, tile, exp, lo, hi, first, dec):
        return exp[v], jnp.where(dec[v] == 1, n, nn - 1), kt

    def smap(kt, v, n, tile, exp, lo, hi, first, dec):
        return exp[v], jnp.where(dec[v] == 1, n, nn - 1), 0

    kernel = functools.partial(
        _dx_kernel, bm=bm, bk=bk, nn=nn, G=G, deinterleave=deinterleave, precision=_precision(dh.dtype)
    )
    scratch = [pltpu.VMEM((2, bm, bk // 2), jnp.float32), pltpu.VMEM((nn, 2, bn, bk // 2), dh.dtype)]
    if deinterleave:
        scratch.append(pltpu.VMEM((bn, NUM_LANES), jnp.float32))
    dx2 = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(meta),
            grid=(nk, V, nn),
            in_specs=[
                pl.BlockSpec((bm, bn), lambda kt, v, n, tile, *_: (tile[v], n)),
                pl.BlockSpec((None, bn, bk // 2), wmap),
                pl.BlockSpec((None, bn, gp), smap),
            ],
            out_specs=pl.BlockSpec((2, bm, bk // 2), lambda kt, v, n, tile, *_: (0, tile[v], kt)),
            scratch_shapes=scratch,
        ),
        out_shape=vma.out_struct((2, m_pad, nk * bk // 2), dh.dtype, *meta, dh, w, s),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        cost_estimate=_cost(M, N, K, dh, w, s, jax.ShapeDtypeStruct((M, K), dh.dtype)),
        name="mxfp4_grouped_matmul_dx",
    )(*meta, dh, w, s)
    return _merge_x(dx2, M, K)


# ----------------------------------------------------------------------------------------------
# custom_vjp and the public entry point
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _mm(x, blocks, scales, group_sizes, bias, swiglu, bs, bs_bwd, interpret):
    return _forward(x, blocks, scales, group_sizes, bias, swiglu=swiglu, bs=bs, interpret=interpret, out_dtype=x.dtype)


def _mm_fwd(x, blocks, scales, group_sizes, bias, swiglu, bs, bs_bwd, interpret):
    # the fused gate/up projection's relayout tied to its input (see `_tied`); tying the down
    # projection's as well raised the 20b LoRA step on a v5e-8 (10.81 -> 11.21 GiB per chip)
    w = _tied(blocks, scales, x) if swiglu is not None else (blocks, scales)
    y = _mm(x, *w, group_sizes, bias, swiglu, bs, bs_bwd, interpret)
    return y, (x, blocks, scales, group_sizes, bias)  # the weights as given, not the tied copies


def _tied(blocks, scales, activation):
    """blocks and scales passed through an optimization barrier with an activation, so that what
    the kernels derive from them is computed no earlier than that activation exists.

    The kernels read the packed weight as [E, Nout, Kin/2] in its row-major tiling; the [E, Nout,
    G, 16] array lives in another TPU layout, so the reshape is a copy in HBM. The copies depend
    on the weights alone: in the 20b SFT step on a v5e-8, XLA:TPU held every layer's gate/up copy
    at the step's peak (24 x 127 MiB per chip). Tied to the layer's input (the fused gate/up
    forward) or its output gradient (every backward), a copy lives for about one kernel call. The
    remedy for good is to keep the experts as [E, Nout, Kin/2] on TPU; inference is not tied."""
    # only the weights are taken from the barrier: its outputs share one varying-axes type, which
    # would change the activation's (shard_map) and so its cotangent's
    (blocks, scales), _ = jax.lax.optimization_barrier(((blocks, scales), activation))
    return blocks, scales


def _mm_bwd(swiglu, bs, bs_bwd, interpret, res, dy):
    x, blocks, scales, group_sizes, bias = res
    blocks, scales = _tied(blocks, scales, dy)
    res = x, blocks, scales, group_sizes, bias
    M, N = x.shape[0], blocks.shape[1]
    if swiglu is None:
        dh, deinterleave = dy.astype(jnp.float32), False
    else:
        # Recompute the pre-activation in fp32 (no [M, Nout] residual kept), its columns split
        # [gate | up] per N tile by the kernel: separating interleaved lanes in XLA instead made
        # XLA:TPU's compile of this backward grow past 24 GB of host memory at gpt-oss shapes.
        bn = bs.block_n
        nn = -(-N // bn)
        h = _forward(
            x,
            blocks,
            scales,
            group_sizes,
            bias,
            swiglu=None,
            bs=bs,
            interpret=interpret,
            out_dtype=jnp.float32,
            deinterleave=True,
        ).reshape(M, nn, 2, bn // 2)
        dy = jnp.pad(dy.astype(jnp.float32), ((0, 0), (0, nn * bn // 2 - N // 2))).reshape(M, nn, bn // 2)
        _, vjp = jax.vjp(functools.partial(swiglu_halves, alpha=swiglu[0], limit=swiglu[1]), h[:, :, 0], h[:, :, 1])
        dh = jnp.stack(vjp(dy), axis=2).reshape(M, nn * bn)  # [gate | up] per tile, as h
        deinterleave = True
    return _grads(res, dh, deinterleave, bs, bs_bwd, interpret)


def _grads(res, dh, deinterleave: bool, bs, bs_bwd, interpret):
    """Gradients of (x, blocks, scales, group_sizes, bias) from the pre-activation's fp32 gradient
    dh (per-tile [gate | up] columns when `deinterleave`)."""
    x, blocks, scales, group_sizes, bias = res
    M, N = x.shape[0], blocks.shape[1]
    dx = _input_grad(
        dh.astype(x.dtype), blocks, scales, group_sizes, bs=bs_bwd, interpret=interpret, deinterleave=deinterleave
    )
    dx = vma.sum_to(dx, x)
    dbias = None
    if bias is not None:
        e = row_experts(group_sizes, M)
        dbias = jax.ops.segment_sum(dh, e, num_segments=bias.shape[0] + 1)[:-1]
        if deinterleave:  # back to interleaved columns (a small [E, Nout] array)
            E = bias.shape[0]
            dbias = jnp.swapaxes(dbias.reshape(E, -1, 2, bs.block_n // 2), 2, 3).reshape(E, -1)[:, :N]
        dbias = vma.sum_to(dbias.astype(bias.dtype), bias)
    zero_int = lambda a: jnp.zeros(a.shape, jax.dtypes.float0)
    return dx, zero_int(blocks), zero_int(scales), zero_int(group_sizes), dbias


_mm.defvjp(_mm_fwd, _mm_bwd)


# The pre-activation in the kernel's tile order, for an update added before the SwiGLU
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _mm_tiles(x, blocks, scales, group_sizes, bias, bs, bs_bwd, interpret):
    """x @ W_e^T + bias[e] in x's dtype, [M, tiles_n * bn], each N tile's columns [gate | up]."""
    return _forward(
        x,
        blocks,
        scales,
        group_sizes,
        bias,
        swiglu=None,
        bs=bs,
        interpret=interpret,
        out_dtype=x.dtype,
        deinterleave=True,
    )


def _mm_tiles_fwd(x, blocks, scales, group_sizes, bias, bs, bs_bwd, interpret):
    # not tied in the forward: that raised the 20b LoRA step on a v5e-8 (10.40 -> 10.81 GiB per chip)
    res = (x, blocks, scales, group_sizes, bias)
    return _mm_tiles(*res, bs, bs_bwd, interpret), res


def _mm_tiles_bwd(bs, bs_bwd, interpret, res, dy):
    x, blocks, scales, group_sizes, bias = res
    blocks, scales = _tied(blocks, scales, dy)
    return _grads((x, blocks, scales, group_sizes, bias), dy.astype(jnp.float32), True, bs, bs_bwd, interpret)


_mm_tiles.defvjp(_mm_tiles_fwd, _mm_tiles_bwd)


def to_tiles(cols, bn: int):
    """[..., Nout] interleaved gate/up columns -> [..., tiles_n * bn] in the kernel's tile order
    (zero padded): for a small operand such as a LoRA factor, where the shuffle is cheap."""
    N = cols.shape[-1]
    nn = _cdiv(N, bn)
    cols = jnp.pad(cols, [(0, 0)] * (cols.ndim - 1) + [(0, nn * bn - N)])
    return jnp.swapaxes(cols.reshape(*cols.shape[:-1], nn, bn // 2, 2), -1, -2).reshape(*cols.shape[:-1], nn * bn)


def _swiglu_low_rank(x, blocks, scales, group_sizes, bias, a, b, *, swiglu, bs, bs_bwd, interpret):
    """swiglu(round(x @ W_e^T + bias[e]) + a @ b) with the pre-activation left in tile order: b's
    columns are permuted (`to_tiles`, [R, Nout]) instead of the [M, Nout] activation, and the
    SwiGLU reads whole lane tiles. Separating interleaved lanes of the activation in XLA is what
    made XLA:TPU's compile of a gpt-oss-20b LoRA step grow past 8 GB of host memory for one layer."""
    M, N = x.shape[0], blocks.shape[1]
    bn = bs.block_n
    nn = _cdiv(N, bn)
    h = _mm_tiles(x, blocks, scales, group_sizes, bias, bs, bs_bwd, interpret).astype(jnp.float32)
    h = (h + jnp.dot(a, to_tiles(b, bn), preferred_element_type=jnp.float32)).reshape(M, nn, 2, bn // 2)
    y = swiglu_halves(h[:, :, 0], h[:, :, 1], alpha=swiglu[0], limit=swiglu[1])
    return y.reshape(M, nn * bn // 2)[:, : N // 2].astype(x.dtype)


def resolve_block_sizes(
    block_sizes, M: int, N: int, K: int, *, swiglu: bool, interpret, dtype=jnp.bfloat16
) -> MatmulBlockSizes:
    """Clamp the requested tiles to the problem (a tile covering a whole dim becomes that dim) and
    check the Mosaic tiling rules (skipped in interpret mode)."""
    bs = block_sizes or DEFAULT_BLOCK_SIZES
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    if min(bm, bn, bk) <= 0:
        raise ValueError(f"block sizes must be positive, got {bs}")
    bm = min(bm, _round_up(M, 8))
    bn = N if bn >= N else bn
    bk = K if bk >= K else bk
    if bk % BLOCK:
        raise ValueError(f"block_k must be a multiple of {BLOCK} (whole MXFP4 blocks), got {bk}")
    if swiglu and bn % 2:
        raise ValueError(f"block_n must be even with swiglu (gate/up pairs), got {bn}")
    if not interpret:
        sub = 16 if jnp.dtype(dtype).itemsize == 2 else 8
        if bm % sub:
            raise ValueError(f"block_m must be a multiple of {sub} on TPU, got {bm}")
        lane_n = 2 * NUM_LANES if swiglu else NUM_LANES
        if bn != N and bn % lane_n:
            raise ValueError(f"block_n must be a multiple of {lane_n} (or all of Nout={N}) on TPU, got {bn}")
        if swiglu and bn == N and bn % (2 * 8):
            raise ValueError(f"block_n = Nout must be a multiple of 16 with swiglu, got {bn}")
        if bk != K and bk % (2 * NUM_LANES):
            raise ValueError(f"block_k must be a multiple of {2 * NUM_LANES} (or all of Kin={K}) on TPU, got {bk}")
    return MatmulBlockSizes(bm, bn, bk)


def mxfp4_grouped_matmul(
    x,
    blocks,
    scales,
    group_sizes,
    *,
    bias=None,
    swiglu=None,
    low_rank=None,
    interpret=False,
    block_sizes: MatmulBlockSizes | None = None,
):
    """See the module docstring. `interpret` is False, True (fast interpret mode on CPU) or a
    `pltpu.InterpretParams` (TPU-faithful interpreter). `low_rank` needs `swiglu` here (without it
    the dispatcher adds the update to the plain output)."""
    M, K = x.shape
    N = blocks.shape[1]
    swiglu = None if swiglu is None else (float(swiglu[0]), float(swiglu[1]))
    bs = resolve_block_sizes(block_sizes, M, N, K, swiglu=swiglu is not None, interpret=interpret, dtype=x.dtype)
    bs_bwd = MatmulBlockSizes(bs.block_m, bs.block_n, min(bs.block_k, BWD_BLOCK_K))
    bs_bwd = resolve_block_sizes(bs_bwd, M, N, K, swiglu=False, interpret=interpret, dtype=x.dtype)
    if low_rank is not None:
        if swiglu is None:
            raise ValueError("low_rank needs swiglu in the TPU kernel's entry; use kernels.mxfp4_grouped_matmul")
        return _jitted_low_rank(
            x,
            blocks,
            scales,
            group_sizes.astype(jnp.int32),
            bias,
            *low_rank,
            swiglu=swiglu,
            bs=bs,
            bs_bwd=bs_bwd,
            interpret=interpret,
        )
    return _jitted(
        x, blocks, scales, group_sizes.astype(jnp.int32), bias, swiglu=swiglu, bs=bs, bs_bwd=bs_bwd, interpret=interpret
    )


@functools.partial(jax.jit, static_argnames=("swiglu", "bs", "bs_bwd", "interpret"))
def _jitted(x, blocks, scales, group_sizes, bias, *, swiglu, bs, bs_bwd, interpret):
    return _mm(x, blocks, scales, group_sizes, bias, swiglu, bs, bs_bwd, interpret)


_jitted_low_rank = jax.jit(_swiglu_low_rank, static_argnames=("swiglu", "bs", "bs_bwd", "interpret"))


# ----------------------------------------------------------------------------------------------
# Decode only (tests / debugging): the kernels' tile decode, written out as [E, Nout, Kin]
# ----------------------------------------------------------------------------------------------


def _dequant_kernel(w_ref, s_ref, o_ref, *, bk: int, G: int):
    lo, hi = _decode_tile(w_ref[...], s_ref[...], pl.program_id(2), block_k=bk, num_groups=G)
    o_ref[0] = lo
    o_ref[1] = hi


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "interpret"))
def dequantize_tiles(blocks, scales, *, block_n: int, block_k: int, interpret=False):
    """Decode [E, Nout, Kin/32, 16] / [E, Nout, Kin/32] to fp32 [E, Nout, Kin] with exactly the
    tile decode the matmul kernels use (same BlockSpecs, K-edge and N-edge handling)."""
    E, N, G, _ = blocks.shape
    K = G * BLOCK
    bn = N if block_n >= N else block_n
    bk = K if block_k >= K else block_k
    nk, nn = _cdiv(K, bk), _cdiv(N, bn)
    w = blocks.reshape(E, N, K // 2)
    s = _pad_scales(scales, nn * bn)
    out = pl.pallas_call(
        functools.partial(_dequant_kernel, bk=bk, G=G),
        grid=(E, nn, nk),
        in_specs=[
            pl.BlockSpec((None, bn, bk // 2), lambda e, n, k: (e, n, k)),
            pl.BlockSpec((None, bn, s.shape[2]), lambda e, n, k: (e, n, 0)),
        ],
        out_specs=pl.BlockSpec((None, 2, bn, bk // 2), lambda e, n, k: (e, 0, n, k)),
        out_shape=jax.ShapeDtypeStruct((E, 2, N, nk * bk // 2), jnp.float32),
        interpret=interpret,
    )(w, s)
    return jnp.moveaxis(out, 1, 3).reshape(E, N, -1)[:, :, :K]
