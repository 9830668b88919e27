"""fp32 parity against the two independent oracles on tiny random checkpoints.

OpenAI's gpt_oss.torch reads the original/ layout; transformers' GptOssForCausalLM (eager
attention, experts dequantized on load) reads the HF layout, both run in fp32. T = 40 is five
windows long, so sliding layers drop keys; GQA 4:2; 8 experts, top-2.
Tolerance: max|dlogit| / max|logit| <= 1e-4 (expected ~1e-6 in fp32) and identical argmax.
bf16, the default dtype, has its own bound derived from the oracles: test_parity_bf16.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gptoss_jax as gj
from gptoss_jax import layers
from gptoss_jax.cache import init_cache
from tests import factory
from tests.factory import rel_err

T = 40
TOL = 1e-4


@pytest.fixture(scope="module")
def tokens(tiny_cfg):
    return np.random.default_rng(0).integers(0, tiny_cfg.vocab_size, T)


@pytest.fixture(scope="module")
def openai_logits(original_dir, tokens):
    from gpt_oss.torch.model import Transformer

    model = Transformer.from_checkpoint(original_dir, device="cpu").float()
    with torch.no_grad():
        return model(torch.tensor(tokens)).numpy()


def _hf_logits(path, tokens, **kw):
    from transformers import GptOssForCausalLM

    model = GptOssForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager", **kw)
    with torch.no_grad():
        return model(torch.tensor(tokens)[None]).logits[0].float().numpy()


@pytest.fixture(scope="module")
def hf_logits(hf_mxfp4_dir, tokens):
    from transformers import Mxfp4Config

    return _hf_logits(hf_mxfp4_dir, tokens, quantization_config=Mxfp4Config(dequantize=True))


def test_oracles_agree(openai_logits, hf_logits):
    rel = rel_err(hf_logits, openai_logits)
    print(f"HF vs OpenAI reference: {rel:.2e}")
    assert rel <= TOL
    assert np.abs(openai_logits).max() > 1.0  # a model whose logits are all ~0 would prove nothing


@pytest.mark.parametrize("layout", ["original", "hf_mxfp4", "hf_dense"])
@pytest.mark.parametrize("moe_impl", ["ragged", "chunks"])
def test_ours_vs_oracles(layout, moe_impl, request, tokens, openai_logits, hf_logits):
    path = request.getfixturevalue(f"{layout}_dir")
    model = gj.load(path, dtype="float32", kernel=gj.KernelOptions(moe_impl=moe_impl))
    assert model.experts == ("dense" if layout == "hf_dense" else "mxfp4")
    ours = np.asarray(model(tokens[None]).logits[0])
    oracles = {"OpenAI": openai_logits, "HF": hf_logits}
    if layout == "hf_dense":
        oracles["HF(dense ckpt)"] = _hf_logits(path, tokens)
    for name, want in oracles.items():
        rel = rel_err(ours, want)
        print(f"ours[{layout}, {moe_impl}] vs {name}: {rel:.2e}")
        assert rel <= TOL, name
        np.testing.assert_array_equal(ours.argmax(-1), want.argmax(-1))


def test_dequantize_on_load_is_explicit_and_exact(original_dir, tokens, openai_logits):
    model = gj.load(original_dir, dtype="float32", experts="dense")
    assert model.experts == "dense"
    assert rel_err(np.asarray(model(tokens[None]).logits[0]), openai_logits) <= TOL


# ------------------------------------------------------------------------ beyond one row
# The same tolerance (TOL, identical argmax) on three more shapes: a right-padded batch (full
# forward and cached decode), head_dim 64 with the released RoPE constants, and a sequence twelve
# windows long. Each mechanism also has a control: a deliberate fault that the comparison catches.

ROW_T = 40
ROW_LENGTHS = (40, 23, 31)  # real tokens per row; the rest of each row is right padding
ROW_PROMPTS = (13, 3, 18)  # the cached case prefills these, then decodes one token at a time
LONG_WINDOWS = 12


@pytest.fixture(scope="module")
def openai_model(original_dir):
    from gpt_oss.torch.model import Transformer

    return Transformer.from_checkpoint(original_dir, device="cpu").float()


def _hf_model(path):
    from transformers import GptOssForCausalLM, Mxfp4Config

    return GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", quantization_config=Mxfp4Config(dequantize=True)
    )


@pytest.fixture(scope="module")
def hf_model(hf_mxfp4_dir):
    return _hf_model(hf_mxfp4_dir)


def _oracle_logits(openai_model, hf_model, tokens):
    """Both oracles on one unpadded row."""
    with torch.no_grad():
        x = torch.tensor(np.asarray(tokens))
        return {"OpenAI": openai_model(x).numpy(), "HF": hf_model(x[None]).logits[0].float().numpy()}


def _check(ours, oracles, label):
    errs = {}
    for name, want in oracles.items():
        errs[name] = rel = rel_err(ours, want)
        print(f"{label} vs {name}: {rel:.2e}")
        assert rel <= TOL, name
        np.testing.assert_array_equal(ours.argmax(-1), want.argmax(-1))
    return errs


@pytest.fixture(scope="module")
def rows(tiny_cfg):
    return np.random.default_rng(1).integers(0, tiny_cfg.vocab_size, (len(ROW_LENGTHS), ROW_T))


@pytest.fixture(scope="module")
def row_oracles(rows, openai_model, hf_model):
    """Per row, each oracle on that row's real tokens only."""
    return [_oracle_logits(openai_model, hf_model, rows[b, :n]) for b, n in enumerate(ROW_LENGTHS)]


def _real(per_row):
    """Concatenate the real positions of per-row [T, V] logits."""
    return np.concatenate([per_row[b][:n] for b, n in enumerate(ROW_LENGTHS)])


def _padded(rows, vocab_size, seed):
    seg = (np.arange(ROW_T)[None] < np.array(ROW_LENGTHS)[:, None]).astype(np.int32)
    junk = np.random.default_rng(seed).integers(0, vocab_size, rows.shape)
    return np.where(seg == 1, rows, junk), seg


def test_right_padded_batch_vs_oracles(original_dir, tiny_cfg, rows, row_oracles, hf_model):
    model = gj.load(original_dir, dtype="float32")
    toks, seg = _padded(rows, tiny_cfg.vocab_size, seed=2)
    assert (toks != rows).any()  # the padding holds other tokens than the rows' continuations
    ours = np.asarray(model(toks, segment_ids=seg).logits)
    oracles = {name: _real([r[name] for r in row_oracles]) for name in ("OpenAI", "HF")}
    # HF also batched, right-padded with its attention mask (different junk in the padding).
    hf_toks, _ = _padded(rows, tiny_cfg.vocab_size, seed=3)
    with torch.no_grad():
        hf_batched = hf_model(torch.tensor(hf_toks), attention_mask=torch.tensor(seg)).logits.float().numpy()
    oracles["HF(batched, mask)"] = _real(hf_batched)
    _check(_real(ours), oracles, "ours[right-padded batch]")


def _cached_decode(model, cfg, rows, *, cache_padding=False):
    """Prefill ROW_PROMPTS (right-padded, segment_ids 0 on the padding), then decode one token per
    step until each row holds ROW_LENGTHS tokens; rows finish at different steps. Returns per-row
    logits at every real position. cache_padding=True is the control: the padding is marked real
    in the prefill, so it is written to the cache and shifts every later position."""
    B, P = len(ROW_PROMPTS), max(ROW_PROMPTS)
    cache = init_cache(cfg, B, 64, jnp.float32)
    seg = (np.arange(P)[None] < np.array(ROW_PROMPTS)[:, None]).astype(np.int32)
    toks = np.where(seg == 1, rows[:, :P], 0)
    call = jax.jit(lambda m, t, s, c: m(t, segment_ids=s, cache=c))
    out = call(model, toks, np.ones_like(seg) if cache_padding else seg, cache)
    got = [[np.asarray(out.logits[b, t]) for t in range(n)] for b, n in enumerate(ROW_PROMPTS)]
    cache, pos = out.cache, list(ROW_PROMPTS)
    while any(p < n for p, n in zip(pos, ROW_LENGTHS)):
        live = np.array([p < n for p, n in zip(pos, ROW_LENGTHS)])
        t = np.array([[rows[b, min(pos[b], ROW_T - 1)]] for b in range(B)])
        o = call(model, t, live[:, None].astype(np.int32), cache)
        cache = o.cache
        for b in np.flatnonzero(live):
            got[b].append(np.asarray(o.logits[b, 0]))
            pos[b] += 1
    if not cache_padding:
        assert np.asarray(cache.lengths).tolist() == list(ROW_LENGTHS)
    return [np.stack(g) for g in got]


def test_right_padded_cached_decode_vs_oracles(original_dir, tiny_cfg, rows, row_oracles):
    # Prompts of 13, 3 and 18 tokens grown to 40, 23 and 31: every sliding ring buffer (W = 8)
    # wraps, and rows stop decoding at different steps (a finished row is padding from then on).
    model = gj.load(original_dir, dtype="float32")
    oracles = {name: _real([r[name] for r in row_oracles]) for name in ("OpenAI", "HF")}
    _check(_real(_cached_decode(model, tiny_cfg, rows)), oracles, "ours[right-padded cached decode]")
    # Control: padding cached (and so attended, and counted in the positions) fails the comparison.
    bad = _real(_cached_decode(model, tiny_cfg, rows, cache_padding=True))
    for name, want in oracles.items():
        rel = rel_err(bad, want)
        print(f"control[padding cached] vs {name}: {rel:.2e}")
        assert rel > TOL, name


# head_dim 64 with the released YaRN constants, on a model otherwise tiny.
@pytest.fixture(scope="module")
def hd64_cfg():
    cfg = gj.tiny(head_dim=64)
    ref = gj.gpt_oss_20b()
    for field in (
        "head_dim",
        "rope_theta",
        "rope_factor",
        "rope_beta_fast",
        "rope_beta_slow",
        "rope_original_context",
        "rope_truncate",
    ):
        assert getattr(cfg, field) == getattr(ref, field), field
    return cfg


@pytest.fixture(scope="module")
def hd64_dirs(tmp_path_factory, hd64_cfg):
    base = tmp_path_factory.mktemp("hd64")
    original = factory.write_original(str(base / "original"), hd64_cfg, seed=4)
    hf = factory.write_hf(
        str(base / "hf_mxfp4"),
        factory.original_to_hf(factory.original_tensors(hd64_cfg, 4), hd64_cfg),
        factory.hf_config_dict(hd64_cfg, mxfp4=True),
    )
    return original, hf


@pytest.fixture(scope="module")
def hd64_case(hd64_cfg, hd64_dirs):
    from gpt_oss.torch.model import Transformer

    original, hf = hd64_dirs
    openai = Transformer.from_checkpoint(original, device="cpu").float()
    hf_m = _hf_model(hf)
    tokens = np.random.default_rng(5).integers(0, hd64_cfg.vocab_size, 64)
    with torch.no_grad():
        _, openai_inv = openai.block[0].attn.rope._compute_concentration_and_inv_freq()
    logits = _oracle_logits(openai, hf_m, tokens)
    assert np.abs(logits["OpenAI"]).max() > 1.0  # a model whose logits are all ~0 would prove nothing
    inv = {"OpenAI": openai_inv.float().numpy(), "HF": hf_m.model.rotary_emb.inv_freq.float().numpy()}
    return tokens, logits, inv


@pytest.fixture
def computed_inv_freq(monkeypatch):
    """Route rope_inv_freq through its computation instead of the released models' bit table."""
    layers.rope_inv_freq.cache_clear()
    monkeypatch.setattr(layers, "_RELEASED_ROPE", None)
    yield
    monkeypatch.undo()
    layers.rope_inv_freq.cache_clear()


def _ulps(a, b):
    a, b = np.asarray(a, np.float32).view(np.int32), np.asarray(b, np.float32).view(np.int32)
    return np.abs(a.astype(np.int64) - b.astype(np.int64))


def test_head_dim_64_table_vs_oracles(hd64_cfg, hd64_dirs, hd64_case):
    tokens, oracles, inv = hd64_case
    table = layers.rope_inv_freq(hd64_cfg)
    assert table.shape == (32,)
    for name, want in inv.items():
        np.testing.assert_array_equal(table.view(np.uint32), want.view(np.uint32), err_msg=name)
    model = gj.load(hd64_dirs[0], dtype="float32")
    assert model.cfg.head_dim == 64
    _check(np.asarray(model(tokens[None]).logits[0]), oracles, "ours[head_dim 64, table]")


def test_head_dim_64_computed_vs_oracles(hd64_cfg, hd64_dirs, hd64_case, computed_inv_freq):
    tokens, oracles, inv = hd64_case
    computed = layers.rope_inv_freq(hd64_cfg)
    # It really is the computed path (pow rounding differs from the table in some entries) and
    # within an ulp of both references.
    assert (computed.view(np.uint32) != np.array(layers._RELEASED_INV_FREQ_BITS, np.uint32)).any()
    for name, want in inv.items():
        assert _ulps(computed, want).max() <= 1, name
    for layout, path in zip(("original", "hf_mxfp4"), hd64_dirs):
        model = gj.load(path, dtype="float32")
        _check(np.asarray(model(tokens[None]).logits[0]), oracles, f"ours[head_dim 64, computed, {layout}]")


def test_head_dim_64_control_wrong_rope(hd64_cfg, hd64_dirs, hd64_case, monkeypatch):
    # Control: the YaRN ramp rounded to whole dims (transformers' default when `truncate` is
    # absent, wrong for gpt-oss) is caught.
    tokens, oracles, _ = hd64_case
    right = layers.rope_inv_freq
    monkeypatch.setattr(layers, "rope_inv_freq", lambda cfg: right(cfg.replace(rope_truncate=True)))
    model = gj.load(hd64_dirs[0], dtype="float32")
    bad = np.asarray(model(tokens[None]).logits[0])
    for name, want in oracles.items():
        rel = rel_err(bad, want)
        print(f"control[head_dim 64, truncated YaRN ramp] vs {name}: {rel:.2e}")
        assert rel > TOL, name


def test_many_windows_vs_oracles(original_dir, hf_mxfp4_dir, tiny_cfg, openai_model, hf_model):
    W = tiny_cfg.sliding_window
    T_long = LONG_WINDOWS * W
    tokens = np.random.default_rng(6).integers(0, tiny_cfg.vocab_size, T_long)
    oracles = _oracle_logits(openai_model, hf_model, tokens)
    for layout, path in (("original", original_dir), ("hf_mxfp4", hf_mxfp4_dir)):
        model = gj.load(path, dtype="float32")
        _check(np.asarray(model(tokens[None]).logits[0]), oracles, f"ours[T={T_long}, W={W}, {layout}]")
    # Control: a window one key too wide on the sliding layers is caught.
    sliding = [blk.attn for blk in model.layers if blk.attn.window is not None]
    assert sliding
    for attn in sliding:
        attn.window = W + 1
    bad = np.asarray(model(tokens[None]).logits[0])
    for name, want in oracles.items():
        rel = rel_err(bad, want)
        print(f"control[window {W + 1}] vs {name}: {rel:.2e}")
        assert rel > TOL, name
