"""Tiny random checkpoints written with torch + safetensors.torch (not with this package's writer),
in OpenAI's `original/` layout and the HF hub layout, so the loaders and the oracles read files
that our own code did not produce.

Weight scales are chosen so that a random 4-layer model has O(1) activations, varied routing and
non-trivial sinks: a parity test on a model whose layers do nothing would prove little.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import torch
from safetensors.torch import save_file

from gptoss_jax.config import ModelConfig
from gptoss_jax.tasks import arithmetic
from gptoss_jax.tokenizer import train_bpe


def original_tensors(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    bf16 = torch.bfloat16

    def normal(shape, std, mean=0.0):
        return (mean + std * torch.randn(*shape, generator=g)).to(bf16)

    def packed(e, rows, cols):
        blocks = torch.randint(0, 256, (e, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
        scales = torch.randint(120, 124, (e, rows, cols // 32), generator=g, dtype=torch.uint8)
        return blocks, scales

    D, E, F, V = cfg.d_model, cfg.num_experts, cfg.expert_dim, cfg.vocab_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    t = {
        "embedding.weight": normal((V, D), 1.0),
        "norm.scale": normal((D,), 0.1, 1.0),
        "unembedding.weight": normal((V, D), 0.2),
    }
    for n in range(cfg.num_layers):
        b = f"block.{n}."
        t[b + "attn.norm.scale"] = normal((D,), 0.1, 1.0)
        t[b + "attn.qkv.weight"] = normal((qkv, D), 0.15)
        t[b + "attn.qkv.bias"] = normal((qkv,), 0.1)
        t[b + "attn.sinks"] = normal((cfg.num_heads,), 1.0)
        t[b + "attn.out.weight"] = normal((D, cfg.q_dim), 0.1)
        t[b + "attn.out.bias"] = normal((D,), 0.1)
        t[b + "mlp.norm.scale"] = normal((D,), 0.1, 1.0)
        t[b + "mlp.gate.weight"] = normal((E, D), 0.3)
        t[b + "mlp.gate.bias"] = normal((E,), 0.2)
        t[b + "mlp.mlp1_weight.blocks"], t[b + "mlp.mlp1_weight.scales"] = packed(E, 2 * F, D)
        t[b + "mlp.mlp1_bias"] = normal((E, 2 * F), 0.2)
        t[b + "mlp.mlp2_weight.blocks"], t[b + "mlp.mlp2_weight.scales"] = packed(E, D, F)
        t[b + "mlp.mlp2_bias"] = normal((E, D), 0.1)
    return t


def write_original(path: str, cfg: ModelConfig, seed: int = 0) -> str:
    """OpenAI's `original/` folder: config.json + model.safetensors."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_original_dict(), f)
    save_file(original_tensors(cfg, seed), os.path.join(path, "model.safetensors"))
    return path


def hf_config_dict(cfg: ModelConfig, *, mxfp4: bool) -> dict:
    d = cfg.to_hf_dict()
    if mxfp4:
        d["quantization_config"] = {
            "quant_method": "mxfp4",
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
        }
    return d


def original_to_hf(t: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The key map of transformers' convert_gpt_oss_weights_to_hf (qkv split, renames; expert
    bytes untouched)."""
    qe, ke = cfg.q_dim, cfg.q_dim + cfg.kv_dim
    out = {
        "model.embed_tokens.weight": t["embedding.weight"],
        "model.norm.weight": t["norm.scale"],
        "lm_head.weight": t["unembedding.weight"],
    }
    for n in range(cfg.num_layers):
        b, p = f"block.{n}.", f"model.layers.{n}."
        for suffix in ("weight", "bias"):
            fused = t[b + f"attn.qkv.{suffix}"]
            out[p + f"self_attn.q_proj.{suffix}"] = fused[:qe].clone()
            out[p + f"self_attn.k_proj.{suffix}"] = fused[qe:ke].clone()
            out[p + f"self_attn.v_proj.{suffix}"] = fused[ke:].clone()
            out[p + f"self_attn.o_proj.{suffix}"] = t[b + f"attn.out.{suffix}"]
            out[p + f"mlp.router.{suffix}"] = t[b + f"mlp.gate.{suffix}"]
        out[p + "self_attn.sinks"] = t[b + "attn.sinks"]
        out[p + "input_layernorm.weight"] = t[b + "attn.norm.scale"]
        out[p + "post_attention_layernorm.weight"] = t[b + "mlp.norm.scale"]
        ex = p + "mlp.experts."
        out[ex + "gate_up_proj_blocks"] = t[b + "mlp.mlp1_weight.blocks"]
        out[ex + "gate_up_proj_scales"] = t[b + "mlp.mlp1_weight.scales"]
        out[ex + "gate_up_proj_bias"] = t[b + "mlp.mlp1_bias"]
        out[ex + "down_proj_blocks"] = t[b + "mlp.mlp2_weight.blocks"]
        out[ex + "down_proj_scales"] = t[b + "mlp.mlp2_weight.scales"]
        out[ex + "down_proj_bias"] = t[b + "mlp.mlp2_bias"]
    return out


def write_hf(path: str, tensors: dict[str, torch.Tensor], config: dict, *, shards: int = 2) -> str:
    """HF hub layout: config.json, `shards` safetensors files and the index."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(keys)), shards)):
        name = f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({keys[j]: tensors[keys[j]].contiguous() for j in part}, os.path.join(path, name))
        weight_map.update({keys[j]: name for j in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def dense_hf_tensors(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """The bf16 dequantized HF variant (gate_up_proj [E, D, 2F], down_proj [E, F, D]): the same
    random model with its experts decoded by the reference decoder of gpt_oss.torch.weights."""
    from gpt_oss.torch.weights import FP4_VALUES

    def decode(blocks, scales):  # the reference's own decode, written out for a torch tensor
        lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
        vals = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)
        vals = vals.reshape(*blocks.shape[:-1], 32)
        vals = torch.ldexp(vals, (scales.to(torch.int32) - 127)[..., None])
        return vals.reshape(*blocks.shape[:-2], -1).to(torch.bfloat16)

    t = original_to_hf(original_tensors(cfg, seed), cfg)
    for n in range(cfg.num_layers):
        ex = f"model.layers.{n}.mlp.experts."
        for name in ("gate_up_proj", "down_proj"):
            w = decode(t.pop(ex + name + "_blocks"), t.pop(ex + name + "_scales"))
            t[ex + name] = w.transpose(1, 2).contiguous()  # [E, out, in] -> HF's [E, in, out]
    return t


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def rms_rel_err(a, b) -> float:
    """||a - b||_2 / ||b||_2 over every element, in float64: the bf16 statistic (a max-based error
    there is set by the one position whose routing a rounding flipped)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.sum((a - b) ** 2) / np.sum(b * b)))


def top2_lead(logits) -> np.ndarray:
    """Per position, how far the top logit leads the second: [..., V] -> [...]."""
    top2 = np.sort(np.asarray(logits, np.float64), axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def grouped_mxfp4_case(E, N, K, M, sizes, seed=0, dtype=jnp.float32):
    """Random inputs of the packed grouped matmul: x [M, K], E experts' packed [N, K] weights
    (blocks [E, N, K/32, 16] uint8, e8m0 scales [E, N, K/32] near 2^0), group sizes, biases [E, N]."""
    rng = np.random.default_rng(seed)
    blocks = jnp.asarray(rng.integers(0, 256, (E, N, K // 32, 16), dtype=np.uint8))
    scales = jnp.asarray(rng.integers(118, 126, (E, N, K // 32), dtype=np.uint8))
    x = jnp.asarray(rng.normal(size=(M, K)), dtype)
    bias = jnp.asarray(rng.normal(size=(E, N)), jnp.float32)
    return x, blocks, scales, jnp.asarray(sizes, jnp.int32), bias


# ------------------------------------------------------------------ bf16 against the oracles
# Shared by tests/test_parity_bf16.py (which states the bound) and scripts/parity_report.py.
BF16_LIMIT_FACTOR = 1.5


def bf16_oracle_runs(original_dir: str, hf_dir: str, tokens) -> dict:
    """OpenAI's gpt_oss.torch (original/ layout) and HF's GptOssForCausalLM (eager, MXFP4 experts
    dequantized on load), each in bf16 and in fp32, on tokens [R, T]: name -> fp32 logits [R, T, V]."""
    from gpt_oss.torch.model import Transformer
    from transformers import GptOssForCausalLM, Mxfp4Config

    out = {}
    with torch.no_grad():
        openai = Transformer.from_checkpoint(original_dir, device="cpu")
        assert next(openai.parameters()).dtype == torch.bfloat16  # the reference's own dtype
        out["OpenAI bf16"] = np.stack([openai(torch.tensor(r)).float().numpy() for r in tokens])
        openai = openai.float()
        out["OpenAI fp32"] = np.stack([openai(torch.tensor(r)).numpy() for r in tokens])
        for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            hf = GptOssForCausalLM.from_pretrained(
                hf_dir, dtype=dtype, attn_implementation="eager", quantization_config=Mxfp4Config(dequantize=True)
            )
            out[f"HF {label}"] = hf(torch.tensor(np.asarray(tokens))).logits.float().numpy()
    return out


def bf16_noise(oracles: dict) -> dict:
    """What bf16 costs the references themselves: each pair's rms_rel_err, the limit
    (BF16_LIMIT_FACTOR x the largest), sigma (RMS of bf16 - fp32 logits, the larger oracle) and the
    oracles' lowest argmax agreement among those pairs."""
    pairs = {
        "OpenAI bf16 vs fp32": ("OpenAI bf16", "OpenAI fp32"),
        "HF bf16 vs fp32": ("HF bf16", "HF fp32"),
        "OpenAI bf16 vs HF bf16": ("OpenAI bf16", "HF bf16"),
    }
    errs = {k: rms_rel_err(oracles[a], oracles[b]) for k, (a, b) in pairs.items()}
    sigma = max(float(np.sqrt(np.mean((oracles[f"{n} bf16"] - oracles[f"{n} fp32"]) ** 2))) for n in ("OpenAI", "HF"))
    agree = {k: float(np.mean(oracles[a].argmax(-1) == oracles[b].argmax(-1))) for k, (a, b) in pairs.items()}
    return {
        "pairs": errs,
        "limit": BF16_LIMIT_FACTOR * max(errs.values()),
        "sigma": sigma,
        "oracle_argmax": min(agree.values()),
        "oracle_argmax_pairs": agree,
    }


def bf16_figures(ours, oracles: dict, noise: dict) -> dict:
    """Ours against each oracle run: name -> (rms_rel_err, argmax agreement at the positions whose
    fp32 lead exceeds sigma, argmax agreement at all positions)."""
    decisive = top2_lead(oracles["OpenAI fp32"]) > noise["sigma"]
    out = {}
    for name, want in oracles.items():
        same = ours.argmax(-1) == want.argmax(-1)
        out[name] = (rms_rel_err(ours, want), float(same[decisive].mean()), float(same.mean()))
    return out


def arithmetic_task(d, *, train_size: int = 24, eval_size: int = 4):
    """A small task folder for run-level tests: `d`/tokenizer.json (a 300-id BPE trained on the
    addition task's text and the harmony role and channel names) and `d`/train.jsonl, eval.jsonl
    (`tasks.arithmetic.write_splits`). Returns the tokenizer."""
    tok = train_bpe(list(arithmetic.corpus(300)) + ["system", "user", "assistant", "analysis", "final"], 300)
    d = str(d)
    tok.hf.save(os.path.join(d, "tokenizer.json"))
    train, held = os.path.join(d, "train.jsonl"), os.path.join(d, "eval.jsonl")
    arithmetic.write_splits(train, held, train_size=train_size, eval_size=eval_size)
    return tok
