"""The harmony chat format of gpt-oss: rendering conversations to tokens and parsing model output.

Pure Python; tokens come from our `gptoss_jax.tokenizer.Tokenizer` (`encode` for ordinary text,
`token_id("<|start|>")` for special tokens). The output is token-for-token what openai-harmony
0.0.8 (`HarmonyEncoding`, the Rust renderer in `src/encoding.rs`) produces for the same input; the
test suite checks this on more than 30 conversations.

Data shape. Messages are plain dicts in openai-harmony's JSON shape (`Message.to_dict()`), so they
move between the two libraries unchanged:

    {"role": "assistant", "name": None, "content": [{"type": "text", "text": "..."}],
     "channel": "final", "recipient": "functions.f", "content_type": "<|constrain|>json"}

A conversation is `{"messages": [...]}` or a list of such dicts (openai_harmony `Message` /
`Conversation` objects are accepted too, via their `to_dict`). System and developer messages carry
a single `{"type": "system_content", ...}` / `{"type": "developer_content", ...}` part; build them
with `system_message()` and `developer_message()`.

Notable behaviour (all checked against openai-harmony):

* The header is tokenized piece by piece, not as one string: role, `:name`, ` to={recipient}`, the
  `<|channel|>` token, the channel, then ` {content_type}`. A content type starting with
  `<|constrain|>` becomes the text " ", the special token, then the rest as text. Recipient "all"
  is not written. Tool messages write their author name (`functions.get_weather`) instead of a role.
* Every content part is encoded separately (two text parts "a", "b" are `encode("a") + encode("b")`).
* A missing key in a `system_content` dict takes openai-harmony's Python default (identity, cutoff
  2024-06, effort medium, channels analysis/commentary/final) - that is what `SystemContent
  .from_dict` does; an explicit `None` leaves the line out. Our builders always write every key.
* The "Calls to these tools must go to the commentary channel: 'functions'." line is decided by the
  conversation, not the system message: it appears when any developer message has a non-empty
  `functions` tool namespace.
* Tool namespaces are rendered sorted by their key (openai-harmony keeps them in a BTreeMap);
  properties of a JSON schema keep their order.
* Analysis dropping (`auto_drop_analysis=True`): if the last assistant message is on `final`,
  every `analysis` message before the first `final` message is dropped - so in
  user, a1, f1, user, a2, f2 only a1 goes. openai-harmony applies this in
  `render_conversation_for_training` too (its Python default), which drops the chain of thought
  of a single-turn [user, analysis, final] example; `render_for_training` mirrors that by default.
* `json_schema_to_typescript` reproduces openai-harmony's output including its oddities: a nested
  object's description is written both above the property and again after `key: `, nested
  closing braces carry the nested indent, and an array of enums is `"x" | "y"[]` (no parentheses).
* Training mask (`render_for_training`): 1 for every token of an assistant message after its
  `<|start|>`, 0 elsewhere.
* Parsing is best-effort: malformed output never raises; the message gets a `"malformed"` key with
  the reasons (missing channel, no terminator, stray special tokens, unknown recipient, ...).
  Well-formed output parses exactly as openai-harmony's parser does. Where openai-harmony raises
  (text after a terminator, a header cut short) we return the text, flagged; where it silently
  keeps going we flag (a `<|start|>` inside content ends the message here, while openai-harmony
  would keep it as content text; `user:name` headers are read as role and name).
"""

from __future__ import annotations

import codecs
import enum
import json
import re
from decimal import Decimal
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "STOP_TOKENS_ASSISTANT", "DEFAULT_MODEL_IDENTITY", "DEFAULT_CHANNELS", "ROLES",
    "render_message", "render_conversation", "render_for_completion", "render_for_training",
    "system_message", "developer_message", "user", "assistant", "tool_call", "tool_result",
    "builtin_tool_namespace", "normalize_conversation", "json_schema_to_typescript",
    "parse_completion", "StreamParser", "stop_tokens",
]

# <|return|> and <|call|>: where sampling an assistant turn stops. Not <|end|>: the model emits it
# between its own analysis and final messages.
STOP_TOKENS_ASSISTANT = (200002, 200012)

DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"
DEFAULT_CHANNELS = ("analysis", "commentary", "final")
ROLES = ("system", "developer", "user", "assistant", "tool")
KNOWN_NAMESPACES = ("functions", "browser", "python")

# openai-harmony's JSON spells efforts "Low"/"Medium"/"High"; the rendered text is lower case.
_EFFORTS = {"low": "Low", "medium": "Medium", "high": "High"}

START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL = (
    "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>")


def stop_tokens(tokenizer, *, include_end: bool = False) -> tuple[int, ...]:
    """Ids that end sampling of an assistant turn: `<|return|>`, `<|call|>` (and `<|end|>` with
    `include_end`, as in openai-harmony's `stop_tokens()`, which its parser uses)."""
    ids = (tokenizer.token_id(RETURN), tokenizer.token_id(CALL))
    return ids + (tokenizer.token_id(END),) if include_end else ids


# ============================================================================ validation
def _plain(value):
    """Enum members (openai_harmony's Role / ReasoningEffort in `to_dict` output) to their value."""
    return value.value if isinstance(value, enum.Enum) else value


def _effort(value, where: str) -> str | None:
    value = _plain(value)
    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in _EFFORTS:
        raise ValueError(f"{where}: reasoning_effort must be one of low, medium, high "
                         f"(any case), got {value!r}")
    return _EFFORTS[value.lower()]


def _check_str(value, key: str, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string or None, got {type(value).__name__}")
    return value


def _opt_str(d: Mapping, key: str, where: str) -> str | None:
    return _check_str(d.get(key), key, where)


def _normalize_tool(tool: Any, where: str) -> dict:
    if hasattr(tool, "model_dump"):
        tool = tool.model_dump()
    if not isinstance(tool, Mapping):
        raise ValueError(f"{where}: a tool must be a dict, got {type(tool).__name__}")
    if tool.get("type") == "function" and isinstance(tool.get("function"), Mapping):
        tool = tool["function"]  # the OpenAI chat-completions wrapper
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: a tool needs a non-empty string 'name'")
    description = tool.get("description", "")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise ValueError(f"{where}: tool {name!r} field 'description' must be a string")
    out = {"name": name, "description": description}
    if tool.get("parameters") is not None:
        out["parameters"] = tool["parameters"]
    return out


def _normalize_namespaces(tools: Any, where: str) -> dict | None:
    """`tools` of a system/developer content: {key: {"name", "description"?, "tools": [...]}}."""
    if tools is None:
        return None
    if not isinstance(tools, Mapping):
        raise ValueError(f"{where}: field 'tools' must be a dict of tool namespaces")
    out = {}
    for key, ns in tools.items():
        if hasattr(ns, "model_dump"):
            ns = ns.model_dump()
        if not isinstance(ns, Mapping):
            raise ValueError(f"{where}: tool namespace {key!r} must be a dict")
        name = ns.get("name", key)
        if not isinstance(name, str):
            raise ValueError(f"{where}: tool namespace {key!r} needs a string 'name'")
        entries = ns.get("tools")
        if entries is None:
            raise ValueError(f"{where}: tool namespace {key!r} is missing field 'tools'")
        out[key] = {"name": name, "description": _opt_str(ns, "description", where),
                    "tools": [_normalize_tool(t, f"{where}, namespace {key!r}") for t in entries]}
    return out


def _normalize_part(part: Any, role: str, where: str) -> dict:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if hasattr(part, "to_dict"):
        part = part.to_dict()
    if not isinstance(part, Mapping):
        raise ValueError(f"{where}: a content part must be a dict, got {type(part).__name__}")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where}: a text part needs a string field 'text'")
        return {"type": "text", "text": part["text"]}
    if kind == "system_content":
        if role != "system":
            raise ValueError(f"{where}: system_content may only appear in a system message, not {role}")
        # Missing keys: openai-harmony's pydantic defaults (what SystemContent.from_dict gives).
        channel_config = part.get("channel_config", {"valid_channels": list(DEFAULT_CHANNELS),
                                                     "channel_required": True})
        if channel_config is not None:
            if not isinstance(channel_config, Mapping) or not isinstance(
                    channel_config.get("valid_channels"), (list, tuple)):
                raise ValueError(f"{where}: channel_config needs a list 'valid_channels'")
            channel_config = {"valid_channels": [str(c) for c in channel_config["valid_channels"]],
                              "channel_required": bool(channel_config.get("channel_required", False))}
        return {
            "type": "system_content",
            "model_identity": _check_str(part.get("model_identity", DEFAULT_MODEL_IDENTITY),
                                         "model_identity", where),
            "reasoning_effort": _effort(part.get("reasoning_effort", "medium"), where),
            "conversation_start_date": _opt_str(part, "conversation_start_date", where),
            "knowledge_cutoff": _check_str(part.get("knowledge_cutoff", DEFAULT_KNOWLEDGE_CUTOFF),
                                           "knowledge_cutoff", where),
            "channel_config": channel_config,
            "tools": _normalize_namespaces(part.get("tools"), where),
        }
    if kind == "developer_content":
        if role != "developer":
            raise ValueError(f"{where}: developer_content may only appear in a developer message, not {role}")
        return {"type": "developer_content",
                "instructions": _opt_str(part, "instructions", where),
                "tools": _normalize_namespaces(part.get("tools"), where)}
    raise ValueError(f"{where}: unknown content part type {kind!r} "
                     "(expected text, system_content or developer_content)")


def _normalize_message(msg: Any, index: int) -> dict:
    where = f"message {index}"
    if hasattr(msg, "to_dict"):
        msg = msg.to_dict()
    if not isinstance(msg, Mapping):
        raise ValueError(f"{where}: expected a message dict, got {type(msg).__name__}")
    role = _plain(msg.get("role"))
    if role is None:
        raise ValueError(f"{where}: field 'role' is missing")
    if role not in ROLES:
        raise ValueError(f"{where}: field 'role' is {role!r}; expected one of {', '.join(ROLES)}")
    name = _opt_str(msg, "name", where)
    if role == "tool" and not name:
        raise ValueError(f"{where}: field 'name' is required for a tool message (e.g. 'functions.get_weather')")
    if "content" not in msg or msg["content"] is None:
        raise ValueError(f"{where}: field 'content' is missing")
    content = msg["content"]
    if isinstance(content, (str, Mapping)):
        content = [content]
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"{where}: field 'content' must be a string or a list of parts")
    out = {"role": role, "name": name,
           "content": [_normalize_part(p, role, f"{where}, content[{j}]") for j, p in enumerate(content)]}
    for key in ("channel", "recipient", "content_type"):
        value = _opt_str(msg, key, where)
        if value is not None:
            out[key] = value
    return out


def normalize_conversation(conversation: Any) -> list[dict]:
    """Validated messages in canonical form. Raises ValueError naming the bad message and field."""
    if hasattr(conversation, "to_dict") and not isinstance(conversation, Mapping):
        conversation = conversation.to_dict()
    if isinstance(conversation, Mapping):
        if "messages" not in conversation:
            raise ValueError("a conversation dict needs a 'messages' list")
        conversation = conversation["messages"]
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Iterable):
        raise ValueError("a conversation is {'messages': [...]} or a list of message dicts")
    return [_normalize_message(m, i) for i, m in enumerate(conversation)]


# ============================================================================ builders
def system_message(*, model_identity: str | None = DEFAULT_MODEL_IDENTITY,
                   knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF,
                   current_date: str | None = None,
                   reasoning_effort: str | None = "medium",
                   channels: Sequence[str] | None = DEFAULT_CHANNELS,
                   channel_required: bool = True,
                   browser_tool: bool = False,
                   python_tool: bool = False,
                   tools: Sequence[Mapping] | Mapping | None = None) -> dict:
    """A system message with openai-harmony's `SystemContent` (every key written; None = omitted).

    `tools` adds built-in tool namespaces ({"name", "description", "tools": [...]}, a list or a
    dict keyed by name); `browser_tool` / `python_tool` fetch openai-harmony's own definitions
    (see `builtin_tool_namespace`). Function tools belong in `developer_message`; the
    "Calls to these tools must go to the commentary channel" line follows from them.
    """
    namespaces: dict = {}
    if browser_tool:
        namespaces["browser"] = builtin_tool_namespace("browser")
    if python_tool:
        namespaces["python"] = builtin_tool_namespace("python")
    if isinstance(tools, Mapping):
        namespaces.update(tools)
    elif tools:
        for ns in tools:
            if not isinstance(ns, Mapping) or not isinstance(ns.get("name"), str):
                raise ValueError("system_message: each of `tools` must be a namespace dict with a 'name'")
            namespaces[ns["name"]] = ns
    content = {
        "type": "system_content",
        "model_identity": model_identity,
        "reasoning_effort": _effort(reasoning_effort, "system_message"),
        "conversation_start_date": current_date,
        "knowledge_cutoff": knowledge_cutoff,
        "channel_config": None if channels is None else {"valid_channels": list(channels),
                                                         "channel_required": bool(channel_required)},
        "tools": _normalize_namespaces(namespaces, "system_message") if namespaces else None,
    }
    return {"role": "system", "name": None, "content": [content]}


def developer_message(instructions: str | None = None,
                      tools: Sequence[Mapping] | None = None) -> dict:
    """A developer message: `# Instructions` plus function tools
    ([{"name", "description", "parameters": JSON schema}], or OpenAI's {"type": "function",
    "function": {...}} wrapper) in the `functions` namespace."""
    content: dict = {"type": "developer_content", "instructions": instructions, "tools": None}
    if tools:
        content["tools"] = {"functions": {
            "name": "functions", "description": None,
            "tools": [_normalize_tool(t, f"developer_message, tools[{i}]") for i, t in enumerate(tools)]}}
    return {"role": "developer", "name": None, "content": [content]}


def _text_message(role: str, text: str, *, name=None, channel=None, recipient=None, content_type=None):
    if not isinstance(text, str):
        raise ValueError(f"{role} message text must be a string, got {type(text).__name__}")
    msg = {"role": role, "name": name, "content": [{"type": "text", "text": text}]}
    for key, value in (("channel", channel), ("recipient", recipient), ("content_type", content_type)):
        if value is not None:
            msg[key] = value
    return msg


def user(text: str, *, name: str | None = None) -> dict:
    return _text_message("user", text, name=name)


def assistant(text: str, channel: str | None = "final", recipient: str | None = None,
              content_type: str | None = None) -> dict:
    return _text_message("assistant", text, channel=channel, recipient=recipient, content_type=content_type)


def tool_call(recipient: str, arguments: str | Mapping, *, channel: str = "commentary",
              content_type: str | None = "<|constrain|>json") -> dict:
    """An assistant tool call, e.g. `tool_call("functions.get_weather", {"location": "SF"})`."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments)
    return assistant(arguments, channel=channel, recipient=recipient, content_type=content_type)


def tool_result(name: str, text: str, channel: str | None = "commentary") -> dict:
    """A tool's reply to the assistant: `<|start|>{name} to=assistant<|channel|>commentary...`."""
    return _text_message("tool", text, name=name, channel=channel, recipient="assistant")


def builtin_tool_namespace(name: str) -> dict:
    """openai-harmony's definition of the built-in `browser` or `python` tool, as a plain dict.

    The prompt text of these tools lives in openai-harmony; we borrow it rather than keep a copy,
    so this needs `openai_harmony` installed."""
    if name not in ("browser", "python"):
        raise ValueError(f"built-in tools are 'browser' and 'python', not {name!r}")
    try:
        from openai_harmony import ToolNamespaceConfig
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError(f"the {name} tool definition comes from openai-harmony; install it or pass "
                         "the namespace dict via system_message(tools=...)") from e
    return getattr(ToolNamespaceConfig, name)().model_dump()


# ============================================================================ text rendering
def _rust_lines(text: str) -> list[str]:
    """Rust's `str::lines`: split at \\n (dropping a \\r before it); no empty last line."""
    pieces = text.split("\n")
    last = pieces.pop()  # the only piece not followed by a newline
    lines = [p[:-1] if p.endswith("\r") else p for p in pieces]
    return lines + [last] if last else lines


def _format_float(x: float) -> str:
    """A float as serde_json writes it (shortest round-trip digits, ryu's layout)."""
    if x != x or x in (float("inf"), float("-inf")):
        return "null"
    if x == 0:
        return "-0.0" if str(x).startswith("-") else "0.0"
    sign = "-" if x < 0 else ""
    tup = Decimal(repr(abs(x))).as_tuple()
    digits = "".join(map(str, tup.digits)).lstrip("0")
    exp = tup.exponent
    stripped = digits.rstrip("0")
    exp += len(digits) - len(stripped)
    digits = stripped
    length = len(digits)
    kk = length + exp  # the decimal point sits after kk digits
    if 0 <= exp and kk <= 16:
        body = digits + "0" * exp + ".0"
    elif 0 < kk <= 16:
        body = digits[:kk] + "." + digits[kk:]
    elif -5 < kk <= 0:
        body = "0." + "0" * (-kk) + digits
    elif length == 1:
        body = f"{digits}e{kk - 1}"
    else:
        body = f"{digits[0]}.{digits[1:]}e{kk - 1}"
    return sign + body


def _json_display(value) -> str:
    """Compact JSON as serde_json's Display (for `// default: ...` comments)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _format_float(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{json.dumps(str(k), ensure_ascii=False)}:{_json_display(v)}"
                              for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_json_display(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _get(schema, key):
    return schema.get(key) if isinstance(schema, Mapping) else None


def _is_enum(schema) -> bool:
    values = _get(schema, "enum")
    return isinstance(values, list) and len(values) > 0


def _default_text(schema, default) -> str:
    """The text after "default: " - strings are quoted unless the schema is an enum."""
    if isinstance(default, str):
        return default if _is_enum(schema) else f'"{default}"'
    return _json_display(default)


def _nullable(schema, type_str: str) -> str:
    if _get(schema, "nullable") is True and "null" not in type_str:
        return f"{type_str} | null"
    return type_str


def _variant_comments(variant, skip_description: bool, property_description=None) -> str:
    comments = []
    description = _get(variant, "description")
    if not skip_description and isinstance(description, str) and description != property_description:
        comments.append(description)
    if isinstance(variant, Mapping) and "default" in variant:  # a JSON null default counts too
        comments.append("default: " + _default_text(variant, variant["default"]))
    return f" // {' '.join(comments)}" if comments else ""


def json_schema_to_typescript(schema: Any, indent: str = "") -> str:
    """A JSON schema as the TypeScript-like type openai-harmony puts in tool definitions.

    Supported as openai-harmony does: object properties (optional `?`, title / description /
    examples / default comments, nested objects indented by 4), string enums as `"a" | "b"`,
    `oneOf` unions, `nullable`, `type` lists, arrays (`T[]`, `Array<any>` without items),
    integer as number; anything else is `any`."""
    one_of = _get(schema, "oneOf")
    if isinstance(one_of, list):
        out = []
        for variant in one_of:
            type_str = _nullable(variant, json_schema_to_typescript(variant, indent + "   "))
            # At the top level every variant's description is a trailing comment.
            out.append(f"\n{indent} | {type_str}{_variant_comments(variant, False)}")
        return "".join(out)
    kind = _get(schema, "type")
    if isinstance(kind, list):
        names = ["number" if t == "integer" else t for t in kind if isinstance(t, str)]
        if names:
            return " | ".join(names)
        return "any"
    if not isinstance(kind, str):
        return "any"
    if kind == "object":
        return _object_to_typescript(schema, indent)
    if kind == "string":
        values = _get(schema, "enum")
        if isinstance(values, list):
            quoted = [f'"{v}"' for v in values if isinstance(v, str)]
            if quoted:
                return " | ".join(quoted)
        return "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        if isinstance(schema, Mapping) and "items" in schema:
            return json_schema_to_typescript(schema["items"], indent) + "[]"
        return "Array<any>"
    return "any"


def _object_to_typescript(schema: Mapping, indent: str) -> str:
    out = []
    description = _get(schema, "description")
    if isinstance(description, str):
        out.append(f"{indent}// {description}\n")
    out.append("{\n")
    properties = _get(schema, "properties")
    if isinstance(properties, Mapping):
        required = _get(schema, "required")
        required = {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
        for key, prop in properties.items():
            optional = "" if key in required else "?"
            title = _get(prop, "title")
            if isinstance(title, str):
                out.append(f"{indent}// {title}\n{indent}//\n")
            prop_description = _get(prop, "description")
            one_of = _get(prop, "oneOf")
            if one_of is None and isinstance(prop_description, str):
                out.append(f"{indent}// {prop_description}\n")
            examples = _get(prop, "examples")
            if isinstance(examples, list) and examples:
                out.append(f"{indent}// Examples:\n")
                out.extend(f'{indent}// - "{ex}"\n' for ex in examples if isinstance(ex, str))
            if isinstance(one_of, list):
                out.append(_one_of_property(key, prop, one_of, optional, indent))
                continue
            type_str = _nullable(prop, json_schema_to_typescript(prop, indent + "    "))
            line = f"{indent}{key}{optional}: {type_str},"
            # A property with a oneOf that is not a list has its default silently ignored.
            if one_of is None and isinstance(prop, Mapping) and "default" in prop:
                line += " // default: " + _default_text(prop, prop["default"])
            out.append(line + "\n")
    out.append(f"{indent}}}")
    return "".join(out)


def _one_of_property(key: str, prop: Mapping, variants: list, optional: str, indent: str) -> str:
    out = []
    prop_description = _get(prop, "description")
    if not isinstance(prop_description, str):
        prop_description = None
    # The property's description is written above it, unless the first variant repeats it.
    first_description = _get(variants[0], "description") if variants else None
    above = prop_description is not None and prop_description != first_description
    if above:
        out.append(f"{indent}// {prop_description}\n")
    if "default" in prop:
        out.append(f"{indent}// default: {_default_text(prop, prop['default'])}\n")
    out.append(f"{indent}{key}{optional}:\n")
    for i, variant in enumerate(variants):
        type_str = _nullable(variant, json_schema_to_typescript(variant, indent + "   "))
        comments = _variant_comments(variant, skip_description=(i == 0 and above),
                                     property_description=prop_description)
        out.append(f"{indent} | {type_str}{comments}\n")
    out.append(f"{indent},\n")
    return "".join(out)


def _tools_section(namespaces: Mapping) -> str:
    sections = ["# Tools"]
    for key in sorted(namespaces):  # openai-harmony holds namespaces in a BTreeMap
        ns = namespaces[key]
        lines = [f"## {ns['name']}\n"]
        has_tools = bool(ns["tools"])
        for line in _rust_lines(ns.get("description") or ""):
            lines.append(f"// {line}" if has_tools else line)
        if has_tools:
            lines.append(f"namespace {ns['name']} {{\n")
            for tool in ns["tools"]:
                lines.extend(f"// {line}" for line in _rust_lines(tool["description"]))
                if tool.get("parameters") is not None:
                    lines.append(f"type {tool['name']} = (_: "
                                 f"{json_schema_to_typescript(tool['parameters'], '')}) => any;\n")
                else:
                    lines.append(f"type {tool['name']} = () => any;\n")
            lines.append(f"}} // namespace {ns['name']}")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def _system_text(sc: Mapping, has_function_tools: bool) -> str:
    sections = []
    top = []
    if sc["model_identity"] is not None:
        top.append(sc["model_identity"])
    if sc["knowledge_cutoff"] is not None:
        top.append(f"Knowledge cutoff: {sc['knowledge_cutoff']}")
    if sc["conversation_start_date"] is not None:
        top.append(f"Current date: {sc['conversation_start_date']}")
    if top:
        sections.append("\n".join(top))
    if sc["reasoning_effort"] is not None:
        sections.append(f"Reasoning: {sc['reasoning_effort'].lower()}")
    if sc["tools"]:
        sections.append(_tools_section(sc["tools"]))
    channel_config = sc["channel_config"]
    if channel_config is not None and channel_config["valid_channels"]:
        header = f"# Valid channels: {', '.join(channel_config['valid_channels'])}."
        if channel_config["channel_required"]:
            header += " Channel must be included for every message."
        if has_function_tools:
            header += "\nCalls to these tools must go to the commentary channel: 'functions'."
        sections.append(header)
    return "\n\n".join(sections)


def _developer_text(dc: Mapping) -> str:
    sections = []
    if dc["instructions"] is not None:
        sections += ["# Instructions", dc["instructions"]]
    if dc["tools"]:
        sections.append(_tools_section(dc["tools"]))
    return "\n\n".join(sections)


# ============================================================================ token rendering
def _has_function_tools(messages: Sequence[Mapping]) -> bool:
    for msg in messages:
        for part in msg["content"]:
            if part["type"] == "developer_content" and part["tools"]:
                functions = part["tools"].get("functions")
                if functions is not None and functions["tools"]:
                    return True
    return False


def _render_normalized(msg: Mapping, tokenizer, has_function_tools: bool) -> list[int]:
    tid = tokenizer.token_id
    out = [tid(START)]
    # Each header piece is encoded on its own, as openai-harmony does.
    if msg["role"] == "tool":
        out += tokenizer.encode(msg["name"])
    else:
        out += tokenizer.encode(msg["role"])
        if msg["name"] is not None:
            out += tokenizer.encode(f":{msg['name']}")
    recipient = msg.get("recipient")
    if recipient is not None and recipient != "all":
        out += tokenizer.encode(f" to={recipient}")
    if msg.get("channel") is not None:
        out.append(tid(CHANNEL))
        out += tokenizer.encode(msg["channel"])
    content_type = msg.get("content_type")
    if content_type is not None:
        if content_type.startswith(CONSTRAIN):
            out += tokenizer.encode(" ")
            out.append(tid(CONSTRAIN))
            out += tokenizer.encode(content_type[len(CONSTRAIN):])
        else:
            out += tokenizer.encode(f" {content_type}")
    out.append(tid(MESSAGE))
    for part in msg["content"]:
        if part["type"] == "text":
            out += tokenizer.encode(part["text"])
        elif part["type"] == "system_content":
            out += tokenizer.encode(_system_text(part, has_function_tools))
        else:
            out += tokenizer.encode(_developer_text(part))
    # An assistant message with a recipient is a tool call and ends with <|call|>.
    is_call = msg["role"] == "assistant" and recipient is not None
    out.append(tid(CALL) if is_call else tid(END))
    return out


def render_message(message: Mapping, tokenizer, *, conversation_has_function_tools: bool = False) -> list[int]:
    """One message: `<|start|>{header}<|message|>{content}{<|end|> or <|call|>}`.

    `conversation_has_function_tools` adds the "Calls to these tools..." line to a system message
    (in a conversation this is worked out from the developer messages)."""
    return _render_normalized(_normalize_message(message, 0), tokenizer, conversation_has_function_tools)


def _kept_messages(messages: list[dict], auto_drop_analysis: bool) -> list[dict]:
    """openai-harmony's analysis dropping: only when the last assistant message is on `final`,
    and then every `analysis` message before the first `final` message (of any role) goes."""
    if not auto_drop_analysis:
        return messages
    last_assistant_is_final = next(
        (m.get("channel") == "final" for m in reversed(messages) if m["role"] == "assistant"), False)
    first_final = next((i for i, m in enumerate(messages) if m.get("channel") == "final"), None)
    if not last_assistant_is_final or first_final is None:
        return messages
    return [m for i, m in enumerate(messages) if not (i < first_final and m.get("channel") == "analysis")]


def _render_all(conversation, tokenizer, auto_drop_analysis: bool
                ) -> tuple[list[dict], list[dict], list[list[int]]]:
    """(all messages, the kept ones, the tokens of each kept one)."""
    messages = normalize_conversation(conversation)
    has_tools = _has_function_tools(messages)  # over all messages, dropped ones included
    kept = _kept_messages(messages, auto_drop_analysis)
    return messages, kept, [_render_normalized(m, tokenizer, has_tools) for m in kept]


def render_conversation(conversation, tokenizer, *, auto_drop_analysis: bool = True) -> list[int]:
    """All messages, rendered back to back (no trailing `<|start|>`)."""
    _, _, pieces = _render_all(conversation, tokenizer, auto_drop_analysis)
    return [t for piece in pieces for t in piece]


def render_for_completion(conversation, tokenizer, next_role: str = "assistant", *,
                          auto_drop_analysis: bool = True) -> list[int]:
    """The prompt for sampling the next turn: the conversation then `<|start|>{next_role}`."""
    next_role = _plain(next_role)
    if next_role not in ROLES:
        raise ValueError(f"next_role must be one of {', '.join(ROLES)}, got {next_role!r}")
    tokens = render_conversation(conversation, tokenizer, auto_drop_analysis=auto_drop_analysis)
    return tokens + [tokenizer.token_id(START)] + tokenizer.encode(next_role)


def render_for_training(conversation, tokenizer, *, auto_drop_analysis: bool = True
                        ) -> tuple[list[int], list[int]]:
    """Tokens and a 0/1 loss mask for supervised training.

    Tokens equal openai-harmony's `render_conversation_for_training`: the conversation rendered
    (with analysis dropping, openai-harmony's default - pass `auto_drop_analysis=False` to keep
    the chain of thought of a [user, analysis, final] example), and if the last message is an
    assistant message on the `final` channel, its terminator becomes `<|return|>`.

    Mask rule: for every rendered assistant message, every token after its `<|start|>` is 1 -
    the role token(s) "assistant", the header (` to=...`, `<|channel|>...`, content type),
    `<|message|>`, the content and the terminator (`<|end|>`, `<|call|>` or `<|return|>`).
    The `<|start|>` token itself is 0 (the prompt supplies `<|start|>assistant`; we do not train
    it even between consecutive assistant messages). Every token of a system, developer, user or
    tool message is 0.
    """
    messages, kept, pieces = _render_all(conversation, tokenizer, auto_drop_analysis)
    tokens, mask = [], []
    for msg, piece in zip(kept, pieces):
        tokens += piece
        trained = 1 if msg["role"] == "assistant" else 0
        mask += [0] + [trained] * (len(piece) - 1)
    if messages and messages[-1]["role"] == "assistant" and messages[-1].get("channel") == "final" and tokens:
        tokens[-1] = tokenizer.token_id(RETURN)
    return tokens, mask


# ============================================================================ parsing
def _bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte (the GPT-2 table)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}
_ASCII_WS = re.compile(r"[ \t\n\x0c\r]+")  # Rust's split_ascii_whitespace


class _TokenText:
    """Exact bytes of a token (partial UTF-8 included), which `decode` would replace with U+FFFD."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        cached = self.cache.get(token)
        if cached is None:
            piece = self.tokenizer.id_to_token(token) if not self.tokenizer.is_special(token) else None
            if piece is not None and all(c in _UNICODE_TO_BYTE for c in piece):
                cached = bytes(_UNICODE_TO_BYTE[c] for c in piece)
            else:  # special tokens, or a tokenizer that is not byte-level
                cached = self.tokenizer.decode([token]).encode("utf-8")
            self.cache[token] = cached
        return cached


class StreamParser:
    """Incremental parser of sampled tokens into harmony messages.

    `role` is the role already given by the prompt (`<|start|>assistant`), so the first header
    starts right away; pass `role=None` if the tokens begin with `<|start|>`. `feed(token)`
    returns the messages that token completed; `current` is the message in progress; `finish()`
    closes the stream and returns whatever was still open.

    Well-formed input gives what openai-harmony's parser gives. Malformed input never raises:
    the affected message carries `"malformed": "reason; reason"` and keeps all of its text.
    ` to=` is accepted both right after the role and after the channel.
    """

    def __init__(self, tokenizer, role: str | None = "assistant", *,
                 namespaces: Sequence[str] = KNOWN_NAMESPACES,
                 channels: Sequence[str] | None = DEFAULT_CHANNELS):
        role = _plain(role)
        if role is not None and role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)} or None, got {role!r}")
        self.tokenizer = tokenizer
        self.namespaces = tuple(namespaces)
        self.channels = None if channels is None else tuple(channels)
        self.messages: list[dict] = []
        self.tokens: list[int] = []
        self._bytes = _TokenText(tokenizer)
        self._ids = {name: tokenizer.token_id(name)
                     for name in (START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL)}
        self._stops = {self._ids[END], self._ids[RETURN], self._ids[CALL]}
        self._default_role = role or "assistant"
        self._role_hint = role  # the role of the next header when the prompt already wrote it
        self._state = "header" if role is not None else "start"
        self._problems: list[str] = []  # reasons for the message being assembled
        self._header: list[int] = []
        self._parsed: dict | None = None
        self._decoder = None
        self._content: list[str] = []

    # ------------------------------------------------------------------ public
    def feed(self, token: int) -> list[dict]:
        token = int(token)
        self.tokens.append(token)
        done: list[dict] = []
        ids = self._ids
        if self._state == "start":
            if token == ids[START]:
                self._begin_header(None)
            elif token in self._stops:
                pass  # a terminator between messages closes nothing; it carries no text
            else:
                # Text (or a header token) with no <|start|>: read it as a header of a message by
                # the previous author, so a missing "<|start|>assistant" loses nothing.
                self._begin_header(self.messages[-1]["role"] if self.messages else self._default_role)
                self._problems.append("missing <|start|> before message")
                self._state = "header"
                self._header.append(token)
        elif self._state == "header":
            if token == ids[MESSAGE]:
                self._parsed = self._parse_header(self._header, self._role_hint)
                self._state, self._decoder, self._content = "content", \
                    codecs.getincrementaldecoder("utf-8")(errors="replace"), []
            elif token == ids[START] and not self._header and not self._problems:
                self._begin_header(None)  # a repeated <|start|> before any header text loses nothing
            elif token in self._stops or token == ids[START]:
                done.append(self._header_only_message(
                    f"header ended by {self._name(token)} without <|message|>"))
                if token == ids[START]:
                    self._begin_header(None)
            else:
                self._header.append(token)
        else:  # content
            if token in self._stops:
                if token == ids[CALL] and self._parsed["recipient"] is None:
                    self._problems.append("<|call|> ends a message that has no recipient")
                done.append(self._close_content())
            elif token == ids[START]:
                self._problems.append("no terminator before the next <|start|>")
                done.append(self._close_content())
                self._begin_header(None)
            else:
                if self.tokenizer.is_special(token):
                    # openai-harmony keeps such a token's text in the content; so do we, flagged.
                    self._problems.append(f"special token {self._name(token)} inside content")
                self._content.append(self._decoder.decode(self._bytes(token)))
        self.messages.extend(done)
        return done

    def finish(self) -> list[dict]:
        """End of stream: close a message left open (flagged as truncated)."""
        done: list[dict] = []
        if self._state == "content":
            self._problems.append("truncated: no <|end|>, <|return|> or <|call|>")
            done.append(self._close_content())
        elif self._state == "header" and (self._header or self._problems):
            done.append(self._header_only_message("truncated in the header (no <|message|>)"))
        self._state = "start"
        self.messages.extend(done)
        return done

    @property
    def current(self) -> dict | None:
        """The message being read: role, channel, recipient, content_type and the content so far
        (without an incomplete UTF-8 character), or None between messages."""
        if self._state == "content":
            p = self._parsed
            return {"role": p["role"], "name": p["name"], "channel": p["channel"],
                    "recipient": p["recipient"], "content_type": p["content_type"],
                    "content": "".join(self._content), "state": "content"}
        if self._state == "header":
            return {"role": self._role_hint, "name": None, "channel": None, "recipient": None,
                    "content_type": None, "content": "", "state": "header",
                    "header": self.tokenizer.decode(self._header)}
        return None

    # ------------------------------------------------------------------ internals
    def _name(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _begin_header(self, role_hint: str | None) -> None:
        self._state, self._header, self._role_hint, self._problems = "header", [], role_hint, []

    def _message(self, parsed: Mapping, text: str) -> dict:
        msg = {"role": parsed["role"], "name": parsed["name"], "content": [{"type": "text", "text": text}]}
        for key in ("channel", "recipient", "content_type"):
            if parsed[key] is not None:
                msg[key] = parsed[key]
        problems = self._problems + parsed["problems"]
        if problems:
            msg["malformed"] = "; ".join(problems)
        return msg

    def _close_content(self) -> dict:
        self._content.append(self._decoder.decode(b"", final=True))
        msg = self._message(self._parsed, "".join(self._content))
        self._state, self._role_hint, self._problems, self._parsed = "start", None, [], None
        return msg

    def _header_only_message(self, reason: str) -> dict:
        """A header that never reached <|message|>: keep its metadata, the rest becomes content."""
        parsed = self._parse_header(self._header, self._role_hint, leftover_is_content=True)
        self._problems.append(reason)
        msg = self._message(parsed, parsed["leftover"])
        self._state, self._role_hint, self._problems, self._header = "start", None, [], []
        return msg

    def _header_string(self, tokens: Sequence[int], problems: list[str]) -> str:
        """Header tokens as text; the only special tokens a header may hold are <|channel|> and
        <|constrain|>, others are flagged and read as a space."""
        pieces, run = [], []
        allowed = {self._ids[CHANNEL]: CHANNEL, self._ids[CONSTRAIN]: CONSTRAIN}
        for t in tokens:
            if self.tokenizer.is_special(t):
                pieces.append(self.tokenizer.decode(run))
                run = []
                if t in allowed:
                    pieces.append(allowed[t])
                else:
                    problems.append(f"unexpected special token {self._name(t)} in header")
                    pieces.append(" ")
            else:
                run.append(t)
        pieces.append(self.tokenizer.decode(run))
        return "".join(pieces)

    def _parse_header(self, tokens: Sequence[int], role_hint: str | None, *,
                      leftover_is_content: bool = False) -> dict:
        """openai-harmony's header grammar: `{role|tool name} [to=R]<|channel|>{C} [to=R] [type]`,
        plus checks it does not make (unknown recipient, missing channel, stray text)."""
        problems: list[str] = []
        text = self._header_string(tokens, problems)
        channel = None
        at = text.find(CHANNEL)
        if at >= 0:
            after = text[at + len(CHANNEL):]
            match = re.search(r"[\s<]", after)
            end = match.start() if match else len(after)
            channel = after[:end] or None
            if channel is None:
                problems.append("empty channel name")
            before_channel = text[:at]
            text = before_channel + after[end:]
        else:
            before_channel = text
        text = text.strip()
        as_content = text  # for a header that turns out to be content, with its whitespace
        if CONSTRAIN in text:  # "to=x<|constrain|>json" is two parts
            text = text.replace(CONSTRAIN, " " + CONSTRAIN).strip()
        parts = [p for p in _ASCII_WS.split(text) if p]

        name, consumed = None, 0  # consumed: leading words read as the author
        if role_hint is not None:
            role = role_hint
        elif not parts:
            role = self._default_role
            problems.append(f"header has no role (assumed {role})")
        else:
            first = parts[0]
            if first in ROLES:
                role = first
            elif ":" in first and first.split(":", 1)[0] in ROLES and first.split(":", 1)[0] != "tool":
                role, name = first.split(":", 1)
                parts.pop(0)
                consumed += 1
            elif first.startswith("to=") or leftover_is_content:
                # No role word (or the header is really content): keep every word.
                role = self._default_role
                problems.append(f"header has no role (assumed {role})")
            else:
                # openai-harmony: an unknown first word is a tool's name.
                role, name = "tool", first
                parts.pop(0)
                consumed += 1
                if len(parts) == 0:
                    problems.append(f"unknown role {first!r} (read as a tool name)")
        if parts and parts[0] == role:
            parts.pop(0)
            consumed += 1

        # Words before <|channel|> other than the role and to=... are stray text.
        stray = [w for w in _ASCII_WS.split(before_channel.replace(CONSTRAIN, " " + CONSTRAIN)) if w
                 and w != role and w != name and w != f"{role}:{name}" and not w.startswith("to=")
                 and not w.startswith(CONSTRAIN)]
        if at >= 0 and stray and not leftover_is_content:
            problems.append(f"unexpected text before <|channel|>: {' '.join(stray)!r}")

        recipient = content_type = None
        leftover = ""
        if leftover_is_content:
            leftover = re.sub(r"^(?:[^ \t\n\x0c\r]+[ \t\n\x0c\r]*){%d}" % consumed, "", as_content)
        elif parts:
            count = len(parts)
            last = parts.pop()
            if last.startswith("to="):
                recipient = last[3:]
            elif count == 1 and not last.startswith(CONSTRAIN):
                recipient = last
            else:
                content_type = last
                if parts:
                    raw = parts.pop()
                    recipient = raw[3:] if raw.startswith("to=") else raw
            if parts:
                problems.append(f"unexpected text in header: {' '.join(parts)!r}")

        if channel is None and at < 0:
            problems.append("missing channel")
        elif channel is not None and self.channels is not None and channel not in self.channels:
            problems.append(f"unknown channel {channel!r}")
        if recipient is not None and not self._known_recipient(recipient):
            problems.append(f"unknown recipient {recipient!r}")
        return {"role": role, "name": name, "channel": channel, "recipient": recipient,
                "content_type": content_type, "problems": problems, "leftover": leftover}

    def _known_recipient(self, recipient: str) -> bool:
        if recipient in ROLES or recipient == "all":
            return True
        namespace, dot, rest = recipient.partition(".")
        return namespace in self.namespaces and (not dot or bool(rest))


def parse_completion(tokens: Iterable[int], tokenizer, role: str | None = "assistant", **kwargs) -> list[dict]:
    """Messages from sampled tokens (which start after the prompt's `<|start|>{role}`).

    Same result as feeding a `StreamParser` token by token and calling `finish()`; malformed
    messages carry a `"malformed"` reason instead of raising."""
    parser = StreamParser(tokenizer, role, **kwargs)
    for token in tokens:
        parser.feed(token)
    parser.finish()
    return parser.messages
