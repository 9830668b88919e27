"""gptoss_jax.preflight: what is checked against a checkpoint before its weights are read."""

import types

import pytest

import gptoss_jax as gj
from gptoss_jax import preflight


def test_check_prompt():
    cfg = gj.tiny(vocab_size=100, max_position=10)
    preflight.check_prompt([0, 99], cfg, 8)  # exactly fills the context
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 100\) of the checkpoint: \[100, -1\]"):
        preflight.check_prompt([5, 100, -1], cfg, 1)
    with pytest.raises(ValueError, match=r"^prompt of 2 tokens \+ 9 new tokens exceeds the context of 10 tokens"):
        preflight.check_prompt([0, 99], cfg, 9)


def test_check_tokenizer_fits(tokenizer):
    preflight.check_tokenizer_fits(tokenizer, tokenizer.vocab_size, "never shown")
    with pytest.raises(ValueError, match=rf"has {tokenizer.vocab_size} ids but the model's vocabulary only 512: do X$"):
        preflight.check_tokenizer_fits(tokenizer, 512, "do X")


def test_checkpoint_config_reads_no_weights(tmp_path, monkeypatch):
    cfg = gj.tiny()
    gj.save_hf(gj.init(cfg, seed=0), tmp_path / "ck")
    monkeypatch.setattr(gj, "load", None)
    assert preflight.checkpoint_config(str(tmp_path / "ck")) == cfg
    with pytest.raises(gj.CheckpointError):
        preflight.checkpoint_config(str(tmp_path / "missing"))


def test_check_run_tokenizer_against_the_preset(offline_tiktoken):
    def run(vocab):
        model = types.SimpleNamespace(
            checkpoint=None, preset="tiny", overrides={"vocab_size": vocab}, tokenizer="o200k_harmony"
        )
        return types.SimpleNamespace(model=model)

    preflight.check_run_tokenizer(run(201088))
    with pytest.raises(ValueError, match="or model.overrides.vocab_size to the tokenizer's size$"):
        preflight.check_run_tokenizer(run(1000))


def test_copy_tokenizer_from_the_folder_or_above(tmp_path):
    src, dst = tmp_path / "run" / "model", tmp_path / "dst"
    src.mkdir(parents=True)
    dst.mkdir()
    assert preflight.copy_tokenizer(str(src), str(dst)) is None
    assert not (dst / "tokenizer.json").exists()
    (tmp_path / "run" / "tokenizer.json").write_text("above")
    assert preflight.copy_tokenizer(str(src), str(dst)) == str(tmp_path / "run" / "tokenizer.json")
    assert (dst / "tokenizer.json").read_text() == "above"
    (src / "tokenizer.json").write_text("inside")
    preflight.copy_tokenizer(str(src), str(dst))
    assert (dst / "tokenizer.json").read_text() == "inside"
