"""Captured intermediates are what the forward computed, and the inspect helpers agree with direct
computations on them."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax as gj
from gptoss_jax import inspect


@pytest.fixture(scope="module")
def model(original_dir):
    # fp32 and the factory's weights: varied routing, non-trivial sinks, packed MXFP4 experts
    return gj.load(original_dir, dtype="float32")


@pytest.fixture(scope="module")
def packed_batch(tiny_cfg):
    """Two rows: two documents packed in the first (lengths 13 + 11), one padded in the second."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, tiny_cfg.vocab_size, (2, 24)).astype(np.int32)
    seg = np.array([[1] * 13 + [2] * 11, [1] * 20 + [0] * 4], np.int32)
    pos = np.array([list(range(13)) + list(range(11)), list(range(20)) + [0] * 4], np.int32)
    return jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg)


@pytest.fixture(scope="module")
def captured(model, packed_batch):
    tokens, pos, seg = packed_batch
    fwd = jax.jit(lambda m, t, p, s: m(t, positions=p, segment_ids=s, capture="experts"))
    return fwd(model, tokens, pos, seg)


def test_capture_is_off_by_default_and_validated(model, packed_batch):
    tokens = packed_batch[0]
    assert model(tokens).intermediates is None
    with pytest.raises(ValueError, match="capture must be one of"):
        model(tokens, capture="everything")


def test_capture_leaves_the_logits_unchanged(model, packed_batch, captured):
    tokens, pos, seg = packed_batch
    plain = model(tokens, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(captured.logits, plain.logits, rtol=1e-5, atol=1e-5)


def test_residual_stream_adds_up(captured):
    inter = captured.intermediates
    for i, layer in enumerate(inter):
        np.testing.assert_array_equal(layer["residual_mid"], layer["residual"] + layer["attn_out"])
        np.testing.assert_array_equal(layer["residual_out"], layer["residual_mid"] + layer["mlp_out"])
        if i + 1 < len(inter):
            np.testing.assert_array_equal(layer["residual_out"], inter[i + 1]["residual"])


def test_weighted_expert_outputs_reproduce_the_moe_output(captured, tiny_cfg):
    for layer in captured.intermediates:
        out = layer["expert_out"]
        assert out.shape == layer["expert_ids"].shape + (tiny_cfg.d_model,)
        mixed = jnp.einsum("BTkD,BTk->BTD", out, layer["expert_weights"])
        np.testing.assert_allclose(mixed, layer["mlp_out"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(jnp.sum(layer["expert_weights"], -1), 1.0, rtol=1e-6)
        # the top-k ids are the largest router logits, best first
        top = jax.lax.top_k(layer["router_logits"], tiny_cfg.experts_per_token)[1]
        np.testing.assert_array_equal(top, layer["expert_ids"])


def test_expert_outputs_on_dense_experts_and_lora(tiny_cfg):
    from gptoss_jax import lora

    model = gj.init(tiny_cfg, seed=3, dtype=jnp.float32, experts="dense")
    lora.add_lora(model, lora.LoRAConfig(rank=2, targets=("w1", "w2")), seed=1)
    for layer in model.layers:  # nonzero B so the adapters change the experts
        for b in (layer.mlp.lora.b_w1, layer.mlp.lora.b_w2):
            b.set_value(jnp.full(b.shape, 0.05, jnp.float32))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, tiny_cfg.vocab_size, (1, 12)))
    out = model(tokens, capture="experts")
    for layer in out.intermediates:
        mixed = jnp.einsum("BTkD,BTk->BTD", layer["expert_out"], layer["expert_weights"])
        np.testing.assert_allclose(mixed, layer["mlp_out"], rtol=1e-5, atol=1e-5)


def test_attention_maps_reproduce_sink_mass_and_output(model, packed_batch, captured, tiny_cfg):
    tokens, pos, seg = packed_batch
    N, K = tiny_cfg.num_heads, tiny_cfg.num_kv_heads
    for i, layer in enumerate(captured.intermediates):
        probs, sink = inspect.attention_maps(model, captured.intermediates, i, positions=pos, segment_ids=seg)
        assert probs.shape == (2, N, 24, 24)
        # sink mass + key mass = 1 for every query
        np.testing.assert_allclose(probs.sum(-1) + sink, 1.0, rtol=1e-6)
        np.testing.assert_allclose(sink, np.transpose(layer["sink_mass"], (0, 2, 1)), rtol=1e-5, atol=1e-7)
        # no mass outside the mask: across documents, into the future, beyond the window
        q, k = np.arange(24)[:, None], np.arange(24)[None, :]
        outside = k > q
        if tiny_cfg.is_sliding(i):
            outside |= (q - k) >= tiny_cfg.sliding_window
        assert probs[0][:, outside].max() == 0
        assert probs[1][:, :20][:, outside[:20]].max() == 0  # (the padding at 20.. is row 1's own segment 0)
        assert probs[0][:, 13:, :13].max() == 0  # document 2 never sees document 1
        # probs @ v through the output projection is the captured attention output
        attn = model.layers[i].attn
        _, _, v = inspect._qkv(model, i, layer["residual"], pos)
        v = jnp.repeat(v, N // K, axis=2)
        o = jnp.einsum("BNTS,BSNH->BTNH", probs, v)
        o = jnp.einsum("BTNH,NHD->BTD", o, attn.o[...]) + attn.o_bias[...]
        np.testing.assert_allclose(o, layer["attn_out"], rtol=1e-4, atol=1e-5)
        if tiny_cfg.is_sliding(i):  # the window's edge matters: this layer is not secretly full
            assert probs[0, :, 12, 12 - tiny_cfg.sliding_window + 1].max() > 0


def test_sinks_differ_between_heads_and_layers(model, captured, packed_batch):
    seg = np.asarray(packed_batch[2])
    sinks = inspect.sink_mass(captured.intermediates, mask=seg != 0)
    assert sinks.shape == (4, 4) and np.all((sinks > 0) & (sinks < 1))
    probs, sink = inspect.attention_maps(
        model, captured.intermediates, 0, positions=packed_batch[1], segment_ids=packed_batch[2]
    )
    ent = inspect.attention_entropy(probs, sink)
    assert ent.shape == (2, 4, 24)
    assert np.all(ent >= 0) and np.all(ent <= np.log(24 + 1) + 1e-6)
    # the first token of each document sees only itself: entropy over {itself, sink}
    p0 = np.stack([probs[0, :, 0, 0], sink[0, :, 0]], -1)
    np.testing.assert_allclose(ent[0, :, 0], -(p0 * np.log(p0)).sum(-1), rtol=1e-5)


def test_logit_lens_at_the_last_layer_is_the_model(model, captured):
    lens = inspect.logit_lens(model, captured.intermediates)
    assert lens.shape == (4,) + captured.logits.shape
    np.testing.assert_allclose(lens[-1], captured.logits, rtol=1e-5, atol=1e-5)
    ids, probs = inspect.logit_lens_top(model, captured.intermediates, k=3)
    np.testing.assert_array_equal(ids[-1, ..., 0], np.argmax(captured.logits, -1))
    assert np.all(np.diff(probs, axis=-1) <= 0)


def test_routing_statistics(captured, packed_batch, tiny_cfg):
    E, k = tiny_cfg.num_experts, tiny_cfg.experts_per_token
    mask = np.asarray(packed_batch[2]) != 0
    inter = captured.intermediates
    counts = inspect.expert_counts(inter, E, mask)
    assert counts.shape == (4, E) and np.all(counts.sum(-1) == mask.sum() * k)
    ids0 = np.asarray(inter[0]["expert_ids"])[mask]
    np.testing.assert_array_equal(counts[0], [(ids0 == e).sum() for e in range(E)])
    load = inspect.expert_load(inter, E, mask)
    np.testing.assert_allclose(load.sum(-1), 1.0)
    cooc = inspect.expert_cooccurrence(inter, E, mask)
    np.testing.assert_array_equal(np.diagonal(cooc, axis1=1, axis2=2), counts)
    i, j = ids0[0]
    assert cooc[0, i, j] == sum(1 for row in ids0 if i in row and j in row)
    ent = inspect.routing_entropy(inter, mask)
    assert np.all((ent > 0) & (ent < np.log(E)))
    table = inspect.token_expert_table(packed_batch[0], inter, row=1)
    assert len(table) == 24 and table[3]["experts"][2] == [int(e) for e in inter[2]["expert_ids"][1, 3]]


def test_run_corpus_equals_the_direct_statistics(model, tokenizer, tmp_path, tiny_cfg):
    # a jsonl corpus over a tiny vocabulary: ids taken modulo the model's vocabulary via a
    # stand-in tokenizer, so the real o200k tokenizer's pieces drive the packing
    class Small:
        def encode(self, text):
            return [t % tiny_cfg.vocab_size for t in tokenizer.encode(text)]

        def decode(self, ids):
            return " ".join(map(str, ids))

    texts = ["The quick brown fox jumps over the lazy dog. " * (1 + i % 3) for i in range(7)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    stats = inspect.run_corpus(model, Small(), str(path), seq_len=32, batch_size=2, progress=False)
    docs = [Small().encode(t) for t in texts]
    assert stats.documents == 7 and stats.tokens == sum(map(len, docs))
    assert stats.split_documents == sum(len(d) > 32 for d in docs)
    # the same batches by hand
    counts = np.zeros((4, tiny_cfg.num_experts), np.int64)
    sink, hits, targets = np.zeros((4, tiny_cfg.num_heads)), np.zeros(4), 0
    for b in inspect.pack_stream(iter(docs), 32, 2):
        out = model(
            jnp.asarray(b["tokens"]),
            positions=jnp.asarray(b["positions"]),
            segment_ids=jnp.asarray(b["segment_ids"]),
            capture=True,
        )
        m = b["segment_ids"] != 0
        counts += inspect.expert_counts(out.intermediates, tiny_cfg.num_experts, m)
        sink += inspect.sink_mass(out.intermediates, m) * m.sum()
        lens = inspect.logit_lens(model, out.intermediates).argmax(-1)
        same_doc = m[:, :-1] & (b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1])
        hits += (lens[:, :, :-1] == b["tokens"][None, :, 1:])[:, same_doc].sum(-1)
        targets += same_doc.sum()
    np.testing.assert_array_equal(stats.expert_counts, counts)
    np.testing.assert_allclose(stats.sink_mass, sink / stats.tokens, rtol=1e-5)
    np.testing.assert_array_equal(stats.lens_hits, hits)
    assert stats.lens_targets == targets
    top = stats.top_tokens(0, int(np.argmax(counts[0])), n=3)
    assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
    assert sum(stats.token_experts[(1, e)][t] for e in range(8) for t in range(512)) == stats.tokens * 2
    report = stats.to_json()
    json.dumps(report)
    assert len(report["expert_load"]) == 4 and report["tokens"] == stats.tokens


def test_read_corpus_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        list(inspect.read_corpus(str(bad)))
    with pytest.raises(FileNotFoundError):
        list(inspect.read_corpus(str(tmp_path / "missing.txt")))
    with pytest.raises(KeyError, match="capture='experts'"):
        inspect.stacked([{"residual": 0}], "expert_out")


def test_inspect_cli_writes_a_report(original_dir, tmp_path, tiny_cfg):
    from gptoss_jax.cli import main
    from gptoss_jax.tokenizer import train_bpe

    doc = "hello world, this is a document about 12 experts"
    tok = train_bpe([doc] * 3, vocab_size=300)
    tok.hf.save(str(tmp_path / "tokenizer.json"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join([doc] * 5))
    out = tmp_path / "report"
    assert (
        main(
            [
                "inspect",
                str(original_dir),
                "--file",
                str(corpus),
                "--text",
                "hello world",
                "--out",
                str(out),
                "--seq-len",
                "32",
                "--batch-size",
                "2",
                "--tokenizer",
                str(tmp_path / "tokenizer.json"),
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["corpus"]["tokens"] == 5 * len(tok.encode(doc)) + len(tok.encode("hello world"))
    assert len(report["corpus"]["routing_entropy"]) == tiny_cfg.num_layers
    assert [r["text"] for r in report["text"]["tokens"]] == [tok.decode([t]) for t in tok.encode("hello world")]
    for name in ("expert_load.png", "sink_mass.png", "layers.png"):
        assert os.path.getsize(out / name) > 1000
