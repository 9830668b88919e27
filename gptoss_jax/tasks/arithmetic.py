"""Multi-digit addition in the harmony chat format, with a short column-by-column analysis.

    user:      What is 777 + 76?
    analysis:  777 + 76: 7+6+0=13, so far 3. 77 + 7: 7+7+1=15, so far 53. 7 + 0: 7+0+1=8, so far 853.
    final:     853

Each step restates what is left of the operands, adds their last digits and the carry (the tens
digit of the previous sum), and prepends the new digit to the partial result (the whole sum at
the last column). Every step therefore reads only what sits right before it or copies the
previous step, which a small transformer learns from a few thousand examples; the final answer
copies the last partial result. The operands are restated in the question's own spelling (same
tokens), which makes the first copy as easy to learn as the later ones.

Problems are a pure function of (seed, index); train and held-out sets come from different seeds
and a held-out problem that also occurs in the training set is replaced, so accuracy is measured
on unseen problems.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator


def problem(rng: random.Random, min_digits: int, max_digits: int) -> tuple[int, int]:
    """Two operands whose digit counts are drawn independently from [min_digits, max_digits]."""

    def operand():
        n = rng.randint(min_digits, max_digits)
        return rng.randint(10 ** (n - 1) if n > 1 else 0, 10**n - 1)

    return operand(), operand()


def analysis(a: int, b: int) -> str:
    steps, carry, so_far = [], 0, ""
    ra, rb = str(a), str(b)
    while True:
        x, y = int(ra[-1]), int(rb[-1])
        total = x + y + carry
        last = len(ra) == 1 and len(rb) == 1
        so_far = (str(total) if last else str(total % 10)) + so_far
        steps.append(f"{ra} + {rb}: {x}+{y}+{carry}={total}, so far {so_far}.")
        if last:
            return " ".join(steps)
        carry = total // 10
        ra, rb = ra[:-1] or "0", rb[:-1] or "0"


def conversation(a: int, b: int) -> dict:
    """One training example in the chat shape (`train.data` turns it into harmony messages)."""
    return {
        "messages": [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "thinking": analysis(a, b), "content": str(a + b)},
        ]
    }


def problems(
    n: int, *, seed: int, min_digits: int = 1, max_digits: int = 3, exclude: set | None = None
) -> Iterator[tuple[int, int]]:
    rng = random.Random(seed)
    made = 0
    while made < n:
        a, b = problem(rng, min_digits, max_digits)
        if exclude is not None and (a, b) in exclude:
            continue
        made += 1
        yield a, b


def write_splits(
    train_path: str,
    eval_path: str,
    *,
    train_size: int,
    eval_size: int,
    seed: int = 0,
    min_digits: int = 1,
    max_digits: int = 3,
    final_noise: float = 0.0,
) -> dict:
    """Train and held-out jsonl files; held-out problems never occur in the training set.

    final_noise: the fraction of training examples whose final answer is made wrong (its last
    digit plus one, mod 10) while the analysis stays right: a start for RL whose own working is
    right more often than its answers (held-out examples are always right)."""
    if not 0.0 <= final_noise <= 1.0:
        raise ValueError(f"final_noise must be in [0, 1], got {final_noise}")
    train = list(problems(train_size, seed=seed, min_digits=min_digits, max_digits=max_digits))
    held = list(
        problems(eval_size, seed=seed + 1_000_003, min_digits=min_digits, max_digits=max_digits, exclude=set(train))
    )
    noise = random.Random(seed + 2_000_003)
    perturbed = 0
    for path, items, rate in ((train_path, train, final_noise), (eval_path, held, 0.0)):
        with open(path, "w") as f:
            for a, b in items:
                ex = conversation(a, b)
                if rate and noise.random() < rate:
                    answer = ex["messages"][-1]["content"]
                    ex["messages"][-1]["content"] = answer[:-1] + str((int(answer[-1]) + 1) % 10)
                    perturbed += 1
                f.write(json.dumps(ex) + "\n")
    return {
        "train": len(train),
        "train_finals_perturbed": perturbed,
        "eval": len(held),
        "min_digits": min_digits,
        "max_digits": max_digits,
        "heldout_first": [list(p) for p in held[:8]],
    }


def corpus(n: int = 2000, *, seed: int = 0, max_digits: int = 6) -> Iterator[str]:
    """Texts to train a small tokenizer on: the phrasing of the task (numbers are split into
    single digits by the tokenizer, so their values do not matter)."""
    for a, b in problems(n, seed=seed, max_digits=max_digits):
        yield f"What is {a} + {b}?"
        yield analysis(a, b)
        yield str(a + b)


def read_problems(path: str) -> list[tuple[int, int]]:
    """The (a, b) of every conversation of a jsonl written here."""
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                q = json.loads(line)["messages"][0]["content"]  # "What is A + B?"
                a, b = q.removeprefix("What is ").removesuffix("?").split(" + ")
                out.append((int(a), int(b)))
    return out


def write_problems(path: str, n: int, *, seed: int, exclude=(), min_digits: int = 1, max_digits: int = 3) -> int:
    """`n` fresh problems (none of `exclude`) as conversations with reference answers, e.g. the
    prompts of an RL run that must not be problems the model was trained or is evaluated on."""
    items = problems(n, seed=seed, min_digits=min_digits, max_digits=max_digits, exclude=set(exclude))
    with open(path, "w") as f:
        for a, b in items:
            f.write(json.dumps(conversation(a, b)) + "\n")
    return n
