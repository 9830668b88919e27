"""Training data: jsonl conversations -> harmony tokens + loss mask -> packed rows -> batches.

Each jsonl line is one conversation, in either of two shapes:
- openai-harmony's JSON (`{"messages": [...]}` or a bare list of messages, content as parts);
- the common chat shape `{"messages": [{"role", "content", "thinking"?}]}` with string contents:
  a `system` message becomes the developer instructions, an assistant's `thinking` its analysis
  message and its `content` the final answer. A harmony system message (with the configured
  reasoning effort) is put first where a conversation has none.

Malformed lines (not UTF-8, not JSON, not a conversation, a message on a channel its system
message does not declare: analysis, commentary, final by default) are reported with their file
and line number and skipped (or fatal with `strict=True`); a file that leaves nothing to train on
is an error that says why (`no_data_error`).
Packing places whole examples into rows of `seq_len` tokens in order (`pack_rows`: first fit
for training, next fit for streams such as `inspect.run_corpus`); each example gets its own
segment id and positions from 0, so attention never crosses documents. Examples longer than a row
are never truncated: they are counted and left out (or fatal with `strict`).
Batches are a pure function of (seed, step), so a resumed run reads exactly what it would have.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from gptoss_jax import harmony


class DataError(ValueError):
    """Bad training data, naming the file and line."""


@dataclasses.dataclass
class DataReport:
    lines: int = 0
    conversations: int = 0
    malformed: list[str] = dataclasses.field(default_factory=list)  # "path:line: reason"
    too_long: int = 0  # examples longer than one row, left out
    no_target: int = 0  # examples with no trained token (nothing for the loss), left out
    line_numbers: list[int] = dataclasses.field(default_factory=list)  # of the conversations read, in order

    def summary(self) -> str:
        return (
            f"{self.conversations} conversations from {self.lines} lines; {len(self.malformed)} "
            f"malformed, {self.too_long} longer than a row, {self.no_target} without an assistant "
            "turn (all left out)"
        )


def _is_chat_shape(messages) -> bool:
    return all(isinstance(m, dict) and isinstance(m.get("content"), str) and "channel" not in m for m in messages)


def from_chat_shape(messages, *, reasoning_effort: str = "low") -> list[dict]:
    """The chat shape (string contents, `thinking` on assistant turns) as harmony messages."""
    out = [harmony.system_message(reasoning_effort=reasoning_effort)]
    for i, m in enumerate(messages):
        role = m.get("role")
        if role in ("system", "developer"):
            out.append(harmony.developer_message(m["content"]))
        elif role == "user":
            out.append(harmony.user(m["content"]))
        elif role == "assistant":
            if m.get("thinking"):
                out.append(harmony.assistant(m["thinking"], channel="analysis"))
            out.append(harmony.assistant(m["content"], channel="final"))
        else:
            raise ValueError(f"message {i}: role {role!r} is not one of system, developer, user, assistant")
    return out


def check_channels(conv: Sequence[dict]) -> None:
    """Every message's channel must be one its system message declares valid (analysis,
    commentary, final by default); a typo such as "finale" would otherwise train a format the
    model never sees at inference."""
    valid = harmony.DEFAULT_CHANNELS
    if conv and conv[0]["role"] == "system":
        config = next((p.get("channel_config") for p in conv[0]["content"] if p.get("type") == "system_content"), None)
        if config and config.get("valid_channels"):
            valid = tuple(config["valid_channels"])
    for i, m in enumerate(conv):
        channel = m.get("channel")
        if channel is not None and channel not in valid:
            raise ValueError(f"message {i}: channel {channel!r} is not one of {', '.join(valid)}")


def parse_conversation(record, *, reasoning_effort: str = "low") -> list[dict]:
    """One decoded jsonl record -> normalized harmony messages (ValueError if malformed)."""
    messages = record.get("messages") if isinstance(record, dict) else record
    if not isinstance(messages, list) or not messages:
        raise ValueError("expected {'messages': [...]} with at least one message")
    if _is_chat_shape(messages):
        messages = from_chat_shape(messages, reasoning_effort=reasoning_effort)
    conv = harmony.normalize_conversation(messages)
    check_channels(conv)
    if conv[0]["role"] != "system":
        conv = harmony.normalize_conversation([harmony.system_message(reasoning_effort=reasoning_effort)]) + conv
    return conv


def read_jsonl(
    path: str, *, strict: bool = False, reasoning_effort: str = "low", report: DataReport | None = None
) -> tuple[list[list[dict]], DataReport]:
    report = report or DataReport()
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                report.lines += 1
                record = json.loads(line)
            except UnicodeDecodeError as e:
                report.lines += 1
                reason = f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})"
            except json.JSONDecodeError as e:
                reason = f"{path}:{lineno}: not valid JSON ({e.msg} at character {e.pos + 1})"
            else:
                try:
                    out.append(parse_conversation(record, reasoning_effort=reasoning_effort))
                    report.line_numbers.append(lineno)
                    continue
                except (ValueError, TypeError, KeyError) as e:
                    reason = f"{path}:{lineno}: {e}"
            if strict:
                raise DataError(reason)
            report.malformed.append(reason)
    report.conversations += len(out)
    return out, report


def no_data_error(path: str, report: DataReport, what: str = "usable conversations") -> DataError:
    """The error for a data file that leaves nothing to train or evaluate on, saying why."""
    if report.lines == 0:
        return DataError(f"{path} holds no conversations (the file is empty)")
    first = f"; first: {report.malformed[0]}" if report.malformed else ""
    return DataError(f"{path} leaves no {what}: {report.summary()}{first}")


@dataclasses.dataclass
class Packed:
    tokens: np.ndarray  # [N, L] int32 (0 where padding)
    loss_mask: np.ndarray  # [N, L] int32: 1 = this token is a target
    segment_ids: np.ndarray  # [N, L] int32: 1, 2, ... per example in the row; 0 = padding
    positions: np.ndarray  # [N, L] int32: from 0 within each example

    def __len__(self) -> int:
        return self.tokens.shape[0]


def tokenize(conversations: Iterable, tokenizer, *, keep_analysis: bool = True, report: DataReport | None = None):
    """Conversations -> [(tokens, loss_mask)] through `harmony.render_for_training`; with
    `keep_analysis` the analysis before a final answer stays in (and is trained), otherwise it is
    dropped as openai-harmony does by default."""
    out = []
    for conv in conversations:
        tokens, mask = harmony.render_for_training(conv, tokenizer, auto_drop_analysis=not keep_analysis)
        if not any(mask):
            if report is not None:
                report.no_target += 1
            continue
        out.append((tokens, mask))
    return out


FITS = ("first", "next")


def pack_rows(
    examples: Iterable[tuple[Sequence[int], Sequence[int] | None]], seq_len: int, *, fit: str = "first"
) -> Iterator[list[tuple]]:
    """The packing itself: whole (tokens, mask) examples of at most `seq_len` tokens placed, in
    order, into rows of `seq_len` tokens; yields each row as the list of its examples.

    `fit="first"` (first fit): an example goes into the first row with room for it, so a short
    example can fill a gap an earlier long one left; rows are final only once every example is
    placed, so they all come at the end. `fit="next"` (next fit): an example goes into the
    current row or, when it does not fit there, closes it and starts the next; each row comes as
    soon as it is closed, so a stream of any length is packed in constant memory."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    rows: list[list[tuple]] = []
    room: list[int] = []
    for example in examples:
        n = len(example[0])
        if n > seq_len:
            raise ValueError(f"an example of {n} tokens does not fit a row of {seq_len}")
        if fit == "next" and room and n > room[-1]:
            room.pop()
            yield rows.pop()
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(example)
                room[r] -= n
                break
        else:
            rows.append([example])
            room.append(seq_len - n)
    yield from rows


def layout(rows: Sequence[Sequence[tuple]], seq_len: int, num_rows: int | None = None) -> Packed:
    """Rows of (tokens, mask) examples (`pack_rows`) as arrays [num_rows (default: one per row),
    seq_len]: each example gets the next segment id of its row and positions from 0; the rest is
    padding (all zeros). A mask of None leaves the example's loss mask at 0."""
    shape = (len(rows) if num_rows is None else num_rows, seq_len)
    packed = Packed(*(np.zeros(shape, np.int32) for _ in range(4)))
    for r, row in enumerate(rows):
        at = 0
        for seg, (tokens, mask) in enumerate(row, 1):
            n = len(tokens)
            packed.tokens[r, at : at + n] = tokens
            if mask is not None:
                packed.loss_mask[r, at : at + n] = mask
            packed.segment_ids[r, at : at + n] = seg
            packed.positions[r, at : at + n] = np.arange(n)
            at += n
    return packed


def pack(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    seq_len: int,
    *,
    strict: bool = False,
    report: DataReport | None = None,
    fit: str = "first",
) -> Packed:
    """Pack training examples (tokens, loss mask) into rows (`pack_rows`; first fit by default).
    An example longer than a row is counted in `report.too_long` and left out, or an error with
    `strict`."""

    def checked():
        for i, (tokens, mask) in enumerate(examples):
            if len(tokens) != len(mask):
                raise DataError(f"example {i}: {len(tokens)} tokens but {len(mask)} mask entries")
            if len(tokens) > seq_len:
                if strict:
                    raise DataError(f"example {i} has {len(tokens)} tokens, more than a row of {seq_len}")
                if report is not None:
                    report.too_long += 1
                continue
            yield tokens, mask

    return layout(list(pack_rows(checked(), seq_len, fit=fit)), seq_len)


def pack_batches(
    examples: Iterable[tuple[Sequence[int], Sequence[int] | None]], seq_len: int, batch_size: int, *, fit: str = "next"
) -> Iterator[Packed]:
    """Streamed packing: `Packed` batches of `batch_size` rows (`pack_rows`, next fit by default),
    each as soon as its rows are complete; the last one is filled up with padding rows."""
    rows = []
    for row in pack_rows(examples, seq_len, fit=fit):
        rows.append(row)
        if len(rows) == batch_size:
            yield layout(rows, seq_len)
            rows = []
    if rows:
        yield layout(rows, seq_len, batch_size)


def batch_at(packed: Packed, step: int, batch_size: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """The batch of global step `step`: rows from a fresh permutation each epoch (seeded by
    (seed, epoch)); a pure function of its arguments, so resuming at a step is exact."""
    n = len(packed)
    if n == 0:
        raise DataError("no packed rows: the data set is empty after filtering")
    epoch, within = np.divmod(step * batch_size + np.arange(batch_size), n)
    orders = {e: np.random.default_rng([seed, int(e)]).permutation(n) for e in np.unique(epoch)}
    rows = np.array([orders[e][w] for e, w in zip(epoch, within)], np.int64)
    return {name: getattr(packed, name)[rows] for name in ("tokens", "loss_mask", "segment_ids", "positions")}
