"""RL that visibly learns: GRPO and GSPO from a start with headroom, over seeds, beside TRL.

    python scripts/rl_experiment.py [--quick] [--out runs/rl_experiment] [--record DIR]
                                    [--seeds 0 1 2] [--steps 20] [--arms ARM ...]

TRL comes from the optional extra `rl-peer` (`make setup-rl-peer`); without it the TRL arms stop
the script with that hint before anything runs.

1. The start: the quickstart's SFT (same model and data size, 1,200 steps instead of 800) on
   training data whose final answer is wrong in half the examples (last digit + 1) while the
   column-by-column analysis is always right (`tasks.arithmetic.write_splits(final_noise=0.5)`). The policy
   learns to work the sum out and then, often, to copy it with its last digit bumped: it
   solves ~40% of held-out problems greedily and its sampled groups mix right and wrong answers,
   so group advantages carry signal. Reused when `OUT/start` holds it (7.5 minutes to build).
2. RL prompts: 4,000 fresh problems (in neither SFT split). Held-out: the first 200 of the
   start's held-out problems, greedy, exact final answer (`train.eval.task_accuracy`), at step 0,
   every `--eval-every` steps and at the end.
3. Arms, each `configs/grpo_quickstart.yaml` with the overrides ARM_OVERRIDES lists (and the
   record repeats): ours (`train.rl`) grpo, gspo; TRL's GRPOTrainer (`train.trl_peer`,
   translated from the same config) trl-grpo, trl-gspo; the control grpo-shuffled (each step's
   rewards permuted across its samples: updates of the same size without the information) on
   every seed; grpo-lora (adapters only, on the start re-encoded with MXFP4 experts, base
   frozen), grpo-kl and trl-grpo-kl (kl_coef 0.05) on the first seed.
4. Per run: held-out accuracy before and after, the exact McNemar p-value over the 200 problems
   (`train.eval.mcnemar`), time per step split into sampling and the rest (median over steps
   after the first). `OUT/results.json`, `OUT/report.md`, `OUT/curves.png`; with --record DIR
   the same in DIR, the report as README.md (an experiments/ record: the README's RL figures are
   rendered from it by scripts/figures.py).

--quick: one seed, 15 steps, arms grpo, trl-grpo and grpo-shuffled: 3.6 minutes here with the
start already built, 11 with it. The whole experiment: 29 minutes, 37 with the start.
"""

import argparse
import json
import os
import shutil
import time

import numpy as np

from gptoss_jax import host
from gptoss_jax.bench import records
from gptoss_jax.tasks import arithmetic
from gptoss_jax.train import eval as eval_lib
from gptoss_jax.train import quickstart, rl, sft, trl_peer
from gptoss_jax.train.config import load_config
from gptoss_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "grpo_quickstart.yaml")
FINAL_NOISE = 0.5
HELD_OUT = 200
RL_PROMPTS = 4000
ALL_ARMS = ("grpo", "gspo", "trl-grpo", "trl-gspo", "grpo-shuffled", "grpo-lora", "grpo-kl", "trl-grpo-kl")
QUICK_ARMS = ("grpo", "trl-grpo", "grpo-shuffled")
FIRST_SEED_ONLY = ("grpo-lora", "grpo-kl", "trl-grpo-kl")
START_SFT = ["run.progress=false", "run.steps=1200", "optim.total_steps=1200"]
SHARED = ["optim.learning_rate=1e-4", "optim.warmup_steps=5", "run.save_every=1000", "run.progress=false"]
ARM_OVERRIDES = {
    "grpo": ["algorithm=grpo"],
    "gspo": ["algorithm=gspo"],
    "trl-grpo": ["algorithm=grpo"],
    "trl-gspo": ["algorithm=gspo"],
    "grpo-shuffled": ["algorithm=grpo", "rl.shuffle_rewards=true"],
    "grpo-lora": ["algorithm=grpo", "lora.enabled=true", "model.experts=mxfp4", "optim.learning_rate=1e-3"],
    "grpo-kl": ["algorithm=grpo", "rl.kl_coef=0.05"],
    "trl-grpo-kl": ["algorithm=grpo", "rl.kl_coef=0.05"],
}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/rl_experiment")
    ap.add_argument("--record", help="also write results.json, report.md and curves.png into this folder")
    ap.add_argument("--quick", action="store_true", help="one seed, 15 steps, arms " + ", ".join(QUICK_ARMS))
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--arms", nargs="+", choices=ALL_ARMS)
    ap.add_argument("--fresh", action="store_true", help="rerun arms whose finished run is in OUT/runs")
    ap.add_argument(
        "--replot",
        action="store_true",
        help="only redraw the report and curves from OUT/results.json (and in --record)",
    )
    args = ap.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.steps = args.steps or (15 if args.quick else 20)
    args.arms = args.arms or list(QUICK_ARMS if args.quick else ALL_ARMS)
    if args.steps < 2 or args.eval_every < 1:
        ap.error("--steps must be at least 2 and --eval-every at least 1")
    return args


def build_start(out: str, log) -> dict:
    """The SFT start (reused when present) and its two HF exports: float32 with dense experts
    (TRL's start) and float32 with the experts re-encoded as MXFP4 (the LoRA arm's base)."""
    start = os.path.join(out, "start")
    built = not os.path.isfile(os.path.join(start, "summary.json"))
    if built:
        log(f"== the start: SFT with {FINAL_NOISE:.0%} of training final answers wrong (~9 minutes) -> {start}")
        quickstart.run(start, START_SFT, final_noise=FINAL_NOISE, log=log)
    with open(os.path.join(start, "summary.json")) as f:
        summary = json.load(f)
    run_cfg = sft.run_config(os.path.join(start, "sft"))
    paths = {
        "start": start,
        "model": os.path.join(start, "sft", "model"),
        "tokenizer": os.path.join(start, "tokenizer.json"),
        "eval": os.path.join(start, "data", "eval.jsonl"),
        "hf_dense": os.path.join(start, "hf_float32"),
        "hf_mxfp4": os.path.join(start, "hf_mxfp4"),
    }
    for key, experts in (("hf_dense", "dense"), ("hf_mxfp4", "mxfp4")):
        if not os.path.isfile(os.path.join(paths[key], "config.json")):
            sft.export_hf(run_cfg, paths[key], experts=experts, dtype="float32")
            log(f"== exported the start ({experts} experts, float32) -> {paths[key]}")
    return {"paths": paths, "summary": summary, "built": built}


def write_prompts(out: str, start: str) -> str:
    path = os.path.join(out, "rl_prompts.jsonl")
    seen = arithmetic.read_problems(os.path.join(start, "data", "train.jsonl")) + arithmetic.read_problems(
        os.path.join(start, "data", "eval.jsonl")
    )
    arithmetic.write_problems(path, RL_PROMPTS, seed=2_000_003, exclude=seen)
    return path


def arm_overrides(arm: str, seed: int, args, paths: dict, prompts: str, run_dir: str) -> list[str]:
    checkpoint = paths["hf_mxfp4"] if arm == "grpo-lora" else paths["model"]
    return (
        SHARED
        + [
            f"model.checkpoint={checkpoint}",
            f"model.tokenizer={paths['tokenizer']}",
            f"data.train={prompts}",
            f"data.eval={paths['eval']}",
            f"eval.limit={HELD_OUT}",
            f"run.seed={seed}",
            f"run.steps={args.steps}",
            f"optim.total_steps={args.steps * 2}",
            f"rl.eval_every={args.eval_every}",
            f"run.out_dir={run_dir}",
        ]
        + ARM_OVERRIDES[arm]
    )


def run_arm(arm: str, seed: int, args, paths: dict, prompts: str, log) -> dict:
    run_dir = os.path.join(args.out, "runs", f"{arm}_seed{seed}")
    overrides = arm_overrides(arm, seed, args, paths, prompts, run_dir)
    done = os.path.join(run_dir, "summary.json")
    finished = os.path.isfile(done) and os.path.isfile(os.path.join(run_dir, "wall.json"))
    if finished:
        with open(done) as f:
            finished = json.load(f).get("steps") == args.steps
    if args.fresh or not finished:
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = load_config(CONFIG, overrides)
        log(f"== {arm}, seed {seed}: {args.steps} steps -> {run_dir}")
        t = time.time()
        if arm.startswith("trl-"):
            trl_peer.train(cfg, paths["hf_dense"], log=lambda s: log("   " + s))
        else:
            rl.train(cfg, log=lambda s: log("   " + s))
        with open(os.path.join(run_dir, "wall.json"), "w") as f:
            json.dump({"seconds": round(time.time() - t, 1)}, f)  # the whole run, evaluations included
    return summarize(arm, seed, run_dir, args.steps, overrides)


def summarize(arm: str, seed: int, run_dir: str, steps: int, overrides: list[str]) -> dict:
    with open(os.path.join(run_dir, "eval_right.json")) as f:
        right = json.load(f)
    metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    test = eval_lib.mcnemar(right["0"], right[str(steps)])
    trained = [m for m in metrics if "reward" in m]
    after_first = trained[1:] or trained
    accuracy = {m["step"]: m["eval_accuracy"] for m in metrics if "eval_accuracy" in m}
    with open(os.path.join(run_dir, "wall.json")) as f:
        wall = json.load(f)["seconds"]
    return {
        "arm": arm,
        "trainer": "trl" if arm.startswith("trl-") else "gptoss_jax",
        "seed": seed,
        "before": accuracy[0],
        "after": accuracy[steps],
        **test,
        "accuracy": {str(k): v for k, v in sorted(accuracy.items())},
        "seconds_per_step": float(np.median([m["seconds_sampling"] + m["seconds_update"] for m in after_first])),
        "seconds_sampling": float(np.median([m["seconds_sampling"] for m in after_first])),
        "seconds_update": float(np.median([m["seconds_update"] for m in after_first])),
        "kl_max": max(m.get("kl", 0.0) for m in trained),
        "seconds_wall": wall,
        "overrides": [o for o in overrides if not o.startswith(("run.out_dir", "model.", "data."))],
        "curves": {
            key: [m.get(key) for m in trained]
            for key in ("reward", "reward_exact_match", "kl", "clip_fraction", "response_length", "entropy")
        },
    }


def report(result: dict, out_dir: str, name: str = "report.md") -> None:
    """`name` (the table) and curves.png in out_dir, from the results alone."""
    runs = result["runs"]
    lines = [
        f"# RL from a start with headroom: {result['settings']['steps']} steps, seeds {result['settings']['seeds']}",
        "",
        f"Start: SFT on {result['start']['train_problems']} problems with "
        f"{result['start']['train_finals_perturbed']} final answers made wrong; held-out accuracy "
        f"{result['start']['heldout_accuracy']:.3f} (greedy, {HELD_OUT} problems). Command: "
        f"`{result['provenance']['command']}`; {result['seconds_total'] / 60:.1f} minutes in all "
        f"(the start's SFT and evaluation: {result['start']['seconds'] / 60:.1f} minutes, "
        f"{'in this run' if result['start']['built_by_this_run'] else 'reused from an earlier run'}).",
        "",
        "| arm | trainer | seed | held-out before | after | change | fixed / broken | McNemar p "
        "| s/step (sampling + rest) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['arm']} | {r['trainer']} | {r['seed']} | {r['before']:.3f} | {r['after']:.3f} | "
            f"{100 * (r['after'] - r['before']):+.1f} pts | {r['fixed']} / {r['broken']} | {r['p_value']:.1e} | "
            f"{r['seconds_per_step']:.2f} ({r['seconds_sampling']:.2f} + {r['seconds_update']:.2f}) |"
        )
    lines += ["", "| arm | seeds | mean change | smallest change | largest p | s/step (median over seeds) |"]
    lines += ["|---|---|---|---|---|---|"]
    for arm, s in result["arms"].items():
        lines.append(
            f"| {arm} | {s['seeds']} | {100 * s['mean_change']:+.1f} pts | {100 * s['min_change']:+.1f} pts | "
            f"{s['max_p']:.1e} | {s['seconds_per_step']:.2f} |"
        )
    lines += ["", "![curves](curves.png)", ""]
    with open(os.path.join(out_dir, name), "w") as f:
        f.write("\n".join(lines))
    plot(result, os.path.join(out_dir, "curves.png"))


COLORS = {"grpo": "C0", "gspo": "C1", "grpo-shuffled": "C7", "grpo-lora": "C2", "grpo-kl": "C3"}


def _style(arm: str):
    base = arm.removeprefix("trl-")
    return COLORS.get(base, "C4"), ("--" if arm.startswith("trl-") else "-")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, steps = result["runs"], result["settings"]["steps"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [
        (axes[0, 0], "reward", "reward on the step's prompts (mean; band: seeds' min-max)"),
        (axes[0, 2], "kl", "KL to the start (k3, arms with kl_coef > 0)"),
        (axes[1, 0], "clip_fraction", "clip fraction"),
        (axes[1, 1], "response_length", "response length (tokens)"),
    ]
    arms = list(result["arms"])
    for ax, key, title in panels:
        for arm in arms:
            series = [r["curves"][key] for r in runs if r["arm"] == arm]
            if key == "kl" and not any(any(v for v in s if v) for s in series):
                continue
            values = np.array([[np.nan if v is None else v for v in s] for s in series], float)
            x = np.arange(1, values.shape[1] + 1)
            color, ls = _style(arm)
            ax.plot(x, np.nanmean(values, 0), ls, color=color, label=arm)
            if len(series) > 1:
                ax.fill_between(x, np.nanmin(values, 0), np.nanmax(values, 0), color=color, alpha=0.15)
        ax.set_title(title, fontsize=10)
    ax = axes[0, 1]
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        x = sorted(int(k) for k in rs[0]["accuracy"])
        values = np.array([[r["accuracy"][str(k)] for k in x] for r in rs])
        color, ls = _style(arm)
        ax.plot(x, values.mean(0), ls, marker="o", color=color, label=arm)
        if len(rs) > 1:
            ax.fill_between(x, values.min(0), values.max(0), color=color, alpha=0.15)
    ax.set_title(f"held-out accuracy (greedy, {HELD_OUT} problems)", fontsize=10)
    ax = axes[1, 2]
    names = [a for a in arms if result["arms"][a]["seconds_per_step"]]
    sampling = [result["arms"][a]["seconds_sampling"] for a in names]
    rest = [result["arms"][a]["seconds_update"] for a in names]
    ax.barh(names, sampling, color="C9", label="sampling")
    ax.barh(names, rest, left=sampling, color="C8", label="rewards, log-probs, updates")
    ax.set_title("seconds per step (median over steps and seeds)", fontsize=10)
    ax.invert_yaxis()
    for a in axes.flat:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    for a in list(axes[0]) + list(axes[1, :2]):
        a.set_xlabel("RL step (8 prompts x 8 samples, 2 updates)")
        a.set_xlim(0, steps + 0.5)
    fig.suptitle("solid: gptoss_jax (train.rl); dashed: TRL GRPOTrainer, same config, start and prompts", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def by_arm(runs: list[dict]) -> dict:
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        rs = [r for r in runs if r["arm"] == arm]
        change = [r["after"] - r["before"] for r in rs]
        out[arm] = {
            "seeds": [r["seed"] for r in rs],
            "before": float(np.mean([r["before"] for r in rs])),
            "after": float(np.mean([r["after"] for r in rs])),
            "mean_change": float(np.mean(change)),
            "min_change": float(np.min(change)),
            "max_p": max(r["p_value"] for r in rs),
            "seconds_per_step": float(np.median([r["seconds_per_step"] for r in rs])),
            "seconds_sampling": float(np.median([r["seconds_sampling"] for r in rs])),
            "seconds_update": float(np.median([r["seconds_update"] for r in rs])),
            "kl_max": max(r["kl_max"] for r in rs),
        }
    return out


def main(argv=None):
    host.reexec_with_huge_pages()  # first: huge pages for XLA's host buffers (gptoss_jax/host.py)
    args = parse(argv)
    if args.replot:
        with open(os.path.join(args.out, "results.json")) as f:
            result = json.load(f)
        for folder, name in [(args.out, "report.md")] + ([(args.record, "README.md")] if args.record else []):
            report(result, folder, name)
        return
    if any(a.startswith("trl-") for a in args.arms):
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit(
                "the TRL arms need the rl-peer extra: make setup-rl-peer (or leave out --arms trl-*)"
            ) from None
    t0 = time.time()
    log = lambda s: print(s, flush=True)
    os.makedirs(args.out, exist_ok=True)
    start = build_start(args.out, log)
    prompts = write_prompts(args.out, start["paths"]["start"])
    runs = []
    for arm in args.arms:
        for seed in args.seeds[:1] if arm in FIRST_SEED_ONLY else args.seeds:
            runs.append(run_arm(arm, seed, args, start["paths"], prompts, log))
            r = runs[-1]
            log(
                f"== {arm} seed {seed}: held-out {r['before']:.3f} -> {r['after']:.3f} "
                f"(fixed {r['fixed']}, broken {r['broken']}, p = {r['p_value']:.1e}); "
                f"{r['seconds_per_step']:.2f} s/step ({r['seconds_sampling']:.2f} sampling)"
            )
    s = start["summary"]
    result = {
        "provenance": records.provenance(),
        "start": {
            "sft_steps": s["steps"],
            "train_problems": s["data"]["train"],
            "train_finals_perturbed": s["data"]["train_finals_perturbed"],
            "heldout_accuracy": s["heldout_accuracy"],
            "final_noise": FINAL_NOISE,
            "quickstart_overrides": START_SFT,
            "seconds": s["seconds_total"],
            "built_by_this_run": start["built"],
        },
        "settings": {
            "config": os.path.relpath(CONFIG, ROOT),
            "shared_overrides": SHARED,
            "arm_overrides": {a: ARM_OVERRIDES[a] for a in args.arms},
            "steps": args.steps,
            "eval_every": args.eval_every,
            "seeds": args.seeds,
            "held_out": HELD_OUT,
            "rl_prompts": RL_PROMPTS,
            "quick": args.quick,
        },
        "runs": runs,
        "arms": by_arm(runs),
        "seconds_total": round(time.time() - t0, 1),
    }
    for folder, name in [(args.out, "report.md")] + ([(args.record, "README.md")] if args.record else []):
        records.write(result, os.path.join(folder, "results.json"))
        report(result, folder, name)
    with open(os.path.join(args.out, "report.md")) as f:
        print(f.read())


if __name__ == "__main__":
    main()
