"""Sharding on 8 fake CPU devices (conftest sets the XLA flag before jax is imported).

Invariants, each against the single-device run of the same weights: forward logits on three
meshes (fp32, max|diff| / max|logit| <= 1e-5), one optax train step (loss, gradients, updated
weights), init from one seed, and the rules table's errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import gptoss_jax as gj
from gptoss_jax import sharding
from gptoss_jax.train import next_token_loss

MESHES = {
    "data8": dict(data=8),
    "data2_expert4": dict(data=2, expert=4),
    "fsdp2_tensor2_expert2": dict(fsdp=2, tensor=2, expert=2),
}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_eight_devices():
    assert jax.device_count() == 8


# ------------------------------------------------------------------------------------- mesh/rules
def test_make_mesh_axes_and_sizes():
    mesh = gj.make_mesh(data=2, expert=4)
    assert mesh.axis_names == sharding.MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1, "expert": 4}
    assert dict(gj.make_mesh(tensor=2, fsdp=-1).shape)["fsdp"] == 4
    with pytest.raises(ValueError, match="needs 6 devices, have 8"):
        gj.make_mesh(data=2, expert=3)
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        gj.make_mesh(data=-1, expert=-1)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.mesh_from_config({"data": 2, "pipeline": 4})
    assert dict(sharding.mesh_from_config(None).shape)["data"] == 8
    assert sharding.parse_mesh("data=2, expert=4") == {"data": 2, "expert": 4}
    with pytest.raises(ValueError, match="axis=size"):
        sharding.parse_mesh("data2")


def test_rules_map_logical_axes():
    mesh = gj.make_mesh(fsdp=2, tensor=2, expert=2)
    spec = sharding.logical_to_spec(("experts", "embed", "expert_mlp"), (8, 64, 128), mesh)
    assert spec == P("expert", "fsdp", "tensor")
    # (size-1 axes may be named: they split nothing)
    assert sharding.logical_to_spec(("batch", "length"), (8, 5), mesh) == P(("data", "fsdp", "expert"), None)
    # a dimension the axis does not divide stays replicated on it
    assert sharding.logical_to_spec(("batch",), (2,), mesh) == P(("data", "fsdp"))
    assert sharding.logical_to_spec(("vocab", "embed"), (7, 64), mesh) == P(None, "fsdp")


def test_a_mesh_axis_used_twice_is_an_error():
    mesh = gj.make_mesh(fsdp=2, tensor=4)
    rules = dict(sharding.DEFAULT_RULES, head_dim="tensor")
    with pytest.raises(ValueError, match="mesh axis 'tensor' is used twice"):
        sharding.logical_to_spec(("embed", "q_heads", "head_dim"), (64, 4, 16), mesh, rules)
    with pytest.raises(ValueError, match="no sharding rule"):
        sharding.logical_to_spec(("nonsense",), (4,), mesh)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.check_rules({"embed": "model"})


# ---------------------------------------------------------------------------------- equality
def _forward(model, tokens):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits)(state, tokens)


@pytest.fixture(scope="module")
def tokens(tiny_cfg):
    return jnp.asarray(np.random.RandomState(0).randint(0, tiny_cfg.vocab_size, (8, 20)), jnp.int32)


@pytest.fixture(scope="module")
def single_device_logits(tiny_cfg, tokens):
    return {
        e: np.asarray(_forward(gj.init(tiny_cfg, seed=3, dtype=jnp.float32, experts=e), tokens))
        for e in ("mxfp4", "dense")
    }


@pytest.mark.parametrize("experts", ["mxfp4", "dense"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_forward_equals_single_device(tiny_cfg, tokens, single_device_logits, mesh_name, experts):
    mesh = gj.make_mesh(**MESHES[mesh_name])
    model = gj.init(tiny_cfg, seed=3, dtype=jnp.float32, experts=experts, mesh=mesh)
    got = _forward(model, tokens)
    assert len(got.sharding.device_set) == 8
    err = rel(got, single_device_logits[experts])
    print(f"{mesh_name} {experts}: max|diff|/max|logit| = {err:.2e}")
    assert err <= 1e-5


def test_same_seed_same_weights_on_every_mesh(tiny_cfg):
    plain = nnx.to_flat_state(nnx.state(gj.init(tiny_cfg, seed=5)))
    for shape in MESHES.values():
        sharded = nnx.to_flat_state(nnx.state(gj.init(tiny_cfg, seed=5, mesh=gj.make_mesh(**shape))))
        assert [p for p, _ in sharded] == [p for p, _ in plain]
        for (path, vs), (_, vp) in zip(sharded, plain):
            np.testing.assert_array_equal(
                np.asarray(vs.get_value()), np.asarray(vp.get_value()), err_msg=f"{shape} {path}"
            )


def test_weights_are_placed_by_the_rules(tiny_cfg):
    mesh = gj.make_mesh(fsdp=2, tensor=2, expert=2)
    model = gj.init(tiny_cfg, seed=0, mesh=mesh)
    mlp = model.layers[0].mlp
    assert mlp.w1_blocks[...].sharding.spec == P("expert", "tensor", "fsdp", None)  # [E, 2F, D/32, 16]
    assert mlp.w2_scales[...].sharding.spec == P("expert", "fsdp", "tensor")  # [E, D, F/32]
    assert model.layers[0].attn.q[...].sharding.spec == P("fsdp", "tensor", None)
    assert model.embed[...].sharding.spec == P("tensor", "fsdp")
    # each device holds 1/8 of the packed experts
    shard = mlp.w1_blocks[...].addressable_shards[0].data
    assert shard.size * 8 == mlp.w1_blocks[...].size


def _train_step(graphdef, rest, optimizer):
    def loss_fn(params, tokens):
        logits = nnx.merge(graphdef, params, rest)(tokens).logits
        return next_token_loss(logits, tokens)[0]

    @jax.jit
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    return step


@pytest.mark.parametrize(
    "mesh_name,experts",
    [
        ("data8", "dense"),  # the chunked MoE's backward in shard_map
        ("data2_expert4", "mxfp4"),
        ("fsdp2_tensor2_expert2", "mxfp4"),
        ("fsdp2_tensor2_expert2", "dense"),
    ],
)
def test_train_step_equals_single_device(tiny_cfg, tokens, mesh_name, experts):
    """Loss and gradients of the packed-base model (only nnx.Params train), and the weights after
    one optimizer step. The step is SGD with momentum and weight decay: its update is linear in the
    gradient, so the gradients' agreement carries over. (AdamW's first step is about lr * sign(g),
    which turns entries at fp32 noise level, |g| ~ 1e-8, into full-size differences.)"""
    optimizer = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.1, momentum=0.9))
    results = []
    for mesh in (None, gj.make_mesh(**MESHES[mesh_name])):
        model = gj.init(
            tiny_cfg,
            seed=4,
            dtype=jnp.float32,
            experts=experts,
            mesh=mesh,
            kernel=gj.KernelOptions(moe_impl="chunks" if mesh_name == "data8" else None),
        )
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        step = _train_step(graphdef, rest, optimizer)
        new, _, loss, grads = step(params, optimizer.init(params), tokens)
        results.append((float(loss), jax.tree.leaves(grads), jax.tree.leaves(new)))
    (loss0, g0, p0), (loss1, g1, p1) = results
    assert len(g0) == len(g1) > 10
    assert abs(loss1 - loss0) / abs(loss0) <= 1e-6
    g_err = max(rel(a, b) for a, b in zip(g1, g0) if np.abs(np.asarray(b)).max() > 0)
    p_err = max(rel(a, b) for a, b in zip(p1, p0))
    print(f"{mesh_name} {experts}: loss {loss0:.6f} vs {loss1:.6f}, grads {g_err:.2e}, params {p_err:.2e}")
    assert g_err <= 1e-5 and p_err <= 1e-5


def test_load_onto_a_mesh_reads_only_local_slices(original_dir, monkeypatch):
    """Every weight is built from per-device slices (make_array_from_callback), none from a
    whole host copy handed to device_put."""
    calls = []
    original = jax.make_array_from_callback

    def spy(shape, sharding_, cb, *a, **kw):
        def counted(index):
            out = cb(index)
            calls.append((shape, out.shape))
            return out

        return original(shape, sharding_, counted, *a, **kw)

    monkeypatch.setattr(jax, "make_array_from_callback", spy)
    mesh = gj.make_mesh(fsdp=2, tensor=2, expert=2)
    model = gj.load(original_dir, dtype="float32", mesh=mesh)
    assert model.mesh is mesh
    packed = [c for c in calls if len(c[0]) == 4]  # the MXFP4 blocks
    assert packed and all(np.prod(got) * 8 == np.prod(full) for full, got in packed)


@pytest.mark.parametrize(
    "mesh_name,adapters", [("fsdp2_tensor2_expert2", False), ("fsdp2_tensor2_expert2", True), ("expert8", True)]
)
def test_train_state_is_laid_out_as_the_weights(tiny_cfg, tokens, mesh_name, adapters):
    """The fp32 master copies, both AdamW moments and the state after a step are split across the
    mesh exactly as the trained variable itself, whether the state is made eagerly or under jit
    (as `gptoss compile` and a jitted init make it). Control: optax's own init under jit, with
    nothing saying how to lay the moments out, replicates them on every device."""
    from gptoss_jax import lora
    from gptoss_jax.train.step import OptimConfig, make_optimizer, make_trainer, trainable_filter

    mesh = gj.make_mesh(**{**MESHES, "expert8": dict(expert=8)}[mesh_name])
    model = gj.init(tiny_cfg, seed=0, dtype=jnp.bfloat16, mesh=mesh)
    if adapters:
        model = lora.add_lora(model, lora.LoRAConfig(rank=4, alpha=8.0))
    trainable = trainable_filter(lora=adapters)
    optimizer = make_optimizer(OptimConfig(total_steps=10, warmup_steps=1))
    trainer = make_trainer(model, optimizer, trainable=trainable)
    want = {path: v.sharding for path, v in nnx.to_flat_state(nnx.state(model, trainable))}
    assert any(not s.is_fully_replicated for s in want.values())

    def laid_out_as_wanted(tree):
        got = dict(nnx.to_flat_state(tree))
        return got.keys() == want.keys() and all(got[k].sharding.is_equivalent_to(want[k], got[k].ndim) for k in want)

    batch = {"tokens": jnp.concatenate([tokens] * 4, 0)[:8], "loss_mask": jnp.ones((8, tokens.shape[1]), jnp.float32)}
    batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, sharding.batch_spec(mesh, 8)))
    for state in (trainer.init(model), jax.jit(trainer.init)(model)):
        adam = state.opt_state[1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
        for tree in (state.params, adam.mu, adam.nu):
            assert laid_out_as_wanted(tree)
    # one step from the jitted init's state: the new state keeps the layout
    state, metrics = trainer.step(state, batch)
    assert bool(metrics["finite"])
    adam = state.opt_state[1][0]
    for tree in (state.params, adam.mu, adam.nu):
        assert laid_out_as_wanted(tree)

    # control: the moments optax makes under jit from the same sharded master copies
    master = jax.jit(trainer.init)(model).params
    replicated = jax.jit(optimizer.init)(master)[1][0].mu
    assert not laid_out_as_wanted(replicated)
    assert all(v.sharding.is_fully_replicated for _, v in nnx.to_flat_state(replicated))
