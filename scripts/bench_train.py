"""Training-step throughput of `gptoss_jax.train` against HF transformers + torch autograd, same
model, same weights, same batch, fp32, CPU, in one run (needs the test extras: `make setup-test`).

    .venv/bin/python scripts/bench_train.py [--batch 4] [--seq 512] [--steps 5] [--repeats 3]

Both sides run a full fine-tuning step of every weight (dense experts included): forward, loss
over all next tokens, backward, global-norm clipping at 1.0 and an AdamW update. The first
step's losses are printed side by side (the same weights and batch must give the same loss).
Reported: tokens/s as the median over `repeats` timings of `steps` steps each, after a warm-up
(compilation is excluded for us; HF has none), and our ratio to HF.
"""

import argparse
import statistics
import tempfile

import jax
import numpy as np
import torch
from flax import nnx

import gptoss_jax as gj
from gptoss_jax import host
from gptoss_jax.bench import timing
from gptoss_jax.bench.peers import BENCH_CONFIG, training_steps


def timed(step, steps, repeats):
    """Seconds per step: median, min, max over `repeats` timings of `steps` steps (after a warm-up)."""
    step()  # warm-up
    ts = [t / steps for t in timing.seconds(lambda: [step() for _ in range(steps)], repeats, warmup=0)]
    return statistics.median(ts), min(ts), max(ts)


def main():
    host.reexec_with_huge_pages()  # first: huge pages for XLA's host buffers (gptoss_jax/host.py)
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import GptOssForCausalLM

    cfg = gj.tiny(**BENCH_CONFIG)
    B, T = args.batch, args.seq
    print(f"config: {BENCH_CONFIG}")
    print(
        f"jax {jax.__version__}, torch {torch.__version__} threads={torch.get_num_threads()}; "
        f"batch {B} x {T} tokens, fp32, AdamW + clip 1.0, every weight trained"
    )
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    with tempfile.TemporaryDirectory() as d:
        model = gj.init(cfg, seed=0, dtype="float32", experts="dense")
        gj.save_hf(model, d, dtype="float32")
        hf = GptOssForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    hf.train()

    ours_step, hf_step = training_steps(model, hf, tokens)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    first = ours_step(), hf_step()
    print(f"trainable parameters: ours {n_params:,}, HF {sum(p.numel() for p in hf.parameters()):,}")
    print(f"first-step loss: ours {first[0]:.6f}  HF {first[1]:.6f}  (|diff| {abs(first[0] - first[1]):.2e})")
    rows = {}
    for name, fn in (("ours (XLA, fp32)", ours_step), ("HF transformers + torch (eager, fp32)", hf_step)):
        med, lo, hi = timed(fn, args.steps, args.repeats)
        rows[name] = med
        print(f"{name:40s} {B * T / med:9.0f} tokens/s  (step {med:.3f} s; spread {lo:.3f}-{hi:.3f} s)")
    ours, hf_t = rows["ours (XLA, fp32)"], rows["HF transformers + torch (eager, fp32)"]
    print(f"ratio ours / HF: {hf_t / ours:.2f}x tokens/s")


if __name__ == "__main__":
    main()
