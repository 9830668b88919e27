"""Two changes to the native decode kernels, each product timed against the kernels before them
(the source at `--before`, default b7de93c, built and registered under other names) and XLA's
code, in one process, the sides' order rotating.

    python experiments/2026-12-06-matvec-rows/kernels.py      # writes kernels.json + table.md here

1. Packed MXFP4 experts: a work item was 16 output rows (24 KB of a 20b expert), the two threads
   taking them in turn; now an item is a run of up to 256 rows (about four items per thread).
2. Dense `[in, out]` products with fp32 inputs (an fp32 model's projections and dense experts):
   every row that chose a matrix streamed the stored rows again (from cache); now up to four such
   rows share each load (AVX-512), as the bf16 path already did.

Rows: gpt-oss-20b's packed experts (gate_up [5760, 2880], down [2880, 2880]; 4 rows per token,
each its own of 32; inputs bf16 values, as in a bf16 model); the fp32 benchmark model's
(`scripts/bench.py`: d_model 512, 16 experts of [512, 1024] and [512, 512]; 4 rows per token)
projections and experts, gpt-oss-20b's query projection in fp32, and the output heads (kernel
unchanged; XLA's side as the plan runs it without the native kernels) at B tokens. Every case:
`--calls` calls per timing, median of `--repeats` timings. GB/s = bytes of the weights read / time.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from gptoss_jax import cpu_matvec, host, layers, mxfp4  # noqa: E402
from gptoss_jax.bench import records  # noqa: E402


def register_before(commit: str, tmp: str) -> None:
    """Build the kernel source of `commit` and register it as gptoss_*_before."""
    src = subprocess.run(
        ["git", "-C", ROOT, "show", f"{commit}:gptoss_jax/native/matvec.cc"], capture_output=True, text=True, check=True
    ).stdout
    path = os.path.join(tmp, "before.cc")
    with open(path, "w") as f:
        f.write(src)
    so = os.path.join(tmp, "before.so")
    subprocess.run(["g++", *cpu_matvec.FLAGS, f"-I{jax.ffi.include_dir()}", path, "-o", so], check=True)
    lib = ctypes.CDLL(so)
    register_before.lib = lib  # keep it loaded
    for name, sym in (("gptoss_matvec_before", "GptossMatvec"), ("gptoss_mxfp4_matvec_before", "GptossMxfp4Matvec")):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, sym)), platform="cpu")


def before_matvec(x, w, ids):
    call = jax.ffi.ffi_call("gptoss_matvec_before", jax.ShapeDtypeStruct((x.shape[0], w.shape[2]), jnp.float32))
    return call(x.astype(jnp.float32), w, ids, out_in=False)


def before_matvec_out_in(x, w):
    call = jax.ffi.ffi_call("gptoss_matvec_before", jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32))
    return call(x.astype(jnp.float32), w[None], jnp.zeros((x.shape[0],), jnp.int32), out_in=True)


def before_mxfp4(x, t, ids):
    call = jax.ffi.ffi_call(
        "gptoss_mxfp4_matvec_before", jax.ShapeDtypeStruct((x.shape[0], t.blocks.shape[1]), jnp.float32)
    )
    return call(x.astype(jnp.float32), t.blocks, t.scales, ids)


def timed(fn, args, calls):
    t = time.perf_counter()
    for _ in range(calls):
        r = fn(*args)
    jax.block_until_ready(r)
    return (time.perf_counter() - t) / calls


def compare(name, fns, args, nbytes, calls, repeats):
    fns = {k: jax.jit(f) for k, f in fns.items()}
    outs = {k: np.asarray(f(*args), np.float64) for k, f in fns.items()}
    ref = outs["xla"]
    rel = {k: float(np.abs(v - ref).max() / np.abs(ref).max()) for k, v in outs.items() if k != "xla"}
    names = list(fns)
    ts = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            ts[k].append(timed(fns[k], args, calls))
    med = {k: statistics.median(v) for k, v in ts.items()}
    row = {
        "case": name,
        "bytes": nbytes,
        "seconds": ts,
        "ms": {k: 1e3 * v for k, v in med.items()},
        "gb_per_s": {k: nbytes / v / 1e9 for k, v in med.items()},
        "after_over_before": med["before"] / med["after"],
        "max_rel_diff_vs_xla": rel,
    }
    print(
        f"{name:52s} "
        + "  ".join(f"{k} {row['ms'][k]:7.3f} ms ({row['gb_per_s'][k]:5.1f} GB/s)" for k in names)
        + f"  after/before {row['after_over_before']:.2f}x  rel diff {rel['after']:.1e}",
        flush=True,
    )
    return row


def packed_cases(rng, tokens, calls, repeats):
    rows = []
    for name, (O, I) in (("20b experts gate_up", (5760, 2880)), ("20b experts down", (2880, 2880))):
        G = I // 32
        t = mxfp4.MXFP4(
            jnp.asarray(rng.integers(0, 256, (32, O, G, 16), dtype=np.uint8)),
            jnp.asarray(rng.integers(118, 123, (32, O, G), dtype=np.uint8)),
        )
        for B in tokens:
            ids = jnp.asarray(rng.integers(0, 32, 4 * B), jnp.int32)
            chosen = len(set(np.asarray(ids).tolist()))
            x = jnp.asarray(rng.standard_normal((4 * B, I)), jnp.bfloat16).astype(jnp.float32)
            fns = {
                "xla": lambda x, t, i: mxfp4.gathered_matvec(x, t, i),
                "before": before_mxfp4,
                "after": lambda x, t, i: cpu_matvec.mxfp4_matvec(x, t, i),
            }
            label = f"{name} B={B} ({4 * B} rows, {chosen} of 32 [{O}, {I}])"
            rows.append(compare(label, fns, (x, t, ids), chosen * O * G * 17, calls, repeats))
        del t
    return rows


def dense_cases(rng, tokens, calls, repeats):
    rows = []
    f32 = lambda *shape: jnp.asarray((rng.standard_normal(shape) * 0.02).astype(np.float32))
    # (label, stack of matrices [E, I, O], rows per token choosing a random one of E, or all the first)
    shapes = (
        ("bench attention q (12 x [512, 512])", (12, 512, 512), "stack"),
        ("bench experts gate_up (16 x [512, 1024])", (16, 512, 1024), 4),
        ("bench experts down (16 x [512, 512])", (16, 512, 512), 4),
        ("20b attention q fp32 (4 x [2880, 4096])", (4, 2880, 4096), "stack"),
    )
    for label, (E, I, O), per_token in shapes:
        w = f32(E, I, O)
        for B in tokens:
            if per_token == "stack":  # B rows through each matrix of the stack in turn (layers)
                x = f32(B, I) * 50
                fns = {
                    "xla": lambda x, w: jnp.stack([x @ w[e] for e in range(w.shape[0])]),
                    "before": lambda x, w: jnp.stack(
                        [before_matvec(x, w, jnp.full((x.shape[0],), e, jnp.int32)) for e in range(w.shape[0])]
                    ),
                    "after": lambda x, w: jnp.stack(
                        [cpu_matvec.matvec(x, w, jnp.full((x.shape[0],), e, jnp.int32)) for e in range(w.shape[0])]
                    ),
                }
                rows.append(compare(f"{label} B={B}", fns, (x, w), E * I * O * 4, calls, repeats))
            else:
                ids = jnp.asarray(rng.integers(0, E, per_token * B), jnp.int32)
                chosen = len(set(np.asarray(ids).tolist()))
                x = f32(per_token * B, I) * 50
                fns = {
                    "xla": lambda x, w, i: jnp.einsum("RI,RIO->RO", x, w[i]),
                    "before": before_matvec,
                    "after": lambda x, w, i: cpu_matvec.matvec(x, w, i),
                }
                rows.append(
                    compare(f"{label} B={B} ({chosen} chosen)", fns, (x, w, ids), chosen * I * O * 4, calls, repeats)
                )
        del w
    return rows


def head_cases(rng, tokens, calls, repeats):
    """The output head ([out, in], kernel unchanged): the benchmark model's fp32 table [8192, 512]
    and gpt-oss-20b's bf16 table with fp32 inputs, against XLA's multiply-reduce (the CPU plan's
    head up to 8 rows when the native kernels are off)."""
    rows = []
    for label, (V, D), dtype in (
        ("bench head fp32", (8192, 512), jnp.float32),
        ("20b head bf16, fp32 x", (201088, 2880), jnp.bfloat16),
    ):
        table = jnp.asarray((rng.standard_normal((V, D)) * 0.02).astype(np.float32)).astype(dtype)
        for B in tokens:
            x = jnp.asarray(rng.standard_normal((B, D)).astype(np.float32))
            fns = {
                "xla": lambda x, t: layers.unembed(x, t, reduction_rows=8),
                "before": lambda x, t: before_matvec_out_in(x, t),
                "after": lambda x, t: cpu_matvec.matvec(x, t, out_in=True),
            }
            nbytes = table.size * table.dtype.itemsize
            rows.append(compare(f"{label} B={B} ([{V}, {D}])", fns, (x, table), nbytes, calls, repeats))
        del table
    return rows


def main():
    host.reexec_with_huge_pages()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="b7de93c")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tokens", default="1,2,8")
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    cpu_matvec.require()
    tmp = tempfile.mkdtemp()
    register_before(args.before, tmp)
    rng = np.random.default_rng(0)
    tokens = [int(b) for b in args.tokens.split(",")]
    rows = packed_cases(rng, tokens, args.calls, args.repeats) + dense_cases(rng, tokens, args.calls, args.repeats)
    rows += head_cases(rng, tokens, args.calls, args.repeats)
    rec = {
        "provenance": records.provenance(),
        "before": args.before,
        "calls": args.calls,
        "repeats": args.repeats,
        "rows": rows,
    }
    records.write(rec, os.path.join(args.out, "kernels.json"))
    prov = rec["provenance"]
    lines = [
        f"`{prov['command']}`, {prov['date_utc']}, {prov['cpu']['model']}, {prov['cpu']['cores']} cores. "
        f"Medians of {args.repeats} rotated timings of {args.calls} calls.",
        "",
        "| case | XLA ms (GB/s) | before ms (GB/s) | after ms (GB/s) | after / before | after / XLA |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms, gb = r["ms"], r["gb_per_s"]
        lines.append(
            f"| {r['case']} | {ms['xla']:.3f} ({gb['xla']:.1f}) | {ms['before']:.3f} ({gb['before']:.1f}) | "
            f"{ms['after']:.3f} ({gb['after']:.1f}) | {r['after_over_before']:.2f}x | {ms['xla'] / ms['after']:.2f}x |"
        )
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
