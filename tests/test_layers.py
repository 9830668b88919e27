import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gpt_oss.torch import model as ref

from gptoss_jax import layers, plan
from gptoss_jax.config import gpt_oss_20b, tiny

# Spec section 2.4.2: fp32 bit patterns of inv_freq for the released models.
SPEC_INV_FREQ_BITS = """3f800000 3f306535 3ef316a2 3ea77faa 3e66d3fa 3e1f0cfd 3ddb2f9f 3d970764 3d502194
3d01ddd5 3c9e646f 3c3dec94 3bdea840 3b7cfe14 3b093803 3a89f778 39ef543c 390799b9 3820adc6 37dd6dfc
37989328 375242fa 3710e12c 36c7a82b 3689928c 363d9647 3602a245 35b40668 35781728 352af200 34eb93eb
34a252d3""".split()


def _ref_inv_freq(cfg):
    rope = ref.RotaryEmbedding(
        cfg.head_dim,
        cfg.rope_theta,
        torch.float32,
        initial_context_length=cfg.rope_original_context,
        scaling_factor=cfg.rope_factor,
        ntk_alpha=cfg.rope_beta_slow,
        ntk_beta=cfg.rope_beta_fast,
    )
    conc, inv = rope._compute_concentration_and_inv_freq()
    return conc, inv.numpy()


def test_yarn_constants_literal():
    low, high = layers.yarn_correction_range(gpt_oss_20b())
    assert low == pytest.approx(8.092779115512402, abs=1e-12)
    assert high == pytest.approx(17.39802450158856, abs=1e-12)
    assert gpt_oss_20b().rope_concentration ** 2 == pytest.approx(1.8132604340394958, abs=1e-14)
    lo_t, hi_t = layers.yarn_correction_range(gpt_oss_20b().replace(rope_truncate=True))
    assert (lo_t, hi_t) == (8, 18)


def test_inv_freq_bits_released_config():
    inv = layers.rope_inv_freq(gpt_oss_20b())
    assert inv.dtype == np.float32
    assert [format(b, "08x") for b in inv.view(np.uint32)] == SPEC_INV_FREQ_BITS
    conc, ref_inv = _ref_inv_freq(gpt_oss_20b())
    np.testing.assert_array_equal(inv.view(np.uint32), ref_inv.view(np.uint32))
    assert conc == gpt_oss_20b().rope_concentration


@pytest.mark.parametrize("head_dim", [16, 32, 128])
def test_inv_freq_other_head_dims_within_an_ulp(head_dim):
    cfg = tiny(head_dim=head_dim)
    _, ref_inv = _ref_inv_freq(cfg)
    ours = layers.rope_inv_freq(cfg)
    ulps = np.abs(ours.view(np.int32).astype(np.int64) - ref_inv.view(np.int32).astype(np.int64))
    assert ulps.max() <= 1


def test_rope_rotation_matches_reference():
    cfg = gpt_oss_20b()
    rng = np.random.default_rng(0)
    T, heads = 300, 3
    x = rng.normal(size=(T, heads, 64)).astype(np.float32)
    rope = ref.RotaryEmbedding(64, cfg.rope_theta, torch.float32, 4096, 32.0, 1.0, 32.0)
    cos_r, sin_r = rope._compute_cos_sin(T)
    want = ref._apply_rotary_emb(torch.from_numpy(x), cos_r, sin_r).numpy()
    cos, sin = layers.rope_cos_sin(jnp.arange(T)[None], layers.rope_inv_freq(cfg), cfg.rope_concentration)
    got = np.asarray(layers.apply_rope(jnp.asarray(x)[None], cos, sin))[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    # half-split pairing: dim j rotates with dim j + 32 at frequency j; dim 0 at position 1
    c = cfg.rope_concentration
    e = np.zeros((1, 2, 1, 64), np.float32)
    e[0, 1, 0, 0] = 1.0
    cos, sin = layers.rope_cos_sin(jnp.arange(2)[None], layers.rope_inv_freq(cfg), c)
    out = np.asarray(layers.apply_rope(jnp.asarray(e), cos, sin))[0, 1, 0]
    assert out[0] == pytest.approx(c * math.cos(1.0), abs=1e-6)
    assert out[32] == pytest.approx(c * math.sin(1.0), abs=1e-6)
    assert np.count_nonzero(out) == 2


def test_rms_norm_matches_reference_and_multiplies_gain_in_fp32():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 64)).astype(np.float32) * 3
    g = rng.normal(size=(64,)).astype(np.float32)
    norm = ref.RMSNorm(64)
    with torch.no_grad():
        norm.scale.copy_(torch.from_numpy(g))
        want = norm(torch.from_numpy(x)).numpy()
        want_bf16 = norm(torch.from_numpy(x).bfloat16()).float().numpy()
    np.testing.assert_allclose(
        np.asarray(layers.rms_norm(jnp.asarray(x), jnp.asarray(g), 1e-5)), want, rtol=1e-6, atol=1e-6
    )
    got_bf16 = layers.rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(g), 1e-5)
    assert got_bf16.dtype == jnp.bfloat16
    # identical roundings: fp32 math and gain, one cast at the end
    np.testing.assert_array_equal(np.asarray(got_bf16.astype(jnp.float32)), want_bf16)


def test_swiglu_matches_reference():
    rng = np.random.default_rng(0)
    h = (rng.normal(size=(7, 2 * 48)) * 6).astype(np.float32)  # wide enough to hit both clamps
    want = ref.swiglu(torch.from_numpy(h), limit=7.0).numpy()
    got = np.asarray(layers.swiglu(jnp.asarray(h), alpha=1.702, limit=7.0))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # interleave and clamps, literally: gate = even columns, up = odd columns
    h = np.array([[10.0, 10.0, -1.0, -10.0]], np.float32)
    g = np.asarray(layers.swiglu(jnp.asarray(h), alpha=1.702, limit=7.0))[0]
    sig = lambda z: 1 / (1 + math.exp(-z))
    assert g[0] == pytest.approx(7 * sig(1.702 * 7) * 8, rel=1e-6)
    assert g[1] == pytest.approx(-1 * sig(-1.702) * (-7 + 1), rel=1e-6)


@pytest.mark.parametrize("rows", [(1, 1), (3, 1), (2, 5)])  # 1 and 3 rows: reduction forms; 10: matmul
def test_unembed_equals_float64_product(rows):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(300, 64)), jnp.bfloat16)
    h = jnp.asarray(rng.normal(size=rows + (64,)), jnp.bfloat16)
    got = layers.unembed(h, w, reduction_rows=plan.UNEMBED_ROWS_AS_REDUCTION)
    want = np.einsum("...D,VD->...V", np.asarray(h, np.float64), np.asarray(w, np.float64))
    assert got.dtype == jnp.float32 and got.shape == rows + (300,)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("n", [96, 101])  # whole chunks; whole chunks and a tail
def test_unembed_in_row_chunks_equals_float64_product(n):
    rng = np.random.default_rng(n)
    w = jnp.asarray(rng.normal(size=(300, 64)), jnp.bfloat16)
    h = jnp.asarray(rng.normal(size=(1, n, 64)), jnp.bfloat16)
    f = jax.jit(lambda h, w: layers.unembed(h, w, chunk_rows=32))
    assert "while" in f.lower(h, w).as_text()  # 96 > 2 * 32 rows: the chunk loop
    got = f(h, w)
    want = np.einsum("...D,VD->...V", np.asarray(h, np.float64), np.asarray(w, np.float64))
    assert got.dtype == jnp.float32 and got.shape == (1, n, 300)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_embed_lookup_is_exact_for_bf16_and_fp32():
    rng = np.random.default_rng(1)
    tokens = jnp.asarray([[3, 0, 9], [9, 9, 1]])
    for dtype in (jnp.bfloat16, jnp.float32):
        table = jnp.asarray(rng.normal(size=(10, 8)), dtype)
        got = layers.embed_lookup(table, tokens)
        assert got.dtype == dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(table, np.float32)[np.asarray(tokens)])


@pytest.mark.parametrize(
    "spec,x_shape,w_shape,a_shape,b_shape",
    [
        ("BTD,DNH->BTNH", (2, 3, 8), (8, 4, 5), (8, 2), (2, 4, 5)),  # q/k/v: one contracted axis
        ("BTNH,NHD->BTD", (2, 3, 4, 5), (4, 5, 8), (4, 5, 2), (2, 8)),  # o: two contracted axes
    ],
)
def test_linear_with_a_low_rank_adapter_equals_numpy(spec, x_shape, w_shape, a_shape, b_shape):
    rng = np.random.default_rng(2)
    x, w, a, b = (rng.normal(size=s).astype(np.float32) for s in (x_shape, w_shape, a_shape, b_shape))
    nd = len(a_shape) - 1  # contracted axes
    flat = lambda t, lead: t.reshape(int(np.prod(t.shape[:lead])), -1)
    xm = flat(x.astype(np.float64), x.ndim - nd)
    base = xm @ flat(w.astype(np.float64), nd)
    delta = 0.5 * (xm @ flat(a.astype(np.float64), nd)) @ b.reshape(b.shape[0], -1)
    out_shape = x_shape[: x.ndim - nd] + w_shape[nd:]
    plain = layers.linear(jnp.asarray(x), jnp.asarray(w), spec)
    got = layers.linear(
        jnp.asarray(x), jnp.asarray(w), spec, adapter=layers.LowRank(jnp.asarray(a), jnp.asarray(b), 0.5)
    )
    np.testing.assert_allclose(np.asarray(plain), base.reshape(out_shape), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got), (base + delta).reshape(out_shape), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(got) - np.asarray(plain)).max() > 1e-2  # control: the adapter changes the output
