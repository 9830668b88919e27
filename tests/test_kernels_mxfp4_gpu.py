"""The Pallas-Triton MXFP4 grouped matmul: executed in interpret mode on CPU against the reference,
and lowered (not run) for cuda at gpt-oss-20b shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax.kernels import mxfp4_matmul_gpu as mg
from gptoss_jax.kernels.mxfp4_matmul import MatmulBlockSizes, mxfp4_grouped_matmul, mxfp4_grouped_matmul_reference
from gptoss_jax.mxfp4 import MXFP4, dequantize
from tests.factory import grouped_mxfp4_case, rel_err

SWIGLU = (1.702, 7.0)


_case = functools.partial(grouped_mxfp4_case, E=5, N=80, K=96, M=70, sizes=(0, 20, 33, 0, 7))


def _kernel(**kw):
    return lambda x, blocks, scales, sizes, bias=None, swiglu=None: mg.mxfp4_grouped_matmul(
        x, blocks, scales, sizes, bias=bias, swiglu=swiglu, interpret=True, **kw
    )


SMALL = MatmulBlockSizes(16, 32, 64)  # M=70, Nout=80 (40 after swiglu), Kin=96: every edge partial


# ------------------------------------------------------------------------------------------------
# Decode
# ------------------------------------------------------------------------------------------------


def test_decode_kernel_bit_exact_every_byte_and_scale():
    """The matmul's in-kernel tile decode (run alone as a kernel) against `mxfp4.dequantize`, bit
    for bit in fp32 (signed zeros, flushed and infinite extremes included) for all 256 byte values
    under all 256 scales, and in bf16."""
    N, G = 256, 16  # row n uses scale n; each row's 16 groups x 16 bytes hold every byte value
    b = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(1, 1, G, 16), (1, N, G, 16)).copy()
    s = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(1, N, 1), (1, N, G)).copy()
    b, s = jnp.asarray(b), jnp.asarray(s)
    got = np.asarray(mg.dequantize_kernel(b, s, interpret=True, block_n=64, block_k=128))
    want = np.asarray(dequantize(MXFP4(b, s), jnp.float32))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    # normal range in bf16
    got = mg.dequantize_kernel(b[:, 100:160], s[:, 100:160], jnp.bfloat16, interpret=True, block_n=32, block_k=128)
    want = dequantize(MXFP4(b[:, 100:160], s[:, 100:160]), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))


def test_decode_kernel_partial_tiles():
    """Nout=80, Kin=96 with 32x64 tiles: the masked edges decode exactly what is there."""
    _, blocks, scales, _, _ = _case()
    got = np.asarray(mg.dequantize_kernel(blocks, scales, interpret=True, block_n=32, block_k=64))
    want = np.asarray(dequantize(MXFP4(blocks, scales), jnp.float32))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_matmul_with_identity_rows_reads_back_the_decoded_weight():
    """x = one identity matrix per expert: row k of group e is e_k, so y[e*Kin + k] = W_e[:, k];
    the matmul kernel itself reproduces the dequantized weight exactly (up to the sign of zero)."""
    E, N, K = 3, 80, 96
    _, blocks, scales, _, _ = _case(E=E, N=N, K=K, M=1)
    x = jnp.tile(jnp.eye(K, dtype=jnp.float32), (E, 1))
    y = _kernel(block_sizes=SMALL)(x, blocks, scales, jnp.full((E,), K, jnp.int32))
    w = np.asarray(dequantize(MXFP4(blocks, scales), jnp.float32))  # [E, N, K]
    np.testing.assert_array_equal(np.asarray(y), np.swapaxes(w, 1, 2).reshape(E * K, N))


# ------------------------------------------------------------------------------------------------
# Group metadata
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "M,bm,sizes",
    [
        (70, 16, (0, 20, 33, 0, 7)),
        (70, 16, (0, 0, 70, 0, 0)),
        (64, 16, (16, 16, 16, 16)),
        (100, 32, (1, 1, 1, 1, 1, 1, 1)),
        (37, 64, (0, 5, 0, 0)),
        (130, 16, (3, 40, 0, 17, 33, 0, 0, 20)),
    ],
)
def test_group_tiles_cover_every_row_once(M, bm, sizes):
    """Every row is in exactly one visit, of its own expert (E for rows past the groups), inside
    that visit's m tile; the static visit count cdiv(M, bm) + E is enough."""
    E = len(sizes)
    meta = np.asarray(mg.group_tiles(jnp.asarray(sizes, jnp.int32), M, bm))
    assert meta.shape == (4, -(-M // bm) + E)
    owner = np.repeat(np.arange(E + 1), list(sizes) + [M - sum(sizes)])
    seen = np.zeros(M, int)
    for e, tile, lo, hi in meta.T:
        assert 0 <= lo <= hi <= M
        if hi > lo:
            assert tile * bm <= lo and hi <= (tile + 1) * bm
            assert np.all(owner[lo:hi] == e)
            seen[lo:hi] += 1
    np.testing.assert_array_equal(seen, 1)


# ------------------------------------------------------------------------------------------------
# Forward and gradients against the reference (interpret mode)
# ------------------------------------------------------------------------------------------------

GROUPS = [
    (0, 20, 33, 0, 7),  # empty first and last experts, sum 60 < M=70
    (0, 0, 70, 0, 0),  # one expert takes everything
    (25, 0, 0, 0, 45),
]


@pytest.mark.parametrize("swiglu", [None, SWIGLU])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("sizes", GROUPS)
def test_forward_fp32(sizes, with_bias, swiglu):
    x, blocks, scales, sizes, bias = _case(sizes=sizes)
    bias = bias if with_bias else None
    got = _kernel(block_sizes=SMALL)(x, blocks, scales, sizes, bias=bias, swiglu=swiglu)
    want = mxfp4_grouped_matmul_reference(x, blocks, scales, sizes, bias=bias, swiglu=swiglu)
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert rel_err(got, want) <= 1e-5
    past = int(np.sum(np.asarray(sizes)))
    assert np.all(np.asarray(got)[past:] == 0.0)  # rows past the groups


@pytest.mark.parametrize("swiglu", [None, SWIGLU])
def test_forward_bf16(swiglu):
    x, blocks, scales, sizes, bias = _case(dtype=jnp.bfloat16, seed=1)
    got = _kernel(block_sizes=SMALL)(x, blocks, scales, sizes, bias=bias, swiglu=swiglu)
    want = mxfp4_grouped_matmul_reference(x.astype(jnp.float32), blocks, scales, sizes, bias=bias, swiglu=swiglu)
    assert got.dtype == jnp.bfloat16 and rel_err(got, want) <= 1e-2


def test_default_block_sizes():
    x, blocks, scales, sizes, bias = _case(sizes=(0, 20, 33, 0, 7))
    assert mg.effective_block_sizes(70, 96, 80, None, None) == (64, 128, 64)
    got = _kernel()(x, blocks, scales, sizes, bias=bias, swiglu=SWIGLU)
    want = mxfp4_grouped_matmul_reference(x, blocks, scales, sizes, bias=bias, swiglu=SWIGLU)
    assert rel_err(got, want) <= 1e-5


def _grads(fn, x, blocks, scales, sizes, bias, swiglu):
    def loss(x, b):
        return jnp.sum(jnp.sin(fn(x, blocks, scales, sizes, bias=b, swiglu=swiglu)))

    return jax.grad(loss, (0, 1))(x, bias)


@pytest.mark.parametrize("swiglu", [None, SWIGLU])
@pytest.mark.parametrize("sizes", GROUPS[:2])
def test_gradients_fp32(sizes, swiglu):
    x, blocks, scales, sizes, bias = _case(sizes=sizes, seed=2)
    dx, db = _grads(_kernel(block_sizes=SMALL), x, blocks, scales, sizes, bias, swiglu)
    rx, rb = _grads(mxfp4_grouped_matmul_reference, x, blocks, scales, sizes, bias, swiglu)
    assert dx.shape == x.shape and db.shape == bias.shape
    assert rel_err(dx, rx) <= 1e-4, rel_err(dx, rx)
    assert rel_err(db, rb) <= 1e-4, rel_err(db, rb)
    past = int(np.sum(np.asarray(sizes)))
    assert np.all(np.asarray(dx)[past:] == 0.0)


def test_gradient_without_bias_and_integer_cotangents():
    x, blocks, scales, sizes, _ = _case(seed=3)
    ct = jnp.asarray(np.random.default_rng(4).normal(size=(70, 40)), jnp.float32)
    f = lambda x, b, s, g: mg.mxfp4_grouped_matmul(x, b, s, g, swiglu=SWIGLU, interpret=True, block_sizes=SMALL)
    _, vjp = jax.vjp(f, x, blocks, scales, sizes)
    dx, db, ds, dg = vjp(ct)
    _, vjp_r = jax.vjp(lambda x: mxfp4_grouped_matmul_reference(x, blocks, scales, sizes, swiglu=SWIGLU), x)
    assert rel_err(dx, vjp_r(ct)[0]) <= 1e-4
    for g, a in ((db, blocks), (ds, scales), (dg, sizes)):
        assert g.dtype == jax.dtypes.float0 and g.shape == a.shape


def test_gpt_oss_k_edge():
    """Kin = 2880 (90 MXFP4 blocks) and Nout = 5760 with 128-wide K tiles: 22 full K tiles and a
    half one, 45 N tiles; small M and two experts. Forward (swiglu, bias) and both gradients."""
    E, N, K, M = 2, 5760, 2880, 24
    x, blocks, scales, sizes, bias = _case(E=E, N=N, K=K, M=M, sizes=(9, 12), seed=5)
    bs = MatmulBlockSizes(16, 128, 128)
    got = _kernel(block_sizes=bs)(x, blocks, scales, sizes, bias=bias, swiglu=SWIGLU)
    want = mxfp4_grouped_matmul_reference(x, blocks, scales, sizes, bias=bias, swiglu=SWIGLU)
    assert got.shape == (M, N // 2) and rel_err(got, want) <= 1e-5
    dx, db = _grads(_kernel(block_sizes=bs), x, blocks, scales, sizes, bias, SWIGLU)
    rx, rb = _grads(mxfp4_grouped_matmul_reference, x, blocks, scales, sizes, bias, SWIGLU)
    assert rel_err(dx, rx) <= 1e-4 and rel_err(db, rb) <= 1e-4


def test_dispatch_reaches_kernel():
    x, blocks, scales, sizes, bias = _case()
    got = mxfp4_grouped_matmul(
        x,
        blocks,
        scales,
        sizes,
        bias=bias,
        swiglu=SWIGLU,
        implementation="pallas_gpu",
        interpret=True,
        block_sizes=SMALL,
    )
    want = mxfp4_grouped_matmul_reference(x, blocks, scales, sizes, bias=bias, swiglu=SWIGLU)
    assert rel_err(got, want) <= 1e-5


def test_block_size_checks():
    with pytest.raises(ValueError, match="power-of-two"):
        mg.effective_block_sizes(70, 96, 80, None, MatmulBlockSizes(16, 32, 96))
    # clamped to the problem, dots >= 16 (32 pre-activation columns with swiglu), K >= one block
    assert mg.effective_block_sizes(5, 2880, 8, SWIGLU, MatmulBlockSizes(128, 128, 256)) == (16, 32, 256)
    assert mg.effective_block_sizes(5, 32, 8, None, MatmulBlockSizes(8, 8, 64)) == (16, 16, 32)


# ------------------------------------------------------------------------------------------------
# Lowering to Triton for cuda at gpt-oss-20b shapes (no execution)
# ------------------------------------------------------------------------------------------------


def _lower(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("N,swiglu", [(5760, SWIGLU), (2880, None)])
def test_lowers_to_triton_for_cuda(N, swiglu, verified_triton_modules):
    E, K, M = 32, 2880, 16384
    sds = jax.ShapeDtypeStruct
    args = (
        sds((M, K), jnp.bfloat16),
        sds((E, N, K // 32, 16), jnp.uint8),
        sds((E, N, K // 32), jnp.uint8),
        sds((E,), jnp.int32),
        sds((E, N), jnp.bfloat16),
    )

    def f(x, blocks, scales, sizes, bias):
        return mxfp4_grouped_matmul(x, blocks, scales, sizes, bias=bias, swiglu=swiglu, implementation="pallas_gpu")

    def loss(*a):
        return jnp.sum(f(*a).astype(jnp.float32))

    fwd = _lower(f, *args)
    assert fwd.count("__gpu$xla.gpu.triton") == 1 and "mosaic_gpu" not in fwd
    bwd = _lower(jax.value_and_grad(loss, argnums=(0, 4)), *args)
    # forward + dx (+ the h recompute whose epilogue applies the swiglu derivative)
    n_bwd = 3 if swiglu else 2
    assert bwd.count("__gpu$xla.gpu.triton") == n_bwd and "mosaic_gpu" not in bwd
    assert verified_triton_modules == [True] * (1 + n_bwd)


def test_lowering_check_has_teeth():
    """Control for the test above: a 96-wide K tile (3 MXFP4 blocks, not a power of two) built
    past the block-size check is rejected by the Triton lowering."""
    sds = jax.ShapeDtypeStruct
    E, N, K, M = 2, 64, 192, 32
    cfg = mg._Config(
        M=M,
        Kin=K,
        Nout=N,
        E=E,
        block_m=16,
        block_n=32,
        block_k=96,
        swiglu=None,
        has_bias=False,
        dtype="bfloat16",
        interpret=False,
    )
    args = (
        sds((M, K), jnp.bfloat16),
        sds((E, N, K // 32, 16), jnp.uint8),
        sds((E, N, K // 32), jnp.uint8),
        sds((E,), jnp.int32),
    )

    def f(x, blocks, scales, sizes):
        return mg._forward(x, blocks, scales, mg.group_tiles(sizes, M, 16), None, cfg)

    with pytest.raises(ValueError, match="power of 2"):
        _lower(f, *args)
    cfg_ok = mg._Config(**{**cfg.__dict__, "block_k": 64})
    g = lambda x, b, s, sz: mg._forward(x, b, s, mg.group_tiles(sz, M, 16), None, cfg_ok)
    assert _lower(g, *args).count("__gpu$xla.gpu.triton") == 1


def test_model_with_kernel_moe_matches_xla(original_dir, monkeypatch):
    """The tiny model (packed MXFP4 experts, ragged MoE path) with this kernel (interpret mode) in
    place of the XLA grouped matmul: loss and the gradient w.r.t. the expert biases and the
    attention weights feeding the experts."""
    from flax import nnx

    import gptoss_jax as gj

    modes = []
    forward = mg._forward
    monkeypatch.setattr(mg, "_forward", lambda *a, mode="out", **k: modes.append(mode) or forward(*a, mode=mode, **k))
    opts = dict(moe_impl="ragged", attention_impl="xla", interpret=True)
    xla = gj.load(original_dir, dtype="float32", kernel=gj.KernelOptions(mxfp4_impl="xla", **opts))
    ker = gj.load(original_dir, dtype="float32", kernel=gj.KernelOptions(mxfp4_impl="pallas_gpu", **opts))
    toks = jnp.asarray(np.random.default_rng(0).integers(0, xla.cfg.vocab_size, (1, 24)))

    def loss(model):
        return jnp.mean(jax.nn.logsumexp(model(toks).logits, axis=-1))

    lx, gx = nnx.value_and_grad(loss)(xla)
    lk, gk = nnx.value_and_grad(loss)(ker)
    assert abs(float(lx - lk)) <= 1e-5 * abs(float(lx))
    assert "out" in modes and "dh" in modes  # the kernel ran, forward and swiglu backward
    leaves_x = jax.tree_util.tree_leaves_with_path(nnx.state(gx))
    leaves_k = dict(jax.tree_util.tree_leaves_with_path(nnx.state(gk)))
    checked = 0
    for path, a in leaves_x:
        b = leaves_k[path]
        if jnp.issubdtype(a.dtype, jnp.floating) and float(jnp.abs(a).max()) > 0:
            assert float(jnp.abs(a - b).max() / jnp.abs(a).max()) <= 1e-4, path
            checked += 1
    assert checked >= 10
