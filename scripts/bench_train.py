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
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import gptoss_jax as gj  # noqa: E402
from gptoss_jax import host  # noqa: E402
from gptoss_jax.train.step import OptimConfig, make_optimizer, make_trainer  # noqa: E402

BENCH_CONFIG = dict(vocab_size=8192, d_model=512, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64,
                    num_experts=16, experts_per_token=4, expert_dim=512, sliding_window=128)


def training_steps(model, hf, tokens):
    """One full fine-tuning step each for our model and HF's (a torch module in train mode), on the
    same [B, T] int32 tokens: (ours_step, hf_step), each returning that step's loss as a float.
    Both train every weight with global-norm clipping at 1.0 and AdamW (lr 1e-4, no decay)."""
    opt_cfg = OptimConfig(learning_rate=1e-4, warmup_steps=0, total_steps=10_000, weight_decay=0.0,
                          b2=0.999, clip_norm=1.0)
    trainer = make_trainer(model, make_optimizer(opt_cfg))
    state = [trainer.init(model)]
    B, T = tokens.shape
    batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.ones((B, T), jnp.int32)}

    def ours_step():
        state[0], metrics = trainer.step(state[0], batch)
        return float(jax.block_until_ready(metrics["loss"]))

    torch_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids = torch.tensor(tokens, dtype=torch.long)

    def hf_step():
        loss = hf(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        torch_opt.step()
        torch_opt.zero_grad(set_to_none=True)
        return loss.item()

    return ours_step, hf_step


def timed(step, steps, repeats):
    step()  # warm-up
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append((time.perf_counter() - t) / steps)
    return statistics.median(rates), min(rates), max(rates)


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
    print(f"jax {jax.__version__}, torch {torch.__version__} threads={torch.get_num_threads()}; "
          f"batch {B} x {T} tokens, fp32, AdamW + clip 1.0, every weight trained")
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
