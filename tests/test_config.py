import json

import pytest

from gptoss_jax.config import FULL, SLIDING, ConfigError, ModelConfig, gpt_oss_20b, gpt_oss_120b, tiny


def test_presets_match_the_released_models():
    c = gpt_oss_20b()
    assert (c.num_layers, c.num_experts, c.d_model, c.num_heads, c.num_kv_heads, c.head_dim) == (
        24,
        32,
        2880,
        64,
        8,
        64,
    )
    assert (c.vocab_size, c.expert_dim, c.experts_per_token, c.sliding_window) == (201088, 2880, 4, 128)
    assert [c.layer_type(i) for i in range(4)] == [SLIDING, FULL, SLIDING, FULL]
    assert c.rope_concentration == pytest.approx(1.3465735902799727, abs=1e-15)
    big = gpt_oss_120b()
    assert (big.num_layers, big.num_experts) == (36, 128)


def test_hf_config_both_rope_spellings(tmp_path):
    hf = gpt_oss_120b().to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert ModelConfig.from_pretrained(tmp_path) == gpt_oss_120b()
    # transformers v5 folds rope_scaling and rope_theta into rope_parameters
    v5 = dict(hf)
    rope = dict(v5.pop("rope_scaling"), rope_theta=v5.pop("rope_theta"))
    v5["rope_parameters"] = rope
    (tmp_path / "config.json").write_text(json.dumps(v5))
    assert ModelConfig.from_pretrained(tmp_path) == gpt_oss_120b()


def test_hf_truncate_defaults_to_true_like_transformers():
    hf = gpt_oss_20b().to_hf_dict()
    del hf["rope_scaling"]["truncate"]
    assert ModelConfig.from_hf_dict(hf).rope_truncate is True


def test_original_config(tmp_path):
    # The exact keys of original/config.json for 20b (spec section 1.2).
    d = {
        "num_hidden_layers": 24,
        "num_experts": 32,
        "experts_per_token": 4,
        "vocab_size": 201088,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "swiglu_limit": 7.0,
        "head_dim": 64,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "sliding_window": 128,
        "initial_context_length": 4096,
        "rope_theta": 150000,
        "rope_scaling_factor": 32.0,
        "rope_ntk_alpha": 1,
        "rope_ntk_beta": 32,
    }
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "config.json").write_text(json.dumps(d))
    assert ModelConfig.from_pretrained(tmp_path) == gpt_oss_20b()
    assert ModelConfig.from_pretrained(tmp_path / "original" / "config.json") == gpt_oss_20b()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_heads=6, num_kv_heads=4), "divisible by num_kv_heads"),
        (dict(experts_per_token=9), "exceeds num_experts"),
        (dict(head_dim=15), "even"),
        (dict(layer_types=("sliding_attention",)), "4 layers"),
        (dict(layer_types=("sliding_attention", "full_attention", "local", "full_attention")), "local"),
        (dict(d_model=0), "d_model"),
    ],
)
def test_validation_messages(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**overrides)


def test_mxfp4_needs_multiples_of_32():
    with pytest.raises(ConfigError, match="d_model .* multiple of 32"):
        tiny(d_model=48).validate_mxfp4()


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such checkpoint"):
        ModelConfig.from_pretrained(tmp_path / "nope")
    with pytest.raises(ConfigError, match="neither config.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_oss", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="required key"):
        ModelConfig.from_pretrained(tmp_path)
