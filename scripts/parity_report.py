"""Print the fp32 parity figures of this implementation against OpenAI's gpt_oss.torch and HF
transformers on tiny random checkpoints (needs the test extras: `make setup-test`).

    .venv/bin/python scripts/parity_report.py [--seeds 3] [--tokens 40]
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gptoss_jax as gj  # noqa: E402
from tests import factory  # noqa: E402


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=40)
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
            hf_dir = factory.write_hf(os.path.join(d, "hf"), factory.original_to_hf(
                factory.original_tensors(cfg, seed), cfg), factory.hf_config_dict(cfg, mxfp4=True))
            toks = np.random.default_rng(seed).integers(0, cfg.vocab_size, args.tokens)
            with torch.no_grad():
                ref = Transformer.from_checkpoint(orig, device="cpu").float()(torch.tensor(toks)).numpy()
                hf = GptOssForCausalLM.from_pretrained(
                    hf_dir, dtype=torch.float32, attn_implementation="eager",
                    quantization_config=Mxfp4Config(dequantize=True))(torch.tensor(toks)[None]).logits[0].numpy()
            ours_o = np.asarray(gj.load(orig, dtype="float32")(toks[None]).logits[0])
            ours_h = np.asarray(gj.load(hf_dir, dtype="float32")(toks[None]).logits[0])
            rows.append((seed, rel(ours_o, ref), rel(ours_h, hf), rel(hf, ref),
                         float((ours_o.argmax(-1) == ref.argmax(-1)).mean()),
                         float((ours_h.argmax(-1) == hf.argmax(-1)).mean()), float(np.abs(ref).max())))
    print("seed  ours(original) vs OpenAI  ours(hf) vs HF  HF vs OpenAI  argmax=OpenAI  argmax=HF  max|logit|")
    for r in rows:
        print(f"{r[0]:4d}  {r[1]:24.2e}  {r[2]:14.2e}  {r[3]:12.2e}  {r[4]:13.3f}  {r[5]:9.3f}  {r[6]:10.3f}")
    worst = np.max(np.array([r[1:4] for r in rows]), axis=0)
    print(f"worst: ours vs OpenAI {worst[0]:.2e}, ours vs HF {worst[1]:.2e}, HF vs OpenAI {worst[2]:.2e}")


if __name__ == "__main__":
    main()
