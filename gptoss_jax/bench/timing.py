"""One timer for every benchmark: warm-up calls run untimed, each timed call waits for its result
(`jax.block_until_ready` on whatever the call returns; a no-op for non-JAX values), and the
figure of a row is the median (or, where a script says so, the minimum) of the timed calls.

    seconds(fn, repeats, warmup=1) -> [s, ...]     one entry per timed call
    median(fn, ...) / best(fn, ...)                 their median / minimum
    capped(fn, repeats, cap, budget)                fewer repeats when a call is slow
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax

Clock = Callable[[], float]


def once(fn: Callable, clock: Clock = time.perf_counter) -> float:
    """Seconds of one call of `fn`, its result ready."""
    t = clock()
    jax.block_until_ready(fn())
    return clock() - t


def seconds(fn: Callable, repeats: int, *, warmup: int = 1, clock: Clock = time.perf_counter) -> list[float]:
    """`warmup` untimed calls (compilation, allocator), then `repeats` timed ones."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    return [once(fn, clock) for _ in range(repeats)]


def median(fn: Callable, repeats: int, *, warmup: int = 1, clock: Clock = time.perf_counter) -> float:
    return statistics.median(seconds(fn, repeats, warmup=warmup, clock=clock))


def best(fn: Callable, repeats: int, *, warmup: int = 1, clock: Clock = time.perf_counter) -> float:
    return min(seconds(fn, repeats, warmup=warmup, clock=clock))


def capped(
    fn: Callable, repeats: int, cap: float, budget: float, clock: Clock = time.perf_counter
) -> tuple[list[float], str]:
    """A timed warm-up, then `repeats` timed calls, fewer (but at least 2) when they would take
    more than `budget` seconds. A warm-up longer than `cap` is itself the one sample (for code
    with nothing to compile). -> (seconds per call, a note saying what was cut, or "")."""
    t_w = once(fn, clock)
    if t_w > cap:
        return [t_w], "1 run: the warm-up, longer than the cap"
    n = max(2, min(repeats, int(budget / max(t_w, 1e-9))))
    return [once(fn, clock) for _ in range(n)], (f"{n} of {repeats} repeats (time budget)" if n < repeats else "")


def stats(xs) -> dict:
    """{"median", "min", "max", "n"} of a list of numbers (the record format of bench.py)."""
    xs = [float(x) for x in xs]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}
