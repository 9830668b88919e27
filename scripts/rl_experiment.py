"""GRPO and GSPO from the quickstart's SFT model: held-out accuracy before and after, over seeds.

    .venv/bin/python scripts/rl_experiment.py [--quickstart runs/quickstart] [--out runs/rl_experiment]
                                              [--seeds 0 1] [--steps 45]

1. the quickstart run (`make run`) is reused, or run first when its model is missing (~10 min);
2. RL prompts: 4,000 fresh addition problems (1-3 digit operands) that are neither in the
   quickstart's training set nor in its held-out set;
3. for each algorithm and seed: `gptoss train configs/grpo_quickstart.yaml algorithm=... run.seed=...`
   (full fine-tuning, 8 prompts x 8 samples per step, 2 updates per rollout), held-out accuracy
   (greedy, exact final answer, all 500 held-out problems) at step 0 and at the end;
4. `OUT/results.json`, `OUT/report.md` and `OUT/curves.png` (reward and accuracy of every run).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gptoss_jax import host  # noqa: E402
from gptoss_jax.tasks import arithmetic  # noqa: E402
from gptoss_jax.train.config import load_config  # noqa: E402
from gptoss_jax.train.metrics import read_metrics  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "grpo_quickstart.yaml")


def main():
    host.reexec_with_huge_pages()  # first: huge pages for XLA's host buffers (gptoss_jax/host.py)
    ap = argparse.ArgumentParser()
    ap.add_argument("--quickstart", default="runs/quickstart")
    ap.add_argument("--out", default="runs/rl_experiment")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=45)
    ap.add_argument("--algorithms", nargs="+", default=["grpo", "gspo"])
    args = ap.parse_args()
    from gptoss_jax.train import quickstart, rl

    qs = args.quickstart
    if not os.path.isdir(os.path.join(qs, "sft", "model")):
        print(f"== no quickstart model in {qs}: running the quickstart first")
        quickstart.run(qs)
    os.makedirs(args.out, exist_ok=True)
    prompts = os.path.join(args.out, "rl_prompts.jsonl")
    seen = arithmetic.read_problems(os.path.join(qs, "data", "train.jsonl")) + arithmetic.read_problems(
        os.path.join(qs, "data", "eval.jsonl")
    )
    arithmetic.write_problems(prompts, 4000, seed=2_000_003, exclude=seen)
    print(f"== {prompts}: 4000 fresh problems, none of the {len(set(seen))} the SFT run trained or is scored on")

    results = []
    t0 = time.time()
    for algorithm in args.algorithms:
        for seed in args.seeds:
            out = os.path.join(args.out, f"{algorithm}_seed{seed}")
            cfg = load_config(
                CONFIG,
                [
                    f"algorithm={algorithm}",
                    f"run.seed={seed}",
                    f"run.steps={args.steps}",
                    f"optim.total_steps={args.steps}",
                    f"model.checkpoint={qs}/sft/model",
                    f"model.tokenizer={qs}/tokenizer.json",
                    f"data.train={prompts}",
                    f"data.eval={qs}/data/eval.jsonl",
                    f"run.out_dir={out}",
                    "run.progress=false",
                ],
            )
            t = time.time()
            summary = rl.train(cfg, log=lambda s: print("   " + s))
            acc = summary["eval_accuracy"]
            with open(os.path.join(out, "eval_right.json")) as f:
                right = json.load(f)
            base, final = right["0"], right[str(args.steps)]
            row = {
                "algorithm": algorithm,
                "seed": seed,
                "before": acc["0"],
                "after": acc[str(args.steps)],
                "fixed": sum(1 for b, a in zip(base, final) if a and not b),
                "broken": sum(1 for b, a in zip(base, final) if b and not a),
                "seconds": round(time.time() - t, 1),
                "metrics": read_metrics(os.path.join(out, "metrics.jsonl")),
            }
            results.append(row)
            print(
                f"== {algorithm} seed {seed}: held-out accuracy {row['before']:.3f} -> {row['after']:.3f} "
                f"({row['seconds']:.0f} s)"
            )
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    report(results, args, time.time() - t0)


def report(results, args, seconds):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lines = [
        "| algorithm | seed | held-out accuracy before | after | change | problems fixed / broken | run time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['algorithm']} | {r['seed']} | {r['before']:.3f} | {r['after']:.3f} | "
            f"{100 * (r['after'] - r['before']):+.1f} pts | {r['fixed']} / {r['broken']} | {r['seconds']:.0f} s |"
        )
    for algorithm in args.algorithms:
        after = np.array([r["after"] for r in results if r["algorithm"] == algorithm])
        before = results[0]["before"]
        lines.append(
            f"\n{algorithm}: after {after.mean():.3f} (min {after.min():.3f}, max {after.max():.3f}, "
            f"spread {after.max() - after.min():.3f}) vs before {before:.3f} over seeds {args.seeds}"
        )
    lines.append(f"\nall runs: {seconds:.0f} s")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for r in results:
        steps = [m["step"] for m in r["metrics"] if "reward_exact_match" in m]
        em = np.array([m["reward_exact_match"] for m in r["metrics"] if "reward_exact_match" in m])
        smooth = np.convolve(em, np.ones(5) / 5, mode="valid")
        axes[0].plot(steps[4:], smooth, label=f"{r['algorithm']} seed {r['seed']}")
        axes[1].plot([0, args.steps], [r["before"], r["after"]], marker="o", label=f"{r['algorithm']} seed {r['seed']}")
    axes[0].set_title("sampled answers exactly right (train prompts, 5-step mean)")
    axes[1].set_title("held-out accuracy (greedy, 500 problems)")
    for ax in axes:
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "curves.png"), dpi=110)


if __name__ == "__main__":
    main()
