import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptoss_jax as gj


@pytest.mark.parametrize("preset, count", [(gj.gpt_oss_20b, 20_914_757_184), (gj.gpt_oss_120b, 116_829_156_672)])
@pytest.mark.parametrize("experts", ["mxfp4", "dense"])
def test_full_size_parameter_counts(preset, count, experts):
    model = gj.abstract(preset(), experts=experts)
    assert gj.parameter_count(model) == count


def test_20b_packed_bytes():
    packed = gj.parameter_bytes(gj.abstract(gj.gpt_oss_20b(), experts="mxfp4"))
    dense = gj.parameter_bytes(gj.abstract(gj.gpt_oss_20b(), experts="dense"))
    # experts: 0.5 byte per weight + 1 scale byte per 32 weights; the rest bf16 (norms/sinks fp32)
    E, L, D, F = 32, 24, 2880, 2880
    expert_weights = L * E * (2 * F * D + D * F)
    assert packed == dense - expert_weights * 2 + expert_weights // 2 + expert_weights // 32
    assert packed == 13_761_550_080
    print(f"gpt-oss-20b parameters as stored: {packed / 2**30:.2f} GiB packed, {dense / 2**30:.2f} GiB dense")


def test_full_size_forward_shapes():
    model = gj.abstract(gj.gpt_oss_20b())
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(
        lambda s, t: nnx.merge(graphdef, s)(t).logits, state, jax.ShapeDtypeStruct((1, 300), jnp.int32)
    )
    assert out.shape == (1, 300, 201088) and out.dtype == jnp.float32


def test_packed_sequences_equal_separate_runs(tiny_cfg):
    model = gj.init(tiny_cfg, seed=1, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, tiny_cfg.vocab_size, 19), rng.integers(0, tiny_cfg.vocab_size, 13)
    packed = model(
        jnp.asarray(np.concatenate([a, b]))[None],
        positions=jnp.asarray(np.concatenate([np.arange(19), np.arange(13)]))[None],
        segment_ids=jnp.asarray([1] * 19 + [2] * 13)[None],
    ).logits[0]
    la = model(jnp.asarray(a)[None]).logits[0]
    lb = model(jnp.asarray(b)[None]).logits[0]
    np.testing.assert_allclose(np.asarray(packed), np.concatenate([la, lb]), rtol=1e-5, atol=1e-5)


def test_same_seed_same_weights_and_capture(tiny_cfg):
    m1, m2 = gj.init(tiny_cfg, seed=3), gj.init(tiny_cfg, seed=3)
    for x, y in zip(jax.tree.leaves(nnx.state(m1)), jax.tree.leaves(nnx.state(m2))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    out = m1(jnp.arange(12)[None], capture=True)
    assert out.logits.dtype == jnp.float32 and out.logits.shape == (1, 12, tiny_cfg.vocab_size)
    layer = out.intermediates[0]
    assert layer["sink_mass"].shape == (1, 12, tiny_cfg.num_heads)
    assert layer["expert_ids"].shape == (1, 12, tiny_cfg.experts_per_token)
    np.testing.assert_allclose(np.asarray(layer["expert_weights"].sum(-1)), 1.0, rtol=1e-6)


def test_init_on_a_mesh_gives_the_same_weights(tiny_cfg):
    mesh = gj.make_mesh(fsdp=2, expert=4)
    sharded, plain = gj.init(tiny_cfg, seed=5, mesh=mesh), gj.init(tiny_cfg, seed=5)
    blocks = sharded.layers[1].mlp.w2_blocks[...]
    assert blocks.sharding.spec[0] == "expert" and len(blocks.sharding.device_set) == 8
    flat_s, flat_p = nnx.to_flat_state(nnx.state(sharded)), nnx.to_flat_state(nnx.state(plain))
    for (ps, vs), (pp, vp) in zip(flat_s, flat_p):
        assert ps == pp
        np.testing.assert_array_equal(np.asarray(vs.get_value()), np.asarray(vp.get_value()))


def test_jit_over_state(tiny_cfg):
    model = gj.init(tiny_cfg, seed=0, dtype=jnp.float32)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits)
    t = jnp.arange(20)[None]
    np.testing.assert_allclose(np.asarray(fwd(state, t)), np.asarray(model(t).logits), rtol=1e-5, atol=1e-5)


def test_bad_inputs(tiny_cfg):
    model = gj.init(tiny_cfg)
    with pytest.raises(ValueError, match=r"\[batch, time\]"):
        model(jnp.arange(5))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\)"):
        model(jnp.array([[1, 600]]))
    with pytest.raises(ValueError, match="integer"):
        model(jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="positions must have"):
        model(jnp.ones((1, 3), jnp.int32), positions=jnp.arange(4)[None])
    with pytest.raises(ValueError, match="experts must be one of"):
        gj.init(tiny_cfg, experts="int8")
