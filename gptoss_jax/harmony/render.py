"""Harmony messages to tokens, token for token as openai-harmony 0.0.8 renders them
(`HarmonyEncoding`, the Rust renderer in `src/encoding.rs`).

* The header is tokenized piece by piece, not as one string: role, `:name`, ` to={recipient}`, the
  `<|channel|>` token, the channel, then ` {content_type}`. A content type starting with
  `<|constrain|>` becomes the text " ", the special token, then the rest as text. Recipient "all"
  is not written. Tool messages write their author name (`functions.get_weather`) instead of a role.
* Every content part is encoded separately (two text parts "a", "b" are `encode("a") + encode("b")`).
* The "Calls to these tools must go to the commentary channel: 'functions'." line is decided by the
  conversation, not the system message: it appears when any developer message has a non-empty
  `functions` tool namespace.
* Analysis dropping (`auto_drop_analysis=True`): if the last assistant message is on `final`,
  every `analysis` message before the first `final` message is dropped - so in
  user, a1, f1, user, a2, f2 only a1 goes. openai-harmony applies this in
  `render_conversation_for_training` too (its Python default), which drops the chain of thought
  of a single-turn [user, analysis, final] example; `render_for_training` mirrors that by default.
* Training mask (`render_for_training`): 1 for every token of an assistant message after its
  `<|start|>`, 0 elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .messages import (
    CALL,
    CHANNEL,
    CONSTRAIN,
    END,
    MESSAGE,
    RETURN,
    ROLES,
    START,
    _normalize_message,
    _plain,
    normalize_conversation,
)
from .schema import _tools_section


# ============================================================================ text rendering
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
        out += tokenizer.encode(msg["name"], disallowed_special=())
    else:
        out += tokenizer.encode(msg["role"], disallowed_special=())
        if msg["name"] is not None:
            out += tokenizer.encode(f":{msg['name']}", disallowed_special=())
    recipient = msg.get("recipient")
    if recipient is not None and recipient != "all":
        out += tokenizer.encode(f" to={recipient}", disallowed_special=())
    if msg.get("channel") is not None:
        out.append(tid(CHANNEL))
        out += tokenizer.encode(msg["channel"], disallowed_special=())
    content_type = msg.get("content_type")
    if content_type is not None:
        if content_type.startswith(CONSTRAIN):
            out += tokenizer.encode(" ", disallowed_special=())
            out.append(tid(CONSTRAIN))
            out += tokenizer.encode(content_type[len(CONSTRAIN) :], disallowed_special=())
        else:
            out += tokenizer.encode(f" {content_type}", disallowed_special=())
    out.append(tid(MESSAGE))
    for part in msg["content"]:
        if part["type"] == "text":
            out += tokenizer.encode(part["text"], disallowed_special=())
        elif part["type"] == "system_content":
            out += tokenizer.encode(_system_text(part, has_function_tools), disallowed_special=())
        else:
            out += tokenizer.encode(_developer_text(part), disallowed_special=())
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
        (m.get("channel") == "final" for m in reversed(messages) if m["role"] == "assistant"), False
    )
    first_final = next((i for i, m in enumerate(messages) if m.get("channel") == "final"), None)
    if not last_assistant_is_final or first_final is None:
        return messages
    return [m for i, m in enumerate(messages) if not (i < first_final and m.get("channel") == "analysis")]


def _render_all(conversation, tokenizer, auto_drop_analysis: bool) -> tuple[list[dict], list[dict], list[list[int]]]:
    """(all messages, the kept ones, the tokens of each kept one)."""
    messages = normalize_conversation(conversation)
    has_tools = _has_function_tools(messages)  # over all messages, dropped ones included
    kept = _kept_messages(messages, auto_drop_analysis)
    return messages, kept, [_render_normalized(m, tokenizer, has_tools) for m in kept]


def render_conversation(conversation, tokenizer, *, auto_drop_analysis: bool = True) -> list[int]:
    """All messages, rendered back to back (no trailing `<|start|>`)."""
    _, _, pieces = _render_all(conversation, tokenizer, auto_drop_analysis)
    return [t for piece in pieces for t in piece]


def render_for_completion(
    conversation, tokenizer, next_role: str = "assistant", *, auto_drop_analysis: bool = True
) -> list[int]:
    """The prompt for sampling the next turn: the conversation then `<|start|>{next_role}`."""
    next_role = _plain(next_role)
    if next_role not in ROLES:
        raise ValueError(f"next_role must be one of {', '.join(ROLES)}, got {next_role!r}")
    tokens = render_conversation(conversation, tokenizer, auto_drop_analysis=auto_drop_analysis)
    return tokens + [tokenizer.token_id(START)] + tokenizer.encode(next_role, disallowed_special=())


def render_for_training(conversation, tokenizer, *, auto_drop_analysis: bool = True) -> tuple[list[int], list[int]]:
    """Tokens and a 0/1 loss mask for supervised training.

    Tokens equal openai-harmony's `render_conversation_for_training`: the conversation rendered
    (with analysis dropping, openai-harmony's default - pass `auto_drop_analysis=False` to keep
    the chain of thought of a [user, analysis, final] example), and if the last message is an
    assistant message on the `final` channel, its terminator becomes `<|return|>`.

    Mask rule: for every rendered assistant message, every token after its `<|start|>` is 1 -
    the role token(s) "assistant", the header (` to=...`, `<|channel|>...`, content type),
    `<|message|>`, the content and the terminator (`<|end|>`, `<|call|>` or `<|return|>`).
    Its `<|start|>` is 1 when the message before it is an assistant message too (the model writes
    `<|end|><|start|>assistant...` between its analysis and its final answer within one turn, so
    it must learn to), else 0 (the prompt supplies `<|start|>assistant`). Every token of a
    system, developer, user or tool message is 0.
    """
    messages, kept, pieces = _render_all(conversation, tokenizer, auto_drop_analysis)
    tokens, mask = [], []
    previous = None
    for msg, piece in zip(kept, pieces):
        tokens += piece
        trained = 1 if msg["role"] == "assistant" else 0
        mask += [trained if previous == "assistant" else 0] + [trained] * (len(piece) - 1)
        previous = msg["role"]
    if messages and messages[-1]["role"] == "assistant" and messages[-1].get("channel") == "final" and tokens:
        tokens[-1] = tokenizer.token_id(RETURN)
    return tokens, mask
