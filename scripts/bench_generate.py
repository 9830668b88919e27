"""Prefill and decode throughput of `gptoss_jax.generate` against HF transformers `generate`,
same weights, fp32, CPU, in one run (needs the test extras: `make setup-test`).

    .venv/bin/python scripts/bench_generate.py [--prompt 256] [--new 64] [--batch 1 8] [--repeats 3]

Prefill rate = batch*prompt / t(1 new token); decode rate = batch*(new-1) / (t(new) - t(1)).
Best of `repeats` after a warm-up (compilation is excluded for us; HF has none).
"""

import argparse
import tempfile

import numpy as np
import torch

import gptoss_jax as gj
from gptoss_jax import host
from gptoss_jax.bench import peers, timing


def main():
    host.reexec_with_huge_pages()  # first: huge pages for XLA's host buffers (gptoss_jax/host.py)
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import GptOssForCausalLM, Mxfp4Config

    cfg = gj.tiny(
        vocab_size=8192,
        d_model=256,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        head_dim=32,
        num_experts=16,
        experts_per_token=4,
        expert_dim=256,
        sliding_window=128,
    )
    print(f"config: {cfg}")
    print(f"torch {torch.__version__} threads={torch.get_num_threads()}; prompt={args.prompt} new={args.new}")
    with tempfile.TemporaryDirectory() as d:
        gj.save_hf(gj.init(cfg, seed=0), d)  # MXFP4 experts, bf16 rest: the hub's layout
        ours = {
            "ours (mxfp4 experts)": gj.load(d, dtype="float32"),
            "ours (dense experts)": gj.load(d, dtype="float32", experts="dense"),
        }
        hf = GptOssForCausalLM.from_pretrained(
            d, dtype=torch.float32, attn_implementation="eager", quantization_config=Mxfp4Config(dequantize=True)
        ).eval()
    rng = np.random.default_rng(0)
    print(f"{'impl':24s} {'batch':>5s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    for B in args.batch:
        prompts = rng.integers(0, cfg.vocab_size, (B, args.prompt))
        rows = {}

        def ours_run(model, n):
            return lambda: gj.generate(
                model,
                None,
                prompts.tolist(),
                max_new_tokens=n,
                temperature=0,
                stop_tokens=(),
                prefill_chunk=args.prompt,
                block=16,
            )

        hf_run = lambda n: peers.hf_greedy_generate(hf, prompts, n)
        runners = {name: (ours_run(m, 1), ours_run(m, args.new)) for name, m in ours.items()}
        runners["HF transformers (eager)"] = (hf_run(1), hf_run(args.new))
        for name, (one, many) in runners.items():
            t1, tn = timing.best(one, args.repeats), timing.best(many, args.repeats)
            rows[name] = (B * args.prompt / t1, B * (args.new - 1) / (tn - t1))
            print(f"{name:24s} {B:5d} {rows[name][0]:14.1f} {rows[name][1]:13.1f}", flush=True)
        ref = rows["HF transformers (eager)"]
        for name in ours:
            print(
                f"  ratio {name} / HF at batch {B}: prefill {rows[name][0] / ref[0]:.2f}x, "
                f"decode {rows[name][1] / ref[1]:.2f}x"
            )


if __name__ == "__main__":
    main()
