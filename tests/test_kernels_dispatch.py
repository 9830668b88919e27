"""The dispatch point and the model's use of it (the kernels' own tests are beside them)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptoss_jax as gj
from gptoss_jax import attention as xla_attention
from gptoss_jax import kernels


def _inputs(B=2, T=45, N=4, K=2, H=16, seed=0, lengths=(20, 7)):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, H)), jnp.float32) for n in (N, K, K))
    sinks = jnp.asarray(rng.normal(size=(N,)), jnp.float32)
    seg = jnp.asarray(np.repeat([[1, 2, 3]], B, 0).repeat([*lengths, T - sum(lengths)], axis=1), jnp.int32)
    return q, k, v, sinks, seg


def _primitives(jaxpr):
    """Names of every primitive in a jaxpr, nested ones (jit, custom_vjp, scan, ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _primitives(sub)


@pytest.mark.parametrize("window", [None, 8])
def test_xla_path_equals_reference(window):
    # T long enough that both XLA paths cut the queries into several chunks (full layers: chunks
    # of `causal_chunk(T)` rows; sliding layers: chunks of W), with a document running across a
    # chunk boundary, so the chunked path is what is compared with the reference
    T = 300
    q, k, v, s, seg = _inputs(T=T, lengths=(20, 250))
    C = xla_attention.causal_chunk(T) if window is None else window
    assert -(-T // C) >= 2
    assert any(int(seg[0, b - 1]) == int(seg[0, b]) for b in range(C, T, C))
    want = kernels.attention_reference(q, k, v, s, sliding_window=window, segment_ids=seg)
    got = kernels.attention(q, k, v, s, sliding_window=window, segment_ids=seg, implementation="xla")
    assert float(jnp.abs(got - want).max() / jnp.abs(want).max()) <= 1e-5
    got = kernels.attention(q, k, v, s, sliding_window=window, segment_ids=seg, implementation="xla", sm_scale=0.3)
    want = kernels.attention_reference(q, k, v, s, sliding_window=window, segment_ids=seg, sm_scale=0.3)
    assert float(jnp.abs(got - want).max() / jnp.abs(want).max()) <= 1e-5


def test_bad_arguments():
    q, k, v, s, seg = _inputs()
    with pytest.raises(ValueError, match="unknown attention implementation"):
        kernels.attention(q, k, v, s, implementation="cudnn")
    with pytest.raises(ValueError, match="sinks must have shape"):
        kernels.attention(q, k, v, s[:2])
    with pytest.raises(ValueError, match="sliding_window"):
        kernels.attention(q, k, v, s, sliding_window=0)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_model_with_kernel_attention_matches_xla(original_dir, impl):
    """The whole model, forward and gradient w.r.t. the attention weights, with the Pallas kernel
    (interpret mode) in place of the XLA attention, on packed sequences."""
    xla = gj.load(original_dir, dtype="float32")
    ker = gj.load(original_dir, dtype="float32", kernel=gj.KernelOptions(attention_impl=impl, interpret=True))
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(0, xla.cfg.vocab_size, (1, 40)))
    seg = jnp.asarray([[1] * 25 + [2] * 15])
    pos = jnp.asarray([list(range(25)) + list(range(15))])

    def loss(model):
        return jnp.mean(jax.nn.logsumexp(model(toks, positions=pos, segment_ids=seg).logits, axis=-1))

    def pallas_calls(model):  # kernel launches in the traced forward and backward program
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda st: nnx.value_and_grad(loss)(nnx.merge(graphdef, st)))(state)
        return sum(name == "pallas_call" for name in _primitives(jaxpr.jaxpr))

    # the option is taken: the kernel model runs Pallas at least once per layer (the backward
    # adds its own), the XLA model never; otherwise the comparison below would be XLA with XLA
    assert pallas_calls(xla) == 0
    assert pallas_calls(ker) >= 2 * ker.cfg.num_layers

    lx, gx = nnx.value_and_grad(loss)(xla)  # w.r.t. nnx.Param: the packed experts are frozen
    lk, gk = nnx.value_and_grad(loss)(ker)
    assert abs(float(lx - lk)) <= 1e-5 * abs(float(lx))
    for name in ("q", "k", "v"):
        a, b = getattr(gx.layers[0].attn, name)[...], getattr(gk.layers[0].attn, name)[...]
        assert float(jnp.abs(a - b).max() / jnp.abs(a).max()) <= 1e-4, name
    a, b = gx.layers[1].attn.sinks[...], gk.layers[1].attn.sinks[...]
    assert float(jnp.abs(a - b).max() / jnp.abs(a).max()) <= 1e-4


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_first_chunk_of_a_new_cache_runs_the_kernel(original_dir, impl):
    """generate's first prefill chunk on a new cache (`empty_cache=True`) with the Pallas kernel
    (interpret mode): the kernel runs once per layer (through the cache, never), and the logits
    and the cache written equal those of the same chunk through the cache (fp32, 1e-5 of the
    logits' scale), on right-padded prompts longer than the sliding window."""
    from gptoss_jax.cache import init_cache

    m = gj.load(original_dir, dtype="float32", kernel=gj.KernelOptions(attention_impl=impl, interpret=True))
    cfg = m.cfg
    prompts = (13, 4, 16)
    assert max(prompts) > cfg.sliding_window
    seg = (np.arange(16)[None] < np.array(prompts)[:, None]).astype(np.int32)
    toks = np.where(seg, np.random.default_rng(6).integers(0, cfg.vocab_size, (3, 16)), 0)
    cache = init_cache(cfg, 3, 24, jnp.float32)
    graphdef, state = nnx.split(m)

    def chunk(st, empty):
        return nnx.merge(graphdef, st)(toks, segment_ids=seg, cache=cache, empty_cache=empty)

    calls = {
        e: sum(n == "pallas_call" for n in _primitives(jax.make_jaxpr(chunk, static_argnums=1)(state, e).jaxpr))
        for e in (True, False)
    }
    assert calls == {True: cfg.num_layers, False: 0}
    new, old = (jax.jit(chunk, static_argnums=1)(state, e) for e in (True, False))
    valid = seg.astype(bool)
    a, b = np.asarray(new.logits)[valid], np.asarray(old.logits)[valid]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    for x, y in zip(new.cache.layers, old.cache.layers):
        np.testing.assert_array_equal(np.asarray(x.pos), np.asarray(y.pos))
        np.testing.assert_allclose(np.asarray(x.k), np.asarray(y.k), atol=1e-5 * np.abs(np.asarray(y.k)).max())
