"""Evaluation: next-token loss / perplexity on held-out conversations, and task accuracy by
generating an answer in the harmony format and comparing its parsed `final` message.

For accuracy each held-out conversation ends with the reference assistant turn (analysis
optional, then final); the prompt is everything before that turn, rendered for completion with
the conversation's own system message (so its reasoning effort applies).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax import harmony, sampling
from gptoss_jax.train.data import Packed
from gptoss_jax.train.losses import next_token_loss


def evaluate_loss(model, packed: Packed, *, batch_size: int = 8) -> dict:
    """Mean next-token loss over every target of `packed` (each row once) and its perplexity."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def sums(state, tokens, mask, seg, pos):
        logits = nnx.merge(graphdef, state)(tokens, positions=pos, segment_ids=seg).logits
        mean, n = next_token_loss(logits, tokens, mask, seg)
        return mean * n, n

    total, count = 0.0, 0.0
    for i in range(0, len(packed), batch_size):
        rows = slice(i, i + batch_size)
        parts = [getattr(packed, k)[rows] for k in ("tokens", "loss_mask", "segment_ids", "positions")]
        short = batch_size - parts[0].shape[0]
        if short:  # pad the last batch with empty rows (segment 0: no targets), one compilation
            parts = [np.pad(p, ((0, short), (0, 0))) for p in parts]
        s, n = sums(state, *map(jnp.asarray, parts))
        total, count = total + float(s), count + float(n)
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "targets": int(count)}


def split_reference(conversation: Sequence[dict]) -> tuple[list[dict], str]:
    """(prompt messages, reference final answer): the trailing assistant messages are the answer."""
    cut = len(conversation)
    while cut > 0 and conversation[cut - 1]["role"] == "assistant":
        cut -= 1
    finals = [m for m in conversation[cut:] if m.get("channel") == "final"]
    if cut == len(conversation) or not finals:
        raise ValueError("a held-out conversation must end with an assistant turn holding a final message")
    text = "".join(p["text"] for p in finals[-1]["content"] if p["type"] == "text")
    return list(conversation[:cut]), text


def final_answer(messages: Sequence[dict]) -> str | None:
    """The text of the last well-formed `final` message of a parsed completion (None if none).

    A final message the completion ends inside (`"incomplete"`: no `<|return|>`, as when a server
    strips the stop token) counts, as openai-harmony parses it; `"warnings"` do not matter here."""
    for m in reversed(messages):
        if m.get("channel") == "final" and not m.get("malformed"):
            return "".join(p.get("text", "") for p in m.get("content", []))
    return None


def exact_match(answer: str | None, reference: str) -> bool:
    return answer is not None and answer.strip() == reference.strip()


def task_accuracy(
    model,
    tokenizer,
    conversations: Sequence[Sequence[dict]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    match: Callable[[str | None, str], bool] = exact_match,
    generate=None,
    examples: int = 5,
) -> dict:
    """Greedy answers to the prompts of `conversations`, scored against their reference finals."""
    generate = generate or sampling.generate
    prompts, refs = zip(*(split_reference(c) for c in conversations))
    correct, shown, right = 0, [], []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        rendered = [harmony.render_for_completion(p, tokenizer) for p in chunk]
        gen = generate(model, tokenizer, rendered, max_new_tokens=max_new_tokens, temperature=0.0)
        for j, toks in enumerate(gen.tokens):
            answer = final_answer(harmony.parse_completion(toks, tokenizer))
            ok = match(answer, refs[i + j])
            correct += ok
            right.append(bool(ok))
            if len(shown) < examples:
                shown.append({"reference": refs[i + j], "answer": answer, "correct": bool(ok)})
    n = len(prompts)
    return {
        "accuracy": correct / n if n else float("nan"),
        "correct": correct,
        "total": n,
        "examples": shown,
        "right": right,
    }  # per conversation, in order: for paired comparisons of two models


def mcnemar(before: Sequence[bool], after: Sequence[bool]) -> dict:
    """Exact McNemar test of two scorings of the same problems (right/wrong before and after):
    only the problems that changed count. Under "no change in accuracy" a changed problem is
    fixed or broken with probability 1/2, so the two-sided p-value is twice the binomial tail of
    the smaller count (at most 1). -> {fixed, broken, p_value}."""
    if len(before) != len(after):
        raise ValueError(f"scorings of different problem sets: {len(before)} vs {len(after)} answers")
    fixed = sum(1 for b, a in zip(before, after) if a and not b)
    broken = sum(1 for b, a in zip(before, after) if b and not a)
    n, k = fixed + broken, min(fixed, broken)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 1.0
    return {"fixed": fixed, "broken": broken, "p_value": min(1.0, 2.0 * tail)}


def write_results(path: str, results: dict) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
