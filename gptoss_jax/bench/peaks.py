"""What this machine can do at best, measured: matmul FLOP/s and stream bandwidth, and which CPU
(model, instruction sets) it is.

Matmul: a jitted `jnp.dot` of two n x n matrices (and `torch.mm` when torch is installed), median
of repeats, 2 n^3 FLOPs per product. Stream bandwidth (the STREAM convention): bytes read + bytes
written per second of a large array copy (2 x size) or add (3 x size for x + y, 2 x size for
x + 1). `bounds()` is the table scripts/bench.py prints and records: the best of each.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.bench import timing

# instruction-set flags that decide how fast XLA and torch run matmuls on a CPU
ISA_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "avx_vnni",
)


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("this probe needs torch (an optional extra: `make setup-test`)") from e
    return torch


def has_torch() -> bool:
    try:
        _torch()
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------ matmul
def jax_matmul(n: int, dtype, repeats: int, accumulate=None) -> float:
    """FLOP/s of a jitted n x n `jnp.dot` in `dtype` (`accumulate`: its preferred_element_type)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=accumulate))
    return 2 * n**3 / timing.median(lambda: f(a, b), repeats)


def torch_matmul(n: int, dtype: str, repeats: int) -> float:
    """FLOP/s of `torch.mm` of n x n matrices of torch dtype `dtype` ("float32", "bfloat16")."""
    torch = _torch()
    a = torch.randn(n, n).to(getattr(torch, dtype))
    b = torch.randn(n, n).to(getattr(torch, dtype))
    return 2 * n**3 / timing.median(lambda: torch.mm(a, b), repeats)


# --------------------------------------------------------------------------------- bandwidth
def stream_rate(fn: Callable, nbytes: int, repeats: int, *, reduce=timing.median, warmup: int = 1) -> float:
    """Bytes per second of `fn`, which moves `nbytes` (read + written) per call."""
    return nbytes / reduce(fn, repeats, warmup=warmup)


def jax_add_stream(nbytes: int, repeats: int, operands: int = 2) -> float:
    """A jitted add over fp32 arrays of `nbytes` into a donated buffer (the output reuses the input's
    pages, so no fresh pages are faulted in per call): x + y (3 x nbytes moved) or x + 1 (2 x)."""
    n = nbytes // 4
    y = jnp.ones((n,), jnp.float32) if operands == 2 else jnp.float32(1.0)
    add = jax.jit(lambda x, y: x + y, donate_argnums=0)
    box = [add(jnp.zeros((n,), jnp.float32), y)]

    def step():
        box[0] = add(box[0], y)
        return box[0]

    return stream_rate(step, (operands + 1) * n * 4, repeats)


def host_streams(nbytes: int, repeats: int, torch=None) -> dict:
    """numpy (one thread) and, given the torch module, torch copies and adds of fp32 arrays of
    `nbytes`: {name: bytes/s}. The arrays are freed on return."""
    n = nbytes // 4
    a = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    b = np.ones(n, np.float32)
    c = np.empty(n, np.float32)
    bw = {
        "numpy copy (1 thread)": stream_rate(lambda: np.copyto(c, a), 2 * nbytes, repeats),
        "numpy add (1 thread)": stream_rate(lambda: np.add(a, b, out=c), 3 * nbytes, repeats),
    }
    if torch is not None:
        ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
        threads = torch.get_num_threads()
        bw[f"torch copy ({threads} threads)"] = stream_rate(lambda: tc.copy_(ta), 2 * nbytes, repeats)
        bw[f"torch add ({threads} threads)"] = stream_rate(lambda: torch.add(ta, tb, out=tc), 3 * nbytes, repeats)
    return bw


def read_rate(nbytes: int, repeats: int) -> float:
    """Bytes per second read by a jitted max over an fp32 array of `nbytes` (XLA's reduction on
    every core; nothing written), best of `repeats`: the rate a decode step, which only reads its
    weights, can reach. On the shared machines measured it differed from a copy's rate (bytes read
    + written) by up to a third, either way from run to run, so both are worth recording."""
    a = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(jnp.max)
    return stream_rate(lambda: f(a), a.size * 4, repeats, reduce=timing.best)


def threaded_copy(nbytes: int, repeats: int, threads: int) -> dict:
    """numpy copies of a uint8 array of `nbytes`, with one thread and with `threads` threads over
    page-aligned slices, best of `repeats` (no warm-up: both arrays are touched beforehand)."""
    src = np.full(nbytes, 1, np.uint8)
    dst = np.zeros(nbytes, np.uint8)  # both touched: no page faults inside the timing
    parts = np.array_split(np.arange(nbytes // 4096 + 1) * 4096, threads)
    bounds = [(int(p[0]), min(nbytes, int(p[-1]) + 4096)) for p in parts if len(p)]
    one = stream_rate(lambda: np.copyto(dst, src), 2 * nbytes, repeats, reduce=timing.best, warmup=0)
    with concurrent.futures.ThreadPoolExecutor(threads) as ex:

        def par():
            list(ex.map(lambda b: np.copyto(dst[b[0] : b[1]], src[b[0] : b[1]]), bounds))

        many = stream_rate(par, 2 * nbytes, repeats, reduce=timing.best, warmup=0)
    return {"one": one, "many": many, "check": bool(dst[::4096].all())}


# ------------------------------------------------------------------------------------ bounds
def bounds(quick: bool, say: Callable = print) -> dict:
    """The matmul and bandwidth peaks of scripts/bench.py's "bounds" section:
    {"matmul": {dtype: {"jax", "jax_case", "torch", "torch_case", "bound", "bound_from", "all"}},
     "bandwidth": {"all", "bound", "bound_from"}}; the bound is the best of every variant."""
    sizes = [1024, 2048] if quick else [2048, 4096]
    reps = 3 if quick else 5
    torch = _torch() if has_torch() else None
    out = {"matmul": {}, "bandwidth": {}}
    say(f"  peak matmul (square n x n, median of {reps}; GFLOP/s = 2n^3 / s):")
    for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        variants = {"jax": {}, "torch": {}}
        torch_ok = torch is not None
        if torch_ok:  # e.g. bf16 on a CPU without bf16 instructions: minutes per large product
            rate = torch_matmul(512, name, 3)
            if rate < 10e9:
                variants["torch"]["torch.mm n=512 (larger sizes skipped: too slow)"] = rate
                torch_ok = False
        for n in sizes:
            for acc in [None] if dt == jnp.float32 else [None, jnp.float32]:  # bf16 out, fp32 out
                tag = f"jnp.dot n={n}" + ("" if acc is None else " ->f32")
                variants["jax"][tag] = jax_matmul(n, dt, reps, acc)
            if torch_ok:
                variants["torch"][f"torch.mm n={n}"] = torch_matmul(n, name, reps)
        if not variants["torch"]:
            variants["torch"]["torch not installed"] = 0.0
        best = {lib: max(v.items(), key=lambda kv: kv[1]) for lib, v in variants.items()}
        lib = max(best, key=lambda k: best[k][1])
        every = {**variants["jax"], **variants["torch"]}
        out["matmul"][name] = {
            "jax": best["jax"][1],
            "jax_case": best["jax"][0],
            "torch": best["torch"][1],
            "torch_case": best["torch"][0],
            "bound": best[lib][1],
            "bound_from": f"{lib} ({best[lib][0]})",
            "all": every,
        }
        say(
            f"    {name:9s} jax {best['jax'][1] / 1e9:7.1f} GFLOP/s ({best['jax'][0]})   torch "
            f"{best['torch'][1] / 1e9:7.1f} GFLOP/s ({best['torch'][0]})   -> bound "
            f"{best[lib][1] / 1e9:.1f} GFLOP/s [{lib}]"
        )
        say("      all: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in every.items()))

    nbytes = (256 if quick else 1024) * 2**20
    say(f"  stream bandwidth ({nbytes // 2**20} MiB fp32 arrays, bytes read + written, median of {reps}):")
    bw = host_streams(nbytes, reps, torch)
    bw["jax add (jit, donated)"] = jax_add_stream(nbytes, reps)
    for k, v in bw.items():
        say(f"    {k:28s} {v / 1e9:7.2f} GB/s")
    best_bw = max(bw, key=bw.get)
    read = read_rate(nbytes, reps)
    out["bandwidth"] = {"all": bw, "bound": bw[best_bw], "bound_from": best_bw, "read": read}
    say(f"    -> bound {bw[best_bw] / 1e9:.2f} GB/s [{best_bw}]")
    say(f"  read-only rate (jitted max over {nbytes // 2**20} MiB, best of {reps}): {read / 1e9:.2f} GB/s")
    return out


def peaks_of(bounds_record: dict) -> dict:
    """{"float32", "bfloat16": FLOP/s, "bandwidth": bytes/s, "read": bytes/s or None} of a
    `bounds()` record (records older than the read-only rate have none)."""
    m = bounds_record["matmul"]
    return {
        "float32": m["float32"]["bound"],
        "bfloat16": m["bfloat16"]["bound"],
        "bandwidth": bounds_record["bandwidth"]["bound"],
        "read": bounds_record["bandwidth"].get("read"),
    }


# ---------------------------------------------------------------------------------------- CPU
def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """Model name, the ISA flags above that the CPU has, and the cores this process may use."""
    model, flags = None, set()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"model": model, "isa": [f for f in ISA_FLAGS if f in flags], "cores": cores}
