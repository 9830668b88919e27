"""The decode step's matrix-vector products at gpt-oss-20b's sizes: XLA's code (what the plan ran
before) against the native kernels (`gptoss_jax.cpu_matvec`), in one process, interleaved.

    python experiments/2026-12-06-cpu-matvec/kernels.py            # writes kernels.json + table.md here

Each case is jitted both ways over the same random arrays and timed as `--calls` calls per timing,
median of `--repeats` timings, the two sides alternating. The dense cases use 12 distinct matrices
per call (more bytes than the L3 holds), so each matrix comes from memory as in a 24-layer step.
Rows (R = rows of x, 1, 2 and 8; the projections' inputs are bf16 values, as a bf16 model's):
  attention q  x [R, 2880] @ W [2880, 4096] bf16 ([in, out]: the model's layout)
  attention o  x [R, 4096] @ W [4096, 2880] bf16
  attention k  x [R, 2880] @ W [2880, 512] bf16
  head         x [R, 2880] @ table [201088, 2880]^T bf16 ([out, in]); XLA: `layers.unembed`'s
               multiply-reduce (the CPU plan's code for <= 8 rows)
  experts      4 rows per token, each its own of 32 packed MXFP4 matrices [5760, 2880]; XLA:
               `mxfp4.gathered_matvec` (decoded inside the reduction)
Effective GB/s = bytes of the weights read (each chosen matrix once) / time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from gptoss_jax import cpu_matvec, host, layers, mxfp4  # noqa: E402
from gptoss_jax.bench import records  # noqa: E402


def timed(fn, args, calls, repeats):
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            r = fn(*args)
        jax.block_until_ready(r)
        out.append((time.perf_counter() - t) / calls)
    return out


def compare(name, xla_fn, native_fn, args, nbytes, calls, repeats):
    xla_fn, native_fn = jax.jit(xla_fn), jax.jit(native_fn)
    a, b = np.asarray(xla_fn(*args), np.float64), np.asarray(native_fn(*args), np.float64)
    rel = float(np.abs(a - b).max() / np.abs(a).max())
    ts = {"xla": [], "native": []}
    for r in range(repeats):
        order = ("xla", "native") if r % 2 == 0 else ("native", "xla")
        for side in order:
            ts[side] += timed(xla_fn if side == "xla" else native_fn, args, calls, 1)
    med = {k: statistics.median(v) for k, v in ts.items()}
    row = {
        "case": name,
        "bytes": nbytes,
        "seconds": ts,
        "ms": {k: 1e3 * v for k, v in med.items()},
        "gb_per_s": {k: nbytes / v / 1e9 for k, v in med.items()},
        "speedup": med["xla"] / med["native"],
        "max_rel_diff": rel,
    }
    print(
        f"{name:34s} XLA {row['ms']['xla']:8.2f} ms ({row['gb_per_s']['xla']:5.1f} GB/s)  native "
        f"{row['ms']['native']:8.2f} ms ({row['gb_per_s']['native']:5.1f} GB/s)  {row['speedup']:5.2f}x  "
        f"max rel diff {rel:.1e}",
        flush=True,
    )
    return row


def main():
    host.reexec_with_huge_pages()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    if not cpu_matvec.available():
        sys.exit(f"native kernels unavailable: {cpu_matvec.unavailable_reason()}")
    rng = np.random.default_rng(0)
    rows = []
    bf = lambda *shape: jnp.asarray((rng.standard_normal(shape) * 0.02).astype(np.float32)).astype(jnp.bfloat16)
    for R in (1, 2, 8):
        shapes = (("attention q", (2880, 4096)), ("attention o", (4096, 2880)), ("attention k", (2880, 512)))
        for name, (I, O) in shapes:
            ws = [bf(I, O) for _ in range(12)]
            x = jnp.asarray(rng.standard_normal((R, I)), jnp.bfloat16).astype(jnp.float32)  # bf16 activations
            xla = lambda x, ws: jnp.stack(
                [jnp.einsum("RI,IO->RO", x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32) for w in ws]
            )
            nat = lambda x, ws: jnp.stack([cpu_matvec.matvec(x, w) for w in ws])
            rows.append(
                compare(f"{name} R={R} (12 x [{I}, {O}])", xla, nat, (x, ws), 12 * I * O * 2, args.calls, args.repeats)
            )
            del ws
        table = bf(201088, 2880)
        x = jnp.asarray(rng.standard_normal((R, 2880)), jnp.float32)
        rows.append(
            compare(
                f"head R={R} ([201088, 2880])",
                lambda x, t: layers.unembed(x, t, reduction_rows=8),
                lambda x, t: cpu_matvec.matvec(x, t, out_in=True),
                (x, table),
                table.size * 2,
                max(1, args.calls // 2),
                args.repeats,
            )
        )
        del table
        blocks = jnp.asarray(rng.integers(0, 256, (32, 5760, 90, 16), dtype=np.uint8))
        scales = jnp.asarray(rng.integers(118, 123, (32, 5760, 90), dtype=np.uint8))
        t = mxfp4.MXFP4(blocks, scales)
        ids = jnp.asarray(rng.integers(0, 32, 4 * R), jnp.int32)
        xs = jnp.asarray(rng.standard_normal((4 * R, 2880)), jnp.float32)
        chosen = len(set(np.asarray(ids).tolist()))
        rows.append(
            compare(
                f"experts R={R} ({4 * R} rows, {chosen} of 32 MXFP4 [5760, 2880])",
                lambda x, t, i: mxfp4.gathered_matvec(x, t, i),
                lambda x, t, i: cpu_matvec.mxfp4_matvec(x, t, i),
                (xs, t, ids),
                chosen * 5760 * 90 * 17,
                args.calls,
                args.repeats,
            )
        )
        del blocks, scales, t
    rec = {"provenance": records.provenance(), "calls": args.calls, "repeats": args.repeats, "rows": rows}
    records.write(rec, os.path.join(args.out, "kernels.json"))
    lines = [
        f"`{rec['provenance']['command']}`, {rec['provenance']['date_utc']}, {rec['provenance']['cpu']['model']}, "
        f"{rec['provenance']['cpu']['cores']} cores. Medians of {args.repeats} interleaved timings.",
        "",
        "| case | XLA ms (GB/s) | native ms (GB/s) | speedup | max rel diff |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['ms']['xla']:.2f} ({r['gb_per_s']['xla']:.1f}) | {r['ms']['native']:.2f} "
            f"({r['gb_per_s']['native']:.1f}) | {r['speedup']:.2f}x | {r['max_rel_diff']:.1e} |"
        )
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
