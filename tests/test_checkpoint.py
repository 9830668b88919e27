import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

import gptoss_jax as gj
from gptoss_jax.checkpoint import find_checkpoint


def _copy(src, tmp_path, name="ck"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit(folder, file, fn):
    t = load_file(str(folder / file))
    fn(t)
    save_file(t, str(folder / file))


def test_layout_detection(original_dir, hf_mxfp4_dir, tmp_path):
    assert find_checkpoint(original_dir).layout == "original"
    assert find_checkpoint(hf_mxfp4_dir).layout == "hf"
    # a hub repo root: HF files plus original/ beside them -> HF wins; original/ alone -> original
    root = _copy(hf_mxfp4_dir, tmp_path, "repo")
    shutil.copytree(original_dir, root / "original")
    assert find_checkpoint(root).layout == "hf"
    only = tmp_path / "only"
    shutil.copytree(original_dir, only / "original")
    assert find_checkpoint(only).layout == "original"
    assert gj.load(only).cfg == gj.load(root).cfg


def test_packed_experts_stay_packed(hf_mxfp4_dir):
    model = gj.load(hf_mxfp4_dir)
    mlp = model.layers[0].mlp
    assert mlp.w1_blocks[...].dtype == jnp.uint8 and not hasattr(mlp, "w1")
    params = nnx.state(model, nnx.Param)
    assert all(leaf.dtype != jnp.uint8 for leaf in jax.tree.leaves(params))
    # and nothing is left at its random initial value: compare one tensor with the file
    f = load_file(os.path.join(hf_mxfp4_dir, "model-00001-of-00002.safetensors"))
    key = next(k for k in f if k.endswith("mlp.experts.down_proj_blocks"))
    n = int(key.split(".")[2])
    np.testing.assert_array_equal(np.asarray(model.layers[n].mlp.w2_blocks[...]), f[key].numpy())


def test_missing_tensor(hf_mxfp4_dir, tmp_path):
    ck = _copy(hf_mxfp4_dir, tmp_path)
    _edit(ck, "model-00000-of-00002.safetensors", lambda t: t.pop(sorted(t)[0]))
    with pytest.raises(gj.CheckpointError, match=r"missing tensor\(s\) \['lm_head.weight'\]"):
        gj.load(ck)


def test_wrong_shape(original_dir, tmp_path):
    ck = _copy(original_dir, tmp_path)
    _edit(ck, "model.safetensors", lambda t: t.update({"block.2.attn.sinks": torch.zeros(5, dtype=torch.bfloat16)}))
    with pytest.raises(gj.CheckpointError, match=r"block.2.attn.sinks \[5\] does not fit .*layers.2.attn.sinks"):
        gj.load(ck)


def test_unknown_key(original_dir, tmp_path):
    ck = _copy(original_dir, tmp_path)
    _edit(ck, "model.safetensors", lambda t: t.update({"block.9.attn.extra": torch.zeros(2)}))
    with pytest.raises(gj.CheckpointError, match=r"unknown tensor\(s\) \['block.9.attn.extra'\]"):
        gj.load(ck)


def test_truncated_file(original_dir, tmp_path):
    ck = _copy(original_dir, tmp_path)
    path = ck / "model.safetensors"
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(
        gj.CheckpointError, match=r"model.safetensors: tensor '.*' ends at byte .* \(truncated file\?\)"
    ):
        gj.load(ck)


def test_duplicate_tensor(hf_mxfp4_dir, tmp_path):
    ck = _copy(hf_mxfp4_dir, tmp_path)
    extra = load_file(str(ck / "model-00000-of-00002.safetensors"))
    key = sorted(extra)[3]
    _edit(ck, "model-00001-of-00002.safetensors", lambda t: t.update({key: extra[key]}))
    with pytest.raises(gj.CheckpointError, match=f"tensor '{key}' is stored twice"):
        gj.load(ck)


def test_index_names_a_missing_file(hf_mxfp4_dir, tmp_path):
    ck = _copy(hf_mxfp4_dir, tmp_path)
    os.remove(ck / "model-00001-of-00002.safetensors")
    with pytest.raises(gj.CheckpointError, match="lists model-00001-of-00002.safetensors, which is missing"):
        gj.load(ck)


def test_packed_tensor_with_wrong_dtype(original_dir, tmp_path):
    ck = _copy(original_dir, tmp_path)
    _edit(
        ck,
        "model.safetensors",
        lambda t: t.update({"block.0.mlp.mlp1_weight.scales": t["block.0.mlp.mlp1_weight.scales"].to(torch.int32)}),
    )
    with pytest.raises(gj.CheckpointError, match="block.0.mlp.mlp1_weight.scales must be stored as U8"):
        gj.load(ck)


def test_dense_checkpoint_cannot_load_packed(hf_dense_dir):
    with pytest.raises(gj.CheckpointError, match="experts='dense'"):
        gj.load(hf_dense_dir, experts="mxfp4")


@pytest.mark.parametrize("experts", ["mxfp4", "dense"])
def test_export_round_trip_and_transformers_reads_it(original_dir, tmp_path, experts):
    from transformers import GptOssForCausalLM, Mxfp4Config

    model = gj.load(original_dir, dtype="float32", experts=experts)
    out = tmp_path / "export"
    gj.save_hf(model, out, dtype="bfloat16", max_shard_bytes=200_000)
    assert os.path.isfile(out / "model.safetensors.index.json")  # sharded
    back = gj.load(out, dtype="float32")
    assert back.experts == experts
    tokens = np.arange(30)[None] * 7 % model.cfg.vocab_size
    # the checkpoint's values are bf16, so the fp32 model survives a bf16 export exactly
    np.testing.assert_array_equal(np.asarray(back(tokens).logits), np.asarray(model(tokens).logits))
    kw = {"quantization_config": Mxfp4Config(dequantize=True)} if experts == "mxfp4" else {}
    hf = GptOssForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager", **kw)
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(model(tokens).logits)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


def test_load_onto_a_mesh(original_dir):
    mesh = gj.make_mesh(fsdp=2, expert=4)
    model = gj.load(original_dir, dtype="float32", mesh=mesh)
    blocks = model.layers[0].mlp.w1_blocks[...]
    assert blocks.sharding.spec[0] == "expert"  # 8 experts over 4 devices
    assert len(blocks.sharding.device_set) == 8
    ref = gj.load(original_dir, dtype="float32")
    t = np.arange(20)[None]
    fwd = lambda m: nnx.jit(lambda m, t: m(t).logits)(m, t)
    np.testing.assert_allclose(np.asarray(fwd(model)), np.asarray(fwd(ref)), rtol=1e-5, atol=1e-5)
