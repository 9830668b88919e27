"""Roofline of one gpt-oss attention layer (computed, not timed): FLOPs and HBM bytes of the
flash-attention forward for a sliding (W=128) and a full layer, with and without block skipping,
from the same trace-time block map the kernels use.

    .venv/bin/python scripts/attention_roofline.py [--block 128]

Per visited (query block, KV block) tile: QK^T and PV cost 2 * 2*bq*bk*H FLOPs per query head.
Bytes: Q and O once per query block; K and V once per visited tile, shared by the G query heads
of a KV head (the GQA tile sharing of the kernels). bf16 operands, B = 1.
"""

import argparse

from gptoss_jax import host
from gptoss_jax.bench.flops import exact_attention_flops, flash_attention_cost
from gptoss_jax.config import gpt_oss_20b

PEAKS = {
    "H100 SXM (bf16 dense 989 TFLOP/s, 3.35 TB/s)": (989e12, 3.35e12),
    "TPU v5e (197 TFLOP/s, 819 GB/s)": (197e12, 819e9),
}


def main():
    host.reexec_with_huge_pages()  # first: huge pages for XLA's host buffers (gptoss_jax/host.py)
    ap = argparse.ArgumentParser()
    ap.add_argument("--block", type=int, default=128)
    args = ap.parse_args()
    cfg = gpt_oss_20b()
    print(
        f"gpt-oss attention: N={cfg.num_heads} K={cfg.num_kv_heads} H={cfg.head_dim}, "
        f"block {args.block}x{args.block}, bf16, B=1"
    )
    print(
        f"{'T':>7s} {'layer':8s} {'skip':5s} {'tiles':>9s} {'GFLOP':>10s} {'exact GFLOP':>12s} {'MB':>9s} "
        f"{'FLOP/B':>7s}  " + "  ".join(f"t_min {name.split(' (')[0]} (us)" for name in PEAKS)
    )
    for T in (4096, 32768, 131072):
        for name, window in (("sliding", cfg.sliding_window), ("full", None)):
            for skipping in (True, False):
                visits, flops, nbytes = flash_attention_cost(cfg, T, window, args.block, skipping)
                times = [max(flops / f, nbytes / b) * 1e6 for f, b in PEAKS.values()]
                print(
                    f"{T:7d} {name:8s} {'yes' if skipping else 'no':5s} {visits:9d} {flops / 1e9:10.1f} "
                    f"{exact_attention_flops(cfg, T, window) / 1e9:12.1f} {nbytes / 1e6:9.1f} {flops / nbytes:7.1f}  "
                    + "  ".join(f"{t:>22.1f}" for t in times)
                )


if __name__ == "__main__":
    main()
