"""Where a prefill forward and a training step of the benchmark config spend their time, piece by piece.

    .venv/bin/python scripts/profile_prefill.py                         # prefill, batch 1 x 2048, fp32
    .venv/bin/python scripts/profile_prefill.py --mode train            # training, batch 4 x 512, fp32
    .venv/bin/python scripts/profile_prefill.py --seq 8192 --dtype bfloat16 --json runs/profile.json

The model is `scripts/bench.py`'s BENCH config (4 layers: 2 sliding, window 128, and 2 full;
d_model 512, 8 query / 2 KV heads of 64, 16 experts top-4 of width 512, vocab 8192) with random
dense weights. Each piece is run at the real activation shape on random inputs, jitted on its own,
median of `--repeats` (after a warm-up):

  attention     RMSNorm, q/k/v projections, RoPE, attention with sinks, output projection; split
                into the projections alone and the attention core alone (`self_attention`)
  MoE           RMSNorm, router, top-4, the experts (the default CPU path, `moe.moe_chunks`);
                split into routing alone and the experts alone, beside the bucket path
                (`moe.moe_buckets`, the CPU default before) on the same routing
  head          final RMSNorm and the unembedding of every position (+ in training the mean
                next-token cross-entropy)

In `--mode train` each piece is its forward and backward (`jax.vjp` with a random cotangent:
gradients for the inputs and every weight), which is what a training step runs per piece; the
step itself adds global-norm clipping and AdamW. For each piece: ms, the FLOPs it must do (2 per
multiply-add, causal/sliding attention counting only the keys a query may see; backward = 2x
forward) and that as a share of the machine's peak matmul rate in the run's dtype, measured here
(jitted `jnp.dot` of 2048 x 2048, median of 5). The pieces are summed over the 4 layers and set
beside the measured whole: a jitted forward of the model (prefill), or the trainer's step
(`gptoss_jax.train.step.make_trainer`, AdamW + clipping: train).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

import gptoss_jax as gj
from gptoss_jax import host
from gptoss_jax.bench import peaks, prefill_pieces, records
from gptoss_jax.bench.peers import BENCH_CONFIG as BENCH
from gptoss_jax.bench.pieces import FlopPieces
from gptoss_jax.bench.pieces import median_ms as median_ms  # imported from here by experiments/


def main():
    host.reexec_with_huge_pages()  # first: huge pages for XLA's host buffers (gptoss_jax/host.py)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("prefill", "train"), default="prefill")
    p.add_argument("--batch", type=int, default=None, help="default 1 (prefill) / 4 (train)")
    p.add_argument("--seq", type=int, default=None, help="default 2048 (prefill) / 512 (train)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    train = args.mode == "train"
    B = args.batch or (4 if train else 1)
    T = args.seq or (512 if train else 2048)
    dtype = jnp.dtype(args.dtype)
    cfg = gj.tiny(**BENCH)
    print(
        f"{args.mode}: batch {B} x {T}, {dtype.name}, BENCH config; {jax.devices()[0].platform}, "
        f"{os.cpu_count()} cores",
        flush=True,
    )
    peak = peaks.jax_matmul(2048, dtype, 5, accumulate=jnp.float32) / 1e9
    print(f"peak matmul ({dtype.name} in, fp32 out, n=2048, median of 5): {peak:.0f} GFLOP/s", flush=True)

    model = gj.init(cfg, seed=0, dtype=dtype, experts="dense")
    rng = np.random.default_rng(1)  # the tokens, then (train) each piece's cotangent
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    piece = FlopPieces(peak, args.repeats, train=train, dtype=dtype, rng=rng)
    total = sum(prefill_pieces.layer_pieces(model, tokens, piece, train=train).values())
    measured, what = prefill_pieces.whole_ms(model, tokens, train=train, repeats=args.repeats)
    n_sliding = sum(cfg.is_sliding(i) for i in range(cfg.num_layers))
    print(
        f"sum of pieces for {cfg.num_layers} layers ({n_sliding} sliding): {total:.0f} ms; "
        f"measured {what}: {measured:.0f} ms; {B * T / measured * 1e3:.0f} tokens/s",
        flush=True,
    )
    if args.json:
        records.write(
            dict(
                mode=args.mode,
                batch=B,
                seq=T,
                dtype=dtype.name,
                peak_gflops=peak,
                pieces=piece.rows,
                summed_ms=total,
                measured_ms=measured,
            ),
            args.json,
        )


if __name__ == "__main__":
    main()
