"""Grouped matmul of expert-sorted rows against packed MXFP4 expert weights, in Pallas on Triton
(GPU); `interpret=True` runs the very same kernels on CPU.

    mxfp4_grouped_matmul(x, blocks, scales, group_sizes, *, bias=None, swiglu=None,
                         interpret=False, block_sizes=None) -> [M, Nout] (or [M, Nout/2])

Semantics are those of `gptoss_jax.kernels.mxfp4_matmul` (x [M, Kin] sorted by expert, blocks
[E, Nout, Kin/32, 16] uint8, scales [E, Nout, Kin/32] uint8, group_sizes [E], optional bias
[E, Nout] and fused `swiglu=(alpha, limit)`). Differentiable in x and bias through a
`jax.custom_vjp` whose backward is two Pallas kernels; the packed weight and the group sizes get
float0 zeros.

What is notable:

* Group metadata, computed in jnp outside the kernels (`group_tiles`). The rows past
  sum(group_sizes) are an extra "none" group E. Every group is cut along the M tiles it touches,
  giving one *visit* (expert, m tile, first row, end row) per (group, m tile) pair. The number of
  visits is at most cdiv(M, block_m) + E (each of the E group boundaries inside a tile adds one),
  which is the static grid size; the unused tail visits have an empty row range. A tile that
  straddles a group boundary is visited once per group, each visit masking the rows of the
  other groups out of its loads and its stores, so every output row is written by exactly one
  program and there is no race. A "none" visit runs zero K iterations and writes zeros.
* Decode in registers, no gather. A program loads the packed bytes [bn, bk/2] and the scales
  [bn, bk/32] of its weight tile and builds each value's float32 bits directly: for the code
  c = s|e|m (sign, 2-bit exponent, mantissa) and scale byte S, a normal E2M1 value times
  2**(S-127) has biased exponent e - 1 + S and mantissa bit m; the subnormal code (e=0, m=1, the
  value 0.5) has exponent S - 1 and mantissa 0; code 0 is +-0. The scale is thus folded into the
  exponent with integer adds (no multiply, no table). Results below the normal range are flushed
  to +-0 and above it become +-inf (as the fp32 reference gives on XLA:CPU). The low nibble
  (even element) and the high nibble (odd element) are decoded separately and interleaved with
  a stack/reshape (Triton's join), then cast to x's dtype for `pl.dot` (bf16 values are exact).
* Fused SwiGLU without an in-register de-interleave: the packed weight (a free reshape) is
  viewed as [E, Nout/2, 2, Kin/2] and a program with `block_n` pre-activation columns computes
  two accumulators of block_n/2 columns, one over the gate rows (index 0) and one over the up
  rows (index 1). The epilogue clamps them and writes gate*sigmoid(alpha*gate)*(up+1) as a
  [block_m, block_n/2] tile of the [M, Nout/2] output. The bias is viewed the same way.
* Edges. Triton tiles are powers of two; Kin = 2880 (90 MXFP4 blocks) and Nout = 5760 / 2880 are
  not multiples of every tile, so loads of x, the bytes, the scales and the bias are masked at
  the K and N edges (masked bytes read as code 0, i.e. 0, so garbage never meets the dot) and
  stores are masked at the N (forward) / K (backward) edge and to the program's row range.
* Backward. With dh = dy (or, with swiglu fused, the swiglu derivative applied to the
  recomputed pre-activation h): dx = dh @ W_e, contracting the weight's output axis, by a kernel
  that reads the packed weight (tile over rows and Kin, loop over Nout), and dbias = per-expert
  column sums of dh (a segment sum in XLA). With swiglu, h is recomputed by the forward kernel
  in a mode whose epilogue reads dy and writes dh [M, Nout] in fp32 (interleaved as h), so h
  itself is never saved nor written. The dx kernel casts dh to x's dtype before its dot, as the
  XLA path does.
* Triton: every pallas_call gets `plgpu.CompilerParams(num_warps, num_stages)`, which selects the
  Triton lowering for cuda. fp32 inputs use IEEE dots (precision HIGHEST), bf16 inputs bf16 dots
  with fp32 accumulation. The K loop has a dynamic trip count (0 for "none" visits), which the
  Triton lowering still turns into an scf.for; the count is built as int32(ok) * k_tiles because a
  scalar `jnp.where(ok, k_tiles, 0)` of two literals lowered to an i1 bound that the MLIR
  verifier rejects (the lowering test runs the verifier on every Triton module).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gptoss_jax.kernels import vma
from gptoss_jax.kernels.groups import MatmulBlockSizes, row_experts
from gptoss_jax.mxfp4 import BLOCK

DEFAULT_BLOCK_SIZES = MatmulBlockSizes(block_m=64, block_n=128, block_k=64)
MIN_DOT = 16  # Triton's tl.dot needs every dim >= 16

# metadata rows of `group_tiles`
_EXPERT, _TILE, _LO, _HI = range(4)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------
# Static configuration (trace time)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
    M: int
    Kin: int
    Nout: int
    E: int
    block_m: int
    block_n: int  # pre-activation output columns per tile (both halves with swiglu)
    block_k: int
    swiglu: tuple[float, float] | None
    has_bias: bool
    dtype: str  # x's dtype name
    interpret: bool

    @property
    def fp32(self) -> bool:
        return jnp.dtype(self.dtype) == jnp.float32

    @property
    def precision(self):
        return lax.Precision.HIGHEST if self.fp32 else lax.Precision.DEFAULT

    @property
    def parts(self) -> int:  # 2: gate/up accumulators side by side
        return 1 if self.swiglu is None else 2

    @property
    def visits(self) -> int:
        return _cdiv(self.M, self.block_m) + self.E

    @property
    def n_tiles(self) -> int:
        return _cdiv(self.Nout, self.block_n)

    @property
    def k_tiles(self) -> int:
        return _cdiv(self.Kin, self.block_k)

    def compiler_params(self, tile_elems: int):
        num_warps = 4 if tile_elems <= 64 * 128 else 8
        return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)


def effective_block_sizes(M: int, Kin: int, Nout: int, swiglu, block_sizes: MatmulBlockSizes | None):
    """(block_m, block_n, block_k) actually used: defaults, power-of-two check, then clamped to
    the (power-of-two rounded) problem with every dot dim >= 16 (block_n/2 >= 16 with swiglu)
    and block_k a whole number of MXFP4 blocks."""
    bs = block_sizes or DEFAULT_BLOCK_SIZES
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    if not all(map(_is_pow2, (bm, bn, bk))):
        raise ValueError(f"pallas_gpu mxfp4 matmul needs power-of-two block sizes, got {bm}, {bn}, {bk}")
    min_n = MIN_DOT * (1 if swiglu is None else 2)
    bm = max(min(bm, _next_pow2(M)), MIN_DOT)
    bn = max(min(bn, _next_pow2(Nout)), min_n)
    bk = max(min(bk, _next_pow2(Kin)), BLOCK)
    return bm, bn, bk


def _config(x, blocks, group_sizes, bias, swiglu, interpret, block_sizes) -> _Config:
    E, Nout, G, _ = blocks.shape
    M, Kin = x.shape
    bm, bn, bk = effective_block_sizes(M, Kin, Nout, swiglu, block_sizes)
    sw = None if swiglu is None else (float(swiglu[0]), float(swiglu[1]))
    return _Config(
        M=M,
        Kin=Kin,
        Nout=Nout,
        E=E,
        block_m=bm,
        block_n=bn,
        block_k=bk,
        swiglu=sw,
        has_bias=bias is not None,
        dtype=jnp.dtype(x.dtype).name,
        interpret=bool(interpret),
    )


# --------------------------------------------------------------------------------------------
# Group metadata (jnp, outside the kernels)
# --------------------------------------------------------------------------------------------


def group_tiles(group_sizes, M: int, block_m: int):
    """[4, V] int32, V = cdiv(M, block_m) + E: per visit (expert, m tile, first row, end row).

    Group E ("none") holds the rows past sum(group_sizes). Visits are ordered by group, then by
    tile; the tail past the real visits has expert E and the empty row range [0, 0)."""
    E = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    rest = jnp.maximum(M - jnp.sum(sizes), 0)
    sizes = jnp.concatenate([sizes, rest[None]])  # [E+1]
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first = starts // block_m
    n_vis = jnp.where(sizes > 0, (ends - 1) // block_m - first + 1, 0)
    cum = jnp.cumsum(n_vis)
    V = _cdiv(M, block_m) + E
    v = jnp.arange(V, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(cum, v, side="right"), E).astype(jnp.int32)
    valid = v < cum[-1]
    tile = first[g] + v - (cum[g] - n_vis[g])
    lo = jnp.maximum(starts[g], tile * block_m)
    hi = jnp.minimum(ends[g], tile * block_m + block_m)
    zero = jnp.zeros_like(v)
    return jnp.stack(
        [jnp.where(valid, g, E), jnp.where(valid, tile, zero), jnp.where(valid, lo, zero), jnp.where(valid, hi, zero)]
    ).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# In-kernel helpers
# --------------------------------------------------------------------------------------------


def _e2m1_bits(code, scale):
    """float32 bits (int32) of E2M1[code] * 2**(scale - 127); code, scale int32 of one shape.
    Normal results are exact; below the normal range -> +-0, above -> +-inf."""
    sign = jnp.where((code & 8) != 0, jnp.int32(-(2**31)), jnp.int32(0))
    e, m = (code >> 1) & 3, code & 1
    field = jnp.where(e == 0, scale - 1, e - 1 + scale)  # biased fp32 exponent of the result
    mant = jnp.where(e == 0, 0, m << 22)
    mag = jnp.where(field >= 255, jnp.int32(0x7F800000), (field << 23) | mant)
    mag = jnp.where(((code & 7) == 0) | (field <= 0), 0, mag)
    return mag | sign


def decode_tile(packed, scales, dtype):
    """packed [r, c/2] uint8 (element 2b in the low nibble of byte b), scales [r, c/32] uint8 ->
    [r, c] in dtype, element k in its natural position."""
    r, half = packed.shape
    b = packed.astype(jnp.int32)
    s = scales.astype(jnp.int32)
    s = jnp.broadcast_to(s[:, :, None], (r, s.shape[1], BLOCK // 2)).reshape(r, half)
    lo = lax.bitcast_convert_type(_e2m1_bits(b & 15, s), jnp.float32)
    hi = lax.bitcast_convert_type(_e2m1_bits(b >> 4, s), jnp.float32)
    return jnp.stack([lo, hi], axis=-1).reshape(r, 2 * half).astype(dtype)


def _iota(n: int):
    return lax.broadcasted_iota(jnp.int32, (n,), 0)


def _load_weight(b_ref, s_ref, e, row0, part, k0, rows: int, cols: int, n_rows: int, Kin: int, dtype):
    """Decoded [rows, cols] tile of expert e: rows row0.. of the [E, n_rows, P, Kin/2] packed view
    (part `part`), input channels k0.. (k0 a multiple of cols). Rows >= n_rows and channels
    >= Kin read as 0."""
    part = jnp.int32(part)  # a traced scalar index: interpret mode rejects static ints here
    r = row0 + _iota(rows)
    kb = k0 // 2 + _iota(cols // 2)
    ks = k0 // BLOCK + _iota(cols // BLOCK)
    row_ok = (r < n_rows)[:, None]
    packed = plgpu.load(
        b_ref.at[e, pl.ds(row0, rows), part, pl.ds(pl.multiple_of(k0 // 2, cols // 2), cols // 2)],
        mask=row_ok & (kb < Kin // 2)[None, :],
        other=0,
    )
    sc = plgpu.load(
        s_ref.at[e, pl.ds(row0, rows), part, pl.ds(k0 // BLOCK, cols // BLOCK)],
        mask=row_ok & (ks < Kin // BLOCK)[None, :],
        other=127,
    )
    return decode_tile(packed, sc, dtype)


def _visit(meta_ref, v):
    return (meta_ref[_EXPERT, v], meta_ref[_TILE, v], meta_ref[_LO, v], meta_ref[_HI, v])


def _swiglu_parts(gate, up, alpha, limit):
    g = jnp.minimum(gate, limit)
    u = jnp.clip(up, -limit, limit)
    return g * jax.nn.sigmoid(alpha * g) * (u + 1.0)


def _swiglu_grad_parts(gate, up, dy, alpha, limit):
    """d/dgate, d/dup of swiglu times dy, with jnp.minimum / jnp.clip's derivative (1 inside,
    0 outside, 1/2 exactly at the limit)."""
    g = jnp.minimum(gate, limit)
    u = jnp.clip(up, -limit, limit)
    dg_mask = jnp.where(gate < limit, 1.0, jnp.where(gate == limit, 0.5, 0.0))
    inside = (up > -limit) & (up < limit)
    du_mask = jnp.where(inside, 1.0, jnp.where((up == limit) | (up == -limit), 0.5, 0.0))
    sig = jax.nn.sigmoid(alpha * g)
    dgate = dy * (u + 1.0) * (sig + g * alpha * sig * (1.0 - sig)) * dg_mask
    dup = dy * g * sig * du_mask
    return dgate, dup


# --------------------------------------------------------------------------------------------
# Forward kernel (also the backward's h recompute with the swiglu derivative as epilogue)
# --------------------------------------------------------------------------------------------


def _fwd_kernel(*refs, cfg: _Config, mode: str):
    """mode "out": write y (swiglu applied if fused); mode "dh": read dy, write dh = dy * swiglu'(h)
    into the [M, Nout/2, 2] fp32 view of dh."""
    meta_ref, x_ref, b_ref, s_ref, *refs = refs
    bias_ref = refs.pop(0) if cfg.has_bias else None
    dy_ref = refs.pop(0) if mode == "dh" else None
    (o_ref,) = refs
    bm, bk, P = cfg.block_m, cfg.block_k, cfg.parts
    bnp = cfg.block_n // P  # columns per accumulator
    n_rows = cfg.Nout // P  # rows of the packed [E, Nout/P, P, Kin/2] view
    j, v = pl.program_id(0), pl.program_id(1)
    e, tile, lo, hi = _visit(meta_ref, v)
    ec = jnp.minimum(e, cfg.E - 1)
    m0 = tile * bm
    rows = m0 + _iota(bm)
    row_ok = (rows >= lo) & (rows < hi)
    n0 = j * bnp
    cols = n0 + _iota(bnp)
    col_ok = cols < n_rows
    dtype = jnp.dtype(cfg.dtype)
    nk = ((e < cfg.E) & (hi > lo)).astype(jnp.int32) * cfg.k_tiles  # 0 for none / empty visits

    def body(kk, accs):
        k0 = kk * bk
        kcols = k0 + _iota(bk)
        x = plgpu.load(
            x_ref.at[pl.ds(m0, bm), pl.ds(pl.multiple_of(k0, bk), bk)],
            mask=row_ok[:, None] & (kcols < cfg.Kin)[None, :],
            other=0,
        )
        out = []
        for p, acc in enumerate(accs):
            w = _load_weight(b_ref, s_ref, ec, n0, p, k0, bnp, bk, n_rows, cfg.Kin, dtype)
            out.append(acc + plgpu.dot(x, w, trans_b=True, precision=cfg.precision))
        return tuple(out)

    accs = tuple(jnp.zeros((bm, bnp), jnp.float32) for _ in range(P))
    accs = lax.fori_loop(0, nk, body, accs)
    if cfg.has_bias:
        b_ok = col_ok & (e < cfg.E)
        accs = tuple(
            acc
            + plgpu.load(bias_ref.at[ec, pl.ds(n0, bnp), jnp.int32(p)], mask=b_ok, other=0).astype(jnp.float32)[None, :]
            for p, acc in enumerate(accs)
        )
    mask = row_ok[:, None] & col_ok[None, :]
    out_idx = (pl.ds(m0, bm), pl.ds(n0, bnp))
    if mode == "out":
        if cfg.swiglu is None:
            y = accs[0]
        else:
            y = _swiglu_parts(accs[0], accs[1], *cfg.swiglu)
        plgpu.store(o_ref.at[out_idx], y.astype(o_ref.dtype), mask=mask)
    else:
        dy = plgpu.load(dy_ref.at[out_idx], mask=mask, other=0).astype(jnp.float32)
        dgate, dup = _swiglu_grad_parts(accs[0], accs[1], dy, *cfg.swiglu)
        plgpu.store(o_ref.at[(*out_idx, jnp.int32(0))], dgate, mask=mask)
        plgpu.store(o_ref.at[(*out_idx, jnp.int32(1))], dup, mask=mask)


def _forward(x, blocks, scales, meta, bias, cfg: _Config, *, mode: str = "out", dy=None):
    E, P = cfg.E, cfg.parts
    b4 = blocks.reshape(E, cfg.Nout // P, P, cfg.Kin // 2)
    s4 = scales.reshape(E, cfg.Nout // P, P, cfg.Kin // BLOCK)
    args = [meta, x, b4, s4]
    if cfg.has_bias:
        args.append(bias.reshape(E, cfg.Nout // P, P))
    if mode == "out":
        out_shape = vma.out_struct((cfg.M, cfg.Nout // P), x.dtype, *args)
    else:
        args.append(dy)
        out_shape = vma.out_struct((cfg.M, cfg.Nout // 2, 2), jnp.float32, *args)
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, mode=mode),
        grid=(cfg.n_tiles, cfg.visits),
        out_shape=out_shape,
        compiler_params=cfg.compiler_params(cfg.block_m * cfg.block_n),
        interpret=cfg.interpret,
        name=f"mxfp4_grouped_matmul_{mode}",
    )(*args)
    return out if mode == "out" else out.reshape(cfg.M, cfg.Nout)


# --------------------------------------------------------------------------------------------
# Backward: dx = dh @ W_e
# --------------------------------------------------------------------------------------------


def _dx_kernel(meta_ref, dh_ref, b_ref, s_ref, dx_ref, *, cfg: _Config):
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    j, v = pl.program_id(0), pl.program_id(1)
    e, tile, lo, hi = _visit(meta_ref, v)
    ec = jnp.minimum(e, cfg.E - 1)
    m0 = tile * bm
    rows = m0 + _iota(bm)
    row_ok = (rows >= lo) & (rows < hi)
    k0 = j * bk
    kcols = k0 + _iota(bk)
    dtype = jnp.dtype(cfg.dtype)
    nn = ((e < cfg.E) & (hi > lo)).astype(jnp.int32) * cfg.n_tiles

    def body(jn, acc):
        n0 = jn * bn
        ncols = n0 + _iota(bn)
        dh = plgpu.load(
            dh_ref.at[pl.ds(m0, bm), pl.ds(pl.multiple_of(n0, bn), bn)],
            mask=row_ok[:, None] & (ncols < cfg.Nout)[None, :],
            other=0,
        ).astype(dtype)
        w = _load_weight(b_ref, s_ref, ec, n0, 0, k0, bn, bk, cfg.Nout, cfg.Kin, dtype)  # [bn, bk]
        return acc + plgpu.dot(dh, w, precision=cfg.precision)

    acc = lax.fori_loop(0, nn, body, jnp.zeros((bm, bk), jnp.float32))
    plgpu.store(
        dx_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)],
        acc.astype(dx_ref.dtype),
        mask=row_ok[:, None] & (kcols < cfg.Kin)[None, :],
    )


def _input_grad(dh, blocks, scales, meta, cfg: _Config):
    E = cfg.E
    b4 = blocks.reshape(E, cfg.Nout, 1, cfg.Kin // 2)
    s4 = scales.reshape(E, cfg.Nout, 1, cfg.Kin // BLOCK)
    return pl.pallas_call(
        functools.partial(_dx_kernel, cfg=cfg),
        grid=(cfg.k_tiles, cfg.visits),
        out_shape=vma.out_struct((cfg.M, cfg.Kin), jnp.dtype(cfg.dtype), meta, dh, b4, s4),
        compiler_params=cfg.compiler_params(cfg.block_m * cfg.block_k),
        interpret=cfg.interpret,
        name="mxfp4_grouped_matmul_dx",
    )(meta, dh, b4, s4)


# --------------------------------------------------------------------------------------------
# custom_vjp and the public entry points
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _matmul(x, blocks, scales, group_sizes, bias, cfg: _Config):
    meta = group_tiles(group_sizes, cfg.M, cfg.block_m)
    return _forward(x, blocks, scales, meta, bias, cfg)


def _matmul_fwd(x, blocks, scales, group_sizes, bias, cfg: _Config):
    return _matmul(x, blocks, scales, group_sizes, bias, cfg), (x, blocks, scales, group_sizes, bias)


def _matmul_bwd(cfg: _Config, res, dy):
    x, blocks, scales, group_sizes, bias = res
    meta = group_tiles(group_sizes, cfg.M, cfg.block_m)
    if cfg.swiglu is None:
        dh = dy  # the dx kernel casts to x's dtype in registers
    else:  # recompute h tile by tile; the epilogue applies the swiglu derivative
        dh = _forward(x, blocks, scales, meta, bias, cfg, mode="dh", dy=dy)
    dx = vma.sum_to(_input_grad(dh, blocks, scales, meta, cfg), x)
    dbias = None
    if bias is not None:
        e = row_experts(group_sizes, cfg.M)
        dbias = jax.ops.segment_sum(dh.astype(jnp.float32), e, num_segments=cfg.E + 1)[:-1]
        dbias = vma.sum_to(dbias.astype(bias.dtype), bias)
    zero_int = lambda a: jnp.zeros(a.shape, jax.dtypes.float0)  # integer inputs: no gradient
    return dx, zero_int(blocks), zero_int(scales), zero_int(group_sizes), dbias


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _jitted(x, blocks, scales, group_sizes, bias, cfg: _Config):
    return _matmul(x, blocks, scales, group_sizes, bias, cfg)


def mxfp4_grouped_matmul(
    x,
    blocks,
    scales,
    group_sizes,
    *,
    bias=None,
    swiglu=None,
    interpret: bool = False,
    block_sizes: MatmulBlockSizes | None = None,
):
    """See the module docstring; shapes are checked by `kernels.mxfp4_matmul`'s dispatcher."""
    cfg = _config(x, blocks, group_sizes, bias, swiglu, interpret, block_sizes)
    return _jitted(x, blocks, scales, group_sizes.astype(jnp.int32), bias, cfg)


# --------------------------------------------------------------------------------------------
# Decode alone (tests: the matmul's own tile decode, run as a kernel)
# --------------------------------------------------------------------------------------------


def _decode_kernel(b_ref, s_ref, o_ref, *, Nout: int, Kin: int, bn: int, bk: int):
    e, j, kk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    w = _load_weight(b_ref, s_ref, e, j * bn, 0, kk * bk, bn, bk, Nout, Kin, o_ref.dtype)
    rows, cols = j * bn + _iota(bn), kk * bk + _iota(bk)
    plgpu.store(
        o_ref.at[e, pl.ds(j * bn, bn), pl.ds(kk * bk, bk)], w, mask=(rows < Nout)[:, None] & (cols < Kin)[None, :]
    )


@functools.partial(jax.jit, static_argnames=("dtype", "interpret", "block_n", "block_k"))
def dequantize_kernel(
    blocks, scales, dtype=jnp.float32, *, interpret: bool = False, block_n: int = 32, block_k: int = 64
):
    """[E, Nout, Kin] decoded by the matmul's own in-kernel tile decode (`_load_weight`), with the
    same edge masking; for testing the decode against `gptoss_jax.mxfp4.dequantize`."""
    E, Nout, G, _ = blocks.shape
    Kin = G * BLOCK
    b4 = blocks.reshape(E, Nout, 1, Kin // 2)
    s4 = scales.reshape(E, Nout, 1, G)
    return pl.pallas_call(
        functools.partial(_decode_kernel, Nout=Nout, Kin=Kin, bn=block_n, bk=block_k),
        grid=(E, _cdiv(Nout, block_n), _cdiv(Kin, block_k)),
        out_shape=jax.ShapeDtypeStruct((E, Nout, Kin), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="mxfp4_decode",
    )(b4, s4)
