"""Grouped matmul of expert-sorted rows against packed MXFP4 expert weights.

    mxfp4_grouped_matmul(x, blocks, scales, group_sizes, *, bias=None, swiglu=None, low_rank=None,
                         implementation="xla", interpret=False, block_sizes=None)

x [M, Kin] rows sorted by expert; blocks [E, Nout, Kin/32, 16] uint8 and scales [E, Nout, Kin/32]
uint8 in the checkpoint's own layout (row r of expert e is output channel r; 32 consecutive
input channels share a scale); group_sizes [E] int32 (zeros allowed, sum <= M; rows past the sum
give 0); bias [E, Nout]. Returns [M, Nout] in x's dtype, accumulated in fp32:

    y[m] = x[m] @ W_e^T + bias[e]    for the expert e whose group holds row m

With `swiglu=(alpha, limit)` the gate/up epilogue is fused: the Nout columns are interleaved
gate/up, and the result is [M, Nout/2] = swiglu(y) — the [M, Nout] intermediate never leaves the
kernel.

`low_rank=(a, b)` (a [M, R], b [R, Nout]) adds a low-rank update to the pre-activation, as a LoRA
adapter of the first expert projection does: swiglu(round(x @ W_e^T + bias[e]) + a @ b), where
round is to x's dtype (the plain kernel output) and the sum is fp32. On TPU the pre-activation
stays in the kernel's per-tile [gate | up] column order and b's columns are permuted instead, so
no [M, Nout] array has its interleaved lanes separated in XLA.

Gradients: w.r.t. x (a grouped matmul against the same packed weight, contracting its output
axis) and w.r.t. bias. The packed weight is frozen: it gets no gradient (fine-tuning trains LoRA
adapters beside it).

Implementations: "xla" (experts one at a time in a scan; each expert's weight is decoded only
while its rows are multiplied, so no buffer of E*Nout*Kin elements ever exists), "pallas_gpu",
"pallas_tpu" (decode in registers / VMEM tile by tile).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gptoss_jax.kernels import mxfp4_matmul_gpu, mxfp4_matmul_tpu, vma
from gptoss_jax.kernels.groups import MatmulBlockSizes, row_experts  # noqa: F401  (re-exported)
from gptoss_jax.layers import swiglu as swiglu_fn
from gptoss_jax.mxfp4 import BLOCK, MXFP4, dequantize

IMPLEMENTATIONS = ("xla", "pallas_gpu", "pallas_tpu")


def mxfp4_grouped_matmul_reference(x, blocks, scales, group_sizes, *, bias=None, swiglu=None, low_rank=None):
    """Decode every expert, then `jax.lax.ragged_dot` (obvious, memory-hungry: tests only)."""
    w = jnp.swapaxes(dequantize(MXFP4(blocks, scales), jnp.float32), 1, 2)  # [E, Kin, Nout]
    y = jax.lax.ragged_dot(x.astype(jnp.float32), w, group_sizes, preferred_element_type=jnp.float32)
    if bias is not None:
        e = row_experts(group_sizes, x.shape[0])
        b = jnp.concatenate([bias.astype(jnp.float32), jnp.zeros((1, bias.shape[1]), jnp.float32)])
        y = y + b[e]
    if low_rank is not None:
        y = y.astype(x.dtype).astype(jnp.float32) + jnp.dot(
            low_rank[0].astype(jnp.float32), low_rank[1].astype(jnp.float32)
        )
    if swiglu is not None:
        y = swiglu_fn(y, alpha=swiglu[0], limit=swiglu[1])
    return y.astype(x.dtype)


def _check(x, blocks, scales, group_sizes, bias, swiglu, low_rank=None):
    if x.ndim != 2 or blocks.ndim != 4 or blocks.shape[-1] != BLOCK // 2 or scales.shape != blocks.shape[:-1]:
        raise ValueError(
            f"need x [M, Kin], blocks [E, Nout, Kin/32, 16], scales [E, Nout, Kin/32]; got "
            f"x{tuple(x.shape)} blocks{tuple(blocks.shape)} scales{tuple(scales.shape)}"
        )
    E, N, G, _ = blocks.shape
    if x.shape[1] != G * BLOCK:
        raise ValueError(f"x has {x.shape[1]} input channels, the packed weight {G * BLOCK}")
    if blocks.dtype != jnp.uint8 or scales.dtype != jnp.uint8:
        raise ValueError("blocks and scales must be uint8")
    if group_sizes.shape != (E,):
        raise ValueError(f"group_sizes must have shape ({E},), got {tuple(group_sizes.shape)}")
    if bias is not None and bias.shape != (E, N):
        raise ValueError(f"bias must have shape ({E}, {N}), got {tuple(bias.shape)}")
    if swiglu is not None and N % 2:
        raise ValueError(f"swiglu needs an even number of output channels, got {N}")
    if low_rank is not None:
        a, b = low_rank
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != x.shape[0] or b.shape != (a.shape[1], N):
            raise ValueError(
                f"low_rank must be (a [M, R], b [R, Nout]) with M = {x.shape[0]}, Nout = {N}; got "
                f"a{tuple(a.shape)} b{tuple(b.shape)}"
            )


def mxfp4_grouped_matmul(
    x,
    blocks,
    scales,
    group_sizes,
    *,
    bias=None,
    swiglu=None,
    low_rank=None,
    implementation: str = "xla",
    interpret: bool = False,
    block_sizes: MatmulBlockSizes | None = None,
):
    _check(x, blocks, scales, group_sizes, bias, swiglu, low_rank)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
    swiglu = None if swiglu is None else (float(swiglu[0]), float(swiglu[1]))
    if low_rank is not None:
        if implementation == "pallas_tpu" and swiglu is not None:
            return mxfp4_matmul_tpu.mxfp4_grouped_matmul(
                x,
                blocks,
                scales,
                group_sizes,
                bias=bias,
                swiglu=swiglu,
                low_rank=low_rank,
                interpret=interpret,
                block_sizes=block_sizes,
            )
        h = mxfp4_grouped_matmul(
            x,
            blocks,
            scales,
            group_sizes,
            bias=bias,
            implementation=implementation,
            interpret=interpret,
            block_sizes=block_sizes,
        ).astype(jnp.float32)
        h = h + jnp.dot(low_rank[0], low_rank[1], preferred_element_type=jnp.float32)
        return (h if swiglu is None else swiglu_fn(h, alpha=swiglu[0], limit=swiglu[1])).astype(x.dtype)
    if implementation == "xla":
        return _xla(x, blocks, scales, group_sizes, bias, swiglu, (block_sizes or MatmulBlockSizes()).block_m)
    impl = mxfp4_matmul_gpu if implementation == "pallas_gpu" else mxfp4_matmul_tpu
    return impl.mxfp4_grouped_matmul(
        x, blocks, scales, group_sizes, bias=bias, swiglu=swiglu, interpret=interpret, block_sizes=block_sizes
    )


# ------------------------------------------------------------------------------------ XLA path
def _grouped(x, blocks, scales, group_sizes, tm: int, *, transpose: bool):
    """sum over experts of rows-of-e @ W_e^T (or @ W_e when `transpose`), fp32 [M, out].

    A scan over experts decodes one expert's weight per step; an inner loop walks that expert's
    rows in chunks of `tm` (x is padded by `tm` rows so every chunk is a static-size slice)."""
    M = x.shape[0]
    out_dim = blocks.shape[2] * BLOCK if transpose else blocks.shape[1]
    xp = jnp.pad(x, ((0, tm), (0, 0)))
    starts = jnp.cumsum(group_sizes) - group_sizes

    def per_expert(out, e):
        w = dequantize(MXFP4(blocks[e], scales[e]), x.dtype)  # [Nout, Kin], this expert only
        start, size = starts[e], group_sizes[e]

        def chunk(c, out):
            rows = jax.lax.dynamic_slice_in_dim(xp, start + c * tm, tm)
            spec = "MN,NK->MK" if transpose else "MK,NK->MN"
            y = jnp.einsum(spec, rows, w, preferred_element_type=jnp.float32)
            keep = (c * tm + jnp.arange(tm)) < size
            old = jax.lax.dynamic_slice_in_dim(out, start + c * tm, tm)
            return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(keep[:, None], y, old), start + c * tm, 0)

        n_chunks = (size + tm - 1) // tm
        return jax.lax.fori_loop(0, n_chunks, chunk, out), None

    out = vma.varying_like(jnp.zeros((M + tm, out_dim), jnp.float32), x, blocks, scales, group_sizes)
    out, _ = jax.lax.scan(per_expert, out, jnp.arange(blocks.shape[0]))
    return out[:M]


def _bias_rows(bias, group_sizes, M):
    e = row_experts(group_sizes, M)
    b = jnp.concatenate([bias.astype(jnp.float32), jnp.zeros((1, bias.shape[1]), jnp.float32)])
    return b[e]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _xla(x, blocks, scales, group_sizes, bias, swiglu, tm):
    return _xla_fwd(x, blocks, scales, group_sizes, bias, swiglu, tm)[0]


def _xla_fwd(x, blocks, scales, group_sizes, bias, swiglu, tm):
    h = _grouped(x, blocks, scales, group_sizes, tm, transpose=False)
    if bias is not None:
        h = h + _bias_rows(bias, group_sizes, x.shape[0])
    y = h if swiglu is None else swiglu_fn(h, alpha=swiglu[0], limit=swiglu[1])
    # Saving h (not recomputing it) costs one [M, Nout] fp32 buffer; the Pallas kernels recompute.
    return y.astype(x.dtype), (x, blocks, scales, group_sizes, bias, h if swiglu is not None else None)


def _xla_bwd(swiglu, tm, res, dy):
    x, blocks, scales, group_sizes, bias, h = res
    dh = dy.astype(jnp.float32)
    if swiglu is not None:
        _, vjp = jax.vjp(lambda h: swiglu_fn(h, alpha=swiglu[0], limit=swiglu[1]), h)
        (dh,) = vjp(dh)
    dx = _grouped(dh.astype(x.dtype), blocks, scales, group_sizes, tm, transpose=True)
    dx = vma.sum_to(dx, x).astype(x.dtype)
    dbias = None
    if bias is not None:
        e = row_experts(group_sizes, x.shape[0])
        dbias = jax.ops.segment_sum(dh, e, num_segments=bias.shape[0] + 1)[:-1].astype(bias.dtype)
        dbias = vma.sum_to(dbias, bias)
    zero_int = lambda a: jnp.zeros(a.shape, jax.dtypes.float0)  # integer inputs: no gradient
    return dx, zero_int(blocks), zero_int(scales), zero_int(group_sizes), dbias


_xla.defvjp(_xla_fwd, _xla_bwd)
