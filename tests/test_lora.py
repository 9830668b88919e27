"""LoRA over the frozen (packed) base: invariants (fresh adapters change nothing; every MoE
dispatch and the expert-parallel layer compute the same adapted function; merging equals the
unmerged model), training touches only the adapters, adapters round-trip through files, and the
merged export read by HF transformers (the oracle) matches our logits within 1e-4 (fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import gptoss_jax as gj
from gptoss_jax import lora
from gptoss_jax.train.step import OptimConfig, make_optimizer, make_trainer, trainable_filter
from tests.factory import rel_err

TOKENS = (np.arange(2 * 23).reshape(2, 23) * 37) % 512


def _randomize_adapters(model, scale=0.05, seed=0):
    """Nonzero B (fresh adapters are exactly zero updates) so every test sees a real update."""
    state = nnx.state(model, lora.LoRAParam)
    for i, (_, var) in enumerate(nnx.to_flat_state(state)):
        v = var.get_value()
        new = (scale * jax.random.normal(jax.random.key(seed + i), v.shape)).astype(v.dtype)
        var.set_value(jax.device_put(new, v.sharding))  # on a mesh: where add_lora placed it
    nnx.update(model, state)
    return model


@pytest.fixture(scope="module")
def lora_model(original_dir):
    m = gj.load(original_dir, dtype="float32")  # packed MXFP4 experts
    lora.add_lora(m, lora.LoRAConfig(rank=4, alpha=8.0))
    return _randomize_adapters(m)


def test_fresh_adapters_leave_the_model_unchanged(original_dir):
    m = gj.load(original_dir, dtype="float32")
    before = np.asarray(m(TOKENS).logits)
    lora.add_lora(m, lora.LoRAConfig(rank=4, alpha=8.0, targets=("q", "o", "w1", "w2")), seed=3)
    np.testing.assert_array_equal(np.asarray(m(TOKENS).logits), before)
    names = {str(p[-1]) for p, _ in nnx.to_flat_state(nnx.state(m, lora.LoRAParam))}
    assert names == {"a_q", "b_q", "a_o", "b_o", "a_w1", "b_w1", "a_w2", "b_w2"}
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.add_lora(m, lora.LoRAConfig())


def test_config_errors():
    with pytest.raises(ValueError, match="subset of"):
        lora.LoRAConfig(targets=("q", "mlp"))
    with pytest.raises(ValueError, match="positive integer"):
        lora.LoRAConfig(rank=0)


@pytest.mark.parametrize("experts", ["mxfp4", "dense"])
def test_every_moe_dispatch_computes_the_same_adapted_model(original_dir, experts):
    m = _randomize_adapters(
        lora.add_lora(gj.load(original_dir, dtype="float32", experts=experts), lora.LoRAConfig(rank=4, alpha=8.0))
    )
    outs = {}
    for impl in ("dense", "ragged", "chunks", "buckets", "gather"):
        m.kernel = gj.KernelOptions(moe_impl=impl)
        outs[impl] = np.asarray(m(TOKENS).logits)
    for impl, got in outs.items():
        assert rel_err(got, outs["dense"]) <= 1e-5, impl
    base = gj.load(original_dir, dtype="float32", experts=experts)
    assert rel_err(outs["dense"], np.asarray(base(TOKENS).logits)) > 1e-2  # the adapters do something


def test_merge_equals_the_unmerged_model(lora_model):
    want = np.asarray(lora_model(TOKENS).logits)
    merged = lora.merge_lora(lora_model, experts="dense")
    assert not lora.has_lora(merged) and merged.experts == "dense"
    assert rel_err(merged(TOKENS).logits, want) <= 1e-5
    # re-encoding to MXFP4 rounds the merged experts to 4 bits: a different model, close to it
    requant = lora.merge_lora(lora_model, experts="mxfp4")
    assert requant.experts == "mxfp4" and 1e-5 < rel_err(requant(TOKENS).logits, want) < 0.5


@pytest.mark.parametrize("experts", ["dense", "mxfp4"])
def test_merged_export_matches_transformers(lora_model, tmp_path, experts):
    from transformers import GptOssForCausalLM, Mxfp4Config

    merged = lora.merge_lora(lora_model, experts=experts)
    gj.save_hf(merged, tmp_path, dtype="float32")
    kw = {"quantization_config": Mxfp4Config(dequantize=True)} if experts == "mxfp4" else {}
    hf = GptOssForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager", **kw)
    with torch.no_grad():
        want = hf(torch.tensor(TOKENS)).logits.numpy()
    # dense: the export of the merge is the adapted model itself; mxfp4: the re-encoded one
    ours = lora_model if experts == "dense" else merged
    assert rel_err(ours(TOKENS).logits, want) <= 1e-4


def test_adapters_round_trip_through_files(lora_model, original_dir, tmp_path):
    lora.save_adapters(lora_model, str(tmp_path), extra={"base": "tiny"})
    fresh = lora.load_adapters(gj.load(original_dir, dtype="float32"), str(tmp_path))
    np.testing.assert_array_equal(np.asarray(fresh(TOKENS).logits), np.asarray(lora_model(TOKENS).logits))
    other = gj.load(original_dir, dtype="float32", experts="dense")
    lora.add_lora(other, lora.LoRAConfig(rank=2, alpha=8.0))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.load_adapters(other, str(tmp_path))


def _batch(n=4, T=24, seed=0):
    r = np.random.default_rng(seed)
    return {"tokens": jnp.asarray(r.integers(0, 512, (n, T)), jnp.int32), "loss_mask": jnp.ones((n, T), jnp.int32)}


def test_training_moves_only_the_adapters(original_dir):
    model = lora.add_lora(gj.load(original_dir, dtype="float32"), lora.LoRAConfig(rank=4, alpha=8.0))
    frozen_before = {
        p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Not(lora.LoRAParam)))
    }
    opt = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=1, total_steps=50, weight_decay=0.0))
    trainer = make_trainer(model, opt, trainable=trainable_filter(lora=True))
    state = trainer.init(model)
    n_trainable = sum(x.size for x in jax.tree.leaves(state.params))
    assert n_trainable == sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model, lora.LoRAParam)))
    batch = _batch()
    losses = []
    for _ in range(6):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05
    trained = trainer.model(state)
    for p, v in nnx.to_flat_state(nnx.state(trained, nnx.Not(lora.LoRAParam))):
        np.testing.assert_array_equal(np.asarray(v.get_value()), frozen_before[p], err_msg=str(p))
    # the expert adapters learned through the packed grouped matmul (B starts at zero)
    b_w1 = np.asarray(trained.layers[0].mlp.lora.b_w1[...])
    assert np.abs(b_w1).max() > 0


def test_norms_and_sinks_filter(original_dir):
    model = lora.add_lora(gj.load(original_dir, dtype="float32"), lora.LoRAConfig(rank=2, alpha=4.0))
    _, params, _ = nnx.split(model, trainable_filter(lora=True, norms_and_sinks=True), ...)
    names = {str(p[-1]) for p, _ in nnx.to_flat_state(params)}
    assert {"norm", "sinks", "a_q", "b_w2"} <= names
    assert not names & {"q", "router", "embed", "q_bias", "w1_blocks"}


def test_expert_parallel_lora_equals_one_device(original_dir):
    """The adapters go through shard_map with the experts (and, over tensor, as partial sums)."""
    ref = _randomize_adapters(lora.add_lora(gj.load(original_dir, dtype="float32"), lora.LoRAConfig(rank=4, alpha=8.0)))
    want = np.asarray(ref(TOKENS).logits)
    for axes in ({"fsdp": 2, "tensor": 2, "expert": 2},):  # experts split, and their width (partial sums)
        mesh = gj.make_mesh(**axes)
        m = _randomize_adapters(
            lora.add_lora(gj.load(original_dir, dtype="float32", mesh=mesh), lora.LoRAConfig(rank=4, alpha=8.0))
        )
        got = nnx.jit(lambda m, t: m(t).logits)(m, jnp.asarray(TOKENS))
        assert rel_err(got, want) <= 1e-5, axes

        def loss(m):
            return jnp.mean(m(jnp.asarray(TOKENS)).logits ** 2)

        grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, lora.LoRAParam)))(m)
        want_grads = nnx.grad(loss, argnums=nnx.DiffState(0, lora.LoRAParam))(ref)
        for (p, g), (_, w) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(want_grads)):
            np.testing.assert_allclose(
                np.asarray(g.get_value()), np.asarray(w.get_value()), rtol=1e-4, atol=1e-6, err_msg=f"{axes} {p}"
            )
