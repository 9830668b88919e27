"""Sampled tokens back to harmony messages: `StreamParser` (token by token) and `parse_completion`.

Parsing is best-effort and never raises. A message can carry three kinds of flags, each a
`"; "`-joined string of reasons under its own key:

* `"malformed"`: output openai-harmony rejects or that loses structure (a header cut short, text
  after a terminator, stray special tokens, an unknown role, ...).
* `"incomplete"`: the stream ended inside the message's content, with no `<|end|>`, `<|return|>`
  or `<|call|>` (servers often strip the stop token; a length limit cuts the same way).
  openai-harmony accepts this, and the content is kept whole, so such a message still counts.
* `"warnings"`: what openai-harmony accepts but a caller may want to know: a message without a
  channel, a recipient outside the known namespaces or (when `tools` is given) not a declared tool.

Well-formed output parses exactly as openai-harmony's parser does. Where openai-harmony raises
(text after a terminator, a header cut short) we return the text, flagged; where it silently
keeps going we flag (a `<|start|>` inside content ends the message here, while openai-harmony
would keep it as content text; `user:name` headers are read as role and name).

Content is decoded from each token's exact bytes with an incremental UTF-8 decoder, so a
character split across tokens comes out whole rather than as U+FFFD.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Mapping, Sequence

from .messages import (
    CALL,
    CHANNEL,
    CONSTRAIN,
    DEFAULT_CHANNELS,
    END,
    KNOWN_NAMESPACES,
    MESSAGE,
    RETURN,
    ROLES,
    START,
    _plain,
)

_ASCII_WS = re.compile(r"[ \t\n\x0c\r]+")  # Rust's split_ascii_whitespace


class StreamParser:
    """Incremental parser of sampled tokens into harmony messages.

    `role` is the role already given by the prompt (`<|start|>assistant`), so the first header
    starts right away; pass `role=None` if the tokens begin with `<|start|>`. `feed(token)`
    returns the messages that token completed; `current` is the message in progress; `finish()`
    closes the stream and returns whatever was still open.

    Well-formed input gives what openai-harmony's parser gives. Malformed input never raises:
    the affected message carries `"malformed": "reason; reason"` and keeps all of its text;
    `"incomplete"` and `"warnings"` flag what openai-harmony accepts (see the module doc).
    ` to=` is accepted both right after the role and after the channel.

    `tools`: the declared tools as recipients (`"functions.get_weather"`, `"browser.search"`);
    when given, a recipient that is none of them (nor a role or `all`) gets a warning.
    """

    def __init__(
        self,
        tokenizer,
        role: str | None = "assistant",
        *,
        namespaces: Sequence[str] = KNOWN_NAMESPACES,
        channels: Sequence[str] | None = DEFAULT_CHANNELS,
        tools: Iterable[str] | None = None,
    ):
        role = _plain(role)
        if role is not None and role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)} or None, got {role!r}")
        self.tokenizer = tokenizer
        self.namespaces = tuple(namespaces)
        self.channels = None if channels is None else tuple(channels)
        self.tools = None if tools is None else frozenset(tools)
        self.messages: list[dict] = []
        self.tokens: list[int] = []
        self._ids = {name: tokenizer.token_id(name) for name in (START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL)}
        self._stops = {self._ids[END], self._ids[RETURN], self._ids[CALL]}
        self._default_role = role or "assistant"
        self._role_hint = role  # the role of the next header when the prompt already wrote it
        self._state = "header" if role is not None else "start"
        self._problems: list[str] = []  # reasons for the message being assembled
        self._incomplete: str | None = None
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
                self._state, self._decoder, self._content = (
                    "content",
                    codecs.getincrementaldecoder("utf-8")(errors="replace"),
                    [],
                )
            elif token == ids[START] and not self._header and not self._problems:
                self._begin_header(None)  # a repeated <|start|> before any header text loses nothing
            elif token in self._stops or token == ids[START]:
                done.append(self._header_only_message(f"header ended by {self._name(token)} without <|message|>"))
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
                self._content.append(self._decoder.decode(self.tokenizer.token_bytes(token)))
        self.messages.extend(done)
        return done

    def finish(self) -> list[dict]:
        """End of stream: close a message left open (its content whole, flagged incomplete)."""
        done: list[dict] = []
        if self._state == "content":
            self._incomplete = "truncated: no <|end|>, <|return|> or <|call|>"
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
            return {
                "role": p["role"],
                "name": p["name"],
                "channel": p["channel"],
                "recipient": p["recipient"],
                "content_type": p["content_type"],
                "content": "".join(self._content),
                "state": "content",
            }
        if self._state == "header":
            return {
                "role": self._role_hint,
                "name": None,
                "channel": None,
                "recipient": None,
                "content_type": None,
                "content": "",
                "state": "header",
                "header": self.tokenizer.decode(self._header),
            }
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
        if self._incomplete:
            msg["incomplete"] = self._incomplete
        if parsed["warnings"]:
            msg["warnings"] = "; ".join(parsed["warnings"])
        return msg

    def _close_content(self) -> dict:
        self._content.append(self._decoder.decode(b"", final=True))
        msg = self._message(self._parsed, "".join(self._content))
        self._state, self._role_hint, self._problems, self._parsed = "start", None, [], None
        self._incomplete = None
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

    def _parse_header(self, tokens: Sequence[int], role_hint: str | None, *, leftover_is_content: bool = False) -> dict:
        """openai-harmony's header grammar: `{role|tool name} [to=R]<|channel|>{C} [to=R] [type]`,
        plus checks it does not make: stray text (problems), missing channel and unknown
        recipient (warnings: openai-harmony accepts those)."""
        problems: list[str] = []
        warnings: list[str] = []
        text = self._header_string(tokens, problems)
        channel = None
        at = text.find(CHANNEL)
        if at >= 0:
            after = text[at + len(CHANNEL) :]
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
        stray = [
            w
            for w in _ASCII_WS.split(before_channel.replace(CONSTRAIN, " " + CONSTRAIN))
            if w
            and w != role
            and w != name
            and w != f"{role}:{name}"
            and not w.startswith("to=")
            and not w.startswith(CONSTRAIN)
        ]
        if at >= 0 and stray and not leftover_is_content:
            problems.append(f"unexpected text before <|channel|>: {' '.join(stray)!r}")

        recipient = content_type = None
        leftover = ""
        if leftover_is_content:
            leftover = re.sub(rf"^(?:[^ \t\n\x0c\r]+[ \t\n\x0c\r]*){{{consumed}}}", "", as_content)
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
            warnings.append("missing channel")
        elif channel is not None and self.channels is not None and channel not in self.channels:
            problems.append(f"unknown channel {channel!r}")
        if recipient is not None and not self._known_recipient(recipient):
            warnings.append(f"unknown recipient {recipient!r}")
        elif recipient is not None and not self._declared_recipient(recipient):
            warnings.append(f"recipient {recipient!r} is not a declared tool")
        return {
            "role": role,
            "name": name,
            "channel": channel,
            "recipient": recipient,
            "content_type": content_type,
            "problems": problems,
            "warnings": warnings,
            "leftover": leftover,
        }

    def _known_recipient(self, recipient: str) -> bool:
        if recipient in ROLES or recipient == "all":
            return True
        namespace, dot, rest = recipient.partition(".")
        return namespace in self.namespaces and (not dot or bool(rest))

    def _declared_recipient(self, recipient: str) -> bool:
        return self.tools is None or recipient in self.tools or recipient in ROLES or recipient == "all"


def parse_completion(tokens: Iterable[int], tokenizer, role: str | None = "assistant", **kwargs) -> list[dict]:
    """Messages from sampled tokens (which start after the prompt's `<|start|>{role}`).

    Same result as feeding a `StreamParser` token by token and calling `finish()`; malformed
    messages carry a `"malformed"` reason instead of raising, a message the stream ends inside is
    `"incomplete"` (not malformed), and `"warnings"` flag what openai-harmony accepts."""
    parser = StreamParser(tokenizer, role, **kwargs)
    for token in tokens:
        parser.feed(token)
    parser.finish()
    return parser.messages
