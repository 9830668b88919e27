"""The model's mixture-of-experts block: route, sort by expert, expert MLPs, weighted combine.

Routing is top-k of the router logits *then* a softmax over the k chosen logits (in fp32). Each
expert computes h = x W1 + b1 (gate/up interleaved), a = swiglu(h), y = a W2 + b2, and the token's
output is sum_k w_k y_k: the down-projection bias is scaled by the routing weight.

Expert weights come in two layouts, both pytrees that flow through the same functions:
- dense:  w1 [E, D, 2F], w2 [E, F, D]  (the HF-dequantized layout, [in, out] per expert)
- MXFP4:  `MXFP4` with logical shapes [E, 2F, D] and [E, D, F]  (the checkpoint's [out, in]); it
  is decoded inside the jitted function, where the transpose fuses into the decode.

Two of the five paths live here (the others, CPU execution strategies, are `moe.cpu`):
- `moe_dense_reference`: every expert on every token, then a gather. Obvious; for tests.
- `moe_ragged`: tokens sorted by expert and one grouped matmul over the contiguous groups
  (`jax.lax.ragged_dot`, or for packed experts the MXFP4 grouped matmul kernel): GPU/TPU.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gptoss_jax.adapters import Adapter
from gptoss_jax.kernels.groups import row_experts
from gptoss_jax.kernels.mxfp4_matmul import mxfp4_grouped_matmul
from gptoss_jax.layers import swiglu
from gptoss_jax.mxfp4 import MXFP4


class ExpertWeights(NamedTuple):
    w1: jax.Array | MXFP4  # dense [E, D, 2F] or MXFP4 logical [E, 2F, D]
    b1: jax.Array  # [E, 2F]
    w2: jax.Array | MXFP4  # dense [E, F, D] or MXFP4 logical [E, D, F]
    b2: jax.Array  # [E, D]
    lora1: Adapter | None = None  # LoRA on w1 / w2 (gptoss_jax.lora); grouped like the base
    lora2: Adapter | None = None


class Routing(NamedTuple):
    logits: jax.Array  # [T, E] fp32
    ids: jax.Array  # [T, k] int32, best first
    weights: jax.Array  # [T, k] fp32, sum to 1


def route(x, w, b, k: int) -> Routing:
    """x [T, D], router w [D, E], b [E]."""
    logits = jnp.einsum("TD,DE->TE", x, w, preferred_element_type=jnp.float32) + b.astype(jnp.float32)
    top, ids = jax.lax.top_k(logits, k)
    return Routing(logits, ids.astype(jnp.int32), jax.nn.softmax(top, axis=-1))


def load_balancing_loss(routing: Routing, mask=None):
    """The Switch-Transformer auxiliary loss E * sum_e f_e * P_e over the tokens where `mask`
    [T] is set: f_e = assignments to expert e per token (the k slots counted, so it sums to k),
    P_e = mean softmax probability of e over all E logits. It is k when the load is uniform.
    (HF computes the same quantity, but pools the tokens of all layers before the products.)"""
    T, E = routing.logits.shape
    w = jnp.ones((T,), jnp.float32) if mask is None else mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    counts = jnp.zeros((E,), jnp.float32).at[routing.ids].add(jnp.broadcast_to(w[:, None], routing.ids.shape))
    probs = jax.nn.softmax(routing.logits, axis=-1)
    return E * jnp.sum((counts / n) * (w @ probs / n))


def in_out(w, dtype) -> jax.Array:
    """An expert weight as a dense [E, in, out] array in `dtype`."""
    if isinstance(w, MXFP4):
        return jnp.swapaxes(w.dequantize(dtype), -1, -2)
    return w.astype(dtype)


def lora_delta(x, adapter: Adapter | None, matmul):
    """(x a) b through the dispatch's own matmul (fp32), or 0 without an adapter."""
    if adapter is None:
        return 0.0
    return matmul(matmul(x, adapter.a).astype(x.dtype), adapter.b)


def expert_mlp(x, w1, b1, w2, b2, *, alpha, limit, matmul, lora1=None, lora2=None, delta=None):
    """The per-expert MLP given a matmul for the chosen dispatch; fp32 accumulation, fp32 SwiGLU.
    LoRA adapters (already in the dispatch's layout) go through the same matmul, unless
    `delta(x, adapter)` computes their update another way."""
    delta = delta or (lambda x, adapter: lora_delta(x, adapter, matmul))
    h = matmul(x, w1) + b1.astype(jnp.float32) + delta(x, lora1)
    a = swiglu(h, alpha=alpha, limit=limit).astype(x.dtype)
    return matmul(a, w2) + b2.astype(jnp.float32) + delta(a, lora2)


def moe_dense_reference(x, ew: ExpertWeights, routing: Routing, *, alpha, limit):
    """Every expert on every token, then gather the chosen k. x [T, D] -> [T, D]."""
    dt = x.dtype
    w1, w2 = in_out(ew.w1, dt), in_out(ew.w2, dt)
    mm = lambda a, w: jnp.einsum("ETI,EIO->ETO", a, w, preferred_element_type=jnp.float32)
    xe = jnp.broadcast_to(x[None], (w1.shape[0],) + x.shape)
    y = expert_mlp(
        xe, w1, ew.b1[:, None], w2, ew.b2[:, None], alpha=alpha, limit=limit, matmul=mm, lora1=ew.lora1, lora2=ew.lora2
    )
    y = jnp.take_along_axis(y.transpose(1, 0, 2), routing.ids[..., None], axis=1)  # [T, k, D]
    return jnp.einsum("TkD,Tk->TD", y, routing.weights).astype(dt)


class Sorted(NamedTuple):
    order: jax.Array  # [T*k] indices into the flattened (token, slot) list, grouped by expert
    experts: jax.Array  # [T*k] expert of each sorted row
    tokens: jax.Array  # [T*k] token of each sorted row
    group_sizes: jax.Array  # [E] int32


def sort_by_expert(ids, num_experts: int) -> Sorted:
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    k = ids.shape[1]
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return Sorted(order, flat[order], order // k, sizes)


def combine(y_sorted, srt: Sorted, routing: Routing, dtype):
    """Undo the sort and take the routing-weighted sum over each token's k experts (in fp32)."""
    T, k = routing.ids.shape
    y = jnp.zeros_like(y_sorted).at[srt.order].set(y_sorted).reshape(T, k, -1)
    return jnp.einsum("TkD,Tk->TD", y, routing.weights).astype(dtype)


def bucket_ranks(srt: Sorted):
    """Each sorted row's slot within its expert's bucket (rows keep token order within an expert)."""
    starts = jnp.cumsum(srt.group_sizes) - srt.group_sizes
    return jnp.arange(srt.order.shape[0], dtype=jnp.int32) - starts[srt.experts]


def grouped_lora_delta(x, adapter: Adapter | None, experts):
    """(x a_e) b_e for each row's expert e (`experts` [M]; E or more = none -> 0), fp32 [M, out].

    x @ [a_0 .. a_E-1] gives every expert's r low-rank columns, each row keeps its own expert's
    (the rest set to exactly 0), and the [M, E r] result multiplies the stacked b: E times the
    adapter's small matmuls, and never an [M, E, out] buffer, which is what `ragged_dot` expands to
    where the compiler has no grouped matmul (XLA:GPU: 24 GB per layer for gpt-oss-20b LoRA at
    32k rows, so the train step did not fit an H100)."""
    if adapter is None:
        return 0.0
    low, b = grouped_lora_factors(x, adapter, experts)
    return jnp.einsum("MR,RO->MO", low, b, preferred_element_type=jnp.float32)


def grouped_lora_factors(x, adapter: Adapter, experts):
    """(low [M, E r] in x's dtype, b [E r, out]) with low @ b = `grouped_lora_delta`: each row's
    x a_e in its own expert's r columns, zeros elsewhere."""
    E, D, r = adapter.a.shape
    M = x.shape[0]
    low = jnp.einsum(
        "MD,DR->MR", x, jnp.swapaxes(adapter.a, 0, 1).reshape(D, E * r), preferred_element_type=jnp.float32
    ).reshape(M, E, r)
    own = (experts[:, None] == jnp.arange(E))[..., None]
    low = jnp.where(own, low, 0.0).astype(x.dtype).reshape(M, E * r)
    return low, adapter.b.reshape(E * r, -1)


def grouped_mlp(xs, group_sizes, ew: ExpertWeights, *, alpha, limit, mxfp4_impl=None, interpret=False):
    """The expert MLPs of rows `xs` [R, D] sorted into contiguous expert groups (`group_sizes`
    [E], sum <= R; rows past the sum are padding) -> fp32 [R, D]. `ragged_dot` for dense weights;
    for packed ones the MXFP4 grouped matmul (`kernels.mxfp4_grouped_matmul`), which never decodes
    more than one expert tile at a time and fuses the SwiGLU into the first matmul."""
    dt = xs.dtype
    ragged = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes, preferred_element_type=jnp.float32)
    rows_expert = row_experts(group_sizes, xs.shape[0])  # E for rows past the groups
    if isinstance(ew.w1, MXFP4) and isinstance(ew.w2, MXFP4):
        mm = functools.partial(
            mxfp4_grouped_matmul, group_sizes=group_sizes, implementation=mxfp4_impl or "xla", interpret=interpret
        )
        # the adapter's update enters before the SwiGLU (`low_rank`)
        low_rank = None if ew.lora1 is None else grouped_lora_factors(xs, ew.lora1, rows_expert)
        a = mm(xs, ew.w1.blocks, ew.w1.scales, bias=ew.b1, swiglu=(alpha, limit), low_rank=low_rank)
        y = mm(a, ew.w2.blocks, ew.w2.scales, bias=ew.b2).astype(jnp.float32)
        return y + grouped_lora_delta(a, ew.lora2, rows_expert)
    experts = jnp.minimum(rows_expert, group_sizes.shape[0] - 1)
    return expert_mlp(
        xs,
        in_out(ew.w1, dt),
        ew.b1[experts],
        in_out(ew.w2, dt),
        ew.b2[experts],
        alpha=alpha,
        limit=limit,
        matmul=ragged,
        lora1=ew.lora1,
        lora2=ew.lora2,
        delta=lambda x, adapter: grouped_lora_delta(x, adapter, rows_expert),
    )


def moe_ragged(x, ew: ExpertWeights, routing: Routing, *, alpha, limit, mxfp4_impl=None, interpret=False):
    """Sort by expert and run a grouped matmul over the contiguous groups (`grouped_mlp`)."""
    srt = sort_by_expert(routing.ids, ew.b1.shape[0])
    y = grouped_mlp(
        x[srt.tokens], srt.group_sizes, ew, alpha=alpha, limit=limit, mxfp4_impl=mxfp4_impl, interpret=interpret
    )
    return combine(y, srt, routing, x.dtype)
