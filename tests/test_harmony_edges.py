"""Harmony edges that openai-harmony 0.0.8 (the `harmony_encoding` fixture) accepts: a completion
whose stop token was stripped, a message without a channel, a recipient that is not a declared
tool. Ours must parse them as the oracle does (strict and non-strict), flag them ("incomplete",
"warnings") but not call them malformed, and eval / the RL rewards must count the final answer.
Controls: the well-formed completion (no flags at all) and malformed ones both parsers reject.
"""

from __future__ import annotations

import json

import pytest
from openai_harmony import HarmonyError, Role

from gptoss_jax import harmony as H
from gptoss_jax.sampling import Generation
from gptoss_jax.train import eval as eval_lib
from gptoss_jax.train import rewards as rewards_lib

FLAGS = ("malformed", "incomplete", "warnings")

WELL_FORMED = (
    "<|channel|>analysis<|message|>2 + 2 is basic.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>"
)

# (name, completion text after "<|start|>assistant", parser kwargs, {flag key: words expected})
ACCEPTED = [
    ("stop stripped", WELL_FORMED[: -len("<|return|>")], {}, {"incomplete": "truncated"}),
    ("stop stripped, final only", "<|channel|>final<|message|>4", {}, {"incomplete": "truncated"}),
    (
        "call stripped",
        '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"SF"}',
        {},
        {"incomplete": "truncated"},
    ),
    ("no channel", "<|message|>4<|return|>", {}, {"warnings": "missing channel"}),
    ("no channel, stop stripped", "<|message|>4", {}, {"warnings": "missing channel", "incomplete": "truncated"}),
    (
        "recipient outside known namespaces",
        "<|channel|>commentary to=shell.exec<|message|>ls<|call|>",
        {},
        {"warnings": "unknown recipient 'shell.exec'"},
    ),
    (
        "recipient not a declared tool",
        "<|channel|>commentary to=functions.nope<|message|>{}<|call|>",
        {"tools": ["functions.get_weather"]},
        {"warnings": "'functions.nope' is not a declared tool"},
    ),
]

REJECTED = [  # openai-harmony raises in both modes; ours keeps the text, flagged malformed
    ("text after the terminator", "<|channel|>final<|message|>4<|end|>stray words", "missing <|start|>"),
    ("header cut short", "<|channel|>final", "truncated in the header"),
]


def oracle(encoding, tokens, strict):
    parsed = encoding.parse_messages_from_completion_tokens(tokens, Role.ASSISTANT, strict=strict)
    return json.loads(json.dumps([m.to_dict() for m in parsed]))


def unflagged(messages):
    return [{k: v for k, v in m.items() if k not in FLAGS} for m in messages]


def ours(tokens, tokenizer, **kwargs):
    parsed = H.parse_completion(tokens, tokenizer, **kwargs)
    parser = H.StreamParser(tokenizer, **kwargs)
    streamed = [m for t in tokens for m in parser.feed(t)] + parser.finish()
    assert streamed == parsed
    return parsed


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
def test_well_formed_control(strict, tokenizer, harmony_encoding):
    tokens = harmony_encoding.encode(WELL_FORMED, allowed_special="all")
    parsed = ours(tokens, tokenizer, tools=["functions.get_weather"])
    assert parsed == oracle(harmony_encoding, tokens, strict)  # no flag keys at all
    assert eval_lib.final_answer(parsed) == "4"


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
@pytest.mark.parametrize("name,text,kwargs,flags", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_accepted_edges_are_flagged_not_malformed(name, text, kwargs, flags, strict, tokenizer, harmony_encoding):
    tokens = harmony_encoding.encode(text, allowed_special="all")
    expected = oracle(harmony_encoding, tokens, strict)  # raises if the oracle rejected it
    parsed = ours(tokens, tokenizer, **kwargs)
    assert unflagged(parsed) == expected
    assert not any(m.get("malformed") for m in parsed), parsed
    for key in FLAGS:
        got = " | ".join(m[key] for m in parsed if key in m)
        if key in flags:
            assert flags[key] in got, (key, parsed)
        else:
            assert not got, (key, parsed)


def test_declared_tools_control(tokenizer, harmony_encoding):
    text = "<|channel|>commentary to=functions.get_weather<|message|>{}<|call|>"
    tokens = harmony_encoding.encode(text, allowed_special="all")
    for tools in (None, ["functions.get_weather"]):
        assert ours(tokens, tokenizer, tools=tools) == oracle(harmony_encoding, tokens, True)
    flagged = ours(tokens, tokenizer, tools=["functions.get_time"])
    assert flagged[0]["warnings"] == "recipient 'functions.get_weather' is not a declared tool"


@pytest.mark.parametrize("name,text,reason", REJECTED, ids=[c[0] for c in REJECTED])
def test_rejected_by_both(name, text, reason, tokenizer, harmony_encoding):
    tokens = harmony_encoding.encode(text, allowed_special="all")
    for strict in (True, False):
        with pytest.raises(HarmonyError):
            oracle(harmony_encoding, tokens, strict)
    parsed = ours(tokens, tokenizer)
    assert reason in " | ".join(m.get("malformed", "") for m in parsed), parsed


# ------------------------------------------------------------------------------ eval and RL rewards
QUESTION = [H.user("What is 2 + 2?"), H.assistant("4", channel="final")]


def completion_tokens(harmony_encoding, text, strip_stop):
    tokens = harmony_encoding.encode(text, allowed_special="all")
    return tokens[:-1] if strip_stop else tokens


@pytest.mark.parametrize(
    "text,strip_stop,correct",
    [
        (WELL_FORMED, False, True),  # control: well formed
        (WELL_FORMED, True, True),  # the server stripped <|return|>
        (WELL_FORMED.replace(">4<", ">5<"), True, False),  # control: stripped and wrong
        ("<|channel|>analysis<|message|>hmm<|end|><|start|>assistant<|channel|>final", False, False),  # malformed
        ("<|message|>4<|return|>", False, False),  # no channel: accepted, but not a final answer
    ],
)
def test_task_accuracy_counts_stripped_stop(text, strip_stop, correct, tokenizer, harmony_encoding):
    tokens = completion_tokens(harmony_encoding, text, strip_stop)
    prompts = []

    def generate(model, tok, rendered, **kwargs):
        prompts.extend(rendered)
        return Generation([list(tokens)] * len(rendered), ["stop"] * len(rendered), [len(r) for r in rendered])

    result = eval_lib.task_accuracy(None, tokenizer, [QUESTION], generate=generate)
    assert prompts == [H.render_for_completion(QUESTION[:1], tokenizer)]
    assert result["right"] == [correct]
    assert (result["examples"][0]["answer"] == "4") == correct


@pytest.mark.parametrize(
    "text,strip_stop,reason,expected",
    [
        # sampling stopped on <|return|>: the tokens carry it (control) or it was stripped
        (WELL_FORMED, False, "stop", {"exact_match": 1.0, "numeric_match": 1.0, "format": 1.0}),
        (WELL_FORMED, True, "stop", {"exact_match": 1.0, "numeric_match": 1.0, "format": 0.0}),
        (WELL_FORMED.replace(">4<", ">5<"), True, "stop", {"exact_match": 0.0, "numeric_match": 0.0, "format": 0.0}),
        # cut at the length limit inside the final message: the answer may be cut short, not rewarded
        (WELL_FORMED, True, "length", {"exact_match": 0.0, "numeric_match": 0.0, "format": 0.0}),
        ("<|message|>4<|return|>", False, "stop", {"exact_match": 0.0, "numeric_match": 0.0, "format": 0.0}),
    ],
)
def test_rl_rewards_count_stripped_stop(text, strip_stop, reason, expected, tokenizer, harmony_encoding):
    tokens = completion_tokens(harmony_encoding, text, strip_stop)
    gen = Generation([tokens], [reason], [0])
    # as train/rl.py builds them
    completions = [
        rewards_lib.Completion(H.parse_completion(t, tokenizer), len(t), r == "stop")
        for t, r in zip(gen.tokens, gen.stop_reason)
    ]
    spec = rewards_lib.from_config({name: 1.0 for name in expected})
    total, parts, errors = rewards_lib.score(completions, ["4"], spec)
    assert {name: values[0] for name, values in parts.items()} == expected
    assert errors == {name: 0 for name in expected}
