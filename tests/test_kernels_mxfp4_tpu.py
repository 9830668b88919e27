"""The TPU Pallas MXFP4 grouped matmul (gptoss_jax.kernels.mxfp4_matmul_tpu).

Execution runs in Pallas interpret mode on CPU (small shapes, explicit small block sizes so that
every edge is exercised: partial M / N / K tiles, tiles straddling groups, empty experts); the
real target is checked by lowering for TPU at gpt-oss-20b shapes (the Pallas->Mosaic lowering
checks the block shapes and verifies the Mosaic module; Mosaic's layout passes only run inside
libtpu, which is not available here).

Oracles: `mxfp4.dequantize` (bit for bit) and `mxfp4_grouped_matmul_reference` and its autodiff.
Tolerances (max|delta| / max|ref|): forward 1e-5 fp32, 1e-2 bf16 x; gradients 1e-4 fp32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from gptoss_jax.kernels import mxfp4_matmul_tpu as mt
from gptoss_jax.kernels.mxfp4_matmul import MatmulBlockSizes as BS
from gptoss_jax.kernels.mxfp4_matmul import mxfp4_grouped_matmul as dispatch
from gptoss_jax.kernels.mxfp4_matmul import mxfp4_grouped_matmul_reference as reference
from gptoss_jax.mxfp4 import MXFP4, dequantize

SWIGLU = (1.702, 7.0)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def make(E, N, K, M, sizes, dtype=jnp.float32, seed=0, scale_range=(118, 126)):
    rng = np.random.default_rng(seed)
    blocks = jnp.asarray(rng.integers(0, 256, (E, N, K // 32, 16), dtype=np.uint8))
    scales = jnp.asarray(rng.integers(*scale_range, (E, N, K // 32), dtype=np.uint8))
    x = jnp.asarray(rng.normal(size=(M, K)), jnp.float32).astype(dtype)
    bias = jnp.asarray(rng.normal(size=(E, N)), jnp.float32)
    return x, blocks, scales, jnp.asarray(sizes, jnp.int32), bias


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "N,K,bn,bk", [(80, 160, 32, 64), (64, 2880, 64, 512), (48, 96, 48, 96)], ids=["partialNK", "kin2880", "full"]
)
def test_in_kernel_decode_is_bitwise_the_reference(N, K, bn, bk):
    # Every scale whose results are normal floats (2..252), every byte value.
    _, blocks, scales, _, _ = make(2, N, K, 1, [1, 0], scale_range=(2, 253), seed=1)
    got = mt.dequantize_tiles(blocks, scales, block_n=bn, block_k=bk, interpret=True)
    want = dequantize(MXFP4(blocks, scales), jnp.float32)
    assert got.shape == want.shape
    bits = lambda a: np.asarray(jax.lax.bitcast_convert_type(a, jnp.int32))
    np.testing.assert_array_equal(bits(got), bits(want))


# ---------------------------------------------------------------------------------------------
# Group metadata
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes,M,bm", [((0, 17, 0, 25, 9, 0), 60, 16), ((0, 0, 0), 20, 8), ((8, 8, 16), 32, 8), ((3, 0, 40, 1), 44, 16)]
)
def test_group_metadata_visits_every_overlapping_tile_group_pair_once(sizes, M, bm):
    (tile, expert, lo, hi, first, decode), nv = mt.group_metadata(jnp.asarray(sizes, jnp.int32), M, bm)
    tile, expert, lo, hi, first, decode = map(np.asarray, (tile, expert, lo, hi, first, decode))
    nv = int(nv)
    tiles_m = -(-M // bm)
    assert len(tile) == tiles_m + len(sizes) and nv <= len(tile)
    starts = np.cumsum(sizes) - np.asarray(sizes)
    want = [(t, e) for e, (s, g) in enumerate(zip(starts, sizes)) if g for t in range(s // bm, (s + g - 1) // bm + 1)]
    got = [(int(tile[v]), int(expert[v])) for v in range(nv) if hi[v] > lo[v]]
    assert got == want
    for v in range(nv):
        if hi[v] > lo[v]:
            e = int(expert[v])
            assert (lo[v], hi[v]) == (starts[e], starts[e] + sizes[e])
    # every M tile is visited, and its first visit is flagged (it writes the zeros)
    assert sorted({int(t) for t in tile[:nv]}) == list(range(tiles_m))
    assert [v for v in range(len(tile)) if first[v]] == [int(np.argmax(tile == t)) for t in range(tiles_m)]
    assert decode[0] == 1 and all(decode[v] == (expert[v] != expert[v - 1]) for v in range(1, len(tile)))
    assert np.all(np.diff(tile) >= 0)  # consecutive visits of a tile: the output block stays resident


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

# Empty experts first / middle / last, sum(sizes) = 51 < M = 60, M not a multiple of block_m,
# experts spanning several M tiles and tiles straddling groups; N = 80 and K = 160 leave partial
# last N and K tiles with block_n = 32, block_k = 64.
CASE = dict(E=6, N=80, K=160, M=60, sizes=(0, 17, 0, 25, 9, 0))
SMALL = BS(16, 32, 64)


@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("swiglu", [None, SWIGLU], ids=["plain", "swiglu"])
def test_forward_fp32(swiglu, use_bias):
    x, blocks, scales, sizes, bias = make(**CASE)
    bias = bias if use_bias else None
    got = mt.mxfp4_grouped_matmul(x, blocks, scales, sizes, bias=bias, swiglu=swiglu, interpret=True, block_sizes=SMALL)
    want = reference(x, blocks, scales, sizes, bias=bias, swiglu=swiglu)
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert rel(got, want) <= 1e-5
    assert np.all(np.asarray(got)[51:] == 0)  # rows past sum(group_sizes)


def test_forward_bf16_through_the_dispatcher():
    x, blocks, scales, sizes, bias = make(**CASE, dtype=jnp.bfloat16)
    got = dispatch(
        x,
        blocks,
        scales,
        sizes,
        bias=bias,
        swiglu=SWIGLU,
        implementation="pallas_tpu",
        interpret=True,
        block_sizes=SMALL,
    )
    want = reference(x.astype(jnp.float32), blocks, scales, sizes, bias=bias, swiglu=SWIGLU)
    assert got.dtype == jnp.bfloat16 and rel(got, want) <= 1e-2


def test_all_experts_empty_gives_zeros():
    x, blocks, scales, _, bias = make(3, 32, 64, 20, (0, 0, 0))
    got = mt.mxfp4_grouped_matmul(
        x, blocks, scales, jnp.zeros(3, jnp.int32), bias=bias, interpret=True, block_sizes=BS(8, 32, 32)
    )
    assert got.shape == (20, 32) and np.all(np.asarray(got) == 0)


def test_kin_2880_the_90_group_k_edge():
    """Kin = 2880 with the default block_k = 512: 6 K tiles, the last one 320 channels short."""
    x, blocks, scales, sizes, bias = make(E=3, N=64, K=2880, M=40, sizes=(15, 0, 22), seed=3)
    for swiglu in (None, SWIGLU):
        got = mt.mxfp4_grouped_matmul(
            x, blocks, scales, sizes, bias=bias, swiglu=swiglu, interpret=True, block_sizes=BS(16, 32, 512)
        )
        want = reference(x, blocks, scales, sizes, bias=bias, swiglu=swiglu)
        assert rel(got, want) <= 1e-5, swiglu


def test_tpu_faithful_interpreter():
    """TPU-semantics interpreter: uninitialized VMEM (the decoded-weight scratch, the accumulator)
    reads as NaN and races are detected, so reading scratch before writing it would show."""
    x, blocks, scales, sizes, bias = make(3, 32, 64, 24, (0, 13, 7))
    ip = pltpu.InterpretParams(uninitialized_memory="nan", detect_races=True)
    got = mt.mxfp4_grouped_matmul(
        x, blocks, scales, sizes, bias=bias, swiglu=SWIGLU, interpret=ip, block_sizes=BS(8, 16, 32)
    )
    want = reference(x, blocks, scales, sizes, bias=bias, swiglu=SWIGLU)
    assert rel(got, want) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("swiglu", [None, SWIGLU], ids=["plain", "swiglu"])
def test_input_and_bias_gradients(swiglu):
    x, blocks, scales, sizes, bias = make(**CASE, seed=2)

    def loss(fn):
        return lambda x, b: jnp.sum(jnp.sin(fn(x, blocks, scales, sizes, bias=b, swiglu=swiglu)))

    kernel = lambda *a, **k: mt.mxfp4_grouped_matmul(*a, **k, interpret=True, block_sizes=SMALL)
    gx, gb = jax.jit(jax.grad(loss(kernel), (0, 1)))(x, bias)
    rx, rb = jax.grad(loss(reference), (0, 1))(x, bias)
    assert rel(gx, rx) <= 1e-4 and rel(gb, rb) <= 1e-4
    assert np.all(np.asarray(gx)[51:] == 0) and np.all(np.asarray(gb)[[0, 2, 5]] == 0)  # empty experts


def _low_rank_case(R=6, seed=4):
    x, blocks, scales, sizes, bias = make(**CASE, seed=seed)
    rng = np.random.default_rng(seed + 1)
    a = jnp.asarray(rng.normal(size=(CASE["M"], R)), jnp.float32)
    b = jnp.asarray(0.3 * rng.normal(size=(R, CASE["N"])), jnp.float32)
    return x, blocks, scales, sizes, bias, a, b


def test_low_rank_update_before_the_swiglu():
    """swiglu(x W^T + bias + a b): the TPU path keeps the pre-activation in the kernel's tile order
    and permutes b instead (N = 80 with block_n 32: a padded last tile). Forward and the gradients
    w.r.t. x, bias, a and b against the reference and its autodiff."""
    x, blocks, scales, sizes, bias, a, b = _low_rank_case()

    def loss(fn):
        return lambda x, bias, a, b: jnp.sum(
            jnp.sin(fn(x, blocks, scales, sizes, bias=bias, swiglu=SWIGLU, low_rank=(a, b)))
        )

    kernel = lambda *args, **kw: dispatch(*args, **kw, implementation="pallas_tpu", interpret=True, block_sizes=SMALL)
    got = kernel(x, blocks, scales, sizes, bias=bias, swiglu=SWIGLU, low_rank=(a, b))
    want = reference(x, blocks, scales, sizes, bias=bias, swiglu=SWIGLU, low_rank=(a, b))
    assert got.shape == (CASE["M"], CASE["N"] // 2) and rel(got, want) <= 1e-5
    # the update matters: without it the output moves by far more than the tolerance
    assert rel(reference(x, blocks, scales, sizes, bias=bias, swiglu=SWIGLU), want) > 1e-2
    grads = jax.jit(jax.grad(loss(kernel), (0, 1, 2, 3)))(x, bias, a, b)
    wants = jax.grad(loss(reference), (0, 1, 2, 3))(x, bias, a, b)
    for name, g, w in zip(("x", "bias", "a", "b"), grads, wants):
        assert rel(g, w) <= 1e-4, name
    # the XLA path (the dispatcher adds the update to the plain output) agrees too
    xla = dispatch(x, blocks, scales, sizes, bias=bias, swiglu=SWIGLU, low_rank=(a, b), implementation="xla")
    assert rel(xla, want) <= 1e-5


def test_low_rank_control_untiled_factor(monkeypatch):
    # Control: b left in the checkpoint's interleaved column order (not permuted to the kernel's
    # tile order) adds each gate's update to the wrong column, which the comparison catches.
    x, blocks, scales, sizes, bias, a, b = _low_rank_case(R=5)  # a new shape: traced afresh
    monkeypatch.setattr(
        mt, "to_tiles", lambda cols, bn: jnp.pad(cols, ((0, 0), (0, -(-cols.shape[1] // bn) * bn - cols.shape[1])))
    )
    got = dispatch(
        x,
        blocks,
        scales,
        sizes,
        bias=bias,
        swiglu=SWIGLU,
        low_rank=(a, b),
        implementation="pallas_tpu",
        interpret=True,
        block_sizes=SMALL,
    )
    want = reference(x, blocks, scales, sizes, bias=bias, swiglu=SWIGLU, low_rank=(a, b))
    assert rel(got, want) > 1e-2


def test_low_rank_shapes_are_checked():
    x, blocks, scales, sizes, bias, a, b = _low_rank_case()
    with pytest.raises(ValueError, match="low_rank must be"):
        dispatch(x, blocks, scales, sizes, swiglu=SWIGLU, low_rank=(a, b[:, :-2]))


# ---------------------------------------------------------------------------------------------
# Lowering for the real target at gpt-oss-20b shapes (lower only)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N,swiglu", [(5760, SWIGLU), (2880, None)], ids=["mlp1_swiglu", "mlp2"])
def test_lowers_for_tpu_at_20b_shapes(N, swiglu):
    E, K, M = 32, 2880, 16384
    args = [
        jax.ShapeDtypeStruct((M, K), jnp.bfloat16),
        jax.ShapeDtypeStruct((E, N, K // 32, 16), jnp.uint8),
        jax.ShapeDtypeStruct((E, N, K // 32), jnp.uint8),
        jax.ShapeDtypeStruct((E,), jnp.int32),
        jax.ShapeDtypeStruct((E, N), jnp.float32),
    ]

    def f(x, blocks, scales, sizes, bias):
        return mt.mxfp4_grouped_matmul(x, blocks, scales, sizes, bias=bias, swiglu=swiglu)

    def loss(x, blocks, scales, sizes, bias):  # sin: the forward output is needed by the backward
        return jnp.sum(jnp.sin(f(x, blocks, scales, sizes, bias).astype(jnp.float32)))

    fwd = jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    bwd = jax.jit(jax.grad(loss, argnums=(0, 4))).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert fwd.count("tpu_custom_call") == 1
    # forward, dx; with SwiGLU also the fp32 recompute of the pre-activation
    assert bwd.count("tpu_custom_call") == (3 if swiglu else 2)


def test_rejects_untiled_blocks_for_tpu():
    x, blocks, scales, sizes, _ = make(2, 512, 1024, 64, (30, 34))
    with pytest.raises(ValueError, match="block_k must be a multiple of 256"):
        mt.mxfp4_grouped_matmul(x, blocks, scales, sizes, block_sizes=BS(64, 128, 384))
    with pytest.raises(ValueError, match="block_n must be a multiple of 256"):
        mt.mxfp4_grouped_matmul(x, blocks, scales, sizes, swiglu=SWIGLU, block_sizes=BS(64, 128, 256))
    with pytest.raises(ValueError, match="block_m must be a multiple of 8"):
        mt.mxfp4_grouped_matmul(x, blocks, scales, sizes, block_sizes=BS(12, 128, 256))
