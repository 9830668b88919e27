import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gptoss_jax import mxfp4
from gptoss_jax.mxfp4 import MXFP4, dequantize_np, quantize


def test_e2m1_table_literal():
    assert mxfp4.E2M1_VALUES.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                                          -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
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


def test_decode_matches_openai_reference_decoder():
    from gpt_oss.torch.weights import Checkpoint

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 5, 4, 16), dtype=np.uint8)
    scales = rng.integers(100, 140, (3, 5, 4), dtype=np.uint8)
    ck = Checkpoint.__new__(Checkpoint)  # only the decoder is used; no files involved
    ck.tensor_name_to_file = {"b": None, "s": None}
    ck._get_tensor = lambda name: torch.from_numpy(blocks if name == "b" else scales)
    ref = ck._get_mxfp4_tensor("b", "s", dtype=torch.float32).numpy()
    ours = np.asarray(MXFP4(jnp.asarray(blocks), jnp.asarray(scales)).dequantize(jnp.float32))
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(dequantize_np(blocks, scales), ref)
    # bf16 decode is exact (every decoded value is representable)
    bf = np.asarray(MXFP4(jnp.asarray(blocks), jnp.asarray(scales)).dequantize(jnp.bfloat16))
    np.testing.assert_array_equal(bf.astype(np.float32), ref)


def test_decode_every_code_at_every_scale():
    # all 256 byte values (both nibbles) at every scale whose results are finite normal floats
    blocks = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(1, 16, 16), (251, 16, 16))[:, None]
    scales = np.broadcast_to(np.arange(2, 253, dtype=np.uint8).reshape(251, 1, 1), (251, 1, 16))
    want = dequantize_np(np.ascontiguousarray(blocks), np.ascontiguousarray(scales))
    got = np.asarray(MXFP4(jnp.asarray(blocks), jnp.asarray(scales)).dequantize(jnp.float32))
    np.testing.assert_array_equal(got, want)


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
    y = mxfp4.gathered_matvec(jnp.asarray(x), MXFP4(jnp.asarray(blocks), jnp.asarray(scales)),
                              jnp.asarray(ids), rows=rows)
    w = dequantize_np(blocks, scales).astype(np.float64)  # [E, O, I]
    want = np.einsum("ROI,RI->RO", w[ids], x.astype(np.float64))
    assert y.dtype == jnp.float32 and y.shape == (R, O)
    scale = np.abs(w[ids]).sum(-1) * np.abs(x).max()  # bound on the terms' magnitude per output
    np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - want), 1e-6 * scale + 1e-30)
    with pytest.raises(ValueError, match="do not fit"):
        mxfp4.gathered_matvec(jnp.asarray(x[:, :64]), MXFP4(jnp.asarray(blocks), jnp.asarray(scales)),
                              jnp.asarray(ids))
