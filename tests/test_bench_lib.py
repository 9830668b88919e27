"""gptoss_jax.bench: the timer, the FLOP model, the random checkpoint writer, the JSON records; and
`sampling.prefill`, the public prefill that the 20b benchmark times."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax as gj
from gptoss_jax import safetensors_io, sampling
from gptoss_jax.bench import flops, records, timing, weights
from gptoss_jax.cache import init_cache
from gptoss_jax.config import FULL, SLIDING


class FakeClock:
    """A clock that only moves when the timed function runs: each call takes the next duration."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, list(durations), 0

    def __call__(self):
        return self.now

    def fn(self):
        self.calls += 1
        self.now += self.durations.pop(0)


def test_timer_leaves_out_the_warmup():
    c = FakeClock([100.0, 1.0, 3.0, 2.0])  # a slow first (compiling) call
    assert timing.seconds(c.fn, 3, warmup=1, clock=c) == [1.0, 3.0, 2.0]
    assert c.calls == 4
    c = FakeClock([100.0, 1.0, 3.0, 2.0])
    assert timing.median(c.fn, 3, clock=c) == 2.0
    c = FakeClock([100.0, 1.0, 3.0, 2.0])
    assert timing.best(c.fn, 3, clock=c) == 1.0
    # control: without the warm-up the slow call is a sample
    c = FakeClock([100.0, 1.0, 3.0, 2.0])
    assert timing.median(c.fn, 4, warmup=0, clock=c) == 2.5
    assert timing.stats([100.0, 1.0, 3.0, 2.0]) == {"median": 2.5, "min": 1.0, "max": 100.0, "n": 4}


def test_capped_cuts_repeats_to_the_budget():
    c = FakeClock([2.0] * 10)
    ts, note = timing.capped(c.fn, 5, cap=10, budget=4.5, clock=c)  # 4.5 s holds 2 runs of 2 s
    assert ts == [2.0, 2.0] and note == "2 of 5 repeats (time budget)"
    c = FakeClock([20.0] + [1.0] * 10)
    ts, note = timing.capped(c.fn, 5, cap=10, budget=100, clock=c)  # the warm-up alone is over the cap
    assert ts == [20.0] and "warm-up" in note and c.calls == 1
    c = FakeClock([1.0] * 10)  # control: within budget, every repeat runs
    assert timing.capped(c.fn, 3, cap=10, budget=100, clock=c) == ([1.0, 1.0, 1.0], "")


def test_mean_keys_counts_the_visible_keys():
    for T, W in ((1, 4), (5, 2), (7, 7), (9, 4), (16, None)):
        brute = np.mean([min(t, W or t) for t in range(1, T + 1)])
        assert flops.mean_keys(T, W) == pytest.approx(brute)


@pytest.mark.parametrize("layer", [FULL, SLIDING])
def test_forward_flops_of_one_layer_by_hand(layer):
    cfg = gj.tiny(num_layers=1, layer_types=(layer,), sliding_window=2)
    T = 4
    D, N, K, H = 64, 4, 2, 16
    E, k, F, V = 8, 2, 64, 512
    assert (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (D, N, K, H)
    assert (cfg.num_experts, cfg.experts_per_token, cfg.expert_dim, cfg.vocab_size) == (E, k, F, V)
    per_token = (
        2 * D * N * H
        + 2 * D * K * H * 2
        + 2 * N * H * D  # q, k and v, out
        + 2 * D * E  # router
        + k * (2 * D * 2 * F + 2 * F * D)  # k experts: gate/up, down
        + 2 * D * V
    )  # unembedding
    keys = [1, 2, 3, 4] if layer == FULL else [1, 2, 2, 2]  # window 2 on the sliding layer
    by_hand = per_token + sum(2 * 2 * N * H * n for n in keys) / T  # QK^T and PV per visible key
    assert flops.forward_flops_per_token(cfg, T) == pytest.approx(by_hand)
    # last-token logits only: the unembedding is spread over the T tokens
    assert flops.forward_flops_per_token(cfg, T, all_logits=False) == pytest.approx(by_hand - 2 * D * V * (1 - 1 / T))
    # control: a longer sequence changes only the attention term (mean keys 4.5 / 15/8 at T = 8)
    mean8 = 4.5 if layer == FULL else 15 / 8
    assert flops.forward_flops_per_token(cfg, 8) == pytest.approx(per_token + 2 * 2 * N * H * mean8)
    assert flops.forward_flops_per_token(cfg, 8) != pytest.approx(by_hand)


def test_random_checkpoint_loads_with_the_expected_tensors(tmp_path):
    cfg = gj.tiny()
    rec = weights.recipe(seed=3)
    plan = weights.plan_tensors(cfg)
    shards = weights.split_shards(plan, 2e5)  # several shards for a ~0.5 MB model
    assert len(shards) > 1
    out = str(tmp_path / "ckpt")
    weights.write_checkpoint(out, cfg, shards, rec, align=64, progress=False)

    names = {n: s for n, s, _ in plan}
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in names
    assert names["model.layers.0.mlp.experts.gate_up_proj_blocks"] == (8, 2 * 64, 64 // 32, 16)
    assert names["model.embed_tokens.weight"] == (512, 64)
    seen = {}
    for fn, ts in shards:
        f = safetensors_io.SafetensorsFile(os.path.join(out, fn))
        assert f._base % 64 == 0  # the data section starts 64-byte aligned
        for name, shape, dtype in ts:
            seen[name] = f.get(name)
            assert f.shape(name) == shape and f.dtype(name) == dtype
    assert set(seen) == set(names)
    lo, hi = rec["scales"]
    scales = seen["model.layers.1.mlp.experts.down_proj_scales"]
    assert scales.min() >= lo and scales.max() <= hi
    assert np.all(seen["model.layers.0.input_layernorm.weight"].astype(np.float32) == 1.0)
    w = seen["model.layers.0.self_attn.q_proj.weight"].astype(np.float32)
    assert 0.01 < w.std() < 0.04

    model = gj.load(out, dtype="bfloat16")
    assert model.experts == "mxfp4" and model.cfg == cfg
    assert gj.parameter_bytes(model) > 0
    assert weights.existing_checkpoint_ok(out, shards, weights.hf_config(cfg), rec, 64) == (True, "complete")
    # controls: another recipe, or a header written with another alignment, is not reused
    assert not weights.existing_checkpoint_ok(out, shards, weights.hf_config(cfg), weights.recipe(seed=4), 64)[0]
    assert not weights.existing_checkpoint_ok(out, shards, weights.hf_config(cfg), rec, 8)[0]


def test_shard_header_is_the_safetensors_header_at_alignment_8(tmp_path):
    arrays = {"a": np.zeros((3, 5), np.uint8), "b": np.ones((7,), weights.BF16)}
    path = tmp_path / "x.safetensors"
    safetensors_io.save_file(arrays, path, metadata={"format": "pt"})
    head = weights.shard_header([(k, v.shape, v.dtype) for k, v in sorted(arrays.items())], align=8)
    assert path.read_bytes()[: len(head)] == head
    assert len(weights.shard_header([("a", (3, 5), np.dtype(np.uint8))], align=64)) % 64 == 0


def test_random_values_depend_on_seed_and_name_only():
    a = weights.random_array("x.weight", (4, 8), weights.BF16, weights.recipe(seed=1))
    b = np.concatenate(list(weights.chunks("x.weight", (4, 8), weights.BF16, weights.recipe(seed=1), chunk_bytes=16)))
    assert np.array_equal(a.reshape(-1), b)  # chunking does not change the values
    assert not np.array_equal(a, weights.random_array("y.weight", (4, 8), weights.BF16, weights.recipe(seed=1)))
    assert not np.array_equal(a, weights.random_array("x.weight", (4, 8), weights.BF16, weights.recipe(seed=2)))


def test_record_written_whole_with_provenance(tmp_path):
    path = tmp_path / "sub" / "rec.json"
    records.write({"provenance": records.provenance(), "x": np.float32(1.5)}, path)
    rec = json.loads(path.read_text())
    assert rec["x"] == 1.5 and set(rec["provenance"]) == {"command", "date_utc", "cpu", "environment"}
    assert os.listdir(path.parent) == ["rec.json"]  # no temporary left beside it


def test_public_prefill_logits_are_each_prompts_last():
    model = gj.init(gj.tiny(), seed=0, dtype="float32")
    prompts = [[1, 2, 3, 4, 5], [7, 8]]  # the short row is padded inside the chunks
    _, logits = sampling.prefill(model, prompts, init_cache(model.cfg, 2, 8, model.dtype), prefill_chunk=2)
    # a causal forward of [7, 8, ...] at position 1 sees only 7 and 8
    full = model(jnp.asarray([prompts[0], [7, 8, 9, 10, 11]], jnp.int32)).logits
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(full[0, 4]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(full[1, 1]), rtol=1e-4, atol=1e-4)
    # control: not the logits of the padded row's last position
    assert not np.allclose(np.asarray(logits[1]), np.asarray(full[1, 4]), rtol=1e-4, atol=1e-4)
