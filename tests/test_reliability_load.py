"""Loading never yields silently wrong weights: a tensor whose stored shape differs from what its
conversion rule expects (a transposed tensor, a config.json whose head counts disagree with the
tensors) and non-finite values (NaN/inf floats, E8M0 scale byte 255) are refused with one clear
error naming the tensor and the file, in every layout and through the CLI."""

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

import gptoss_jax as gj
from gptoss_jax import checkpoint
from gptoss_jax.cli import main


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory, hf_mxfp4_dir):
    path = tmp_path_factory.mktemp("native") / "ck"
    gj.save_native(gj.load(hf_mxfp4_dir), path)
    return str(path)


@pytest.fixture(scope="module")
def layouts(original_dir, hf_mxfp4_dir, hf_dense_dir, native_dir):
    return {"original": original_dir, "hf": hf_mxfp4_dir, "hf_dense": hf_dense_dir, "native": native_dir}


def _copy(src, tmp_path, name="ck"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _file_of(folder, key):
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors") and key in load_file(str(folder / name)):
            return name
    raise KeyError(key)


def _edit_tensor(folder, key, fn):
    """Rewrite one tensor of a copied checkpoint with torch + safetensors; returns its file name."""
    name = _file_of(folder, key)
    t = load_file(str(folder / name))
    t[key] = fn(t[key].clone()).contiguous()
    save_file(t, str(folder / name))
    return name


def _edit_config(folder, **changes):
    path = folder / "config.json"
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def _set(index, value):
    def fn(t):
        t[index] = value
        return t

    return fn


def _error(path, **kw) -> str:
    with pytest.raises(gj.CheckpointError) as e:
        gj.load(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------ shapes (issue 1)
@pytest.mark.parametrize(
    "layout,key,variable,expect",
    [
        # k_proj [K*H, D] = [32, 64] stored as [64, 32]: used to load scrambled (reshape to (n, h, -1))
        (
            "hf",
            "model.layers.1.self_attn.k_proj.weight",
            "layers.1.attn.k",
            "[32, 64] = [num_key_value_heads*head_dim, hidden_size]",
        ),
        ("original", "block.1.mlp.gate.weight", "layers.1.mlp.router", "[8, 64] = [num_experts, hidden_size]"),
        (
            "hf_dense",
            "model.layers.0.mlp.experts.down_proj",
            "layers.0.mlp.w2",
            "[8, 64, 64] = [num_local_experts, intermediate_size, hidden_size]",
        ),
        ("native", "layers.1.attn.k", "layers.1.attn.k", "[64, 2, 16] = [hidden_size, num_key_value_heads, head_dim]"),
    ],
)
def test_transposed_tensor_is_refused(layouts, tmp_path, layout, key, variable, expect):
    ck = _copy(layouts[layout], tmp_path)
    # 2-d: transposed; [E, F, D] with F == D: the expert axis swapped in; [D, K, H]: reversed
    swap = {2: lambda w: w.T, 3: lambda w: w.permute(1, 0, 2) if layout == "hf_dense" else w.permute(2, 1, 0)}
    name = _edit_tensor(ck, key, lambda w: swap[w.ndim](w))
    found = list(load_file(str(ck / name))[key].shape)
    msg = _error(ck)
    assert f"tensor {key} {found} does not fit model variable {variable} (in {name}): expected shape {expect}" in msg
    assert "wrong order" in msg


def test_square_tensor_transposed_is_not_refused(hf_mxfp4_dir, tmp_path):
    """Control: a square o_proj [64, 64] cannot be told from its transpose by shape; it loads."""
    ck = _copy(hf_mxfp4_dir, tmp_path)
    _edit_tensor(ck, "model.layers.0.self_attn.o_proj.weight", lambda w: w.T)
    model = gj.load(ck, dtype="float32")
    want = load_file(str(ck / _file_of(ck, "model.layers.0.self_attn.o_proj.weight")))
    np.testing.assert_array_equal(
        np.asarray(model.layers[0].attn.o[...]).reshape(64, 64).T,
        want["model.layers.0.self_attn.o_proj.weight"].float().numpy(),
    )


def test_untouched_checkpoints_load(layouts):
    """Control: every layout loads as written, all finite, and the layouts give the same weights."""

    def weights(path, **kw):
        return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(gj.load(path, **kw)))}

    ref = weights(layouts["original"])
    for layout in ("hf", "native"):
        got = weights(layouts[layout])
        assert got.keys() == ref.keys()
        for p in ref:
            np.testing.assert_array_equal(got[p], ref[p], err_msg=str(p))
    dense, dequantized = weights(layouts["hf_dense"]), weights(layouts["hf"], experts="dense")
    assert dense.keys() == dequantized.keys()
    for p in dense:
        assert np.isfinite(dense[p].astype(np.float32)).all(), p
        np.testing.assert_array_equal(dense[p], dequantized[p], err_msg=str(p))


def test_float_tensor_stored_as_bytes_is_refused(hf_mxfp4_dir, tmp_path):
    ck = _copy(hf_mxfp4_dir, tmp_path)
    _edit_tensor(ck, "model.layers.0.self_attn.q_proj.bias", lambda b: b.to(torch.uint8))
    assert "model.layers.0.self_attn.q_proj.bias has dtype uint8; expected a float dtype" in _error(ck)


# ---------------------------------------------------------------------- head counts (issue 3)
@pytest.mark.parametrize(
    "layout,changes,tensor,names",
    [
        (
            "hf",
            {"num_attention_heads": 8},
            "model.layers.0.self_attn.q_proj.weight",
            "num_attention_heads=8, head_dim=16",
        ),
        ("hf", {"head_dim": 24}, "model.layers.0.self_attn.q_proj.weight", "num_attention_heads=4, head_dim=24"),
        (
            "hf",
            {"num_key_value_heads": 4},
            "model.layers.0.self_attn.k_proj.weight",
            "num_key_value_heads=4, head_dim=16",
        ),
        # N*H and K*H unchanged (2*32, 1*32 vs 4*16, 2*16): only the sinks show the head count
        (
            "original",
            {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32},
            "block.0.attn.sinks",
            "num_attention_heads=2",
        ),
        (
            "original",
            {"num_key_value_heads": 4},
            "block.0.attn.qkv.weight",
            "num_attention_heads=4, num_key_value_heads=4, head_dim=16",
        ),
        ("native", {"num_attention_heads": 8}, "layers.0.attn.o", "num_attention_heads=8"),
    ],
)
def test_head_count_that_does_not_fit_the_tensors(layouts, tmp_path, layout, changes, tensor, names):
    ck = _copy(layouts[layout], tmp_path)
    _edit_config(ck, **changes)
    msg = _error(ck)
    assert f"tensor {tensor} " in msg and "does not fit" in msg
    assert f"config.json has {names}, which does not match this tensor" in msg
    assert "reshape" not in msg
    if tensor.endswith("qkv.weight"):
        assert "expected shape [192, 64] = [(num_attention_heads+2*num_key_value_heads)*head_dim, hidden_size]" in msg


# ------------------------------------------------------------------ non-finite values (issue 2)
@pytest.mark.parametrize(
    "layout,key,experts",
    [
        ("hf", "model.layers.2.mlp.experts.gate_up_proj_scales", None),
        ("hf", "model.layers.2.mlp.experts.down_proj_scales", "dense"),
        ("original", "block.0.mlp.mlp2_weight.scales", None),
        ("original", "block.3.mlp.mlp1_weight.scales", "dense"),
        ("native", "layers.2.mlp.w1_scales", None),
    ],
)
def test_scale_byte_255_is_refused(layouts, tmp_path, layout, key, experts):
    ck = _copy(layouts[layout], tmp_path)
    name = _edit_tensor(ck, key, _set((3, 5, 1), 255))
    msg = _error(ck, experts=experts)
    assert (
        f"tensor {key} (in {name}) holds scale byte 255 (NaN in the OCP MX E8M0 format) "
        "at index [3, 5, 1] (expert 3): expected bytes 0..254"
    ) in msg


@pytest.mark.parametrize(
    "layout,key,index,value,shown",
    [
        ("hf", "model.layers.0.self_attn.q_proj.weight", (3, 7), float("nan"), "nan at index [3, 7]"),
        ("hf", "model.embed_tokens.weight", (300, 1), float("inf"), "inf at index [300, 1]"),
        ("hf_dense", "model.layers.1.mlp.experts.gate_up_proj", (2, 3, 4), float("-inf"), "-inf at index [2, 3, 4]"),
        ("original", "block.2.attn.qkv.weight", (70, 0), float("nan"), "nan at index [70, 0]"),
        ("original", "norm.scale", (63,), float("inf"), "inf at index [63]"),
        ("native", "layers.3.attn.sinks", (1,), float("nan"), "nan at index [1]"),  # stored fp32
    ],
)
def test_non_finite_float_is_refused(layouts, tmp_path, layout, key, index, value, shown):
    ck = _copy(layouts[layout], tmp_path)
    name = _edit_tensor(ck, key, _set(index, value))
    msg = _error(ck)
    assert f"tensor {key} (in {name}) holds {shown}: expected finite weights" in msg


def test_extreme_but_legit_values_load(hf_mxfp4_dir, tmp_path):
    """Control: the largest finite bf16, subnormals, -0 and scale bytes 0 and 254 are values, not
    errors, for the packed model (the checks test the exponent field, not magnitudes)."""
    ck = _copy(hf_mxfp4_dir, tmp_path)
    big = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    tiny = float(ml_dtypes.finfo(ml_dtypes.bfloat16).smallest_subnormal)
    _edit_tensor(ck, "model.layers.0.self_attn.q_proj.weight", _set((0, slice(0, 3)), torch.tensor([big, -big, tiny])))
    _edit_tensor(ck, "model.layers.0.self_attn.k_proj.weight", _set((1, 2), -0.0))
    scales = "model.layers.1.mlp.experts.down_proj_scales"
    _edit_tensor(ck, scales, _set((0, 0, 0), 0))
    _edit_tensor(ck, scales, _set((7, 63, 1), 254))
    model = gj.load(ck, dtype="float32")
    assert np.asarray(model.layers[0].attn.q[...])[0, 0, 0] == big
    assert int(np.asarray(model.layers[1].mlp.w2_scales[...])[7, 63, 1]) == 254


def test_dequantizing_beyond_float32_is_refused(hf_mxfp4_dir, tmp_path):
    """Scale byte 254 times E2M1 6.0 is 6 * 2**127: loading experts='dense' used to write inf."""
    ck = _copy(hf_mxfp4_dir, tmp_path)
    blocks, scales = "model.layers.1.mlp.experts.down_proj_blocks", "model.layers.1.mlp.experts.down_proj_scales"
    _edit_tensor(ck, blocks, _set((2, 9, 1), 0x77))  # both nibbles: +6.0
    _edit_tensor(ck, scales, _set((2, 9, 1), 254))
    msg = _error(ck, experts="dense")
    assert f"tensor {blocks} (in {_file_of(ck, blocks)}) decodes to inf at [expert, out, in] [2, 9, 32]" in msg
    assert f"(scale byte 254 in {scales})" in msg
    # control: 252 keeps 6 * 2**125 finite, so the same block dequantizes
    _edit_tensor(ck, scales, _set((2, 9, 1), 252))
    w2 = np.asarray(gj.load(ck, dtype="float32", experts="dense").layers[1].mlp.w2[...])
    assert w2[2, 32, 9] == 6.0 * 2.0**125


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32])
def test_first_nonfinite_scans_every_chunk(dtype):
    n = 2 * checkpoint._CHUNK + 5
    a = np.linspace(-3, 3, n).astype(dtype)
    finfo = ml_dtypes.finfo(dtype) if dtype is ml_dtypes.bfloat16 else np.finfo(dtype)
    a[7:11] = [finfo.max, -finfo.max, finfo.smallest_subnormal, -0.0]  # extreme but finite
    assert checkpoint._first_nonfinite(a) is None
    for i in (0, checkpoint._CHUNK - 1, checkpoint._CHUNK, n - 1):
        for bad in (np.nan, np.inf, -np.inf, -np.nan):
            b = a.copy()
            b[i] = bad
            assert checkpoint._first_nonfinite(b.reshape(1, -1)) == i, (i, bad)
    b = a.copy()
    b[[10, checkpoint._CHUNK + 3]] = np.nan
    assert checkpoint._first_nonfinite(b) == 10


# -------------------------------------------------------------------------------- through the CLI
def test_cli_convert_dense_refuses_a_nan_scale(hf_mxfp4_dir, tmp_path, capsys):
    ck = _copy(hf_mxfp4_dir, tmp_path)
    _edit_tensor(ck, "model.layers.2.mlp.experts.gate_up_proj_scales", _set((3, 5, 1), 255))
    dst = tmp_path / "out"
    assert main(["convert", str(ck), str(dst), "--experts", "dense", "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("gptoss convert: error:")]
    assert len(lines) == 1 and "gate_up_proj_scales" in lines[0] and "scale byte 255" in lines[0]
    assert not dst.exists() or not any(p.suffix == ".safetensors" for p in dst.iterdir())


@pytest.fixture(scope="module")
def full_vocab_dir(tmp_path_factory, hf_mxfp4_dir):
    """The tiny HF checkpoint with its embedding and unembedding widened to the real vocabulary, so
    `gptoss generate` accepts the prompt and the stop tokens."""
    ck = _copy(hf_mxfp4_dir, tmp_path_factory.mktemp("full_vocab"))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        _edit_tensor(ck, key, lambda w: torch.cat([w, w[:1].expand(201088 - w.shape[0], -1)]))
    _edit_config(ck, vocab_size=201088)
    return ck


def test_cli_generate_refuses_nan_weights(full_vocab_dir, tmp_path, capsys):
    args = ["--raw", "--prompt", "hi", "--max-new-tokens", "1", "--temperature", "0"]
    assert main(["generate", str(full_vocab_dir), *args]) == 0  # control: the untouched checkpoint
    capsys.readouterr()
    ck = _copy(full_vocab_dir, tmp_path)
    _edit_tensor(ck, "model.layers.0.self_attn.q_proj.weight", _set((3, 7), float("nan")))
    assert main(["generate", str(ck), *args]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out.strip() == ""
    assert (
        captured.err.strip()
        .splitlines()[-1]
        .startswith("gptoss generate: error: tensor model.layers.0.self_attn.q_proj.weight")
    )


def test_cli_convert_refuses_a_transposed_tensor(hf_mxfp4_dir, tmp_path, capsys):
    ck = _copy(hf_mxfp4_dir, tmp_path)
    _edit_tensor(ck, "model.layers.1.self_attn.k_proj.weight", lambda w: w.T)
    assert main(["convert", str(ck), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("gptoss convert: error: tensor model.layers.1.self_attn.k_proj.weight [64, 32] does not fit")
    )
