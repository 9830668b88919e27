"""Compile the programs users run for their targets and record the compiler's figures.

    python scripts/compile_targets.py [--out experiments/2026-12-05-compile] [--only NAME ...] [--docs]

Each row: one program (20b/120b prefill, decode step, a config's train step) compiled for a
compile-only target (`gptoss_jax.targets`) on this CPU host; per-device arguments / outputs /
temporaries vs HBM, fits, compile time, the Pallas kernels in the program, and for train steps the
`--estimate-memory` figure beside the compiler's. Writes records.json (appended row by row, so a
killed run keeps what it finished) and table.md generated from it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from gptoss_jax import aot, config  # noqa: E402
from gptoss_jax.train.config import load_config  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIGS_README = os.path.join(CONFIGS, "README.md")
B20, B120 = config.gpt_oss_20b(), config.gpt_oss_120b()
# every training config in configs/ for real hardware, and the target it is written for
CONFIG_TARGETS = {
    "lora_20b_gpu80": "h100",
    "sft_20b_gpu80": "h100",
    "grpo_lora_20b_gpu80": "h100",
    "lora_20b_tpu_v5e_8": "tpu-v5e-8",
    "sft_20b_tpu_v5e_8": "tpu-v5e-8",
    "grpo_lora_20b_tpu_v5e_8": "tpu-v5e-8",
    "lora_120b_h100x8": "h100x8",
    "lora_120b_gpu80": "h100",
}
# train-step rows: name -> (config, overrides, target); the configs as shipped, then variants
TRAIN_ROWS = {f"{name}@{target}": (name, [], target) for name, target in CONFIG_TARGETS.items()}
TRAIN_ROWS.update(
    {
        "lora_20b_gpu80 seq 4096 batch 1@h100 chunked loss (field goal: <= 24 GB)": (
            "lora_20b_gpu80",
            ["data.batch_size=1", "data.accum_steps=1", "model.loss_chunk=1024"],
            "h100",
        ),
        "lora_20b_gpu80 r=8 seq 4096 batch 1@h100 loss_chunk 512 (field goal: <= 24 GB)": (
            "lora_20b_gpu80",
            ["data.batch_size=1", "data.accum_steps=1", "model.loss_chunk=512", "lora.rank=8", "lora.alpha=16"],
            "h100",
        ),
        # dropless (capacity_factor null)
        "120b LoRA step 8x2048@h100x8": ("lora_120b_h100x8", ["model.capacity_factor=null"], "h100x8"),
        "120b LoRA step 8x2048@tpu-v5p-8": (
            "lora_120b_h100x8",
            ["mesh={expert: 4}", "model.capacity_factor=null"],
            "tpu-v5p-8",
        ),
        "120b LoRA step 1x2048@h100 (field goal: <= 75 GB)": (
            "lora_120b_h100x8",
            ["mesh={}", "model.capacity_factor=null", "data.batch_size=1"],
            "h100",
        ),
    }
)


def programs():
    """(name, thunk) for every row of the table."""
    rows = []
    for target, mesh in (("h100", {}), ("tpu-v5e-8", {"expert": 8})):
        rows.append(
            (
                f"20b-forward-8192@{target}",
                lambda t=target, m=mesh: aot.compile_forward(B20, t, batch=1, length=8192, mesh=m, progress=False)[1],
            )
        )
        for batch in (1, 64):
            rows.append(
                (
                    f"20b-decode-b{batch}@{target}",
                    lambda t=target, m=mesh, b=batch: aot.compile_decode(
                        B20, t, batch=b, context=8192, mesh=m, progress=False
                    )[1],
                )
            )
    rows.append(
        (
            "20b-serving-forward-b8x8192@tpu-v6e-1",
            lambda: aot.compile_forward(B20, "tpu-v6e-1", batch=8, length=8192, progress=False)[1],
        )
    )
    rows.append(
        (
            "20b-serving-decode-b8@tpu-v6e-1",
            lambda: aot.compile_decode(B20, "tpu-v6e-1", batch=8, context=8192, progress=False)[1],
        )
    )
    for name, (config_name, overrides, target) in TRAIN_ROWS.items():
        rows.append(
            (
                name,
                lambda c=config_name, o=overrides, t=target: aot.compile_train_step(
                    load_config(os.path.join(CONFIGS, c + ".yaml"), o), t, progress=False
                ),
            )
        )
    for target, mesh in (("h100x8", {"expert": 8}), ("tpu-v5p-8", {"expert": 4}), ("tpu-v6e-8", {"expert": 8})):
        rows.append(
            (
                f"120b-forward-4096@{target}",
                lambda t=target, m=mesh: aot.compile_forward(B120, t, batch=8, length=4096, mesh=m, progress=False)[1],
            )
        )
    return rows


def markdown(records: list) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"
    lines = [
        "| program @ target | devices | args GiB | temps GiB | total GiB | HBM GiB | fits | estimate GiB "
        "| compile s | kernels |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['row']} | | | | | | error: {r['error'][:120]} | | | |")
            continue
        est = gib(r["estimate_bytes"]) if r.get("estimate_bytes") else ""
        kernels = ", ".join(f"{k} x{n}" for k, n in sorted(r["kernels"].items()))
        lines.append(
            f"| {r['row']} | {r['devices']} | {gib(r['argument_bytes'])} | {gib(r['temp_bytes'])} | "
            f"{gib(r['total_bytes'])} | {gib(r['hbm_bytes'])} | {'yes' if r['fits'] else '**no**'} | {est} | "
            f"{r['compile_seconds']:.0f} | {kernels} |"
        )
    return "\n".join(lines) + "\n"


def configs_table(records: list) -> str:
    """The configs' rows: compiled per-device total vs HBM beside --estimate-memory (and, where
    `scripts/live_peak.py` read it from a dump, the compiler's peak of live bytes vs the estimate)."""
    gib = lambda b: f"{b / 2**30:.1f}"
    live = lambda r: (
        f" (peak live {gib(r['peak_live_bytes'])} GiB: {r['peak_live_bytes'] / r['estimate_bytes']:.2f})"
        if r.get("peak_live_bytes")
        else ""
    )
    lines = [
        "| config | target | compiled GiB / HBM | fits | --estimate-memory GiB | compiler / estimate |",
        "|---|---|---|---|---|---|",
    ]
    for name, target in CONFIG_TARGETS.items():
        r = next((r for r in records if r["row"] == f"{name}@{target}"), None)
        if r is None:
            lines.append(f"| `{name}.yaml` | {target} | not compiled yet | | | |")
        elif "error" in r:
            lines.append(f"| `{name}.yaml` | {target} | error: {r['error'][:100]} | | | |")
        else:
            lines.append(
                f"| `{name}.yaml` | {target} | {gib(r['total_bytes'])} / {gib(r['hbm_bytes'])} | "
                f"{'yes' if r['fits'] else '**no**'} | {gib(r['estimate_bytes'])} | "
                f"{r['total_bytes'] / r['estimate_bytes']:.2f}{live(r)} |"
            )
    return "\n".join(lines) + "\n"


def update_configs_readme(records: list, path: str = CONFIGS_README) -> None:
    start, end = "<!-- compiled-configs:start -->", "<!-- compiled-configs:end -->"
    text = open(path).read()
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(head + start + "\n" + configs_table(records) + end + tail)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments/2026-12-05-compile")
    p.add_argument("--only", nargs="*", help="row names (substrings) to run")
    p.add_argument("--docs", action="store_true", help="also regenerate the compiled table in configs/README.md")
    p.add_argument(
        "--refresh-estimates",
        action="store_true",
        help="compile nothing: recompute the --estimate-memory figure of every train-step row "
        "(the estimator changed, the compiled program did not) and regenerate the tables",
    )
    p.add_argument(
        "--tables-only",
        action="store_true",
        help="compile nothing: regenerate table.md (and with --docs configs/README.md) from records.json",
    )
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "records.json")
    records = json.load(open(path)) if os.path.exists(path) else []
    rows = programs()
    order = {name: i for i, (name, _) in enumerate(rows)}
    # the table lists the rows this script defines, in its order
    records = sorted((r for r in records if r["row"] in order), key=lambda r: order[r["row"]])
    if args.refresh_estimates:
        from gptoss_jax.train.memory import estimate

        for r in records:
            if r["row"] in TRAIN_ROWS and "error" not in r:
                config, overrides, _ = TRAIN_ROWS[r["row"]]
                r["estimate_bytes"] = estimate(load_config(os.path.join(CONFIGS, config + ".yaml"), overrides)).total
                r["estimate_command"] = "python scripts/compile_targets.py --refresh-estimates"
        with open(path, "w") as f:
            json.dump(records, f, indent=1)
    if args.tables_only or args.refresh_estimates:
        rows = []
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(markdown(records))
        if args.docs:
            update_configs_readme(records)
    for name, run in rows:
        if args.only and not any(s in name for s in args.only):
            continue
        t0 = time.time()
        print(f"{name} ...", flush=True)
        try:
            rec = {"row": name, **run().to_json()}
        except Exception as e:  # record the failure: a program that does not compile is a finding
            traceback.print_exc()
            rec = {"row": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        rec["command"] = "python scripts/compile_targets.py --only " + repr(name)
        rec["wall_seconds"] = round(time.time() - t0, 1)
        records = sorted([r for r in records if r["row"] != name] + [rec], key=lambda r: order[r["row"]])
        with open(path, "w") as f:
            json.dump(records, f, indent=1)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(markdown(records))
        if args.docs:
            update_configs_readme(records)
        print(markdown([rec]).splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
