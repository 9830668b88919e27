"""The decode step's products at gpt-oss-20b's sizes, with bf16-valued inputs (a bf16 model's
activations): the kernels before this change (the source at `--before`, default 9348eb2, built
and registered under other names) against the kernels now, and XLA's code, in one process,
interleaved.

    python experiments/2026-12-06-bf16-dot/kernels.py      # writes kernels.json + table.md here

Before: dense bf16 weights were widened to fp32 and multiplied by fp32 FMAs (no bf16 dot product);
packed MXFP4 blocks were decoded one block (16 bytes) at a time by two byte shuffles. Now: dense
bf16 weights go to VDPBF16PS directly (the [in, out] layout interleaves pairs of stored rows), and
MXFP4 decodes two blocks per step by word permutes (VPERMW). Every case: `--calls` calls per
timing, median of `--repeats` timings, the sides' order rotating.
Rows (R = rows of x): attention q/o/k projections (12 matrices each, more bytes than the L3),
the head [201088, 2880] ([out, in]), packed experts gate_up [5760, 2880] and down [2880, 2880]
(4 rows per token, each its own of 32). GB/s = bytes of the weights read / time.
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
    cmd = ["g++", *cpu_matvec.FLAGS, f"-I{jax.ffi.include_dir()}", path, "-o", so]
    subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(so)
    register_before.lib = lib  # keep it loaded
    for name, sym in (("gptoss_matvec_before", "GptossMatvec"), ("gptoss_mxfp4_matvec_before", "GptossMxfp4Matvec")):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, sym)), platform="cpu")


def before_matvec(x, w, out_in=False):
    O = w.shape[1] if out_in else w.shape[2]
    call = jax.ffi.ffi_call("gptoss_matvec_before", jax.ShapeDtypeStruct((x.shape[0], O), jnp.float32))
    return call(x.astype(jnp.float32), w, jnp.zeros((x.shape[0],), jnp.int32), out_in=out_in)


def before_mxfp4(x, t, ids):
    call = jax.ffi.ffi_call("gptoss_mxfp4_matvec_before", jax.ShapeDtypeStruct((x.shape[0], t.blocks.shape[1]), jnp.float32))
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
        f"{name:40s} "
        + "  ".join(f"{k} {row['ms'][k]:7.2f} ms ({row['gb_per_s'][k]:5.1f} GB/s)" for k in names)
        + f"  after/before {row['after_over_before']:.2f}x  rel diff {rel['after']:.1e}",
        flush=True,
    )
    return row


def main():
    host.reexec_with_huge_pages()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="9348eb2")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", default="1,2,8")
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    cpu_matvec.require()
    if not cpu_matvec.has_bf16_dot():
        sys.exit("this CPU has no AVX512-BF16: the kernels' bf16 paths are not built here")
    tmp = tempfile.mkdtemp()
    register_before(args.before, tmp)
    rng = np.random.default_rng(0)
    bf = lambda *shape: jnp.asarray((rng.standard_normal(shape) * 0.02).astype(np.float32)).astype(jnp.bfloat16)
    xbf = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16).astype(jnp.float32)
    rows = []
    for R in [int(r) for r in args.rows.split(",")]:
        for name, (I, O) in (("attention q", (2880, 4096)), ("attention o", (4096, 2880)), ("attention k", (2880, 512))):
            ws = [bf(I, O) for _ in range(12)]
            x = xbf(R, I)
            fns = {
                "xla": lambda x, ws: jnp.stack(
                    [jnp.einsum("RI,IO->RO", x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32) for w in ws]
                ),
                "before": lambda x, ws: jnp.stack([before_matvec(x, w[None]) for w in ws]),
                "after": lambda x, ws: jnp.stack([cpu_matvec.matvec(x, w) for w in ws]),
            }
            rows.append(compare(f"{name} R={R} (12 x [{I}, {O}])", fns, (x, ws), 12 * I * O * 2, args.calls, args.repeats))
            del ws
        table = bf(201088, 2880)
        fns = {
            "xla": lambda x, t: layers.unembed(x, t, reduction_rows=8),
            "before": lambda x, t: before_matvec(x, t[None], out_in=True),
            "after": lambda x, t: cpu_matvec.matvec(x, t, out_in=True),
        }
        rows.append(
            compare(f"head R={R} ([201088, 2880])", fns, (xbf(R, 2880), table), table.size * 2, max(1, args.calls // 2), args.repeats)
        )
        del table
        for name, (O, I) in (("experts gate_up", (5760, 2880)), ("experts down", (2880, 2880))):
            G = I // 32
            t = mxfp4.MXFP4(
                jnp.asarray(rng.integers(0, 256, (32, O, G, 16), dtype=np.uint8)),
                jnp.asarray(rng.integers(118, 123, (32, O, G), dtype=np.uint8)),
            )
            ids = jnp.asarray(rng.integers(0, 32, 4 * R), jnp.int32)
            chosen = len(set(np.asarray(ids).tolist()))
            fns = {
                "xla": lambda x, t, i: mxfp4.gathered_matvec(x, t, i),
                "before": before_mxfp4,
                "after": lambda x, t, i: cpu_matvec.mxfp4_matvec(x, t, i),
            }
            rows.append(
                compare(
                    f"{name} R={R} ({4 * R} rows, {chosen} of 32 [{O}, {I}])",
                    fns,
                    (xbf(4 * R, I), t, ids),
                    chosen * O * G * 17,
                    args.calls,
                    args.repeats,
                )
            )
            del t
    rec = {"provenance": records.provenance(), "before": args.before, "calls": args.calls, "repeats": args.repeats, "rows": rows}
    records.write(rec, os.path.join(args.out, "kernels.json"))
    lines = [
        f"`{rec['provenance']['command']}`, {rec['provenance']['date_utc']}, {rec['provenance']['cpu']['model']}, "
        f"{rec['provenance']['cpu']['cores']} cores. Medians of {args.repeats} rotated timings; inputs bf16 values.",
        "",
        "| case | XLA ms (GB/s) | before ms (GB/s) | after ms (GB/s) | after / before | after / XLA |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms, gb = r["ms"], r["gb_per_s"]
        lines.append(
            f"| {r['case']} | {ms['xla']:.2f} ({gb['xla']:.1f}) | {ms['before']:.2f} ({gb['before']:.1f}) | "
            f"{ms['after']:.2f} ({gb['after']:.1f}) | {r['after_over_before']:.2f}x | {ms['xla'] / ms['after']:.2f}x |"
        )
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
