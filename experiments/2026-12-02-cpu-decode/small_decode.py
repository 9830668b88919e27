"""generate() decode rate on the small BENCH config (scripts/bench.py), bf16 MXFP4 and dense experts, batch 1 and 8:
64 new tokens after a 32-token prompt, rate = B * 63 / (t(64) - t(1)), best of 3 each. Run it at two commits
(a git worktree on PYTHONPATH) to compare them minutes apart on this noisy machine."""
import sys, time, jax, jax.numpy as jnp, numpy as np
import gptoss_jax as gj
BENCH = dict(vocab_size=8192, d_model=512, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64,
             num_experts=16, experts_per_token=4, expert_dim=512, sliding_window=128)
cfg = gj.tiny(**BENCH)
for experts in ("mxfp4", "dense"):
    model = gj.init(cfg, seed=0, experts=experts)
    for B in (1, 8):
        prompt = [list(range(1, 33))] * B
        def gen(n):
            t = time.perf_counter(); gj.generate(model, None, prompt, max_new_tokens=n, temperature=0, stop_tokens=(), block=64); return time.perf_counter() - t
        gen(1); gen(64)
        t1 = min(gen(1) for _ in range(3)); tn = min(gen(64) for _ in range(3))
        print(f"{experts:6s} batch {B}: {B * 63 / (tn - t1):7.1f} tok/s", flush=True)
