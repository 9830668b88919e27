"""Print the fp32 and bf16 parity figures of this implementation against OpenAI's gpt_oss.torch and HF
transformers on tiny random checkpoints (needs the test extras: `make setup-test`).

    .venv/bin/python scripts/parity_report.py [--seeds 3] [--tokens 40] [--json PATH]

--json writes the figures as a record (`scripts/figures.py` renders the README's parity rows from
it): the command, UTC date and CPU (`provenance`), the config, the versions of the three stacks,
and one section per dtype: "float32" (below) and "bfloat16" (`measure_bf16`, the bound of
tests/test_parity_bf16.py: its limit, the oracles' own bf16 errors, ours forward and cached decode):

    {"provenance": {...}, "config": {...}, "versions": {...}, "args": {...},
     "float32": {"metric": ..., "test_limit": 1e-4, "seeds": [{"seed": 0, "ours_vs_openai": ...,
                 "ours_vs_hf": ..., "hf_vs_openai": ..., "argmax_ours_eq_openai": ...,
                 "argmax_ours_eq_hf": ..., "max_abs_logit": ...}, ...],
                 "worst": {"ours_vs_openai": ..., "ours_vs_hf": ..., "hf_vs_openai": ...},
                 "argmax_agreement_min": {"openai": ..., "hf": ...}}}
"""

import argparse
import dataclasses
import importlib.metadata
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from provenance import provenance  # noqa: E402

import gptoss_jax as gj  # noqa: E402
from tests import factory  # noqa: E402
from tests.test_parity import TOL  # noqa: E402  (the tests' limit, recorded beside the figures)

PAIRS = ("ours_vs_openai", "ours_vs_hf", "hf_vs_openai")


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def write_record(path, args, cfg, rows, bf16=None):
    seeds = [
        dict(zip(("seed",) + PAIRS + ("argmax_ours_eq_openai", "argmax_ours_eq_hf", "max_abs_logit"), r)) for r in rows
    ]
    record = {
        "provenance": provenance(),
        "args": vars(args),
        "config": dataclasses.asdict(cfg),
        "versions": {name: importlib.metadata.version(name) for name in ("jax", "torch", "transformers", "gpt-oss")},
        "float32": {
            "metric": "max|dlogit| / max|logit|, fp32, T tokens of one sequence",
            "test_limit": TOL,
            "seeds": seeds,
            "worst": {k: max(s[k] for s in seeds) for k in PAIRS},
            "argmax_agreement_min": {
                "openai": min(s["argmax_ours_eq_openai"] for s in seeds),
                "hf": min(s["argmax_ours_eq_hf"] for s in seeds),
            },
        },
    }
    if bf16 is not None:
        record["bfloat16"] = bf16
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1, default=str)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--json", default=None, help="also write the figures to this JSON record")
    args = ap.parse_args()
    from gpt_oss.torch.model import Transformer
    from transformers import GptOssForCausalLM, Mxfp4Config

    cfg = gj.tiny()
    print(f"config: {cfg}")
    print(f"T={args.tokens}; metric: max|dlogit| / max|logit| in fp32, and argmax agreement")
    rows = []
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as d:
            orig = factory.write_original(os.path.join(d, "original"), cfg, seed)
            hf_dir = factory.write_hf(
                os.path.join(d, "hf"),
                factory.original_to_hf(factory.original_tensors(cfg, seed), cfg),
                factory.hf_config_dict(cfg, mxfp4=True),
            )
            toks = np.random.default_rng(seed).integers(0, cfg.vocab_size, args.tokens)
            with torch.no_grad():
                ref = Transformer.from_checkpoint(orig, device="cpu").float()(torch.tensor(toks)).numpy()
                hf = (
                    GptOssForCausalLM.from_pretrained(
                        hf_dir,
                        dtype=torch.float32,
                        attn_implementation="eager",
                        quantization_config=Mxfp4Config(dequantize=True),
                    )(torch.tensor(toks)[None])
                    .logits[0]
                    .numpy()
                )
            ours_o = np.asarray(gj.load(orig, dtype="float32")(toks[None]).logits[0])
            ours_h = np.asarray(gj.load(hf_dir, dtype="float32")(toks[None]).logits[0])
            rows.append(
                (
                    seed,
                    rel(ours_o, ref),
                    rel(ours_h, hf),
                    rel(hf, ref),
                    float((ours_o.argmax(-1) == ref.argmax(-1)).mean()),
                    float((ours_h.argmax(-1) == hf.argmax(-1)).mean()),
                    float(np.abs(ref).max()),
                )
            )
    print("seed  ours(original) vs OpenAI  ours(hf) vs HF  HF vs OpenAI  argmax=OpenAI  argmax=HF  max|logit|")
    for r in rows:
        print(f"{r[0]:4d}  {r[1]:24.2e}  {r[2]:14.2e}  {r[3]:12.2e}  {r[4]:13.3f}  {r[5]:9.3f}  {r[6]:10.3f}")
    worst = np.max(np.array([r[1:4] for r in rows]), axis=0)
    print(f"worst: ours vs OpenAI {worst[0]:.2e}, ours vs HF {worst[1]:.2e}, HF vs OpenAI {worst[2]:.2e}")
    bf16 = measure_bf16(cfg)
    if args.json:
        write_record(args.json, args, cfg, rows, bf16)
        print(f"record written to {args.json}")


def measure_bf16(cfg):
    """bf16, the default dtype, as tests/test_parity_bf16.py bounds it (the same checkpoint seed,
    tokens, statistic and limit): ours forward and cached decode against both oracles in bf16 and
    fp32, beside what bf16 costs the oracles themselves."""
    from tests import test_parity_bf16 as tb

    with tempfile.TemporaryDirectory() as d:
        orig = factory.write_original(os.path.join(d, "original"), cfg, 0)
        hf_dir = factory.write_hf(
            os.path.join(d, "hf"),
            factory.original_to_hf(factory.original_tensors(cfg, 0), cfg),
            factory.hf_config_dict(cfg, mxfp4=True),
        )
        tokens = np.random.default_rng(tb.TOKEN_SEED).integers(0, cfg.vocab_size, (tb.R, tb.T))
        oracles = factory.bf16_oracle_runs(orig, hf_dir, tokens)
        noise = factory.bf16_noise(oracles)
        model = gj.load(orig)
        ours = {
            "forward": factory.bf16_figures(tb.forward_logits(model, tokens), oracles, noise),
            "cached_decode": factory.bf16_figures(tb.cached_decode_logits(model, cfg, tokens), oracles, noise),
        }
    print(
        f"\nbf16 ({tb.R} x {tb.T} tokens; e = ||dlogits|| / ||logits||; limit {factory.BF16_LIMIT_FACTOR} x the "
        f"oracles' largest = {noise['limit']:.3e})"
    )
    for k, e in noise["pairs"].items():
        print(f"  oracles {k}: {e:.3e}")
    for what, figs in ours.items():
        for name, (e, decisive, everywhere) in figs.items():
            print(
                f"  ours {what} vs {name}: {e:.3e}; argmax {decisive:.3f} (decisive positions), {everywhere:.3f} (all)"
            )
    return {
        "metric": "||ours - oracle||_2 / ||oracle||_2 over all logits",
        "rows": tb.R,
        "tokens": tb.T,
        "limit_factor": factory.BF16_LIMIT_FACTOR,
        "limit": noise["limit"],
        "oracle_pairs": noise["pairs"],
        "oracle_argmax_pairs": noise["oracle_argmax_pairs"],
        "argmax_min": tb.ARGMAX_MIN,
        "ours": {
            what: {name: {"e": e, "argmax_decisive": a, "argmax_all": b} for name, (e, a, b) in figs.items()}
            for what, figs in ours.items()
        },
        "worst": max(e for figs in ours.values() for e, _, _ in figs.values()),
        "argmax_decisive_min": min(a for figs in ours.values() for _, a, _ in figs.values()),
    }


if __name__ == "__main__":
    main()
