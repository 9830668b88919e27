import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gptoss_jax import mxfp4
from gptoss_jax.mxfp4 import MXFP4, dequantize_np, quantize


def test_e2m1_table_literal():
    assert mxfp4.E2M1_VALUES.tolist() == [
        0.0,
        0.5,
        1.0,
        1.5,
        2.0,
        3.0,
        4.0,
        6.0,
        -0.0,
        -0.5,
        -1.0,
        -1.5,
        -2.0,
        -3.0,
        -4.0,
        -6.0,
    ]
    assert np.signbit(mxfp4.E2M1_VALUES[8])  # code 8 is -0


def test_nibble_order_and_scale_bias():
    blocks = np.zeros((1, 1, 16), np.uint8)
    blocks[0, 0, 0] = 0x72  # element 0 <- low nibble 2 (1.0), element 1 <- high nibble 7 (6.0)
    blocks[0, 0, 15] = 0x9F  # element 30 <- 0xF (-6.0), element 31 <- 0x9 (-0.5)
    for scale, mult in ((127, 1.0), (128, 2.0), (125, 0.25)):
        t = MXFP4(jnp.asarray(blocks), jnp.full((1, 1), scale, jnp.uint8))
        w = np.asarray(t.dequantize(jnp.float32))
        assert w.shape == (1, 32)
        assert w[0, :2].tolist() == [1.0 * mult, 6.0 * mult]
        assert w[0, 30:].tolist() == [-6.0 * mult, -0.5 * mult]
        assert not w[0, 2:30].any()


def openai_decode(blocks, scales, dtype=torch.float32):
    """OpenAI's own MXFP4 decoder (`gpt_oss.torch.weights.Checkpoint._get_mxfp4_tensor`) on
    in-memory arrays: only the decoder is used, no checkpoint files are involved."""
    from gpt_oss.torch.weights import Checkpoint

    ck = Checkpoint.__new__(Checkpoint)
    ck.tensor_name_to_file = {"b": None, "s": None}
    ck._get_tensor = lambda name: torch.from_numpy(np.ascontiguousarray(blocks if name == "b" else scales))
    return ck._get_mxfp4_tensor("b", "s", dtype=dtype).float().numpy()


def same_values(a, b):
    """Elementwise bit-level equality of float32 arrays (NaN equals NaN, +0 differs from -0)."""
    return np.asarray(a, np.float32).view(np.uint32) == np.asarray(b, np.float32).view(np.uint32)


def test_decode_matches_openai_reference_decoder():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 5, 4, 16), dtype=np.uint8)
    scales = rng.integers(100, 140, (3, 5, 4), dtype=np.uint8)
    ref = openai_decode(blocks, scales)
    ours = np.asarray(MXFP4(jnp.asarray(blocks), jnp.asarray(scales)).dequantize(jnp.float32))
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(dequantize_np(blocks, scales), ref)
    # bf16 decode is exact (every decoded value is representable)
    bf = np.asarray(MXFP4(jnp.asarray(blocks), jnp.asarray(scales)).dequantize(jnp.bfloat16))
    np.testing.assert_array_equal(bf.astype(np.float32), ref)


# Every byte (so every code in both nibbles) at every one of the 256 E8M0 scale bytes:
# row s of the decoded [256, 16 * 32] matrix is scale byte s.
ALL_BLOCKS = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(1, 16, 16), (256, 16, 16)).copy()
ALL_SCALES = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, 16)).copy()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_all_256_scales_against_openai_reference(dtype):
    """All 256 scale bytes x all 16 codes in both nibble positions, against OpenAI's decoder in
    the same dtype. Bit-exact (signed zeros and infinities included) except in two documented
    places:

    * scales 0 and 1 (2**-127, 2**-126): results below float32's smallest normal (2**-126) are
      subnormal. The reference (torch on CPU) keeps them; our jnp decode, like XLA:CPU and
      accelerators generally, may flush them to a zero of the same sign. Every other value at
      these scales is exact. The NumPy decoder (`dequantize_np`) keeps them and is exact.
    * scale 255 is NaN in OCP MX E8M0. The checkpoint loader refuses it before anything is
      decoded (`checkpoint.py`), so no decoder sees it from a checkpoint; given it directly,
      both decoders read it as 2**128 like any other byte (no NaN): 0 -> +-0, +-0.5 -> +-2**127,
      every larger magnitude -> +-inf. This is checked here, so a change in it is seen.
    """
    tdt, jdt = {"float32": (torch.float32, jnp.float32), "bfloat16": (torch.bfloat16, jnp.bfloat16)}[dtype]
    ref = openai_decode(ALL_BLOCKS, ALL_SCALES, tdt).reshape(256, -1)
    ours = np.asarray(MXFP4(jnp.asarray(ALL_BLOCKS), jnp.asarray(ALL_SCALES)).dequantize(jdt), np.float32).reshape(
        256, -1
    )
    assert ours.shape == ref.shape == (256, 512)
    with np.errstate(over="ignore"):  # scale 255 overflows to inf, as in the reference
        exact_np = same_values(
            dequantize_np(ALL_BLOCKS, ALL_SCALES).reshape(256, -1),
            openai_decode(ALL_BLOCKS, ALL_SCALES).reshape(256, -1),
        )
    assert exact_np.all()

    exact = same_values(ours, ref)
    assert exact[2:].all(), f"scale bytes {sorted(set(np.nonzero(~exact[2:])[0] + 2))} differ"
    subnormal = (ref != 0) & (np.abs(ref) < np.finfo(np.float32).tiny)
    assert subnormal[:2].sum() > 0 and not subnormal[2:].any()
    assert exact[:2][~subnormal[:2]].all()
    flushed = ~exact[:2] & subnormal[:2]
    assert (ours[:2][flushed] == 0).all()
    assert (np.signbit(ours[:2][flushed]) == np.signbit(ref[:2][flushed])).all()

    # scale 255, spelled out: codes 0..7 then 8..15 in the low nibble (byte b = code)
    row = ALL_BLOCKS[255, 0]  # the first block holds bytes 0..15: low nibble = code 0..15
    ref255 = ref[255].reshape(16, 32)[0, 0::2]
    low = ours[255].reshape(16, 32)[0, 0::2]
    want = np.array([0.0, 2.0**127] + [np.inf] * 6 + [-0.0, -(2.0**127)] + [-np.inf] * 6, np.float32)
    assert row.tolist() == list(range(16))
    assert same_values(low, want).all() and same_values(ref255, want).all()
    # scale 0 (2**-127): element 2b is byte b's low nibble, so elements 2, 4, 8 are codes 1, 2, 4:
    # 0.5 -> 2**-128 and 1 -> 2**-127 are subnormal, 2 -> 2**-126 is the smallest normal
    assert ref[0, 2] == 2.0**-128 and ref[0, 4] == 2.0**-127
    assert ref[0, 8] == ours[0, 8] == 2.0**-126


def test_all_scales_comparison_catches_wrong_decoders():
    """Controls: the comparison above fails for a decoder that is wrong at one scale byte only, or
    that swaps the nibbles, or that gets the bias wrong by one."""
    ref = openai_decode(ALL_BLOCKS, ALL_SCALES).reshape(256, -1)
    with np.errstate(over="ignore"):
        good = dequantize_np(ALL_BLOCKS, ALL_SCALES).reshape(256, -1)
        swapped = dequantize_np(((ALL_BLOCKS & 15) << 4) | (ALL_BLOCKS >> 4), ALL_SCALES).reshape(256, -1)
        bias = np.ldexp(good, 1)
    assert same_values(good, ref).all()
    one_scale = good.copy()
    one_scale[200] *= 2  # as if scale byte 200 decoded as 201
    for wrong in (one_scale, swapped, bias):
        mismatched_scales = np.nonzero(~same_values(wrong, ref).all(-1))[0]
        assert mismatched_scales.size > 0
    assert np.nonzero(~same_values(one_scale, ref).all(-1))[0].tolist() == [200]


def test_decode_every_code_at_every_scale():
    # all 256 byte values (both nibbles) at every scale whose results are finite normal floats
    blocks = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(1, 16, 16), (251, 16, 16))[:, None]
    scales = np.broadcast_to(np.arange(2, 253, dtype=np.uint8).reshape(251, 1, 1), (251, 1, 16))
    want = dequantize_np(np.ascontiguousarray(blocks), np.ascontiguousarray(scales))
    got = np.asarray(MXFP4(jnp.asarray(blocks), jnp.asarray(scales)).dequantize(jnp.float32))
    np.testing.assert_array_equal(got, want)


def ocp_quantize_with_ml_dtypes(w):
    """Independent OCP MX v1.0 encoder: per 32-value block, shared exponent
    floor(log2(amax)) - 2 (from the float's exponent field, `np.frexp`), then each value / 2**that
    cast to `ml_dtypes.float4_e2m1fn` (round to nearest, ties to even; saturating at 6). Returns
    (codes [..., G, 32] uint8 with the sign in bit 3, biased scales [..., G])."""
    import ml_dtypes

    x = w.reshape(*w.shape[:-1], -1, 32).astype(np.float32)
    amax = np.abs(x).max(-1)
    _, e = np.frexp(np.where(amax > 0, amax, 1.0))
    shared = np.where(amax > 0, e - 1 - 2, 0)
    codes = (x / np.ldexp(np.float32(1), shared)[..., None]).astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    return codes & 15, (shared + 127).astype(np.uint8)


def unpack_codes(q):
    b = np.asarray(q.blocks)
    return np.stack([b & 15, b >> 4], axis=-1).reshape(*b.shape[:-1], 32)


def quantize_oracle_inputs():
    """Blocks at shared exponents across most of float32's normal range, each mixing random
    values, exact E2M1 grid midpoints (ties), values just either side of the midpoints, values
    in (6, 8) x scale (saturation), zeros and negative zeros."""
    rng = np.random.default_rng(7)
    G = 600
    exps = rng.integers(-100, 100, G)
    mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    vals = rng.uniform(-8, 8, (G, 32))
    kind = rng.integers(0, 6, (G, 32))
    pick = rng.choice(mids, (G, 32)) * rng.choice([-1, 1], (G, 32))
    vals = np.where(kind == 1, pick, vals)
    vals = np.where(kind == 2, np.nextafter(pick, 0), vals)
    vals = np.where(kind == 3, np.nextafter(pick, 2 * pick), vals)
    vals = np.where(kind == 4, rng.uniform(6, 8, (G, 32)) * rng.choice([-1, 1], (G, 32)), vals)
    vals = np.where(kind == 5, rng.choice([0.0, -0.0], (G, 32)), vals)
    vals[:, 0] = rng.uniform(4, 8, G) * rng.choice([-1, 1], G)  # amax in [4, 8): shared exponent 0 before scaling
    w = (vals * np.ldexp(1.0, exps)[:, None]).astype(np.float32)
    w[-1] = 0.0  # an all-zero block
    w[-2] = -0.0
    return w.reshape(60, 10 * 32)


def test_quantize_equals_ml_dtypes_e2m1_rounding():
    w = quantize_oracle_inputs()
    codes, scales = ocp_quantize_with_ml_dtypes(w)
    q = quantize(w)
    np.testing.assert_array_equal(np.asarray(q.scales), scales)
    np.testing.assert_array_equal(unpack_codes(q), codes)
    # control: the oracle is sensitive to the rounding mode; ties-away-from-zero differs on the ties
    x = w.reshape(60, 10, 32) / np.ldexp(np.float32(1), scales.astype(int) - 127)[..., None]
    ties = np.isin(np.abs(x), [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert ties.sum() > 500
    away = np.searchsorted(mxfp4.E2M1_VALUES[:8], np.abs(x), side="left")
    assert (away[ties] != codes[ties]).any()


def test_quantize_oracle_catches_a_wrong_encoder():
    """Control: a quantizer rounding ties up instead of to even, or with the shared exponent off
    by one, is caught by the same comparison."""
    w = quantize_oracle_inputs()
    codes, scales = ocp_quantize_with_ml_dtypes(w)
    good = unpack_codes(quantize(w))
    x = w.reshape(60, 10, 32) / np.ldexp(np.float32(1), scales.astype(int) - 127)[..., None]
    grid = mxfp4.E2M1_VALUES[:8]
    dist = np.abs(np.abs(x)[..., None] - grid)
    ties_up = 7 - np.argmin(dist[..., ::-1], axis=-1)  # last code at minimal distance
    ties_up = ties_up | np.where(np.signbit(x), 8, 0)
    assert (ties_up != codes).any() and (good == codes).all()
    shifted = quantize(w * 2)  # every nonzero block's shared exponent one higher
    nonzero = np.abs(w).reshape(60, 10, 32).max(-1) > 0
    assert nonzero.sum() == 598 and (np.asarray(shifted.scales)[nonzero] != scales[nonzero]).all()


def test_quantize_round_trips_representable_values():
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (4, 6, 2, 16), dtype=np.uint8)
    scales = rng.integers(110, 135, (4, 6, 2), dtype=np.uint8)
    blocks[..., 0] |= 0x07  # make every block's amax a 6 so the shared exponent is recoverable
    w = dequantize_np(blocks, scales)
    q = quantize(w)
    np.testing.assert_array_equal(dequantize_np(np.asarray(q.blocks), np.asarray(q.scales)), w)
    np.testing.assert_array_equal(np.asarray(q.scales), scales)


def test_quantize_ocp_rounding_literal():
    # amax 6 -> shared scale 2**0; magnitudes below are rounded to the E2M1 grid, ties to even code
    x = np.zeros(32, np.float32)
    x[:12] = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.74, -2.6, 0.1, -0.25]
    got = dequantize_np(*map(np.asarray, (lambda q: (q.blocks, q.scales))(quantize(x[None]))))[0]
    assert got[:12].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.5, -3.0, 0.0, -0.0]
    # saturation: amax 7 gives scale 2**0 (floor(log2 7) - 2 = 0) and 7 -> 6
    y = np.zeros((1, 32), np.float32)
    y[0, 0] = 7.0
    q = quantize(y)
    assert int(q.scales[0, 0]) == 127 and dequantize_np(np.asarray(q.blocks), np.asarray(q.scales))[0, 0] == 6.0


def test_quantize_error_bound():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(8, 64)).astype(np.float32)
    q = quantize(w)
    back = dequantize_np(np.asarray(q.blocks), np.asarray(q.scales))
    unit = np.repeat(np.ldexp(1.0, np.asarray(q.scales).astype(int) - 127), 32, axis=-1)
    inside = np.abs(w) <= 6 * unit
    # On the grid the widest step is 2 units (4 -> 6), so rounding is off by at most 1 unit;
    # OCP's shared exponent can leave |w| up to 8 units, which saturates to +-6 units.
    assert np.all(np.abs(back - w)[inside] <= unit[inside])
    np.testing.assert_array_equal(back[~inside], np.sign(w[~inside]) * 6 * unit[~inside])
    assert inside.mean() > 0.5


def test_shapes_and_errors():
    t = MXFP4(jnp.zeros((2, 3, 4, 16), jnp.uint8), jnp.zeros((2, 3, 4), jnp.uint8))
    assert t.shape == (2, 3, 128) and t.nbytes == 2 * 3 * 4 * 17
    with pytest.raises(ValueError, match="do not fit"):
        MXFP4(jnp.zeros((2, 3, 4, 16), jnp.uint8), jnp.zeros((2, 3, 5), jnp.uint8))
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(np.zeros((2, 33)))


@pytest.mark.parametrize("rows", [64, 7])  # 7 does not divide 96: the chunk falls back to a divisor
def test_gathered_matvec_equals_numpy_decode_then_dot(rows):
    """Every code at a spread of scales, each row with its own expert and input; against the
    NumPy decoder (`dequantize_np`) and a float64 dot, within fp32 summation error."""
    rng = np.random.default_rng(3)
    E, O, I, R = 5, 96, 128, 6
    blocks = rng.integers(0, 256, (E, O, I // 32, 16), dtype=np.uint8)
    scales = rng.integers(110, 140, (E, O, I // 32), dtype=np.uint8)
    x = rng.standard_normal((R, I)).astype(np.float32)
    ids = np.array([4, 0, 0, 2, 3, 4], np.int32)
    y = mxfp4.gathered_matvec(
        jnp.asarray(x), MXFP4(jnp.asarray(blocks), jnp.asarray(scales)), jnp.asarray(ids), rows=rows
    )
    w = dequantize_np(blocks, scales).astype(np.float64)  # [E, O, I]
    want = np.einsum("ROI,RI->RO", w[ids], x.astype(np.float64))
    assert y.dtype == jnp.float32 and y.shape == (R, O)
    scale = np.abs(w[ids]).sum(-1) * np.abs(x).max()  # bound on the terms' magnitude per output
    np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - want), 1e-6 * scale + 1e-30)
    with pytest.raises(ValueError, match="do not fit"):
        mxfp4.gathered_matvec(jnp.asarray(x[:, :64]), MXFP4(jnp.asarray(blocks), jnp.asarray(scales)), jnp.asarray(ids))


def test_kernels_package_exports_the_grouped_matmul():
    """`gptoss_jax.kernels.mxfp4_grouped_matmul` is importable with the README's signature and
    computes y[m] = x[m] @ W_e^T + bias[e] for row m's group e; and a plain `import gptoss_jax`
    (checked in a fresh interpreter, where no other test has imported the subpackage) makes
    `gptoss_jax.kernels` reachable."""
    import inspect
    import os
    import subprocess
    import sys

    from gptoss_jax.kernels import mxfp4_grouped_matmul

    params = inspect.signature(mxfp4_grouped_matmul).parameters
    assert list(params)[:4] == ["x", "blocks", "scales", "group_sizes"]
    assert {"bias", "swiglu", "implementation"} <= set(params)
    rng = np.random.default_rng(5)
    E, N, K, M = 3, 8, 64, 7
    blocks = rng.integers(0, 256, (E, N, K // 32, 16), dtype=np.uint8)
    scales = rng.integers(120, 130, (E, N, K // 32), dtype=np.uint8)
    bias = rng.standard_normal((E, N)).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    sizes = np.array([3, 0, 4], np.int32)
    y = np.asarray(
        mxfp4_grouped_matmul(
            jnp.asarray(x), jnp.asarray(blocks), jnp.asarray(scales), jnp.asarray(sizes), bias=jnp.asarray(bias)
        ),
        np.float64,
    )
    w = dequantize_np(blocks, scales).astype(np.float64)
    expert = np.repeat(np.arange(E), sizes)
    want = np.einsum("mk,mnk->mn", x.astype(np.float64), w[expert]) + bias[expert]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    wrong = np.einsum("mk,mnk->mn", x.astype(np.float64), w[np.repeat([0, 1, 2], [3, 4, 0])]) + bias[[0] * 3 + [1] * 4]
    assert np.abs(y - wrong).max() > 1e-2  # control: the wrong grouping is told apart

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    code = (
        "import gptoss_jax as gj, sys; "
        "assert 'gptoss_jax.kernels' in sys.modules and 'kernels' in gj.__all__; "
        "assert gj.kernels.mxfp4_grouped_matmul.__name__ == 'mxfp4_grouped_matmul'; "
        "assert 'mxfp4_grouped_matmul' in gj.kernels.__all__; print('ok')"
    )
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
