"""gptoss_jax.harmony against openai-harmony 0.0.8 (the `harmony_encoding` fixture), token for token.

Both libraries get the same message dicts: ours directly, openai-harmony's through
`Conversation.from_json`. Every conversation in CASES is compared in five ways (render with and
without analysis dropping, completion prompt, training tokens with and without dropping).
"""

from __future__ import annotations

import json
import re

import pytest

# the oracle is a test dependency: missing means failing, not skipping
from openai_harmony import Conversation, Message, RenderConversationConfig, Role

from gptoss_jax import harmony as H

# ------------------------------------------------------------------------------ fixtures / helpers
SIMPLE_CONVO = (  # spec §5.7, openai-harmony test-data/test_simple_convo.txt
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\n\nReasoning: medium\n\n# Valid channels: analysis, commentary, final. "
    "Channel must be included for every message.<|end|><|start|>user<|message|>What is 2 + 2?<|end|>"
    "<|start|>assistant"
)

# spec §4 test vector: a sampled completion after "<|start|>assistant"
VECTOR_TEXT = (
    '<|channel|>analysis<|message|>User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.'
    "<|end|><|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>"
)
VECTOR = [
    int(x)
    for x in (
        "200005 35644 200008 1844 31064 25 392 4827 382 220 17 659 220 17 16842 12295 81645 13 51441 6052 13 "
        "200007 200006 173781 200005 17196 200008 17 659 220 17 314 220 19 13 200002"
    ).split()
]


def oracle_conversation(messages) -> Conversation:
    return Conversation.from_json(json.dumps({"messages": messages}))


def plain(obj):
    """openai-harmony's dicts hold Role / ReasoningEffort enums; compare as JSON."""
    return json.loads(json.dumps(obj))


def oracle_parse(encoding, tokens, role="assistant"):
    parsed = encoding.parse_messages_from_completion_tokens(tokens, None if role is None else Role(role))
    return plain([m.to_dict() for m in parsed])


def special_text_tokens(tokenizer, text: str) -> list[int]:
    """Tokens of text that spells special tokens as <|name|>, each mapped to its special id."""
    out = []
    for piece in re.split(r"(<\|[a-z_0-9]+\|>)", text):
        if re.fullmatch(r"<\|[a-z_0-9]+\|>", piece):
            out.append(tokenizer.token_id(piece))
        elif piece:
            out += tokenizer.encode(piece)
    return out


# ------------------------------------------------------------------------------ schemas
WEATHER = {  # spec §5.7 / openai-harmony test_render_functions_with_parameters
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
    },
    "required": ["location"],
}
MULTI_WEATHER = {
    "type": "object",
    "properties": {
        "locations": {
            "type": "array",
            "items": {"type": "string"},
            "description": 'List of city and state, e.g. ["San Francisco, CA", "New York, NY"]',
        },
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
    },
    "required": ["locations"],
}
KITCHEN_SINK = {
    "description": "params object",
    "type": "object",
    "properties": {
        "string": {"type": "string", "title": "STRING", "description": "A string", "examples": ["hello", "world"]},
        "string_nullable": {
            "type": "string",
            "nullable": True,
            "description": "A nullable string",
            "default": "the default",
        },
        "string_enum": {"type": "string", "enum": ["a", "b", "c"]},
        "oneof_string_or_number": {
            "oneOf": [
                {"type": "string", "default": "default_string_in_oneof"},
                {"type": "number", "description": "numbers can happen too"},
            ],
            "description": "a oneof",
            "default": 20,
        },
        "oneof_same_desc": {
            "oneOf": [{"type": "string", "description": "same"}, {"type": "boolean", "nullable": True}],
            "description": "same",
        },
    },
}
NESTED = {
    "type": "object",
    "properties": {
        "user": {
            "type": "object",
            "description": "Who asks",
            "properties": {
                "id": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string", "enum": ["x", "y"]}},
                "address": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "default": "Paris"}},
                    "required": ["city"],
                },
            },
            "required": ["id"],
        },
        "points": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"x": {"type": "number"}, "y": {"type": "number", "default": 0.5}},
                "required": ["x"],
            },
        },
        "anything": {"type": "array"},
    },
    "required": ["user"],
}
ODD_TYPES = {
    "type": "object",
    "properties": {
        "id": {"type": ["integer", "string"], "default": -1},
        "flag": {"type": "boolean", "default": False},
        "big": {"type": "number", "default": 1e20},
        "tiny": {"type": "number", "default": 1.5e-7},
        "exact": {"type": "number", "default": 1e16},
        "frac": {"type": "number", "default": 123456.789},
        "maybe": {"type": ["number", "null"], "default": None},
        "obj_default": {"type": "object", "default": {"a": [1, "b", None]}},
        "unknown": {"type": "mystery"},
        "no_type": {"description": "no type at all", "enum": ["p", "q"]},
        "quoted": {"type": "string", "default": 'say "hi" é'},
        "int_enum": {"type": "integer", "enum": [1, 2], "default": 2},
    },
    "required": ["id", "flag"],
}


def dev_tools(*tools, instructions="Answer concisely."):
    return H.developer_message(instructions, list(tools))


def tool(name, description, parameters=None):
    out = {"name": name, "description": description}
    if parameters is not None:
        out["parameters"] = parameters
    return out


def raw_dev(content: dict) -> dict:
    return {"role": "developer", "name": None, "content": [{"type": "developer_content", **content}]}


SYS = H.system_message()
SYS_DATED_HIGH = H.system_message(current_date="2025-06-28", reasoning_effort="high")
Q = H.user("What is 2 + 2?")

# ------------------------------------------------------------------------------ conversations
CASES: list[tuple[str, list[dict]]] = [
    ("default_system", [SYS, Q]),
    ("effort_low", [H.system_message(reasoning_effort="low"), Q]),
    ("effort_medium_upper", [H.system_message(reasoning_effort="MEDIUM"), Q]),
    ("effort_high", [H.system_message(reasoning_effort="High"), Q]),
    ("effort_none", [H.system_message(reasoning_effort=None), Q]),
    ("current_date", [H.system_message(current_date="2025-06-28"), Q]),
    (
        "dates_and_cutoff",
        [
            H.system_message(current_date="2021-01-01", knowledge_cutoff="2021-01", channels=["analysis", "final"]),
            H.user("What is 42 * pi?"),
        ],
    ),
    ("no_identity_no_cutoff", [H.system_message(model_identity=None, knowledge_cutoff=None), Q]),
    (
        "custom_identity_optional_channels",
        [H.system_message(model_identity="You are a pirate.", channel_required=False), Q],
    ),
    ("no_channels", [H.system_message(channels=None), Q]),
    ("system_dict_defaults", [{"role": "system", "content": [{"type": "system_content"}]}, Q]),
    ("system_plain_text", [{"role": "system", "content": "You are terse."}, Q]),
    (
        "developer_instructions",
        [
            SYS,
            H.developer_message("Answer the user's questions like a robot."),
            H.user("What is the capital of the largest country in the world?"),
        ],
    ),
    ("developer_multiline_unicode", [SYS_DATED_HIGH, H.developer_message("Règle 1:\n  sois bref.\n\nRule 2: 🙂\n"), Q]),
    ("tool_no_parameters", [SYS_DATED_HIGH, dev_tools(tool("get_location", "Gets the location of the user.")), Q]),
    (
        "tool_weather_enum_default",
        [
            SYS_DATED_HIGH,
            dev_tools(tool("get_current_weather", "Gets the current weather in the provided location.", WEATHER)),
            H.user("What is the weather like in SF?"),
        ],
    ),
    (
        "tools_render_functions_with_parameters",
        [
            SYS_DATED_HIGH,
            dev_tools(
                tool("get_location", "Gets the location of the user."),
                tool("get_current_weather", "Gets the current weather in the provided location.", WEATHER),
                tool(
                    "get_multiple_weathers",
                    "Gets the current weather in the provided list of locations.",
                    MULTI_WEATHER,
                ),
                tool("kitchensink", "A function with various complex schemas.", KITCHEN_SINK),
                instructions="Always respond in riddles",
            ),
            H.user("What is the weather like in SF?"),
        ],
    ),
    ("tool_nested_objects_arrays", [SYS, dev_tools(tool("lookup", "Look a user up.\nTwo lines.\n", NESTED)), Q]),
    ("tool_odd_types_and_defaults", [SYS, dev_tools(tool("odd", "Odd schema", ODD_TYPES)), Q]),
    (
        "tool_empty_schemas",
        [
            SYS,
            dev_tools(
                tool("empty", "", {}),
                tool("bare_object", "b", {"type": "object"}),
                tool("openai_wrapped", "w", {"type": "object", "properties": {}}),
                instructions=None,
            ),
            Q,
        ],
    ),
    (
        "tool_openai_function_wrapper",
        [
            SYS,
            H.developer_message(
                None,
                [
                    {
                        "type": "function",
                        "function": tool(
                            "ping",
                            "Ping a host.",
                            {"type": "object", "properties": {"host": {"type": "string"}}, "required": ["host"]},
                        ),
                    }
                ],
            ),
            Q,
        ],
    ),
    (
        "functions_namespace_empty",
        [SYS, raw_dev({"instructions": "x", "tools": {"functions": {"name": "functions", "tools": []}}}), Q],
    ),
    (
        "developer_extra_namespaces_sorted",
        [
            SYS,
            raw_dev(
                {
                    "instructions": None,
                    "tools": {
                        "zeta": {"name": "zeta", "description": "Last one\nof two lines", "tools": [tool("z", "zz")]},
                        "functions": {"name": "functions", "tools": [tool("f", "ff")]},
                        "alpha": {"name": "alpha", "description": "No tools here.\n\nJust text.", "tools": []},
                    },
                }
            ),
            Q,
        ],
    ),
    ("browser_tool", [H.system_message(current_date="2025-06-28", browser_tool=True), Q]),
    ("browser_and_python", [H.system_message(current_date="2025-06-28", browser_tool=True, python_tool=True), Q]),
    (
        "browser_and_function",
        [
            H.system_message(current_date="2025-06-28", browser_tool=True),
            dev_tools(
                tool(
                    "lookup_weather",
                    "Use this tool to lookup the weather in a given location.",
                    {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
                ),
                instructions=None,
            ),
        ],
    ),
    (
        "spec_5_7_tool_call_and_result",
        [
            SYS_DATED_HIGH,
            dev_tools(tool("get_current_weather", "Gets the current weather in the provided location.", WEATHER)),
            H.user("What is the weather like in SF?"),
            H.assistant("Need to call get_current_weather.", channel="analysis"),
            H.tool_call("functions.get_current_weather", '{"location":"San Francisco, CA"}'),
            H.tool_result("functions.get_current_weather", '{"sunny": true, "temperature": 20}'),
        ],
    ),
    (
        "tool_call_answered_then_next_turn",
        [
            SYS_DATED_HIGH,
            dev_tools(tool("get_current_weather", "Gets the current weather in the provided location.", WEATHER)),
            H.user("What is the weather like in SF?"),
            H.assistant("Need to call get_current_weather.", channel="analysis"),
            H.tool_call("functions.get_current_weather", {"location": "San Francisco, CA"}),
            H.tool_result("functions.get_current_weather", '{"sunny": true, "temperature": 20}'),
            H.assistant("It's sunny and 20 °C.", channel="final"),
            H.user("And tomorrow?"),
        ],
    ),
    (
        "preamble_and_plain_json_content_type",
        [
            SYS,
            dev_tools(tool("search", "Search.", {"type": "object", "properties": {"q": {"type": "string"}}})),
            Q,
            H.assistant("Let me search that.", channel="commentary"),
            H.assistant('{"q": "2+2"}', channel="commentary", recipient="functions.search", content_type="json"),
            H.tool_result("functions.search", "4"),
        ],
    ),
    (
        "python_tool_call_on_analysis",
        [
            H.system_message(python_tool=True),
            Q,
            H.assistant("print(2 + 2)", channel="analysis", recipient="python", content_type="code"),
            H.tool_result("python", "4", channel="analysis"),
        ],
    ),
    (
        "constrain_marker_only_content_type",
        [SYS, Q, H.assistant("{}", channel="commentary", recipient="functions.f", content_type="<|constrain|>")],
    ),
    (
        "dropping_cot_by_default",
        [
            Q,
            H.assistant("User asks: “What is 2 + 2?” Simple arithmetic. Provide answer.", channel="analysis"),
            H.assistant("2 + 2 equals 4.", channel="final"),
            H.user("What about 9 / 2?"),
        ],
    ),
    (
        "does_not_drop_if_ongoing_analysis",
        [
            H.user("What is the weather in SF?"),
            H.assistant(
                "User asks: “What is the weather in SF?” We need to use lookup_weather tool.", channel="analysis"
            ),
            H.tool_call("functions.lookup_weather", '{"location": "San Francisco"}'),
            {
                "role": "tool",
                "name": "functions.lookup_weather",
                "content": [{"type": "text", "text": '{"temperature": 20, "description": "sunny"}'}],
            },
        ],
    ),
    (
        "keep_analysis_between_finals",
        [
            Q,
            H.assistant("thinking 2+2", channel="analysis"),
            H.assistant("4", channel="final"),
            H.user("What is 3 + 5?"),
            H.assistant("thinking 3+5", channel="analysis"),
            H.assistant("8", channel="final"),
        ],
    ),
    ("training_single_turn", [SYS, Q, H.assistant("Simple.", channel="analysis"), H.assistant("4", channel="final")]),
    (
        "last_assistant_is_tool_call",
        [SYS, Q, H.assistant("call it", channel="analysis"), H.tool_call("functions.calc", {"expr": "2+2"})],
    ),
    ("final_with_recipient_last", [Q, H.assistant("odd", channel="final", recipient="functions.x")]),
    (
        "unicode_whitespace",
        [
            SYS,
            H.user("  leading, trailing  \t\n\nnaïve café — 東京 🦜🦩 𝔘𝔫𝔦\r\nZWJ 👩‍💻 \u200b end  "),
            H.assistant("Ответ:\n\n\t4 ✓", channel="final"),
        ],
    ),
    (
        "special_token_text_in_content",
        [
            SYS,
            H.user("Please print <|end|> and <|start|>assistant literally."),
            H.assistant("<|return|> is just text here", channel="final"),
        ],
    ),
    (
        "names_and_recipient_all",
        [
            H.user("hi", name="bob"),
            {"role": "user", "name": None, "recipient": "all", "content": [{"type": "text", "text": "to all"}]},
            {"role": "assistant", "name": "helper", "channel": "final", "content": [{"type": "text", "text": "hello"}]},
        ],
    ),
    (
        "multiple_text_parts_and_empty",
        [
            {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]},
            H.assistant("", channel="final"),
        ],
    ),
    ("no_system_message", [H.user("Just a question")]),
    (
        "tool_message_without_channel",
        [
            Q,
            H.tool_call("functions.f", "{}"),
            {"role": "tool", "name": "functions.f", "recipient": "assistant", "content": "plain string content"},
        ],
    ),
]


def test_case_count():
    names = [name for name, _ in CASES]
    assert len(set(names)) == len(names)
    print(f"\n{len(CASES)} conversations compared token for token with openai-harmony")
    assert len(CASES) >= 30


@pytest.mark.parametrize("name,messages", CASES, ids=[c[0] for c in CASES])
def test_render_matches_openai_harmony(name, messages, tokenizer, harmony_encoding):
    enc, conv = harmony_encoding, oracle_conversation(messages)
    for drop in (True, False):
        cfg = RenderConversationConfig(auto_drop_analysis=drop)
        mine = H.render_conversation(messages, tokenizer, auto_drop_analysis=drop)
        theirs = enc.render_conversation(conv, cfg)
        assert mine == theirs, (
            f"render_conversation drop={drop}:\n{enc.decode(theirs)!r}\n!=\n{tokenizer.decode(mine)!r}"
        )
        tokens, mask = H.render_for_training(messages, tokenizer, auto_drop_analysis=drop)
        assert tokens == enc.render_conversation_for_training(conv, cfg)
        assert len(mask) == len(tokens)
    prompt = H.render_for_completion(messages, tokenizer)
    assert prompt == enc.render_conversation_for_completion(conv, Role.ASSISTANT)
    assert prompt[-2:] == [tokenizer.token_id("<|start|>"), 173781]


def test_single_messages_and_other_next_roles(tokenizer, harmony_encoding):
    checked = 0
    for _, messages in CASES[:12] + CASES[26:32]:
        for msg in messages:
            assert H.render_message(msg, tokenizer) == harmony_encoding.render(Message.from_dict(msg))
            checked += 1
    assert checked > 20
    messages = dict(CASES)["spec_5_7_tool_call_and_result"]
    for role in ("user", "tool", "system"):
        assert H.render_for_completion(
            messages, tokenizer, role
        ) == harmony_encoding.render_conversation_for_completion(oracle_conversation(messages), Role(role))


def test_accepts_openai_harmony_objects_and_messages_wrapper(tokenizer):
    messages = dict(CASES)["spec_5_7_tool_call_and_result"]
    conv = oracle_conversation(messages)
    expected = H.render_conversation(messages, tokenizer)
    assert H.render_conversation(conv, tokenizer) == expected
    assert H.render_conversation(list(conv.messages), tokenizer) == expected
    assert H.render_conversation({"messages": messages}, tokenizer) == expected


def test_builder_dicts_survive_openai_harmony_round_trip():
    for _, messages in CASES:
        for msg in messages:
            back = plain(Message.from_dict(msg).to_dict())
            assert back["role"] == msg["role"] and back.get("channel") == msg.get("channel")
            assert back.get("recipient") == msg.get("recipient")


# ------------------------------------------------------------------------------ spec literals
def test_spec_simple_convo(tokenizer, harmony_encoding):
    tokens = H.render_for_completion([H.system_message(), H.user("What is 2 + 2?")], tokenizer)
    assert tokenizer.decode(tokens) == SIMPLE_CONVO
    assert tokens == harmony_encoding.encode(SIMPLE_CONVO, allowed_special="all")


def test_spec_vector_render_and_parse(tokenizer, harmony_encoding):
    analysis = H.assistant('User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.', channel="analysis")
    final = H.assistant("2 + 2 = 4.", channel="final")
    assert tokenizer.decode(VECTOR) == VECTOR_TEXT
    assert special_text_tokens(tokenizer, VECTOR_TEXT) == VECTOR
    tokens, mask = H.render_for_training([Q, analysis, final], tokenizer, auto_drop_analysis=False)
    assert tokens[-len(VECTOR) - 2 :] == [200006, 173781] + VECTOR
    parsed = H.parse_completion(VECTOR, tokenizer)
    assert parsed == [analysis, final]
    assert parsed == oracle_parse(harmony_encoding, VECTOR)


def test_spec_developer_tools_text(tokenizer):
    text = tokenizer.decode(
        H.render_message(
            dev_tools(tool("get_current_weather", "Gets the current weather in the provided location.", WEATHER)),
            tokenizer,
        )
    )
    assert text == (
        "<|start|>developer<|message|># Instructions\n\nAnswer concisely.\n\n# Tools\n\n## functions\n\n"
        "namespace functions {\n\n// Gets the current weather in the provided location.\n"
        "type get_current_weather = (_: {\n// The city and state, e.g. San Francisco, CA\nlocation: string,\n"
        'format?: "celsius" | "fahrenheit", // default: celsius\n}) => any;\n\n} // namespace functions<|end|>'
    )


def test_function_tools_line_follows_developer_message(tokenizer):
    with_tools = dict(CASES)["spec_5_7_tool_call_and_result"]
    line = "Calls to these tools must go to the commentary channel: 'functions'."
    assert line in tokenizer.decode(H.render_conversation(with_tools, tokenizer))
    assert line not in tokenizer.decode(H.render_conversation(dict(CASES)["browser_tool"], tokenizer))
    assert line in tokenizer.decode(H.render_message(SYS, tokenizer, conversation_has_function_tools=True))


# ------------------------------------------------------------------------------ training mask
def test_training_mask_literal(tokenizer):
    tokens, mask = H.render_for_training([H.user("hi"), H.assistant("hello", channel="final")], tokenizer)
    # <|start|>user<|message|>hi<|end|> <|start|>assistant<|channel|>final<|message|>hello<|return|>
    assert tokens == [200006, 1428, 200008, 3686, 200007, 200006, 173781, 200005, 17196, 200008, 24912, 200002]
    assert mask == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]


def test_training_mask_per_message(tokenizer):
    messages = dict(CASES)["spec_5_7_tool_call_and_result"] + [H.assistant("Sunny, 20 °C.", channel="final")]
    tokens, mask = H.render_for_training(messages, tokenizer, auto_drop_analysis=False)
    start = tokenizer.token_id("<|start|>")
    offset = 0
    previous = None
    for msg in messages:
        n = len(H.render_message(msg, tokenizer, conversation_has_function_tools=True))
        want = 1 if msg["role"] == "assistant" else 0
        # the model writes <|start|> itself only after its own message (analysis -> final)
        assert tokens[offset] == start and mask[offset] == (want if previous == "assistant" else 0)
        previous = msg["role"]
        assert mask[offset + 1 : offset + n] == [want] * (n - 1), msg
        offset += n
    assert offset == len(tokens) and tokens[-1] == tokenizer.token_id("<|return|>")
    assert sum(mask) > 0


# ------------------------------------------------------------------------------ validation
def test_reasoning_effort_validated():
    assert H.system_message(reasoning_effort="LoW")["content"][0]["reasoning_effort"] == "Low"
    with pytest.raises(ValueError, match="low, medium, high"):
        H.system_message(reasoning_effort="extreme")
    bad = {"role": "system", "content": [{"type": "system_content", "reasoning_effort": "max"}]}
    with pytest.raises(ValueError, match=r"message 1.*reasoning_effort"):
        H.render_conversation([Q, bad], None)


@pytest.mark.parametrize(
    "bad,pattern",
    [
        ({"role": "robot", "content": "x"}, r"message 1: field 'role'"),
        ({"content": "x"}, r"message 1: field 'role' is missing"),
        ({"role": "user"}, r"message 1: field 'content' is missing"),
        ({"role": "tool", "content": "x"}, r"message 1: field 'name'"),
        ({"role": "user", "content": [{"type": "system_content"}]}, r"message 1.*system_content"),
        ({"role": "user", "content": [{"type": "image"}]}, r"message 1, content\[0\].*'image'"),
        ({"role": "user", "content": [{"type": "text"}]}, r"message 1, content\[0\].*'text'"),
        ({"role": "user", "content": "x", "channel": 3}, r"message 1: field 'channel'"),
        ("not a dict", r"message 1: expected a message dict"),
    ],
)
def test_bad_messages_raise_clear_errors(bad, pattern, tokenizer):
    with pytest.raises(ValueError, match=pattern):
        H.render_conversation([Q, bad], tokenizer)


def test_stop_tokens(tokenizer, harmony_encoding):
    assert H.STOP_TOKENS_ASSISTANT == (200002, 200012) == H.stop_tokens(tokenizer)
    assert set(H.stop_tokens(tokenizer)) == set(harmony_encoding.stop_tokens_for_assistant_actions())
    assert set(H.stop_tokens(tokenizer, include_end=True)) == set(harmony_encoding.stop_tokens())


# ------------------------------------------------------------------------------ parsing
ROUND_TRIPS = [
    [H.assistant("Simple.", channel="analysis"), H.assistant("4", channel="final")],
    [H.assistant("Need the weather.", channel="analysis"), H.tool_call("functions.get_weather", {"location": "Tokyo"})],
    [
        H.assistant("Checking the weather for you.", channel="commentary"),
        H.tool_call("functions.get_weather", '{"location":"San Francisco"}'),
    ],
    [H.assistant("Multi-line\n\n  answer with ünïcode 🦜🦩 𝔘𝔫𝔦 and <|end|> as text.", channel="final")],
    [H.assistant("print(2 + 2)", channel="analysis", recipient="python", content_type="code")],
    [
        H.assistant("search", channel="analysis"),
        H.assistant('{"query": "x"}', channel="analysis", recipient="browser.search", content_type="<|constrain|>json"),
    ],
]


def stream(tokens, tokenizer, role="assistant"):
    parser = H.StreamParser(tokenizer, role)
    out = []
    for t in tokens:
        out += parser.feed(t)
    return out + parser.finish(), parser


@pytest.mark.parametrize("messages", ROUND_TRIPS, ids=range(len(ROUND_TRIPS)))
def test_parse_round_trip_and_oracle(messages, tokenizer, harmony_encoding):
    for training in (False, True):
        tokens = (
            H.render_for_training(messages, tokenizer, auto_drop_analysis=False)[0]
            if training
            else H.render_conversation(messages, tokenizer, auto_drop_analysis=False)
        )
        assert tokens[:2] == [tokenizer.token_id("<|start|>"), 173781]
        completion = tokens[2:]
        parsed = H.parse_completion(completion, tokenizer)
        assert parsed == messages
        assert parsed == oracle_parse(harmony_encoding, completion)
        assert stream(completion, tokenizer)[0] == parsed
        assert H.parse_completion(tokens, tokenizer, role=None) == messages  # from <|start|>


@pytest.mark.parametrize(
    "text,role",
    [
        # the model's habit: to= after the channel (spec §5.7), with and without a space before <|constrain|>
        (
            "<|channel|>commentary to=functions.get_current_weather <|constrain|>json<|message|>"
            '{"location":"SF"}<|call|>',
            "assistant",
        ),
        (
            "<|start|>assistant<|channel|>commentary to=functions.get_weather<|constrain|>json<|message|>"
            '{"a":1}<|call|>',
            None,
        ),
        (
            "<|start|>assistant to=functions.get_weather<|channel|>commentary<|constrain|>json<|message|>{}<|call|>",
            None,
        ),
        ('<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"sunny": true}<|end|>', None),
        (
            "<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>commentary<|message|>b<|end|>"
            "<|start|>assistant<|channel|>final<|message|>c<|return|>",
            "assistant",
        ),
    ],
)
def test_parse_matches_oracle(text, role, tokenizer, harmony_encoding):
    tokens = harmony_encoding.encode(text, allowed_special="all")
    parsed = H.parse_completion(tokens, tokenizer, role)
    assert parsed == oracle_parse(harmony_encoding, tokens, role)
    assert all("malformed" not in m for m in parsed)
    assert stream(tokens, tokenizer, role)[0] == parsed


def test_stream_current_and_split_utf8(tokenizer):
    text = "🦜🦩 鸚鵡 𝔘𝔫𝔦"
    tokens = special_text_tokens(tokenizer, f"<|channel|>final<|message|>{text}<|return|>")
    parser = H.StreamParser(tokenizer)
    assert parser.current["state"] == "header"
    seen = []
    for t in tokens[:-1]:
        assert parser.feed(t) == []
        current = parser.current
        if current["state"] == "content":
            assert current["channel"] == "final"
            assert "\ufffd" not in current["content"]  # half a character is held back
            assert text.startswith(current["content"])
            seen.append(current["content"])
    assert seen[-1] == text and len(set(seen)) > 3
    assert parser.feed(tokens[-1]) == [H.assistant(text, channel="final")]
    assert parser.current is None and parser.finish() == []


MALFORMED = [
    # (completion text, role given, words expected in "malformed" (or, as (key, words), in the
    # "incomplete" / "warnings" flags), expected (channel, text) per message)
    ("<|message|>hello<|end|>", "assistant", [("warnings", "missing channel")], [(None, "hello")]),
    (
        "<|channel|>final<|message|>the answer is",
        "assistant",
        [("incomplete", "truncated")],
        [("final", "the answer is")],
    ),
    ("<|channel|>final<|reserved_200010|><|message|>x<|end|>", "assistant", ["<|reserved_200010|>"], [("final", "x")]),
    (
        "<|channel|>final some junk<|message|>x<|end|>",
        "assistant",
        [("warnings", "unknown recipient 'some'")],
        [("final", "x")],
    ),
    ("junk<|channel|>final<|message|>x<|end|>", "assistant", ["unexpected text before <|channel|>"], [("final", "x")]),
    (
        "<|channel|>commentary to=shell.exec<|message|>ls<|call|>",
        "assistant",
        [("warnings", "unknown recipient 'shell.exec'")],
        [("commentary", "ls")],
    ),
    (
        "<|channel|>final The answer\nis 4.<|end|>",
        "assistant",
        ["without <|message|>"],
        [("final", "The answer\nis 4.")],
    ),
    (
        "<|channel|>final<|message|>a<|end|>stray words",
        "assistant",
        ["missing <|start|>"],
        [("final", "a"), (None, "stray words")],
    ),
    (
        "<|channel|>analysis<|message|>abc<|start|>assistant<|channel|>final<|message|>d<|return|>",
        "assistant",
        ["no terminator"],
        [("analysis", "abc"), ("final", "d")],
    ),
    (
        "<|channel|>final<|message|>a<|channel|>b<|return|>",
        "assistant",
        ["<|channel|> inside content"],
        [("final", "a<|channel|>b")],
    ),
    ("<|channel|>final<|message|>x<|call|>", "assistant", ["no recipient"], [("final", "x")]),
    ("<|channel|>thoughts<|message|>x<|end|>", "assistant", ["unknown channel 'thoughts'"], [("thoughts", "x")]),
    ("<|channel|><|message|>x<|end|>", "assistant", ["empty channel"], [(None, "x")]),
    ("<|channel|>analysis", "assistant", ["truncated in the header"], [("analysis", "")]),
    ("<|start|>robot<|message|>beep<|end|>", None, ["unknown role 'robot'"], [(None, "beep")]),
]


@pytest.mark.parametrize("text,role,reasons,expected", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_is_flagged_best_effort(text, role, reasons, expected, tokenizer):
    tokens = special_text_tokens(tokenizer, text)
    parsed = H.parse_completion(tokens, tokenizer, role)
    assert [(m.get("channel"), m["content"][0]["text"]) for m in parsed] == expected
    for reason in reasons:
        key, words = reason if isinstance(reason, tuple) else ("malformed", reason)
        flags = " | ".join(m.get(key, "") for m in parsed)
        assert words in flags, (key, parsed)
    assert stream(tokens, tokenizer, role)[0] == parsed
