"""Talking to a checkpoint in the harmony format, as `gptoss generate` and `gptoss chat` do. `load`
checks the sampling options, the tokenizer and the prompt against the checkpoint's config.json
before any weight is read; `reply` generates one assistant turn and streams its final channel
(and the analysis, if asked) to a file object; `Chat` keeps the history of a conversation."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from collections.abc import Mapping

import gptoss_jax as gj
from gptoss_jax import harmony, preflight, sharding
from gptoss_jax.sampling import check_sampling_options, generate


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The sampling options of a turn, as `generate` takes them."""

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def check(self, vocab_size: int | None = None, names: Mapping[str, str] | None = None) -> None:
        """ValueError for an option `generate` would refuse; `names` spells the options in the message."""
        check_sampling_options(**self.kwargs(), vocab_size=vocab_size, names=names)

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


def conversation_start(reasoning_effort: str = "medium", developer: str | None = None) -> list[dict]:
    """The system message (and the developer's, if any) every conversation starts with."""

    msgs = [harmony.system_message(reasoning_effort=reasoning_effort)]
    if developer:
        msgs.append(harmony.developer_message(developer))
    return msgs


def read_conversation(path: str) -> list[dict]:
    """A JSON file of openai-harmony messages, normalized; ValueError (starting with `path`) if it is
    not JSON or not a conversation."""

    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    try:
        return harmony.normalize_conversation(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """The ids a prompt becomes: a conversation rendered for the next assistant turn, or plain text
    encoded as it is (special tokens as text)."""

    if isinstance(prompt, str):
        return tokenizer.encode(prompt, disallowed_special=())
    return harmony.render_for_completion(prompt, tokenizer)


def load(
    checkpoint: str,
    *,
    sampling: Sampling,
    prompt: str | list[dict] | None = None,
    dtype="bfloat16",
    tokenizer: str | None = None,
    mesh: str | None = None,
    names: Mapping[str, str] | None = None,
):
    """(model, tokenizer) of `checkpoint` for chatting. The mesh spec (e.g. 'fsdp=2,expert=4'), the
    sampling options (`names` spells them in messages), the tokenizer (default: the checkpoint's)
    and `prompt` (a conversation or raw text: its ids and length) are all checked before the
    weights are loaded."""

    mesh_spec = sharding.parse_mesh(mesh) if mesh else None
    cfg = preflight.checkpoint_config(checkpoint)
    sampling.check(cfg.vocab_size, names)
    tok = gj.load_tokenizer(tokenizer or checkpoint)
    if prompt is not None:
        preflight.check_prompt(prompt_ids(tok, prompt), cfg, sampling.max_new_tokens)
    device_mesh = sharding.mesh_from_config(mesh_spec) if mesh_spec is not None else None
    return gj.load(checkpoint, dtype=dtype, mesh=device_mesh), tok


def complete(model, tokenizer, text: str, sampling: Sampling, out=None) -> None:
    """Plain text completion of `text` (no chat format) until <|endoftext|>, streamed to `out`
    (default stdout), then a newline."""

    out = out or sys.stdout

    def write(_row, toks):
        out.write(tokenizer.decode(toks))
        out.flush()

    generate(
        model,
        tokenizer,
        [text],
        stop_tokens=(tokenizer.token_id("<|endoftext|>"),),
        stream=write,
        **sampling.kwargs(),
    )
    out.write("\n")


def reply(model, tokenizer, conversation: list[dict], sampling: Sampling, *, show_analysis=False, out=None):
    """Generate one assistant turn, streaming the final channel (and analysis and commentary if
    `show_analysis`) to `out` (default stdout); returns the parsed messages. A message that breaks
    the format is still shown, with what is wrong with it."""

    out = out or sys.stdout
    prompt = harmony.render_for_completion(conversation, tokenizer)
    parser = harmony.StreamParser(tokenizer, role="assistant")
    shown = {"printed": 0}

    def visible(channel):
        return channel in ("final", None) or (show_analysis and channel in ("analysis", "commentary"))

    def completed(msg):
        text = msg["content"][0]["text"] if msg.get("content") else ""
        if msg.get("malformed"):  # never hide what the model wrote, even when it broke the format
            out.write(f"{text[shown['printed'] :]}\n[not valid harmony: {msg['malformed']}]\n")
        elif visible(msg.get("channel")) or msg.get("warnings"):
            out.write(text[shown["printed"] :] + "\n")
            if msg.get("warnings"):  # accepted by openai-harmony, but not what a caller expects
                out.write(f"[harmony: {msg['warnings']}]\n")
        shown["printed"] = 0

    def on_tokens(_row, toks):
        for t in toks:
            for msg in parser.feed(t):
                completed(msg)
            cur = parser.current  # written as its text grows: the channel tag once, before the first text
            if cur and cur["state"] == "content" and visible(cur["channel"]) and len(cur["content"]) > shown["printed"]:
                if shown["printed"] == 0 and cur["channel"] != "final":
                    out.write(f"[{cur['channel']}] ")
                out.write(cur["content"][shown["printed"] :])
                shown["printed"] = len(cur["content"])
        out.flush()

    gen = generate(model, tokenizer, [prompt], stream=on_tokens, **sampling.kwargs())
    for msg in parser.finish():
        completed(msg)
    if gen.stop_reason[0] == "length":
        out.write("\n[stopped at --max-new-tokens]\n")
    return parser.messages


class Chat:
    """A conversation with a loaded model: `send` a user message, get the reply streamed to `out`.
    It starts from the messages `start` (e.g. `conversation_start(...)`), and again on `reset`. The
    analysis of finished turns is dropped on the next render, as the format says; messages that
    broke the format are kept out of the history."""

    def __init__(self, model, tokenizer, sampling: Sampling, start: list[dict], *, show_analysis: bool = False):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.start, self.show_analysis = copy.deepcopy(start), show_analysis
        self.reset()

    def reset(self) -> None:
        """Back to the start messages alone."""
        self.history = copy.deepcopy(self.start)

    def send(self, text: str, out=None) -> list[dict]:
        """Add the user message `text`, generate and stream the reply; returns its messages."""
        self.history.append(harmony.user(text))
        messages = reply(
            self.model, self.tokenizer, self.history, self.sampling, show_analysis=self.show_analysis, out=out
        )
        self.history.extend(m for m in messages if not m.get("malformed"))
        return messages
