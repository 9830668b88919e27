"""MXFP4 (OCP microscaling, E2M1 elements with a shared E8M0 scale) tensors as JAX pytrees.

The checkpoints store each expert matrix [..., out, in] as
  blocks [..., out, in/32, 16] uint8   two E2M1 codes per byte, element 2b in the LOW nibble
  scales [..., out, in/32]     uint8   E8M0, multiplier 2**(scale - 127)
so a block is 32 consecutive values along the contraction (input) axis. `MXFP4` keeps exactly
that layout, so loading is a byte copy and nothing is unpacked until a matmul needs it.

Every decoded value is a small integer multiple of a power of two, hence exact in bf16 and fp32.
`quantize` is the OCP MX v1.0 rule: shared exponent floor(log2(amax)) - 2 (E2M1's largest
exponent), elements rounded to nearest, ties to even, saturating at +-6.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 32  # values per shared scale
SCALE_BIAS = 127
# E2M1 code -> value. Bit 3 is the sign; codes 0..7 are the magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6.
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32
)
_E2M1_MAX_EXP = 2  # 6 = 1.5 * 2**2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MXFP4:
    """A packed MXFP4 matrix (or stack of matrices) whose logical shape is [..., rows, cols]."""

    blocks: jax.Array  # [..., rows, cols/32, 16] uint8
    scales: jax.Array  # [..., rows, cols/32] uint8

    def __post_init__(self):
        b, s = self.blocks, self.scales
        # Pytree transformations rebuild the node with placeholder leaves; only check real arrays.
        if hasattr(b, "shape") and hasattr(s, "shape"):
            if b.shape[:-1] != s.shape or b.shape[-1] != BLOCK // 2:
                raise ValueError(
                    f"MXFP4 blocks {tuple(b.shape)} and scales {tuple(s.shape)} do not fit: "
                    f"need blocks [..., G, {BLOCK // 2}] and scales [..., G]"
                )

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical (decoded) shape."""
        return tuple(self.scales.shape[:-1]) + (self.scales.shape[-1] * BLOCK,)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.blocks.shape)) + int(np.prod(self.scales.shape))

    def dequantize(self, dtype=jnp.bfloat16) -> jax.Array:
        return dequantize(self, dtype)


def _e2m1_to_f32(code):
    """E2M1 codes (uint32, 0..15) to float32 by building the bits: no table gather, which is slow
    on CPU. sign = bit 3, exponent = bits 2..1 (bias 1), mantissa = bit 0; exponent 0 is subnormal
    (0 or 0.5)."""
    sign = (code & 8) << 28
    e, m = (code >> 1) & 3, code & 1
    normal = ((e + 126) << 23) | (m << 22)
    bits = jnp.where(e == 0, jnp.where(m == 1, jnp.uint32(126 << 23), jnp.uint32(0)), normal)
    return jax.lax.bitcast_convert_type(bits | sign, jnp.float32)


def _pow2(exp):
    """2**exp as float32 for int32 exp in [-63, 64], exact (normal range)."""
    return jax.lax.bitcast_convert_type((exp + 127).astype(jnp.uint32) << 23, jnp.float32)


def dequantize(t: MXFP4, dtype=jnp.bfloat16) -> jax.Array:
    """Decode to [..., rows, cols] in `dtype` (jnp; works inside jit). Exact wherever the result
    is a normal float32 (every scale >= 2; checkpoints use scales near 127): the scale is applied
    as two power-of-two factors, each a normal float, because XLA:CPU flushes subnormals."""
    blocks = jnp.asarray(t.blocks).astype(jnp.uint32)
    vals = jnp.stack([_e2m1_to_f32(blocks & 0x0F), _e2m1_to_f32(blocks >> 4)], axis=-1)
    vals = vals.reshape(*blocks.shape[:-1], BLOCK)  # [..., G, 32]
    exp = jnp.asarray(t.scales).astype(jnp.int32) - SCALE_BIAS  # [-127, 128]
    half = exp // 2
    vals = vals * _pow2(half)[..., None] * _pow2(exp - half)[..., None]
    return vals.reshape(*blocks.shape[:-2], -1).astype(dtype)


def _e2m1_times2(code):
    """E2M1 codes (int32, 0..15) times 2 as float32: integers in [-12, 12], built with integer
    arithmetic and one int->float conversion. Unlike the bitcasts of `_e2m1_to_f32`, XLA:CPU fuses
    this into a consuming reduction instead of writing the decoded values to memory first."""
    m = code & 7  # magnitude code: 0 .5 1 1.5 2 3 4 6 -> doubled 0 1 2 3 4 6 8 12
    v = jnp.where(m < 4, m, jnp.where(m < 6, 2 * m - 4, 4 * m - 16))
    return jnp.where((code & 8) != 0, -v, v).astype(jnp.float32)


CHUNK_VALUES = 64 * 2880  # values per row of x decoded per chunk by `gathered_matvec`


def _chunk_rows(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def gathered_matvec(x, t: MXFP4, ids, *, rows: int | None = None) -> jax.Array:
    """y[r] = W[ids[r]] @ x[r] for a stack of packed matrices W [E, O, I]: x [R, I], ids [R] int
    -> float32 [R, O]. For a handful of rows (decoding), where a matmul would spend its time
    decoding whole matrices to memory and reading them back.

    Only the chosen matrices are read, `rows` output rows at a time (`lax.map`; by default
    `CHUNK_VALUES` / I, which is 64 for gpt-oss's 2880 inputs), and each 4-bit
    value is decoded inside the multiply-reduce that consumes it: the packed bytes are the only
    weight traffic. The contraction pairs the low and high nibbles of every byte with the even
    and odd inputs, so nothing is interleaved. Products and sums are fp32; the result equals
    `x @ dequantize(W).T` up to fp32 summation order."""
    E, O, I = t.shape
    R = x.shape[0]
    if x.shape != (R, I) or ids.shape != (R,):
        raise ValueError(
            f"gathered_matvec: x {tuple(x.shape)} and ids {tuple(ids.shape)} do not fit "
            f"matrices [{E}, {O}, {I}] (need x [R, {I}], ids [R])"
        )
    G = I // BLOCK
    xr = x.astype(jnp.float32).reshape(R, 1, G, BLOCK // 2, 2)  # [R, 1, G, 16, (even, odd)]
    n = _chunk_rows(O, rows or max(1, CHUNK_VALUES // I))

    def chunk(c):
        blk = jax.lax.dynamic_slice_in_dim(t.blocks, c * n, n, axis=1)[ids].astype(jnp.int32)
        exp = jax.lax.dynamic_slice_in_dim(t.scales, c * n, n, axis=1)[ids].astype(jnp.int32) - (SCALE_BIAS + 1)
        half = exp // 2  # 2**(scale - 127) / 2 (undoing the doubled values) as two normal factors
        scale = _pow2(half) * _pow2(exp - half)  # [R, n, G]
        p = _e2m1_times2(blk & 15) * xr[..., 0] + _e2m1_times2(blk >> 4) * xr[..., 1]
        return jnp.sum(p * scale[..., None], axis=(-1, -2))  # [R, n]

    ys = jax.lax.map(chunk, jnp.arange(O // n))  # [O/n, R, n]
    return jnp.moveaxis(ys, 0, 1).reshape(R, O)


def dequantize_np(blocks: np.ndarray, scales: np.ndarray, dtype=np.float32) -> np.ndarray:
    """NumPy twin of `dequantize` for host-side conversion (no device memory)."""
    blocks = np.asarray(blocks)
    vals = np.empty(blocks.shape[:-1] + (BLOCK,), np.float32)
    vals[..., 0::2] = E2M1_VALUES[blocks & 0x0F]
    vals[..., 1::2] = E2M1_VALUES[blocks >> 4]
    vals = np.ldexp(vals, np.asarray(scales).astype(np.int32)[..., None] - SCALE_BIAS)
    return vals.reshape(*blocks.shape[:-2], -1).astype(dtype)


def _round_e2m1(mag):
    """Round non-negative magnitudes (already divided by the block scale) to E2M1 codes 0..7,
    nearest with ties to the even code, saturating at 6."""
    grid = jnp.asarray(E2M1_VALUES[:8])
    dist = jnp.abs(mag[..., None] - grid)  # [..., 8]
    lower = jnp.argmin(dist, axis=-1)  # first (lowest) code at minimal distance
    nxt = jnp.minimum(lower + 1, 7)
    d_lower = jnp.take_along_axis(dist, lower[..., None], -1)[..., 0]
    d_next = jnp.take_along_axis(dist, nxt[..., None], -1)[..., 0]
    tie = (d_next == d_lower) & (nxt != lower)
    return jnp.where(tie & (lower % 2 == 1), nxt, lower).astype(jnp.uint8)


def quantize(w) -> MXFP4:
    """Encode [..., rows, cols] (cols a multiple of 32) as MXFP4 with OCP MX rounding."""
    w = jnp.asarray(w, jnp.float32)
    if w.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs the last axis to be a multiple of {BLOCK}, got shape {w.shape}")
    x = w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    amax = jnp.max(jnp.abs(x), axis=-1)
    # floor(log2(amax)) read exactly from the float's exponent field.
    _, e = jnp.frexp(jnp.where(amax > 0, amax, 1.0))
    shared = jnp.where(amax > 0, e - 1 - _E2M1_MAX_EXP, 0)
    biased = jnp.clip(shared + SCALE_BIAS, 0, 254)
    mag = jnp.abs(x) / jnp.ldexp(jnp.ones_like(amax), biased - SCALE_BIAS)[..., None]
    code = _round_e2m1(mag) | jnp.where(jnp.signbit(x), 8, 0).astype(jnp.uint8)
    code = code.reshape(*code.shape[:-1], BLOCK // 2, 2)
    packed = (code[..., 0] | (code[..., 1] << 4)).astype(jnp.uint8)
    return MXFP4(blocks=packed, scales=biased.astype(jnp.uint8))
