"""gptoss_jax.chat: options and prompts checked before the weights, streaming of a turn, history."""

import io
import json
import types

import pytest

import gptoss_jax as gj
from gptoss_jax import chat, harmony, preflight

FLAGS = {"top_k": "--top-k", "max_new_tokens": "--max-new-tokens"}


def test_sampling_checks_and_spells_the_generate_options():
    s = chat.Sampling(max_new_tokens=3, temperature=0, top_k=5)
    assert s.kwargs() == dict(max_new_tokens=3, temperature=0, top_p=1.0, top_k=5, seed=0)
    s.check(vocab_size=5)  # top_k may equal the vocabulary
    with pytest.raises(ValueError, match=r"^--top-k must be an integer from 0 .* vocabulary size 4, got 5"):
        s.check(vocab_size=4, names=FLAGS)
    with pytest.raises(ValueError, match=r"^max_new_tokens must be an integer >= 1, got 0"):
        chat.Sampling(max_new_tokens=0).check()


def test_conversation_start_and_read_conversation(tmp_path):
    assert [m["role"] for m in chat.conversation_start("low")] == ["system"]
    assert [m["role"] for m in chat.conversation_start("low", "be brief")] == ["system", "developer"]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=rf"^{bad} is not valid JSON: "):
        chat.read_conversation(str(bad))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}))
    with pytest.raises(ValueError, match=rf"^{wrong}: "):
        chat.read_conversation(str(wrong))
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"messages": [harmony.system_message(), harmony.user("hi")]}))
    assert [m["role"] for m in chat.read_conversation(str(good))] == ["system", "user"]


@pytest.fixture
def no_checkpoint(monkeypatch):
    """A checkpoint whose config.json says `cfg`; `loads` records the calls of gj.load."""
    cfg = gj.tiny(vocab_size=201088, max_position=64)
    loads = []
    monkeypatch.setattr(preflight, "checkpoint_config", lambda path: cfg)
    monkeypatch.setattr(gj, "load", lambda path, **kw: loads.append((path, kw)) or "model")
    return loads


def test_load_checks_options_and_prompt_before_the_weights(no_checkpoint):
    load = dict(sampling=chat.Sampling(max_new_tokens=8), tokenizer="o200k_harmony", names=FLAGS)
    with pytest.raises(ValueError, match="^--top-k must be"):
        chat.load("ck", **{**load, "sampling": chat.Sampling(top_k=201089)})
    with pytest.raises(ValueError, match="^--mesh wants axis=size pairs"):
        chat.load("ck", mesh="data", **load)
    long = chat.conversation_start() + [harmony.user("word " * 100)]
    with pytest.raises(ValueError, match=r"^prompt of \d+ tokens \+ 8 new tokens exceeds the context of 64"):
        chat.load("ck", prompt=long, **load)
    assert no_checkpoint == []  # nothing was loaded
    model, tok = chat.load("ck", prompt="Once upon a time", dtype="float32", **load)
    assert model == "model" and tok.vocab_size == 201088
    assert no_checkpoint == [("ck", {"dtype": "float32", "mesh": None})]


def test_prompt_ids(tokenizer):
    assert chat.prompt_ids(tokenizer, "<|start|>") == tokenizer.encode("<|start|>", disallowed_special=())
    conv = chat.conversation_start() + [harmony.user("hi")]
    assert chat.prompt_ids(tokenizer, conv) == harmony.render_for_completion(conv, tokenizer)


def _fake_generate(monkeypatch, tokenizer, text, stop_reason="stop"):
    """`generate` that streams the ids of `text` (specials parsed) in two blocks; records its kwargs."""
    ids = tokenizer.encode(text, allowed_special="all")
    seen = {}

    def generate(model, tok, prompts, *, stream, **kw):
        seen.update(kw, prompts=prompts)
        stream(0, ids[:3])
        stream(0, ids[3:])
        return types.SimpleNamespace(stop_reason=[stop_reason])

    monkeypatch.setattr(chat, "generate", generate)
    return seen


TURN = "<|channel|>analysis<|message|>add them<|end|><|start|>assistant<|channel|>final<|message|>four<|return|>"


def test_reply_streams_the_final_channel_and_analysis_when_asked(tokenizer, monkeypatch):
    conv = chat.conversation_start() + [harmony.user("2+2?")]
    seen = _fake_generate(monkeypatch, tokenizer, TURN)
    out = io.StringIO()
    messages = chat.reply("model", tokenizer, conv, chat.Sampling(max_new_tokens=9), out=out)
    assert out.getvalue() == "four\n"
    assert [(m["channel"], m["content"][0]["text"]) for m in messages] == [("analysis", "add them"), ("final", "four")]
    assert seen["prompts"] == [harmony.render_for_completion(conv, tokenizer)] and seen["max_new_tokens"] == 9
    out = io.StringIO()
    chat.reply("model", tokenizer, conv, chat.Sampling(), show_analysis=True, out=out)
    assert out.getvalue() == "[analysis] add them\nfour\n"
    _fake_generate(monkeypatch, tokenizer, TURN[: TURN.index("four") + 3], stop_reason="length")
    out = io.StringIO()
    chat.reply("model", tokenizer, conv, chat.Sampling(), out=out)
    assert out.getvalue() == "fou\n\n[stopped at --max-new-tokens]\n"


def test_reply_shows_what_breaks_the_format(tokenizer, monkeypatch):
    _fake_generate(monkeypatch, tokenizer, "no header at all")
    out = io.StringIO()
    messages = chat.reply("model", tokenizer, chat.conversation_start(), chat.Sampling(), out=out)
    assert "no header at all" in out.getvalue() and "[not valid harmony: " in out.getvalue()
    assert messages[-1].get("malformed")


def test_complete_streams_plain_text_until_endoftext(tokenizer, monkeypatch):
    seen = _fake_generate(monkeypatch, tokenizer, " upon a time")
    out = io.StringIO()
    chat.complete("model", tokenizer, "Once", chat.Sampling(seed=3), out=out)
    assert out.getvalue() == " upon a time\n"
    assert seen["stop_tokens"] == (tokenizer.token_id("<|endoftext|>"),) and seen["prompts"] == ["Once"]
    assert seen["seed"] == 3


def test_chat_keeps_valid_replies_and_resets(monkeypatch):
    good = {"role": "assistant", "channel": "final", "content": [{"type": "text", "text": "hi"}]}
    bad = {**good, "malformed": "no header"}
    calls = []

    def reply(model, tokenizer, history, sampling, *, show_analysis, out):
        calls.append((list(history), show_analysis, out))
        return [good, bad]

    monkeypatch.setattr(chat, "reply", reply)
    start = chat.conversation_start("high", "be brief")
    session = chat.Chat("model", "tok", chat.Sampling(), start, show_analysis=True)
    assert session.send("hello", out="OUT") == [good, bad]
    assert session.history == start + [harmony.user("hello"), good]
    assert calls == [(start + [harmony.user("hello")], True, "OUT")]
    session.send("again")
    assert len(session.history) == len(start) + 4
    session.reset()
    assert session.history == start
    session.history.append(harmony.user("x"))
    session.reset()
    assert session.history == start  # the start messages are not shared with the history
