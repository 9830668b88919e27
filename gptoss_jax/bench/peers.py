"""One set of small random weights in every implementation the CPU benchmarks compare: ours
(`gj.load` in fp32/bf16, dense/MXFP4 experts), HF transformers (`GptOssForCausalLM`, eager
attention, fp32) and OpenAI's reference (`gpt_oss.torch.model.Transformer`, fp32); our jitted
forward; a training step on each side; and what a peer's run at length T should cost (memory,
time), so that a case that cannot fit is skipped before it runs.

torch, transformers and gpt_oss are optional extras (`make setup-test`), imported where used.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import safe_open

import gptoss_jax as gj
from gptoss_jax.train.step import OptimConfig, make_optimizer, make_trainer

GiB = 2**30

# the small config of the CPU benchmarks (scripts/bench.py, bench_train.py, profile_*.py)
BENCH_CONFIG = dict(
    vocab_size=8192,
    d_model=512,
    num_layers=4,
    num_heads=8,
    num_kv_heads=2,
    head_dim=64,
    num_experts=16,
    experts_per_token=4,
    expert_dim=512,
    sliding_window=128,
)


def require_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "comparing with HF transformers / OpenAI's reference needs the test extras "
            "(torch, transformers, gpt_oss: `make setup-test`)"
        ) from e
    return torch


def hf_greedy_generate(hf, prompts, new_tokens: int):
    """A runner for HF's `generate`: exactly `new_tokens` greedy tokens for each row of `prompts`
    (equal-length token lists), no gradients."""
    torch = require_torch()
    ids = torch.tensor(prompts)

    def run():
        with torch.no_grad():
            hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

    return run


class Models:
    """`gj.init(cfg, seed=0, experts="mxfp4")` written once in the hub layout (bf16 floats, MXFP4
    experts) and read by every implementation, each built lazily: ours via `gj.load`; HF from a
    dense fp32 re-save of our fp32 dense model; OpenAI's reference from an `original/` layout
    converted from the hub files."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._dir = tempfile.TemporaryDirectory()
        self.root = self._dir.name
        self._ours = {}
        self._hub = self._dense = self._orig = None

    def hub(self):
        if self._hub is None:
            self._hub = os.path.join(self.root, "hub_mxfp4")
            gj.save_hf(gj.init(self.cfg, seed=0, dtype="float32", experts="mxfp4"), self._hub)
        return self._hub

    def ours(self, dtype: str, experts: str):
        if (dtype, experts) not in self._ours:
            self._ours[dtype, experts] = gj.load(self.hub(), dtype=dtype, experts=experts)
        return self._ours[dtype, experts]

    def hf_dir(self):
        if self._dense is None:
            self._dense = os.path.join(self.root, "hub_dense_fp32")
            gj.save_hf(self.ours("float32", "dense"), self._dense, dtype="float32")
        return self._dense

    def hf(self, train=False, dtype: str = "float32"):
        """HF's model in `dtype` (its bf16 weights are the same values as ours: every stored weight
        is a bf16 value or an MXFP4 value, both exact in bf16)."""
        torch = require_torch()
        from transformers import GptOssForCausalLM

        m = GptOssForCausalLM.from_pretrained(self.hf_dir(), dtype=getattr(torch, dtype), attn_implementation="eager")
        return m.train() if train else m.eval()

    def original_dir(self):
        """OpenAI's original/ layout from the hub files: fused qkv, renamed keys, same bytes."""
        if self._orig is None:
            torch = require_torch()
            from safetensors.torch import save_file

            hub = {}
            for fn in os.listdir(self.hub()):
                if fn.endswith(".safetensors"):
                    with safe_open(os.path.join(self.hub(), fn), framework="pt") as f:
                        hub.update({k: f.get_tensor(k) for k in f.keys()})
            t = {
                "embedding.weight": hub["model.embed_tokens.weight"],
                "norm.scale": hub["model.norm.weight"],
                "unembedding.weight": hub["lm_head.weight"],
            }
            for n in range(self.cfg.num_layers):
                p, b = f"model.layers.{n}.", f"block.{n}."
                sa, ex = p + "self_attn.", p + "mlp.experts."
                for s in ("weight", "bias"):
                    t[b + f"attn.qkv.{s}"] = torch.cat([hub[sa + f"{x}_proj.{s}"] for x in "qkv"], 0)
                    t[b + f"attn.out.{s}"] = hub[sa + f"o_proj.{s}"]
                    t[b + f"mlp.gate.{s}"] = hub[p + f"mlp.router.{s}"]
                t[b + "attn.sinks"] = hub[sa + "sinks"]
                t[b + "attn.norm.scale"] = hub[p + "input_layernorm.weight"]
                t[b + "mlp.norm.scale"] = hub[p + "post_attention_layernorm.weight"]
                for mine, theirs in (("mlp1", "gate_up_proj"), ("mlp2", "down_proj")):
                    t[b + f"mlp.{mine}_weight.blocks"] = hub[ex + theirs + "_blocks"]
                    t[b + f"mlp.{mine}_weight.scales"] = hub[ex + theirs + "_scales"]
                    t[b + f"mlp.{mine}_bias"] = hub[ex + theirs + "_bias"]
            self._orig = os.path.join(self.root, "original")
            os.makedirs(self._orig)
            with open(os.path.join(self._orig, "config.json"), "w") as f:
                json.dump(self.cfg.to_original_dict(), f)
            save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(self._orig, "model.safetensors"))
        return self._orig

    def openai(self):
        from gpt_oss.torch.model import Transformer

        return Transformer.from_checkpoint(self.original_dir(), device="cpu").float().eval()


def compile_forward(model, B: int, T: int, *, last_only=False):
    """Our jitted forward at [B, T] (weights passed as arguments, not baked in as constants).
    -> (run(tokens) -> logits, compile seconds, bytes XLA will allocate beyond the weights)."""
    graphdef, state = nnx.split(model)

    def f(state, tokens):
        m = nnx.merge(graphdef, state)
        if last_only:
            return m(tokens, logits_at=jnp.full((tokens.shape[0],), tokens.shape[1] - 1)).logits
        return m(tokens).logits

    t = time.perf_counter()
    compiled = jax.jit(f).lower(state, jax.ShapeDtypeStruct((B, T), jnp.int32)).compile()
    seconds = time.perf_counter() - t
    need = None
    try:
        ma = compiled.memory_analysis()
        need = int(ma.temp_size_in_bytes + ma.output_size_in_bytes)
    except Exception:  # noqa: BLE001  (not every backend reports it)
        pass
    return (lambda tokens: compiled(state, tokens).block_until_ready()), seconds, need


def training_steps(model, hf, tokens):
    """One full fine-tuning step each for our model and HF's (a torch module in train mode), on the
    same [B, T] int32 tokens: (ours_step, hf_step), each returning that step's loss as a float.
    Both train every weight with global-norm clipping at 1.0 and AdamW (lr 1e-4, no decay)."""
    torch = require_torch()
    opt_cfg = OptimConfig(
        learning_rate=1e-4, warmup_steps=0, total_steps=10_000, weight_decay=0.0, b2=0.999, clip_norm=1.0
    )
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


# ------------------------------------------------------------------------ what a run will cost
def eager_attention_bytes(cfg, T):
    """HF eager attention's working set at T: ~3 live [N, T, T] fp32 score tensors (scores,
    scores + sink column, softmax) and the [T, T] masks (1.5 GiB measured at T=4096)."""
    return 3 * cfg.num_heads * T * T * 4 + 2 * T * T * 4 + GiB / 2


def reference_bytes(cfg, T):
    """OpenAI's reference at T: its MoE gathers each token's k expert matrices ([T, k, 2F, D] and
    [T, k, D, F] fp32), plus ~4 [N, T, T] fp32 attention tensors."""
    gather = T * cfg.experts_per_token * 3 * cfg.expert_dim * cfg.d_model * 4
    return gather + 4 * cfg.num_heads * T * T * 4 + GiB / 2


def predict_peer(prev, T, cfg, peak):
    """Seconds a torch peer should take at T from its last measurement (T0, s0): linear in T,
    plus the growth of a full T x T attention on every layer (what both peers compute) at peak."""
    if prev is None:
        return None
    t0, s0 = prev
    attn = lambda t: cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim * t * t  # noqa: E731
    return s0 * T / t0 + max(attn(T) - attn(t0) * T / t0, 0) / peak


def predict(prev, T, power):
    """Seconds predicted at T from the last measured (T0, seconds), scaling as T^power."""
    if prev is None:
        return None
    t0, s0 = prev
    return s0 * (T / t0) ** power
