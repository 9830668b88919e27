"""Reward functions over parsed harmony completions, and a weighted registry of them.

A reward function takes a `Completion` (the parsed messages, the token count, whether sampling
stopped on a stop token) and the reference answer, and returns a float. A config picks functions
by name with weights:

    rewards: {exact_match: 1.0, format: 0.1, length_penalty: 0.001}

`score` runs each one; a function that raises is caught, counted per name, and scores 0 (a
buggy reward must not kill a long run, nor pass silently).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence


@dataclasses.dataclass
class Completion:
    messages: list[dict]  # harmony.parse_completion of the sampled tokens
    num_tokens: int
    stopped: bool  # sampling stopped on <|return|> / <|call|> (False: cut at the length limit)

    @property
    def final(self) -> str | None:
        """The text of the last well-formed `final` message, or None.

        A final message flagged `"incomplete"` (the tokens end inside it) counts when sampling
        stopped on a stop token that is missing from the tokens (a server that strips it), and
        not when sampling was cut at the length limit: then the answer may be cut short."""
        for m in reversed(self.messages):
            if m.get("channel") == "final" and not m.get("malformed"):
                if m.get("incomplete") and not self.stopped:
                    return None
                return "".join(p.get("text", "") for p in m.get("content", []))
        return None


RewardFn = Callable[[Completion, str], float]
REGISTRY: dict[str, RewardFn] = {}


def register(name: str):
    def wrap(fn: RewardFn) -> RewardFn:
        REGISTRY[name] = fn
        return fn

    return wrap


@register("exact_match")
def exact_match(c: Completion, reference: str) -> float:
    """1 if the final answer equals the reference (surrounding whitespace ignored), else 0."""
    return float(c.final is not None and c.final.strip() == reference.strip())


_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


@register("numeric_match")
def numeric_match(c: Completion, reference: str, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> float:
    """1 if the last number in the final answer equals the reference's number within tolerance
    (so "The answer is 1,134." matches 1134), else 0."""
    if c.final is None:
        return 0.0
    found = _NUMBER.findall(c.final.replace(",", ""))
    want = _NUMBER.findall(reference.replace(",", ""))
    if not found or not want:
        return 0.0
    return float(math.isclose(float(found[-1]), float(want[-1]), rel_tol=rel_tol, abs_tol=abs_tol))


@register("format")
def format_valid(c: Completion, reference: str) -> float:
    """1 for a well-formed turn: at most one analysis message, then exactly one final message
    that ends the turn (stopped on <|return|>), and no malformed, incomplete or flagged message;
    else 0."""
    channels = [m.get("channel") for m in c.messages]
    if not c.stopped or any(m.get(k) for m in c.messages for k in ("malformed", "incomplete", "warnings")):
        return 0.0
    return float(channels in (["final"], ["analysis", "final"]))


@register("length_penalty")
def length_penalty(c: Completion, reference: str) -> float:
    """Minus the number of generated tokens (weight it small: e.g. 1e-3 per token)."""
    return -float(c.num_tokens)


@dataclasses.dataclass
class RewardSpec:
    weights: dict[str, float]

    def __post_init__(self):
        unknown = sorted(set(self.weights) - set(REGISTRY))
        if unknown or not self.weights:
            raise ValueError(
                f"unknown reward(s) {unknown}; known: {sorted(REGISTRY)}"
                if unknown
                else "at least one reward must be given"
            )


def score(completions: Sequence[Completion], references: Sequence[str], spec: RewardSpec):
    """-> (total [N] weighted sums, {name: [N] raw values}, {name: number of calls that raised})."""
    parts = {name: [] for name in spec.weights}
    errors = {name: 0 for name in spec.weights}
    for c, ref in zip(completions, references):
        for name in spec.weights:
            try:
                value = float(REGISTRY[name](c, ref))
                if not math.isfinite(value):
                    raise ValueError(f"reward {name} returned {value}")
            except Exception:  # noqa: BLE001 - counted and scored 0, see the module doc
                value = 0.0
                errors[name] += 1
            parts[name].append(value)
    total = [sum(spec.weights[n] * parts[n][i] for n in spec.weights) for i in range(len(completions))]
    return total, parts, errors


def from_config(weights: Mapping[str, float]) -> RewardSpec:
    return RewardSpec({str(k): float(v) for k, v in weights.items()})
