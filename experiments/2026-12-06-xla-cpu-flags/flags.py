"""Do XLA:CPU's library emitters (oneDNN, XNNPACK, YNNPACK) or vector-width flags speed up the
rows where HF is ahead (issue 25)? Each variant runs in its own process with its XLA_FLAGS;
HF runs once in the same invocation, so every ratio is within one run on one machine.

    python experiments/2026-12-06-xla-cpu-flags/flags.py [--repeats 3] [--json PATH]

Rows (scripts/bench.py's BENCH config, its random weights, batch 1, full logits): prefill
T = 512 and 2048 in fp32 and bf16 (dense experts), one fp32 training step of 4 x 512 (AdamW,
clip); medians of the repeats, compile excluded. A variant whose flags the compiler rejects, or
whose logits differ from the default's by more than 1e-4 relative (fp32), is reported as such.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

VARIANTS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "xnn_dot": "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "onednn_dot": "--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "vector512": "--xla_cpu_prefer_vector_width=512",
}
PREFILL = [(512, "float32"), (2048, "float32"), (512, "bfloat16"), (2048, "bfloat16")]


def child(which: str, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    import gptoss_jax as gj
    from gptoss_jax.bench import peers, timing

    cfg = gj.tiny(**peers.BENCH_CONFIG)
    models = peers.Models(cfg)
    out = {"prefill": {}, "train": None}
    rng = np.random.default_rng(0)
    if which == "hf":
        torch = peers.require_torch()
        hf = models.hf()
        for T, dtype in PREFILL:
            m = hf if dtype == "float32" else models.hf().to(torch.bfloat16)
            ids = torch.tensor(rng.integers(0, cfg.vocab_size, (1, T)))
            with torch.no_grad():
                sec = timing.median(lambda m=m, ids=ids: m(input_ids=ids).logits, repeats)
            out["prefill"][f"{T}/{dtype}"] = {"seconds": sec, "tok_s": T / sec}
        tokens = rng.integers(0, cfg.vocab_size, (4, 512)).astype(np.int32)
        _, hf_step = peers.training_steps(models.ours("float32", "dense"), models.hf(train=True), tokens)
        sec = timing.median(hf_step, repeats)
        out["train"] = {"seconds": sec, "tok_s": 4 * 512 / sec}
        return out
    for T, dtype in PREFILL:
        run, comp, _ = peers.compile_forward(models.ours(dtype, "dense"), 1, T)
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, T)).astype(np.int32))
        logits = np.asarray(run(tokens), np.float32)
        sec = timing.median(lambda: run(tokens), repeats)
        out["prefill"][f"{T}/{dtype}"] = {
            "seconds": sec,
            "tok_s": T / sec,
            "compile_s": comp,
            "logits_checksum": [float(np.abs(logits).mean()), float(logits[0, -1, :8].sum())],
        }
    tokens = rng.integers(0, cfg.vocab_size, (4, 512)).astype(np.int32)
    ours_step, _ = peers.training_steps(models.ours("float32", "dense"), models.hf(train=True), tokens)
    t = time.perf_counter()
    first_loss = ours_step()
    comp = time.perf_counter() - t
    sec = timing.median(ours_step, repeats)
    out["train"] = {"seconds": sec, "tok_s": 4 * 512 / sec, "compile_s": comp, "first_loss": first_loss}
    out["backend"] = jax.default_backend()
    return out


def table(record: dict) -> str:
    """The record as a markdown table: tok/s and ours / HF per row and variant."""
    res = record["results"]
    hf = res["hf"]
    keys = list(hf["prefill"])
    head = "| variant (XLA_FLAGS) | " + " | ".join(f"prefill {k}" for k in keys) + " | train 4x512 fp32 |"
    lines = [
        f"Run {record['provenance']['date_utc']}, `{record['provenance']['command']}`, "
        f"{record['provenance']['cpu']['model']}; tok/s (ours / HF in the same run).",
        "",
        head,
        "|" + "---|" * (len(keys) + 2),
    ]
    hf_cells = " | ".join(f"{hf['prefill'][k]['tok_s']:,.0f}" for k in keys)
    lines.append(f"| HF eager (torch) | {hf_cells} | {hf['train']['tok_s']:,.0f} |")
    for name, r in res.items():
        if name == "hf":
            continue
        if "error" in r:
            lines.append(f"| {name} (`{r['flags']}`) | failed: {r['error'][:80]} |")
            continue
        cells = " | ".join(
            f"{v['tok_s']:,.0f} ({v['tok_s'] / hf['prefill'][k]['tok_s']:.2f}x)"
            + ("" if v.get("agrees_with_default", True) else " logits differ")
            for k, v in r["prefill"].items()
        )
        t = r["train"]["tok_s"]
        lines.append(f"| {name} (`{r['flags'] or 'none'}`) | {cells} | {t:,.0f} ({t / hf['train']['tok_s']:.2f}x) |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "flags.json"))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--table", action="store_true", help="only render table.md from the --json record")
    args = ap.parse_args()
    md = os.path.join(os.path.dirname(args.json), "table.md")
    if args.table:
        with open(args.json) as f:
            record = json.load(f)
        with open(md, "w") as f:
            f.write(table(record))
        return
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.repeats)), flush=True)
        return
    from gptoss_jax.bench import records

    results = {}
    for name in ["hf"] + args.variants:
        env = dict(os.environ)
        flags = VARIANTS.get(name, "")
        env["XLA_FLAGS"] = " ".join(x for x in (os.environ.get("XLA_FLAGS", ""), flags) if x)
        t = time.time()
        p = subprocess.run(
            [sys.executable, __file__, "--child", name, "--repeats", str(args.repeats)],
            env=env,
            capture_output=True,
            text=True,
        )
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            err = (p.stderr.strip().splitlines() or ["no output"])[-1]
            results[name] = {"flags": flags, "error": err[:400]}
            print(f"{name:12s} failed: {err[:200]}", flush=True)
            continue
        results[name] = {"flags": flags, **json.loads(line[0][7:]), "wall_s": round(time.time() - t, 1)}
        r = results[name]
        cells = "  ".join(f"{k} {v['tok_s']:7.0f}" for k, v in r["prefill"].items())
        print(f"{name:12s} prefill tok/s: {cells}  train {r['train']['tok_s']:6.0f} tok/s", flush=True)
    base = results.get("default", {})
    for name, r in results.items():
        if name in ("hf", "default") or "error" in r or "prefill" not in base:
            continue
        for key, v in r["prefill"].items():
            b = base["prefill"][key]["logits_checksum"]
            same = np.allclose(v["logits_checksum"], b, rtol=1e-4 if key.endswith("float32") else 2e-2)
            v["agrees_with_default"] = bool(same)
    record = {"provenance": records.provenance(), "variants": VARIANTS, "results": results}
    records.write(record, args.json)
    with open(md, "w") as f:
        f.write(table(record))
    hf = results["hf"]
    print("\nours / HF (same run):")
    for name, r in results.items():
        if name == "hf" or "error" in r:
            continue
        cells = "  ".join(f"{k} {v['tok_s'] / hf['prefill'][k]['tok_s']:.2f}x" for k, v in r["prefill"].items())
        print(f"{name:12s} {cells}  train {r['train']['tok_s'] / hf['train']['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
