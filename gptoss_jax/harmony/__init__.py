"""The harmony chat format of gpt-oss: rendering conversations to tokens and parsing model output.

Pure Python; tokens come from our `gptoss_jax.tokenizer.Tokenizer` (`encode` for ordinary text,
`token_id("<|start|>")` for special tokens). The output is token-for-token what openai-harmony
0.0.8 produces for the same input; the test suite checks this on more than 30 conversations.
Messages are plain dicts in openai-harmony's JSON shape, so they move between the two libraries
unchanged.

* `messages` - the message dicts, their validation (`normalize_conversation`), builders
  (`system_message`, `developer_message`, `user`, `assistant`, `tool_call`, `tool_result`) and
  constants such as the assistant stop tokens.
* `schema` - JSON schemas as the TypeScript-like tool definitions of the `# Tools` section,
  oddities of openai-harmony's output included.
* `render` - messages to tokens; `render_for_completion` for prompts, `render_for_training` for
  tokens plus a loss mask. Both drop analysis messages as openai-harmony does by default.
* `parse` - tokens to messages (`parse_completion`, `StreamParser`); best-effort: malformed output
  is flagged with a `"malformed"` reason, never raised; a missing final stop token is only
  `"incomplete"`, and what openai-harmony accepts but is unusual gets `"warnings"`.
"""

from .messages import (
    CALL,
    CHANNEL,
    CONSTRAIN,
    DEFAULT_CHANNELS,
    DEFAULT_KNOWLEDGE_CUTOFF,
    DEFAULT_MODEL_IDENTITY,
    END,
    KNOWN_NAMESPACES,
    MESSAGE,
    RETURN,
    ROLES,
    START,
    STOP_TOKENS_ASSISTANT,
    assistant,
    builtin_tool_namespace,
    developer_message,
    normalize_conversation,
    stop_tokens,
    system_message,
    tool_call,
    tool_result,
    user,
)
from .parse import StreamParser, parse_completion
from .render import render_conversation, render_for_completion, render_for_training, render_message
from .schema import json_schema_to_typescript

__all__ = [
    "STOP_TOKENS_ASSISTANT",
    "DEFAULT_MODEL_IDENTITY",
    "DEFAULT_KNOWLEDGE_CUTOFF",
    "DEFAULT_CHANNELS",
    "ROLES",
    "KNOWN_NAMESPACES",
    "START",
    "END",
    "MESSAGE",
    "CHANNEL",
    "CONSTRAIN",
    "RETURN",
    "CALL",
    "render_message",
    "render_conversation",
    "render_for_completion",
    "render_for_training",
    "system_message",
    "developer_message",
    "user",
    "assistant",
    "tool_call",
    "tool_result",
    "builtin_tool_namespace",
    "normalize_conversation",
    "json_schema_to_typescript",
    "parse_completion",
    "StreamParser",
    "stop_tokens",
]
