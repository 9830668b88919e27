"""Memory estimates from the shapes: the exact terms (weights, master copies, AdamW moments) on one
device and split over a mesh, and the shipped 20b configs fit the devices they name."""

import os

import pytest
from flax import nnx

import gptoss_jax as gj
from gptoss_jax.train.config import load_config
from gptoss_jax.train.memory import estimate

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def test_exact_terms_on_one_device():
    cfg = load_config(None, ["model.dtype=bfloat16", "data.seq_len=64", "data.batch_size=4"])
    est = estimate(cfg)
    model = gj.abstract(gj.tiny(), dtype="bfloat16")
    params = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert est.weights == gj.parameter_bytes(model)
    assert est.trainable_parameters == params
    assert est.master == 4 * params and est.optimizer == 8 * params and est.gradients == 4 * params
    assert est.logits == 3 * 4 * 64 * gj.tiny().vocab_size * 4  # micro-batch tokens x vocab, fp32
    full = estimate(
        load_config(None, ["model.dtype=bfloat16", "data.seq_len=64", "data.batch_size=4", "model.remat=full"])
    )
    assert full.activations == 4 * 64 * gj.tiny().d_model * 2 * gj.tiny().num_layers  # layer inputs, bf16
    assert full.activations < est.activations


def test_lora_and_mesh_split_the_terms():
    lora = estimate(load_config(None, ["lora.enabled=true", "lora.rank=4"]))
    cfg = gj.tiny()
    r = 4
    adapters = cfg.num_layers * (
        r * (cfg.d_model + cfg.num_heads * cfg.head_dim) * 2  # q, o
        + 2 * r * (cfg.d_model + cfg.num_kv_heads * cfg.head_dim)  # k, v
        + cfg.num_experts * r * (cfg.d_model + 2 * cfg.expert_dim)  # w1
        + cfg.num_experts * r * (cfg.expert_dim + cfg.d_model)
    )  # w2
    assert lora.trainable_parameters == adapters
    one = estimate(load_config(None, []))
    split = estimate(load_config(None, ["mesh={fsdp: 2, expert: 4}"]))
    assert split.devices == 8
    assert one.weights / 8 <= split.weights < one.weights / 2
    # matrices shard over fsdp (their embed axis), expert biases over expert, the rest stays whole
    assert one.master / 8 < split.master < 0.6 * one.master
    assert split.activations == pytest.approx(one.activations / 8)  # the batch over all 8


def test_working_set_gathered_tables_and_exchange_terms():
    """The terms the compiled programs showed the first estimator missing, each where it applies:
    one layer's expert working set (rows = tokens x top-k on one device; the exchange buffer's rows
    with an expert axis), the vocabulary tables gathered over fsdp (+ their fp32 gradient when they
    train), and with an expert axis the received rows of every layer."""
    c = gj.tiny()
    D, F, E, k, L, V = c.d_model, c.expert_dim, c.num_experts, c.experts_per_token, c.num_layers, c.vocab_size
    base = ["model.dtype=bfloat16", "data.seq_len=64", "data.batch_size=8"]
    one = estimate(load_config(None, base))
    t = 8 * 64  # tokens of the micro-batch on the one device
    assert one.layer_backward == t * k * (2 * 2 * F * 4 + D * (2 + 4))
    assert one.gathered == 0 and one.exchange == 0
    sft = estimate(load_config(None, base + ["mesh={fsdp: 2, tensor: 2}"]))
    assert sft.gathered == V / 2 * D * (2 + 4)  # bf16 gathered + fp32 gradient; vocab split by tensor
    assert estimate(load_config(None, base + ["mesh={fsdp: 2}", "lora.enabled=true"])).gathered == V * D * 2
    # expert=4: 128 local tokens per device; all_to_all with capacity 2: E x ceil(2 t k / E) rows
    a2a = estimate(
        load_config(None, base + ["mesh={expert: 4}", "model.expert_dispatch=all_to_all", "model.capacity_factor=2.0"])
    )
    rows = E * -(-2 * 128 * k // E)
    assert a2a.exchange == rows * D * 2 * L
    assert a2a.layer_backward == rows * (2 * 2 * F * 4 + D * (2 + 4))
    # the dropless ragged exchange: a receive buffer for every device's rows
    ragged = estimate(load_config(None, base + ["mesh={expert: 4}"]))
    assert ragged.exchange == 4 * 128 * k * D * 2 * L


@pytest.mark.parametrize(
    "name,device_gib",
    [
        ("sft_20b_gpu80", 80),
        ("lora_20b_gpu80", 80),
        ("sft_20b_tpu_v5e_8", 16),
        ("lora_20b_tpu_v5e_8", 16),
        ("grpo_lora_20b_gpu80", 80),
        ("grpo_lora_20b_tpu_v5e_8", 16),
        ("lora_120b_h100x8", 80),
        ("lora_120b_gpu80", 80),
    ],
)
def test_shipped_20b_configs_fit_their_devices(name, device_gib):
    est = estimate(load_config(os.path.join(CONFIGS, name + ".yaml")))
    assert est.weights > 2**30  # the real 20b shapes, not a tiny stand-in
    assert est.total <= 0.8 * device_gib * 2**30, est.table(device_gib * 2**30)


def test_rl_terms():
    from gptoss_jax.cache import cache_bytes

    full = estimate(
        load_config(None, ["algorithm=grpo", "rl.group_size=4", "rl.prompts_per_step=2", "data.seq_len=64"])
    )
    assert full.reference == full.master  # a frozen fp32 copy of what trains
    assert full.kv_cache == cache_bytes(gj.tiny(), 8, 64, "bfloat16")  # 2 prompts x 4 samples
    assert full.logits == 3 * 8 * 64 * gj.tiny().vocab_size * 4
    lora_run = estimate(load_config(None, ["algorithm=gspo", "lora.enabled=true"]))
    assert lora_run.reference == 0  # the base is the reference
