"""Where a gpt-oss-20b decode step spends its time on this machine, piece by piece.

    .venv/bin/python scripts/profile_decode.py                 # batch 1, context 1024
    .venv/bin/python scripts/profile_decode.py --batch 8 --context 4096 --json runs/profile.json
    .venv/bin/python scripts/profile_decode.py --config bench --dtype float32 --experts dense --batch 8 --context 160

A decode step at batch B is: the embedding rows, then per layer an attention block (RMSNorm,
q/k/v projections, RoPE, attention over the KV cache, output projection) and an MoE block
(RMSNorm, router, top-4 of 32 experts, the chosen experts' MLPs), then the final norm and the
unembedding. This script builds each piece at gpt-oss-20b's real sizes (random bf16 weights,
random packed MXFP4 experts with scales 2^-9..2^-5, a cache filled to `--context` tokens; no
checkpoint is needed: ~4 GB of memory) and times it the way decoding runs it: `--steps`
iterations inside one jitted `lax.fori_loop`, the weights passed through
`lax.optimization_barrier` with the loop's carry, as `gptoss_jax.sampling` ties them to its
step counter (so nothing is hoisted out of the loop), median of `--repeats`. For each piece it
prints ms per step, the bytes it must read (weights in their stored format, the cache), the rate
that implies, and that as a share of the machine's stream bandwidth (measured here as
`scripts/bench.py` does: a jitted add into a donated buffer, bytes read + written, median of 5).
The pieces are summed for the model's layers (20b: 24, 12 sliding and 12 full; `--config bench`:
scripts/bench.py's small config, 4 layers, any dtype and expert format), and, as a check that
they account for a step, a real decode step of the 2-layer model through `gptoss_jax.sampling` is
timed beside the sum of its own pieces.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

import gptoss_jax as gj
from gptoss_jax import cache as cache_lib
from gptoss_jax import host
from gptoss_jax.bench import decode_pieces, peaks, records
from gptoss_jax.bench.peers import BENCH_CONFIG
from gptoss_jax.bench.pieces import BytePieces
from gptoss_jax.bench.weights import random_model


def main():
    host.reexec_with_huge_pages()  # first: huge pages for XLA's host buffers (gptoss_jax/host.py)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=1024, help="tokens already in the KV cache")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument(
        "--config",
        choices=("20b", "bench"),
        default="20b",
        help="bench: scripts/bench.py's small config (4 layers, d_model 512, 16 experts top-4)",
    )
    p.add_argument("--dtype", default="bfloat16", help="weights' dtype (experts too when --experts dense)")
    p.add_argument("--experts", choices=("mxfp4", "dense"), default="mxfp4")
    args = p.parse_args()

    full = gj.tiny(**BENCH_CONFIG) if args.config == "bench" else gj.gpt_oss_20b()
    cfg = dataclasses.replace(full, num_layers=2, layer_types=None)  # layer 0 sliding, 1 full
    B, L = args.batch, args.context
    name = "gpt-oss-20b" if args.config == "20b" else "bench config"
    print(
        f"{name} decode step pieces ({args.dtype}, {args.experts} experts), batch {B}, context {L}; "
        f"{jax.devices()[0].platform}, {jax.local_device_count()} device(s)",
        flush=True,
    )
    bw = peaks.jax_add_stream(2**30, 5, operands=1) / 1e9
    print(f"stream bandwidth (jitted add, donated, read + write, median of 5): {bw:.1f} GB/s", flush=True)
    t = time.perf_counter()
    model = random_model(cfg, dtype=jnp.dtype(args.dtype), experts=args.experts)
    print(f"random 2-layer model at full width in {time.perf_counter() - t:.0f} s", flush=True)

    plan_native = model.plan(B).native_rows > 0
    print(f"native CPU kernels (gptoss_jax.cpu_matvec): {'on' if plan_native else 'off'}", flush=True)
    cache = cache_lib.init_cache(cfg, B, L + 1, model.dtype)
    piece = BytePieces(bw, args.steps, args.repeats)
    ms = decode_pieces.step_pieces(model, B, L, piece, cache)
    predicted = decode_pieces.predicted_ms(full, ms)
    n_sliding = sum(full.is_sliding(i) for i in range(full.num_layers))
    print(
        f"sum for {full.num_layers} layers ({n_sliding} sliding): {predicted:.0f} ms per step "
        f"= {1e3 * B / predicted:.2f} tokens/s",
        flush=True,
    )
    # a real decode step of the 2-layer model through gptoss_jax.sampling's jitted loop
    step2 = decode_pieces.sampling_step_ms(model, cache, B, args.steps, args.repeats)
    pieces2 = decode_pieces.predicted_ms(cfg, ms)
    print(
        f"measured 2-layer decode step (sampling loop): {step2:.1f} ms; sum of its pieces {pieces2:.1f} ms", flush=True
    )
    if args.json:
        records.write(
            dict(
                provenance=records.provenance(),
                native_kernels=plan_native,
                config=args.config,
                dtype=args.dtype,
                experts=args.experts,
                batch=B,
                context=L,
                stream_gbs=bw,
                pieces=piece.rows,
                predicted_all_layers_ms=predicted,
                measured_2_layer_step_ms=step2,
                pieces_2_layer_ms=pieces2,
            ),
            args.json,
        )


if __name__ == "__main__":
    main()
