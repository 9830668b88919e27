import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gpt_oss.torch import model as ref

from gptoss_jax import moe
from gptoss_jax.mxfp4 import quantize

D, F, E, K = 64, 32, 8, 3


def _weights(seed, packed):
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(E, 2 * F, D)).astype(np.float32) * 0.2  # [E, out, in] like the checkpoint
    w2 = rng.normal(size=(E, D, F)).astype(np.float32) * 0.2
    if packed:
        w1q, w2q = quantize(w1), quantize(w2)
        dense = (np.asarray(w1q.dequantize(jnp.float32)), np.asarray(w2q.dequantize(jnp.float32)))
        ew1, ew2 = w1q, w2q
    else:
        dense = (w1, w2)
        ew1, ew2 = jnp.asarray(w1.transpose(0, 2, 1)), jnp.asarray(w2.transpose(0, 2, 1))
    b1 = rng.normal(size=(E, 2 * F)).astype(np.float32) * 0.5
    b2 = rng.normal(size=(E, D)).astype(np.float32) * 0.5
    router = rng.normal(size=(D, E)).astype(np.float32)
    rb = rng.normal(size=(E,)).astype(np.float32)
    return moe.ExpertWeights(ew1, jnp.asarray(b1), ew2, jnp.asarray(b2)), dense, router, rb


def _reference(x, dense, b1, b2, router, rb):
    """OpenAI's MLPBlock with our weights, norm disabled by comparing after its norm."""
    blk = ref.MLPBlock.__new__(ref.MLPBlock)
    torch.nn.Module.__init__(blk)
    blk.num_experts, blk.experts_per_token, blk.swiglu_limit, blk.world_size = E, K, 7.0, 1
    blk.norm = torch.nn.Identity()
    blk.gate = torch.nn.Linear(D, E)
    with torch.no_grad():
        blk.gate.weight.copy_(torch.tensor(router.T))
        blk.gate.bias.copy_(torch.tensor(rb))
    blk.mlp1_weight = torch.nn.Parameter(torch.tensor(dense[0]))
    blk.mlp1_bias = torch.nn.Parameter(torch.tensor(np.asarray(b1)))
    blk.mlp2_weight = torch.nn.Parameter(torch.tensor(dense[1]))
    blk.mlp2_bias = torch.nn.Parameter(torch.tensor(np.asarray(b2)))
    with torch.no_grad():
        return (blk(torch.tensor(x)) - torch.tensor(x)).numpy()


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("impl", ["dense", "ragged", "chunks", "buckets", "buckets_one_expert_at_a_time", "gather"])
def test_moe_matches_openai_mlp_block(impl, packed):
    options = {"ragged": dict(mxfp4_impl="xla"), "gather": dict(gathered_decode=True)}.get(impl, {})
    if impl == "buckets_one_expert_at_a_time":  # the large-model CPU path (packed experts)
        impl, options = "buckets", dict(one_at_a_time=True)
    ew, dense, router, rb = _weights(0, packed)
    x = np.random.default_rng(1).normal(size=(50, D)).astype(np.float32)
    want = _reference(x, dense, ew.b1, ew.b2, router, rb)
    got, routing = jax.jit(
        lambda x: moe.moe(
            x, jnp.asarray(router), jnp.asarray(rb), ew, k=K, alpha=1.702, limit=7.0, impl=impl, **options
        )
    )(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert len(np.unique(np.asarray(routing.ids))) == E  # every expert used: grouping is exercised


def test_routing_is_topk_then_softmax():
    logits = jnp.array([[1.0, 3.0, 2.0, -1.0]])
    r = moe.route(jnp.ones((1, 1)), logits, jnp.zeros(4), 2)  # x @ w = the logits above
    assert r.ids.tolist() == [[1, 2]]
    np.testing.assert_allclose(np.asarray(r.weights), [[np.exp(1) / (np.exp(1) + 1), 1 / (np.exp(1) + 1)]], rtol=1e-6)


@pytest.mark.parametrize("impl", ["buckets", "chunks"])
def test_dropless_under_skewed_routing(impl):
    # A router bias that sends every token to experts 0..K-1: one group holds all T tokens, far
    # above the mean; buckets must choose the largest static capacity, chunks run 5 chunks of 8
    # rows for each of those experts and none for the rest; nothing is dropped.
    ew, dense, router, rb = _weights(2, False)
    rb = np.where(np.arange(E) < K, 100.0, -100.0).astype(np.float32)
    x = np.random.default_rng(3).normal(size=(40, D)).astype(np.float32)
    args = (jnp.asarray(x), jnp.asarray(router), jnp.asarray(rb), ew)
    want, _ = moe.moe(*args, k=K, alpha=1.702, limit=7.0, impl="dense")
    got, r = moe.moe(*args, k=K, alpha=1.702, limit=7.0, impl=impl)
    assert np.bincount(np.asarray(r.ids).ravel(), minlength=E)[:K].tolist() == [40] * K
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert moe.bucket_capacities(40, K, E)[-1] == 40
    assert moe.chunk_rows(40 * K, E) == 8 and moe.chunk_count(40 * K, E, 8) == 22  # 15 of them used


def test_unknown_impl():
    ew, _, router, rb = _weights(0, False)
    with pytest.raises(ValueError, match="unknown MoE implementation 'fast'"):
        moe.moe(jnp.zeros((2, D)), jnp.asarray(router), jnp.asarray(rb), ew, k=K, alpha=1.7, limit=7.0, impl="fast")


def test_load_balancing_loss_matches_transformers():
    """One layer's loss vs HF's `load_balancing_loss_func` (the oracle), with padding masked."""
    from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2 * 9, E)).astype(np.float32) * 2
    mask = np.ones((2, 9), np.int64)
    mask[1, 6:] = 0  # right padding
    top, ids = jax.lax.top_k(jnp.asarray(logits), K)
    routing = moe.Routing(jnp.asarray(logits), ids.astype(jnp.int32), jax.nn.softmax(top, axis=-1))
    got = float(moe.load_balancing_loss(routing, jnp.asarray(mask.reshape(-1))))
    want = float(load_balancing_loss_func((torch.tensor(logits),), E, K, torch.tensor(mask)))
    assert got == pytest.approx(want, rel=1e-6)
    unmasked = float(load_balancing_loss_func((torch.tensor(logits),), E, K))
    assert float(moe.load_balancing_loss(routing)) == pytest.approx(unmasked, rel=1e-6)
    uniform = moe.Routing(jnp.zeros((E, E)), (jnp.arange(E)[:, None] + jnp.arange(K)) % E, jnp.full((E, K), 1 / K))
    assert float(moe.load_balancing_loss(uniform)) == pytest.approx(K)  # a balanced load scores k


def test_one_expert_at_a_time_gradient_equals_dense():
    """The large-model CPU bucket path (packed experts decoded one at a time in a lax.map) has the
    dense reference's input gradient."""
    ew, _, router, rb = _weights(4, True)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(30, D)).astype(np.float32))
    loss = lambda impl, **o: (
        lambda x: jnp.sum(
            jnp.sin(
                moe.moe(x, jnp.asarray(router), jnp.asarray(rb), ew, k=K, alpha=1.702, limit=7.0, impl=impl, **o)[0]
            )
        )
    )
    want = jax.grad(loss("dense"))(x)
    got = jax.grad(loss("buckets", one_at_a_time=True))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("skewed", [False, True])
def test_chunks_gradients_equal_dense(packed, skewed):
    """The chunked path's own backward loop: gradients for the input, every float weight (dense
    matrices, biases) and per-expert LoRA adapters equal autodiff through the dense reference,
    with balanced and with skewed routing, at a chunk height that splits groups over several
    chunks; packed blocks get no gradient."""
    ew, _, router, rb = _weights(6, packed)
    rng = np.random.default_rng(7)
    ew = ew._replace(
        lora1=moe.Adapter(
            jnp.asarray(rng.normal(size=(E, D, 2)) * 0.1, jnp.float32),
            jnp.asarray(rng.normal(size=(E, 2, 2 * F)) * 0.1, jnp.float32),
        ),
        lora2=moe.Adapter(
            jnp.asarray(rng.normal(size=(E, F, 2)) * 0.1, jnp.float32),
            jnp.asarray(rng.normal(size=(E, 2, D)) * 0.1, jnp.float32),
        ),
    )
    if skewed:
        rb = np.where(np.arange(E) < K, 100.0, -100.0).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(30, D)).astype(np.float32))
    routing = moe.route(x, jnp.asarray(router), jnp.asarray(rb), K)

    def loss(impl):
        def f(x, ew):
            if impl == "dense":
                y = moe.moe_dense_reference(x, ew, routing, alpha=1.702, limit=7.0)
            else:
                y = moe.moe_chunks(x, ew, routing, alpha=1.702, limit=7.0, chunk=8)
            return jnp.sum(jnp.sin(y))

        return jax.jit(jax.grad(f, argnums=(0, 1), allow_int=True))

    want, got = loss("dense")(x, ew), loss("chunks")(x, ew)
    pairs = [(w, g) for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)) if w.dtype != jax.dtypes.float0]
    assert len(pairs) == (7 if packed else 9)  # x, b1, b2, 4 adapter factors (+ w1, w2 dense)
    for w, g in pairs:
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5 * float(jnp.abs(w).max()))
