"""FLOP and byte models of a forward, a decode step and an attention layer (computed, not timed).

Sizes: D d_model, N query heads, K KV heads, H head_dim, E experts, k active experts, F expert
width, V vocabulary, W sliding window, T tokens. FLOPs count 2 per multiply-add:
  projections  2D(N+2K)H + 2NHD per token (q, k, v, out)
  router       2DE per token
  experts      k(2D*2F + 2FD) per token (the k active ones)
  attention    4NH * mean keys a query may see: (T+1)/2 causal, mean min(t, W) sliding
  unembedding  2DV per token for full logits (2DV/T for the last token only)
Norms, RoPE, softmax, SwiGLU and optimizers are not counted; training = 3x the forward.
Bytes of a decode step: every non-expert weight, min(E, batch*k) experts per layer in their
stored format, and the K/V cache the step attends to.
"""

from __future__ import annotations

import statistics

import numpy as np
from flax import nnx

from gptoss_jax.cache import cache_bytes
from gptoss_jax.kernels.attention import attention_block_map


def mean_keys(T: int, window: int | None) -> float:
    """Mean number of keys a query of a length-T causal sequence may see (itself included)."""
    if window is None:
        return (T + 1) / 2
    w = min(window, T)
    return (w * (w + 1) / 2 + (T - w) * w) / T


def projection_flops(cfg) -> float:
    """Per token per layer: the q, k, v and output projections."""
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return 2 * D * (N + 2 * K) * H + 2 * N * H * D


def expert_flops(cfg) -> float:
    """Per token per layer: the k active experts' two matmuls (gate/up 2F wide, then down)."""
    D, F = cfg.d_model, cfg.expert_dim
    return cfg.experts_per_token * (2 * D * 2 * F + 2 * F * D)


def moe_flops(cfg) -> float:
    """Per token per layer: the router and the k active experts."""
    return 2 * cfg.d_model * cfg.num_experts + expert_flops(cfg)


def attention_core_flops(cfg, T: int, window: int | None) -> float:
    """Per token of one layer: QK^T and PV over the keys a query may see."""
    return 4 * cfg.num_heads * cfg.head_dim * mean_keys(T, window)


def unembed_flops(cfg) -> float:
    return 2 * cfg.d_model * cfg.vocab_size


def forward_flops_per_token(cfg, T: int, *, all_logits: bool = True) -> float:
    """Useful FLOPs per token of a length-T forward (batch-independent)."""
    attn = sum(
        attention_core_flops(cfg, T, cfg.sliding_window if cfg.is_sliding(i) else None) for i in range(cfg.num_layers)
    )
    unembed = unembed_flops(cfg) * (1 if all_logits else 1 / T)
    return cfg.num_layers * (projection_flops(cfg) + moe_flops(cfg)) + attn + unembed


def decode_bytes_per_step(
    cfg, *, batch: int, prompt: int, new: int, weight_bytes: int, experts: str, cache_bytes: int
) -> float:
    """Bytes one decode step of `batch` rows must read, averaged over steps 1 .. new-1 after a
    `prompt`-token prefill: weights at `weight_bytes` each (norms and sinks fp32), MXFP4 experts
    at 1/2 + 1/32 byte per weight, min(E, batch*k) experts per layer, the cache's K/V rows."""
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    E, k, F, V = cfg.num_experts, cfg.experts_per_token, cfg.expert_dim, cfg.vocab_size
    w = weight_bytes
    attn = (D * (N + 2 * K) * H + N * H * D + (N + 2 * K) * H + D) * w + (N + D) * 4  # + sinks, norm
    router = (D * E + E) * w + D * 4
    if experts == "dense":
        per_expert = (D * 2 * F + F * D + 2 * F + D) * w
    else:  # MXFP4: half a byte per weight + one scale byte per 32 weights; biases dense
        n = D * 2 * F + F * D
        per_expert = n / 2 + n / 32 + (2 * F + D) * w
    n_experts = min(E, batch * k)
    # decode steps j = 1 .. new-1 attend to prompt + j keys (capped at W on sliding layers)
    ctx = {
        win: statistics.fmean(min(prompt + j, win or 1 << 60) for j in range(1, new))
        for win in (None, cfg.sliding_window)
    }
    kv = sum(
        2 * K * H * cache_bytes * batch * ctx[cfg.sliding_window if cfg.is_sliding(i) else None]
        for i in range(cfg.num_layers)
    )
    head = V * D * w + D * 4 + batch * D * w  # unembedding, final norm, embedding rows
    return cfg.num_layers * (attn + router + n_experts * per_expert) + kv + head


EXPERT_LEAVES = ("w1_blocks", "w1_scales", "w2_blocks", "w2_scales", "b1", "b2", "w1", "w2")


def decode_bytes_per_token(model, total_len: int) -> dict:
    """Bytes one batch-1 decode step reads, from the model's own arrays: one embedding row, every
    attention weight, router and norm, k/E of each expert tensor, the whole unembedding, and the
    KV cache as allocated for `total_len` tokens (a step attends over the whole buffer)."""
    cfg = model.cfg
    k, E = cfg.experts_per_token, cfg.num_experts
    per = {"embed_row": 0, "attention": 0, "router": 0, "experts_k": 0, "norms": 0, "unembed": 0}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        v = var.get_value()
        b = int(np.prod(v.shape)) * v.dtype.itemsize
        name = str(path[-1])
        if path == ("embed",):
            per["embed_row"] += b // v.shape[0]
        elif path == ("unembed",):
            per["unembed"] += b
        elif name in EXPERT_LEAVES:
            per["experts_k"] += b * k // E
        elif name in ("router", "router_bias"):
            per["router"] += b
        elif name == "norm":
            per["norms"] += b
        else:  # q, k, v, o (+ biases), sinks
            per["attention"] += b
    kv = cache_bytes(cfg, 1, total_len, model.dtype)
    weights = sum(per.values())
    return {
        "parts": per,
        "weights": weights,
        "kv_cache": kv,
        "total": weights + kv,
        "expert_bytes_per_layer_k_experts": per["experts_k"] // cfg.num_layers,
    }


def flash_attention_cost(cfg, T: int, window: int | None, block: int, skipping: bool = True):
    """One layer's flash-attention forward at batch 1, bf16, `block` x `block` tiles, from the
    kernels' own block map: per visited tile 4*bq*bk*H FLOPs per query head; Q and O read/written
    once per query block, K and V once per visited tile (shared by a KV head's query heads).
    -> (visited tiles, FLOPs, bytes)."""
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    bm = attention_block_map(T, block_q=block, block_k=block, sliding_window=window)
    nq = len(bm.num_visits)
    visits = bm.total_visits if skipping else nq * nq
    flops = visits * 4 * block * block * H * N
    qo_bytes = 2 * nq * block * N * H * 2
    kv_bytes = visits * 2 * block * K * H * 2
    return visits, flops, qo_bytes + kv_bytes


def exact_attention_flops(cfg, T: int, window: int | None) -> float:
    """FLOPs of the visible (query, key) pairs only, for a whole length-T sequence."""
    return T * attention_core_flops(cfg, T, window)
