"""Harmony messages as plain dicts: constants, validation into canonical form, and builders.

Messages are dicts in openai-harmony's JSON shape (`Message.to_dict()`), so they move between the
two libraries unchanged:

    {"role": "assistant", "name": None, "content": [{"type": "text", "text": "..."}],
     "channel": "final", "recipient": "functions.f", "content_type": "<|constrain|>json"}

A conversation is `{"messages": [...]}` or a list of such dicts (openai_harmony `Message` /
`Conversation` objects are accepted too, via their `to_dict`). System and developer messages carry
a single `{"type": "system_content", ...}` / `{"type": "developer_content", ...}` part; build them
with `system_message()` and `developer_message()`.

* `normalize_conversation` validates every message and raises ValueError naming the bad message
  and field; renderers work on its canonical output only.
* A missing key in a `system_content` dict takes openai-harmony's Python default (identity, cutoff
  2024-06, effort medium, channels analysis/commentary/final) - that is what `SystemContent
  .from_dict` does; an explicit `None` leaves the line out. Our builders always write every key.
* `builtin_tool_namespace` borrows the browser / python tool definitions from openai-harmony
  instead of keeping a copy, so it needs `openai_harmony` installed.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

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
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|constrain|>",
    "<|return|>",
    "<|call|>",
)


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
        raise ValueError(f"{where}: reasoning_effort must be one of low, medium, high (any case), got {value!r}")
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
        out[key] = {
            "name": name,
            "description": _opt_str(ns, "description", where),
            "tools": [_normalize_tool(t, f"{where}, namespace {key!r}") for t in entries],
        }
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
        channel_config = part.get(
            "channel_config", {"valid_channels": list(DEFAULT_CHANNELS), "channel_required": True}
        )
        if channel_config is not None:
            if not isinstance(channel_config, Mapping) or not isinstance(
                channel_config.get("valid_channels"), (list, tuple)
            ):
                raise ValueError(f"{where}: channel_config needs a list 'valid_channels'")
            channel_config = {
                "valid_channels": [str(c) for c in channel_config["valid_channels"]],
                "channel_required": bool(channel_config.get("channel_required", False)),
            }
        return {
            "type": "system_content",
            "model_identity": _check_str(part.get("model_identity", DEFAULT_MODEL_IDENTITY), "model_identity", where),
            "reasoning_effort": _effort(part.get("reasoning_effort", "medium"), where),
            "conversation_start_date": _opt_str(part, "conversation_start_date", where),
            "knowledge_cutoff": _check_str(
                part.get("knowledge_cutoff", DEFAULT_KNOWLEDGE_CUTOFF), "knowledge_cutoff", where
            ),
            "channel_config": channel_config,
            "tools": _normalize_namespaces(part.get("tools"), where),
        }
    if kind == "developer_content":
        if role != "developer":
            raise ValueError(f"{where}: developer_content may only appear in a developer message, not {role}")
        return {
            "type": "developer_content",
            "instructions": _opt_str(part, "instructions", where),
            "tools": _normalize_namespaces(part.get("tools"), where),
        }
    raise ValueError(
        f"{where}: unknown content part type {kind!r} (expected text, system_content or developer_content)"
    )


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
    out = {
        "role": role,
        "name": name,
        "content": [_normalize_part(p, role, f"{where}, content[{j}]") for j, p in enumerate(content)],
    }
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
def system_message(
    *,
    model_identity: str | None = DEFAULT_MODEL_IDENTITY,
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF,
    current_date: str | None = None,
    reasoning_effort: str | None = "medium",
    channels: Sequence[str] | None = DEFAULT_CHANNELS,
    channel_required: bool = True,
    browser_tool: bool = False,
    python_tool: bool = False,
    tools: Sequence[Mapping] | Mapping | None = None,
) -> dict:
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
        "channel_config": None
        if channels is None
        else {"valid_channels": list(channels), "channel_required": bool(channel_required)},
        "tools": _normalize_namespaces(namespaces, "system_message") if namespaces else None,
    }
    return {"role": "system", "name": None, "content": [content]}


def developer_message(instructions: str | None = None, tools: Sequence[Mapping] | None = None) -> dict:
    """A developer message: `# Instructions` plus function tools
    ([{"name", "description", "parameters": JSON schema}], or OpenAI's {"type": "function",
    "function": {...}} wrapper) in the `functions` namespace."""
    content: dict = {"type": "developer_content", "instructions": instructions, "tools": None}
    if tools:
        content["tools"] = {
            "functions": {
                "name": "functions",
                "description": None,
                "tools": [_normalize_tool(t, f"developer_message, tools[{i}]") for i, t in enumerate(tools)],
            }
        }
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


def assistant(
    text: str, channel: str | None = "final", recipient: str | None = None, content_type: str | None = None
) -> dict:
    return _text_message("assistant", text, channel=channel, recipient=recipient, content_type=content_type)


def tool_call(
    recipient: str,
    arguments: str | Mapping,
    *,
    channel: str = "commentary",
    content_type: str | None = "<|constrain|>json",
) -> dict:
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
        raise ValueError(
            f"the {name} tool definition comes from openai-harmony; install it or pass "
            "the namespace dict via system_message(tools=...)"
        ) from e
    return getattr(ToolNamespaceConfig, name)().model_dump()
