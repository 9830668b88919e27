"""Timing a model piece by piece (scripts/profile_prefill.py, scripts/profile_decode.py): each piece
of a layer is built at its real shape, jitted on its own and timed; a `Pieces` table keeps one row
per piece for the JSON record and prints it as it comes, with the rate the piece reached against
the machine's measured peak.

    FlopPieces(peak_gflops, repeats, train=...)   prefill / training: ms, GFLOP, share of peak matmul
    BytePieces(bandwidth_gbs, steps, repeats)     decode: ms per step, bytes read, share of stream bandwidth

Both are called as `piece(name, f, weights, x, amount, ...) -> ms`, with `weights` an argument
of the jitted function (not a constant XLA could fold).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.bench import timing


def median_ms(fn, args, repeats=5) -> float:
    """Milliseconds of `fn(*args)`: one warm-up call, then the median of `repeats`."""
    return 1e3 * timing.median(lambda: fn(*args), repeats)


def nbytes(tree) -> int:
    """Bytes of every array in a pytree, as stored."""
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def vjp_step(f: Callable) -> Callable:
    """`run(weights, x, ct, *extra)` -> the gradients of <f(weights, x, *extra), ct> for (weights,
    x): a piece's forward and backward, as a training step runs it (`extra` is not differentiated)."""

    def run(w, x, ct, *extra):
        out, vjp = jax.vjp(lambda w, x: f(w, x, *extra), w, x)
        return vjp(ct.astype(out.dtype))

    return run


def loop_fn(step: Callable, *, steps: int) -> Callable:
    """jitted (weights, x) -> x after `x = step(weights, x)` run `steps` times in one fori_loop,
    the weights passed through `lax.optimization_barrier` with the carry (as `gptoss_jax.sampling`
    ties them to its step counter) so nothing is hoisted out of the loop."""

    def run(weights, x):
        def body(i, x):
            w, x = jax.lax.optimization_barrier((weights, x))  # (XLA sees through a fori_loop's i)
            return step(w, x)

        return jax.lax.fori_loop(0, steps, body, x)

    return jax.jit(run)


def loop_ms(step: Callable, weights, x, *, steps: int, repeats: int) -> float:
    """ms per iteration of `loop_fn(step, steps=steps)`, median of `repeats`."""
    f = loop_fn(step, steps=steps)
    return timing.median(lambda: f(weights, x), repeats) / steps * 1e3


class Pieces:
    """A table of timed pieces: `rows` for the record, each printed as it is added."""

    def __init__(self, say: Callable = print):
        self.rows: list[dict] = []
        self.say = say

    def add(self, row: dict, line: str) -> float:
        self.rows.append(row)
        self.say(line, flush=True)
        return row["ms"]


class FlopPieces(Pieces):
    """Pieces of a prefill (`f(weights, x, *extra)` jitted, median of `repeats`) or, with `train`,
    of a training step (its VJP with a random cotangent drawn from `rng`: 3x the forward's FLOPs).
    Rows: piece, ms, gflop, of_peak (share of `peak_gflops`)."""

    def __init__(self, peak_gflops: float, repeats: int, *, train=False, dtype=jnp.float32, rng=None, say=print):
        super().__init__(say)
        self.peak, self.repeats, self.train, self.dtype = peak_gflops, repeats, train, dtype
        self.rng = np.random.default_rng(0) if rng is None else rng

    def row(self, name: str, ms: float, flops: float) -> tuple[dict, str]:
        """The row and printed line of a piece that took `ms` for a forward of `flops`."""
        flops *= 3.0 if self.train else 1.0  # forward + backward = 3x the forward's FLOPs
        share = flops / (ms * 1e-3) / 1e9 / self.peak
        line = f"  {name:38s} {ms:9.1f} ms  {flops / 1e9:7.2f} GFLOP  {100 * share:5.1f}% of peak"
        return dict(piece=name, ms=ms, gflop=flops / 1e9, of_peak=share), line

    def time(self, f: Callable, weights, x, *extra) -> float:
        if self.train:
            ct = jnp.asarray(self.rng.standard_normal(jax.eval_shape(f, weights, x, *extra).shape), self.dtype)
            return median_ms(jax.jit(vjp_step(f)), (weights, x, ct) + extra, self.repeats)
        return median_ms(jax.jit(f), (weights, x) + extra, self.repeats)

    def __call__(self, name: str, f: Callable, weights, x, flops: float, *extra) -> float:
        """Time f(weights, x, *extra) -> array; `extra` (e.g. a routing) is an argument, not a
        constant to fold."""
        return self.add(*self.row(name, self.time(f, weights, x, *extra), flops))


class BytePieces(Pieces):
    """Pieces of a decode step (`loop_ms`: `steps` iterations in one jitted loop, median of
    `repeats`). Rows: piece, ms, bytes, gbs, of_bandwidth (share of `bandwidth_gbs`)."""

    def __init__(self, bandwidth_gbs: float, steps: int, repeats: int, say=print):
        super().__init__(say)
        self.bw, self.steps, self.repeats = bandwidth_gbs, steps, repeats

    def row(self, name: str, ms: float, read: float) -> tuple[dict, str]:
        """The row and printed line of a piece that took `ms` per step reading `read` bytes."""
        gbs = read / (ms * 1e-3) / 1e9
        line = (
            f"  {name:34s} {ms:8.2f} ms  reads {read / 1e6:8.1f} MB  {gbs:6.1f} GB/s  "
            f"{100 * gbs / self.bw:5.1f}% of stream"
        )
        return dict(piece=name, ms=ms, bytes=read, gbs=gbs, of_bandwidth=gbs / self.bw), line

    def __call__(self, name: str, step: Callable, weights, x, read: float) -> float:
        """Time `x = step(weights, x)` per iteration."""
        ms = loop_ms(step, weights, x, steps=self.steps, repeats=self.repeats)
        return self.add(*self.row(name, ms, read))
