import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gpt_oss.torch import model as ref

from gptoss_jax import attention
from gptoss_jax.attention import attention_mask, attention_reference, sliding_attention
from gptoss_jax.kernels.attention import attention_reference as kernel_reference


def _qkv(B, T, N, K, H, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k = rng.normal(size=(B, T, K, H)).astype(np.float32)
    v = rng.normal(size=(B, T, K, H)).astype(np.float32)
    s = rng.normal(size=(N,)).astype(np.float32)
    return map(jnp.asarray, (q, k, v, s))


def test_sliding_mask_literal():
    pos = jnp.arange(6)[None]
    seg = jnp.ones((1, 6), jnp.int32)
    m = np.asarray(attention_mask(pos, pos, seg, seg, window=3))[0].astype(int)
    assert m.tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1],
    ]
    m128 = np.asarray(
        attention_mask(jnp.arange(400)[None], jnp.arange(400)[None], jnp.ones((1, 400)), jnp.ones((1, 400)), window=128)
    )[0]
    assert m128.sum(-1).tolist() == [min(i + 1, 128) for i in range(400)]  # W keys incl. itself


def test_segments_literal():
    pos = jnp.array([[0, 1, 2, 0, 1]])
    seg = jnp.array([[1, 1, 1, 2, 2]])
    m = np.asarray(attention_mask(pos, pos, seg, seg, window=None))[0].astype(int)
    assert m.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]


def test_sink_math():
    q, k, v, s = _qkv(1, 1, 2, 1, 4)
    # all keys masked -> the sink takes all the mass and the output is exactly 0
    out, mass = attention_reference(
        q,
        k,
        v,
        s,
        q_pos=jnp.zeros((1, 1)),
        k_pos=jnp.zeros((1, 1)),
        q_seg=jnp.ones((1, 1)),
        k_seg=jnp.zeros((1, 1)),
        window=None,
    )
    assert np.all(np.asarray(out) == 0) and np.allclose(np.asarray(mass), 1.0)
    # one visible key: weight = 1 / (1 + exp(S - s)), no scaling of the sink
    out, mass = attention_reference(
        q,
        k,
        v,
        s,
        q_pos=jnp.zeros((1, 1)),
        k_pos=jnp.zeros((1, 1)),
        q_seg=jnp.ones((1, 1)),
        k_seg=jnp.ones((1, 1)),
        window=None,
    )
    score = np.einsum("nh,h->n", np.asarray(q)[0, 0], np.asarray(k)[0, 0, 0]) / 2.0
    w = 1.0 / (1.0 + np.exp(np.asarray(s) - score))
    np.testing.assert_allclose(np.asarray(out)[0, 0], w[:, None] * np.asarray(v)[0, 0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(mass)[0, 0], 1 - w, rtol=1e-5)


def test_softmax_with_sink_and_the_kernels_reference_adapter():
    s = jnp.array([[0.5, -jnp.inf, 1.0], [-jnp.inf, -jnp.inf, -jnp.inf]])
    p, sink = attention.softmax_with_sink(s, jnp.array([0.25, 3.0]))
    e = np.exp([0.5, 1.0, 0.25])
    np.testing.assert_allclose(np.asarray(p[0]), [e[0] / e.sum(), 0, e[1] / e.sum()], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sink), [e[2] / e.sum(), 1.0], rtol=1e-6)
    assert not np.asarray(p[1]).any()  # no visible key: everything on the sink, no NaN
    # `kernels.attention_reference` is this module's reference for the kernels' self-attention
    q, k, v, sk = _qkv(2, 6, 4, 2, 8)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    seg = jnp.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1]])
    want, _ = attention_reference(q, k, v, sk, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, window=2, scale=0.3)
    got = kernel_reference(q, k, v, sk, sliding_window=2, segment_ids=seg, sm_scale=0.3)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("window", [0, 8])
def test_reference_matches_openai_sdpa(window):
    T, N, K, H = 37, 8, 2, 16
    q, k, v, s = _qkv(1, T, N, K, H, seed=3)
    want = ref.sdpa(
        torch.tensor(np.asarray(q)[0]).reshape(T, K, N // K, H),
        torch.tensor(np.asarray(k)[0]),
        torch.tensor(np.asarray(v)[0]),
        torch.tensor(np.asarray(s)),
        H**-0.5,
        window,
    ).numpy()
    pos, seg = jnp.arange(T)[None], jnp.ones((1, T))
    out, _ = attention_reference(q, k, v, s, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, window=window or None)
    np.testing.assert_allclose(np.asarray(out)[0].reshape(T, -1), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T, window", [(5, 8), (8, 8), (9, 8), (40, 8), (64, 16), (33, 4)])
def test_chunked_sliding_equals_reference(T, window):
    B, N, K, H = 2, 4, 2, 8
    q, k, v, s = _qkv(B, T, N, K, H, seed=T)
    # batch row 0: one document; row 1: three packed documents with restarting positions
    cut1, cut2 = T // 3, (2 * T) // 3
    seg = jnp.stack([jnp.ones(T, jnp.int32), jnp.array([1] * cut1 + [2] * (cut2 - cut1) + [3] * (T - cut2))])
    pos = jnp.stack([jnp.arange(T), jnp.concatenate([jnp.arange(cut1), jnp.arange(cut2 - cut1), jnp.arange(T - cut2)])])
    want, want_mass = attention_reference(q, k, v, s, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, window=window)
    got, got_mass = jax.jit(sliding_attention, static_argnames="window")(
        q, k, v, s, positions=pos, segment_ids=seg, window=window
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_mass), np.asarray(want_mass), rtol=1e-5, atol=1e-6)


def test_chunked_sliding_is_linear_in_T():
    # Memory of the score tensor: O(T * W), not O(T^2).
    B, N, K, H, W = 1, 2, 1, 8, 16
    for T in (256, 1024):
        q, k, v, s = _qkv(B, T, N, K, H)
        pos, seg = jnp.arange(T)[None], jnp.ones((1, T), jnp.int32)
        jaxpr = jax.make_jaxpr(
            lambda q, k, v, s: sliding_attention(q, k, v, s, positions=pos, segment_ids=seg, window=W)
        )(q, k, v, s)
        biggest = max(int(np.prod(var.aval.shape)) for eqn in jaxpr.eqns for var in eqn.outvars)
        assert biggest <= T * N * 2 * W * 2  # scores are [T/W chunks, N, W, 2W]


@pytest.mark.parametrize("T", [7, 40, 64])
def test_causal_chunks_equal_reference(T, monkeypatch):
    """The full layers' query chunks (here of 16 rows: 1, 3 and 4 chunks) give the [T, T]
    reference's outputs, sink mass and gradients, with packed documents in one row."""
    monkeypatch.setattr(attention, "CAUSAL_MIN_CHUNK", 8)
    monkeypatch.setattr(attention, "CAUSAL_MAX_CHUNKS", 4)
    B, N, K, H = 2, 4, 2, 8
    q, k, v, s = _qkv(B, T, N, K, H, seed=T + 1)
    cut1, cut2 = T // 3, (2 * T) // 3
    seg = jnp.stack([jnp.ones(T, jnp.int32), jnp.array([1] * cut1 + [2] * (cut2 - cut1) + [3] * (T - cut2))])
    pos = jnp.stack([jnp.arange(T), jnp.concatenate([jnp.arange(cut1), jnp.arange(cut2 - cut1), jnp.arange(T - cut2)])])
    ref = lambda q, k, v: attention_reference(q, k, v, s, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, window=None)
    new = lambda q, k, v: attention.causal_attention(q, k, v, s, positions=pos, segment_ids=seg)
    for w, g in zip(ref(q, k, v), jax.jit(new)(q, k, v)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
    loss = lambda f: jax.grad(lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)[0])), argnums=(0, 1, 2))
    for w, g in zip(loss(ref)(q, k, v), jax.jit(loss(new))(q, k, v)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
    if T > 16:  # one chunk's scores at a time, never a [T, T]
        jaxpr = jax.make_jaxpr(new)(q, k, v)
        biggest = max(int(np.prod(var.aval.shape)) for eqn in jaxpr.eqns for var in eqn.outvars)
        assert biggest <= B * N * 16 * T < B * N * T * T
