"""The mixture-of-experts block: router, dispatch by expert, expert SwiGLU MLPs, weighted combine.

Routing is top-k of the router logits *then* a softmax over the k chosen logits (in fp32). Each
expert computes h = x W1 + b1 (gate/up interleaved), a = swiglu(h), y = a W2 + b2, and the token's
output is sum_k w_k y_k: the down-projection bias is scaled by the routing weight.

Expert weights come in two layouts, both pytrees that flow through the same functions:
- dense:  w1 [E, D, 2F], w2 [E, F, D]  (the HF-dequantized layout, [in, out] per expert)
- MXFP4:  `MXFP4` with logical shapes [E, 2F, D] and [E, D, F]  (the checkpoint's [out, in]); it
  is decoded inside the jitted function, where the transpose fuses into the decode.

Five implementations compute the same function:
- `moe_dense_reference`: every expert on every token, then a gather. Obvious; for tests.
- `moe_ragged`: tokens sorted by expert, `jax.lax.ragged_dot` over the groups (GPU/TPU path).
- `moe_chunks`: tokens sorted by expert, each group padded to a multiple of a static chunk height,
  and a loop over the experts and their chunks with plain 2-D matmuls (its own backward loop).
  XLA:CPU runs ragged_dot very slowly; this is the CPU path (from 16 rows per expert): dropless,
  and its work follows the group sizes however skewed the routing.
- `moe_buckets`: tokens sorted by expert into per-expert buckets of one static capacity and one
  batched einsum; dropless: the capacity is the smallest of a few static sizes that holds the
  largest group (`lax.switch`), so a skewed routing costs up to E/k times the work. The
  expert-parallel CPU path's fixed-capacity buffers use its `bucket_mlp`.
- `moe_gather`: each (token, slot) gathers its expert's weights (decoding packed ones after the
  gather; on CPU inside the reduction, `mxfp4.gathered_matvec`). For decode steps.

Which path runs, and with which options, is the model's plan (`gptoss_jax.plan`): chosen once per
call from the devices and the shapes; nothing here asks which backend it runs on.

On a device mesh the layer runs expert-parallel (`gptoss_jax.expert_parallel`), built from the
pieces here: `route`, `sort_by_expert`, `grouped_mlp` and `bucket_mlp`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.adapters import Adapter
from gptoss_jax.kernels.groups import row_experts
from gptoss_jax.kernels.mxfp4_matmul import mxfp4_grouped_matmul
from gptoss_jax.layers import swiglu
from gptoss_jax.mxfp4 import MXFP4, gathered_matvec


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
    logits = (jnp.einsum("TD,DE->TE", x, w, preferred_element_type=jnp.float32)
              + b.astype(jnp.float32))
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


def _expert_mlp(x, w1, b1, w2, b2, *, alpha, limit, matmul, lora1=None, lora2=None, delta=None):
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
    y = _expert_mlp(xe, w1, ew.b1[:, None], w2, ew.b2[:, None], alpha=alpha, limit=limit, matmul=mm,
                    lora1=ew.lora1, lora2=ew.lora2)
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


def _combine(y_sorted, srt: Sorted, routing: Routing, dtype):
    """Undo the sort and take the routing-weighted sum over each token's k experts (in fp32)."""
    T, k = routing.ids.shape
    y = jnp.zeros_like(y_sorted).at[srt.order].set(y_sorted).reshape(T, k, -1)
    return jnp.einsum("TkD,Tk->TD", y, routing.weights).astype(dtype)


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
    low = jnp.einsum("MD,DR->MR", x, jnp.swapaxes(adapter.a, 0, 1).reshape(D, E * r),
                     preferred_element_type=jnp.float32).reshape(M, E, r)
    own = (experts[:, None] == jnp.arange(E))[..., None]
    low = jnp.where(own, low, 0.0).astype(x.dtype).reshape(M, E * r)
    return low, adapter.b.reshape(E * r, -1)


def grouped_mlp(xs, group_sizes, ew: ExpertWeights, *, alpha, limit, mxfp4_impl=None,
                interpret=False):
    """The expert MLPs of rows `xs` [R, D] sorted into contiguous expert groups (`group_sizes`
    [E], sum <= R; rows past the sum are padding) -> fp32 [R, D]. `ragged_dot` for dense weights;
    for packed ones the MXFP4 grouped matmul (`kernels.mxfp4_grouped_matmul`), which never decodes
    more than one expert tile at a time and fuses the SwiGLU into the first matmul."""
    dt = xs.dtype
    ragged = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes, preferred_element_type=jnp.float32)
    rows_expert = row_experts(group_sizes, xs.shape[0])  # E for rows past the groups
    if isinstance(ew.w1, MXFP4) and isinstance(ew.w2, MXFP4):
        mm = functools.partial(mxfp4_grouped_matmul, group_sizes=group_sizes,
                               implementation=mxfp4_impl or "xla", interpret=interpret)
        # the adapter's update enters before the SwiGLU (`low_rank`)
        low_rank = None if ew.lora1 is None else grouped_lora_factors(xs, ew.lora1, rows_expert)
        a = mm(xs, ew.w1.blocks, ew.w1.scales, bias=ew.b1, swiglu=(alpha, limit), low_rank=low_rank)
        y = mm(a, ew.w2.blocks, ew.w2.scales, bias=ew.b2).astype(jnp.float32)
        return y + grouped_lora_delta(a, ew.lora2, rows_expert)
    experts = jnp.minimum(rows_expert, group_sizes.shape[0] - 1)
    return _expert_mlp(xs, in_out(ew.w1, dt), ew.b1[experts], in_out(ew.w2, dt), ew.b2[experts],
                       alpha=alpha, limit=limit, matmul=ragged, lora1=ew.lora1, lora2=ew.lora2,
                       delta=lambda x, adapter: grouped_lora_delta(x, adapter, rows_expert))


def moe_ragged(x, ew: ExpertWeights, routing: Routing, *, alpha, limit, mxfp4_impl=None, interpret=False):
    """Sort by expert and run a grouped matmul over the contiguous groups (`grouped_mlp`)."""
    srt = sort_by_expert(routing.ids, ew.b1.shape[0])
    y = grouped_mlp(x[srt.tokens], srt.group_sizes, ew, alpha=alpha, limit=limit,
                    mxfp4_impl=mxfp4_impl, interpret=interpret)
    return _combine(y, srt, routing, x.dtype)


def bucket_capacities(num_tokens: int, k: int, num_experts: int) -> tuple[int, ...]:
    """Static per-expert capacities tried in order; the last one (all tokens) always suffices,
    since a token picks an expert at most once."""
    mean = num_tokens * k / num_experts
    caps = {min(num_tokens, max(8, 8 * math.ceil(f * mean / 8))) for f in (1.25, 2.0, 4.0)}
    return tuple(sorted(caps | {num_tokens}))


def bucket_mlp(buf, ew: ExpertWeights, *, alpha, limit, one_at_a_time: bool = False):
    """The expert MLPs on per-expert buckets `buf` [E, C, D] (one batched einsum) -> fp32 [E, C, D].
    `one_at_a_time` (packed experts too large to decode at once: `plan.DECODE_AT_ONCE_BYTES`):
    a `lax.map` over the experts, one expert decoded in memory instead of all E."""
    if one_at_a_time and isinstance(ew.w1, MXFP4):
        E = ew.b1.shape[0]
        return jax.lax.map(lambda a: _one_expert(a[1], a[0], ew, alpha=alpha, limit=limit),
                           (buf, jnp.arange(E)))
    dt = buf.dtype
    mm = lambda a, w: jnp.einsum("ECI,EIO->ECO", a, w, preferred_element_type=jnp.float32)
    return _expert_mlp(buf, in_out(ew.w1, dt), ew.b1[:, None], in_out(ew.w2, dt), ew.b2[:, None],
                       alpha=alpha, limit=limit, matmul=mm, lora1=ew.lora1, lora2=ew.lora2)


def _one_expert(e, x, ew: ExpertWeights, *, alpha, limit):
    """Expert `e` (a traced index) on x [C, D] -> fp32 [C, D], decoding only its weights. Plain
    2-D matmuls: XLA:CPU runs a batched matmul with a batch of one several times slower."""
    take = lambda ad: None if ad is None else Adapter(ad.a[e], ad.b[e])
    w1, w2 = _take_experts(ew.w1, e), _take_experts(ew.w2, e)

    def mm(a, w):
        if isinstance(w, MXFP4):  # decoded straight to fp32 in its [out, in] layout: no transpose
            return jnp.einsum("CI,OI->CO", a.astype(jnp.float32), w.dequantize(jnp.float32))
        return jnp.einsum("CI,IO->CO", a, w, preferred_element_type=jnp.float32)

    return _expert_mlp(x, w1, ew.b1[e], w2, ew.b2[e], alpha=alpha, limit=limit, matmul=mm,
                       lora1=take(ew.lora1), lora2=take(ew.lora2))


def bucket_ranks(srt: Sorted):
    """Each sorted row's slot within its expert's bucket (rows keep token order within an expert)."""
    starts = jnp.cumsum(srt.group_sizes) - srt.group_sizes
    return jnp.arange(srt.order.shape[0], dtype=jnp.int32) - starts[srt.experts]


def moe_buckets(x, ew: ExpertWeights, routing: Routing, *, alpha, limit, one_at_a_time: bool = False):
    """Per-expert buckets [E, C, D] and one batched einsum; C is the smallest static capacity that
    holds the largest group, so no token is ever dropped (`one_at_a_time`: see `bucket_mlp`)."""
    return _buckets(x, ew, routing.ids, routing.weights, float(alpha), float(limit), bool(one_at_a_time))


def _buckets_at(cap: int, x, ew: ExpertWeights, ids, weights, alpha, limit, one_at_a_time):
    """The bucketed MoE at one static capacity `cap` (which must hold the largest group)."""
    T, k = ids.shape
    E = ew.b1.shape[0]
    srt = sort_by_expert(ids, E)
    slot = srt.experts * cap + bucket_ranks(srt)
    buf = jnp.zeros((E * cap, x.shape[1]), x.dtype).at[slot].set(x[srt.tokens])
    y = bucket_mlp(buf.reshape(E, cap, -1), ew, alpha=alpha, limit=limit,
                   one_at_a_time=one_at_a_time).reshape(E * cap, -1)[slot]
    return _combine(y, srt, Routing(None, ids, weights), x.dtype)


def _capacity_choice(ids, num_experts: int):
    T, k = ids.shape
    caps = bucket_capacities(T, k, num_experts)
    largest = jnp.max(jnp.bincount(ids.reshape(-1), length=num_experts))
    return caps, jnp.searchsorted(jnp.asarray(caps), largest)


# The capacity is picked at run time with `lax.switch`. Differentiating through the switch makes
# every branch carry the residuals of all the others (zeros), which on XLA:CPU cost more than the
# experts themselves (3x the whole layer's backward at 4 capacities); so the backward pass is its
# own switch over per-capacity VJPs, recomputing the chosen branch's forward.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _buckets(x, ew, ids, weights, alpha, limit, one_at_a_time):
    caps, choice = _capacity_choice(ids, ew.b1.shape[0])
    branches = [functools.partial(_buckets_at, c, alpha=alpha, limit=limit, one_at_a_time=one_at_a_time)
                for c in caps]
    return jax.lax.switch(choice, branches, x, ew, ids, weights)


def _buckets_fwd(x, ew, ids, weights, alpha, limit, one_at_a_time):
    return _buckets(x, ew, ids, weights, alpha, limit, one_at_a_time), (x, ew, ids, weights)


def _float_leaves(ew):
    """(the float leaves of `ew`, which leaves are float, rebuild(float leaves) -> ew): gradients
    flow to dense weights, biases and adapters, never to packed blocks or scales."""
    leaves, treedef = jax.tree.flatten(ew)
    floating = [jnp.issubdtype(a.dtype, jnp.floating) for a in leaves]

    def rebuild(float_leaves):
        it = iter(float_leaves)
        return jax.tree.unflatten(treedef, [next(it) if f else a for a, f in zip(leaves, floating)])
    return [a for a, f in zip(leaves, floating) if f], floating, rebuild


def _ew_cotangent(ew, float_grads):
    """The cotangent of `ew` in a custom VJP: `float_grads` for its float leaves, float0 zeros for
    the integer (packed) ones."""
    _, floating, _ = _float_leaves(ew)
    it = iter(float_grads)
    return jax.tree.unflatten(jax.tree.structure(ew), [
        next(it) if f else np.zeros(a.shape, jax.dtypes.float0)
        for a, f in zip(jax.tree.leaves(ew), floating)])


def _buckets_bwd(alpha, limit, one_at_a_time, res, dy):
    x, ew, ids, weights = res
    float_leaves, _, with_floats = _float_leaves(ew)

    def branch(cap):
        def vjp(x, float_leaves, weights, dy):
            f = lambda x, fl, w: _buckets_at(cap, x, with_floats(fl), ids, w, alpha, limit, one_at_a_time)
            return jax.vjp(f, x, float_leaves, weights)[1](dy)
        return vjp

    caps, choice = _capacity_choice(ids, ew.b1.shape[0])
    dx, d_floats, dw = jax.lax.switch(choice, [branch(c) for c in caps], x, float_leaves, weights, dy)
    return dx, _ew_cotangent(ew, d_floats), np.zeros(ids.shape, jax.dtypes.float0), dw


_buckets.defvjp(_buckets_fwd, _buckets_bwd)


def chunk_rows(num_rows: int, num_experts: int) -> int:
    """The chunked MoE's static chunk height: about half the mean group, a multiple of 8 between
    8 and 256 (XLA:CPU's 2-D matmuls reach ~80% of their large-size rate from 64 rows)."""
    return int(min(256, max(8, 8 * round(num_rows / num_experts / 16))))


def chunk_count(num_rows: int, num_experts: int, chunk: int) -> int:
    """Chunks enough for any routing: sum_e ceil(g_e / m) <= (R + E (m - 1)) / m."""
    return -(-(num_rows + num_experts * (chunk - 1)) // chunk)


def moe_chunks(x, ew: ExpertWeights, routing: Routing, *, alpha, limit, chunk: int | None = None):
    """Sort by expert, pad each group to a multiple of `chunk` rows, and loop over the experts and,
    within each, over its chunks only (a loop with a run-time trip count): plain 2-D matmuls, one
    expert's weights at a time (packed ones decoded once per expert), work that follows the
    groups (at most `chunk` - 1 padding rows per expert) whatever the routing, dropless. The
    bucket path instead pads every group to a capacity holding the largest one: 4x the work on
    the benchmark model, whose random router sends most tokens to one expert. The backward pass
    is its own loop (`jax.custom_vjp`), reusing the saved pre-activations."""
    T, k = routing.ids.shape
    E, R = ew.b1.shape[0], T * k
    m = chunk or chunk_rows(R, E)
    n = chunk_count(R, E, m)
    srt = sort_by_expert(routing.ids, E)
    chunks = (srt.group_sizes + m - 1) // m
    row = (jnp.cumsum(chunks) - chunks)[srt.experts] * m + bucket_ranks(srt)  # padded row of each
    buf = jnp.zeros((n * m, x.shape[1]), x.dtype).at[row].set(x[srt.tokens])
    if getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()):
        # inside shard_map: give the float weights the rows' mesh-varying type before the custom
        # VJP, so JAX's own transpose of that cast sums their gradients over the token shards
        typed = lambda a: (a + jnp.where(False, buf[0, 0], 0).astype(a.dtype)
                           if jnp.issubdtype(a.dtype, jnp.floating) else a)
        ew = jax.tree.map(typed, ew)
    y = _chunked(buf, ew, chunks, float(alpha), float(limit), m)
    return _combine(y[row], srt, routing, x.dtype)


def _chunk_fns(ew_e: ExpertWeights, dt, alpha, limit):
    """Expert e's two halves on a chunk of rows, as functions of its float leaves (so gradients
    flow to dense weights, biases and adapters, never to packed blocks): h = x W1 + b1 (+ LoRA)
    and y = swiglu(h) W2 + b2 (+ LoRA), fp32 accumulation. Packed matrices are decoded here, once."""
    fl, _, rebuild = _float_leaves(ew_e)
    decoded = {n: getattr(ew_e, n).dequantize(jnp.float32) for n in ("w1", "w2")
               if isinstance(getattr(ew_e, n), MXFP4)}  # [out, in]

    def mm(a, w, name=None):
        if name in decoded:
            return jnp.einsum("CI,OI->CO", a.astype(jnp.float32), decoded[name])
        return jnp.einsum("CI,IO->CO", a, w, preferred_element_type=jnp.float32)

    def first(rows, fl):
        p = rebuild(fl)
        return mm(rows, p.w1, "w1") + p.b1.astype(jnp.float32) + lora_delta(rows, p.lora1, mm)

    def second(h, fl):
        p = rebuild(fl)
        a = swiglu(h, alpha=alpha, limit=limit).astype(dt)
        return mm(a, p.w2, "w2") + p.b2.astype(jnp.float32) + lora_delta(a, p.lora2, mm)
    return fl, first, second


def _expert_at(ew: ExpertWeights, e) -> ExpertWeights:
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, e, keepdims=False), ew)


def _chunk_loop(chunks, m, ew, dt, alpha, limit, body, carry, acc=None, done=None):
    """For each expert e (with its `_chunk_fns`, built once per expert), run
    body(fns, first_row, carry, acc) -> (carry, acc) over its chunks, `acc` starting at
    acc(fns) (default none) and finished by done(e, carry, acc) -> carry."""
    starts = jnp.cumsum(chunks) - chunks

    def expert(e, carry):
        fns = _chunk_fns(_expert_at(ew, e), dt, alpha, limit)
        state = (carry, acc(fns) if acc else ())
        state = jax.lax.fori_loop(0, chunks[e], lambda c, st: body(fns, (starts[e] + c) * m, *st), state)
        return done(e, *state) if done else state[0]
    return jax.lax.fori_loop(0, chunks.shape[0], expert, carry)


def _zeros(shape, dtype, *refs):
    """Zeros typed like a result computed from `refs`: inside `shard_map` a loop's initial carry
    must vary over the same mesh axes as its outputs, and an element of each ref (selected away)
    carries that type without depending on any attribute of it."""
    z = jnp.zeros(shape, dtype)
    for r in jax.tree.leaves(refs):
        if r.size:
            z = z + jnp.where(False, r.reshape(-1)[0], 0).astype(dtype)
    return z


def _chunked_run(buf, ew, chunks, alpha, limit, m, keep_h):
    F2 = ew.b1.shape[1]

    def body(fns, r0, carry, acc):
        y, h_all = carry
        fl, first, second = fns
        h = first(jax.lax.dynamic_slice_in_dim(buf, r0, m), fl)
        y = jax.lax.dynamic_update_slice_in_dim(y, second(h, fl), r0, 0)
        if keep_h:
            h_all = jax.lax.dynamic_update_slice_in_dim(h_all, h, r0, 0)
        return (y, h_all), acc
    y0 = _zeros((buf.shape[0], buf.shape[1]), jnp.float32, buf, ew, chunks)
    h0 = _zeros((buf.shape[0], F2) if keep_h else (0, F2), jnp.float32, buf, ew, chunks)
    return _chunk_loop(chunks, m, ew, buf.dtype, alpha, limit, body, (y0, h0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked(buf, ew, chunks, alpha, limit, m):
    """The expert MLPs of the padded, expert-sorted rows `buf` [n m, D] -> fp32 [n m, D]; rows of
    unused chunks stay 0, padding rows of used chunks hold the bias-only output (never read)."""
    return _chunked_run(buf, ew, chunks, alpha, limit, m, keep_h=False)[0]


def _chunked_fwd(buf, ew, chunks, alpha, limit, m):
    y, h = _chunked_run(buf, ew, chunks, alpha, limit, m, keep_h=True)
    return y, (buf, ew, chunks, h)


def _chunked_bwd(alpha, limit, m, res, dy):
    buf, ew, chunks, h_all = res
    refs = (buf, ew, chunks, h_all, dy)

    def body(fns, r0, carry, g):
        (d_buf, grads), (fl, first, second) = carry, fns
        rows = jax.lax.dynamic_slice_in_dim(buf, r0, m)
        h = jax.lax.dynamic_slice_in_dim(h_all, r0, m)
        # the primal outputs of these VJPs are unused, so their matmuls are never computed
        dh, d_fl2 = jax.vjp(second, h, fl)[1](jax.lax.dynamic_slice_in_dim(dy, r0, m))
        d_rows, d_fl1 = jax.vjp(first, rows, fl)[1](dh)
        d_buf = jax.lax.dynamic_update_slice_in_dim(d_buf, d_rows.astype(d_buf.dtype), r0, 0)
        return (d_buf, grads), [acc + (g1 + g2).astype(jnp.float32) for acc, g1, g2 in zip(g, d_fl1, d_fl2)]

    def done(e, carry, g):  # an expert's gradients accumulate (fp32) in its own buffers, written once
        d_buf, grads = carry
        return d_buf, [jax.lax.dynamic_update_index_in_dim(G, a.astype(G.dtype), e, 0) for G, a in zip(grads, g)]

    fl_all = _float_leaves(ew)[0]
    carry = (_zeros(buf.shape, buf.dtype, *refs), [_zeros(a.shape, a.dtype, *refs) for a in fl_all])
    d_buf, grads = _chunk_loop(chunks, m, ew, buf.dtype, alpha, limit, body, carry,
                               acc=lambda fns: [_zeros(a.shape, jnp.float32, *refs) for a in fns[0]], done=done)
    return d_buf, _ew_cotangent(ew, grads), np.zeros(chunks.shape, jax.dtypes.float0)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _take_experts(w, ids):
    """The weights of the experts `ids` [n] as a dense [n, in, out] (packed ones decoded after the
    gather, so only n experts are ever decoded)."""
    if isinstance(w, MXFP4):
        return MXFP4(w.blocks[ids], w.scales[ids])
    return w[ids]


def moe_gather(x, ew: ExpertWeights, routing: Routing, *, alpha, limit, gathered_decode: bool = False):
    """Gather each (token, slot)'s expert weights and run them as a batch. For decoding, where
    T*k is far below E, this reads k experts per token instead of all E. `gathered_decode` (the
    CPU plan): packed experts are never decoded to memory, `mxfp4.gathered_matvec` decodes them
    inside the reduction."""
    dt = x.dtype
    T, k = routing.ids.shape
    ids = routing.ids.reshape(-1)
    rows = lambda a, w: jnp.einsum("RI,RIO->RO", a, w, preferred_element_type=jnp.float32)
    if isinstance(ew.w1, MXFP4) and gathered_decode:
        w1, w2 = ew.w1, ew.w2
        mm = lambda a, w: gathered_matvec(a, w, ids) if isinstance(w, MXFP4) else rows(a, w)
    else:
        w1, w2 = in_out(_take_experts(ew.w1, ids), dt), in_out(_take_experts(ew.w2, ids), dt)
        mm = rows
    xs = jnp.repeat(x, k, axis=0)  # row r = token r // k, slot r % k
    take = lambda ad: None if ad is None else Adapter(ad.a[ids], ad.b[ids])
    y = _expert_mlp(xs, w1, ew.b1[ids], w2, ew.b2[ids], alpha=alpha, limit=limit, matmul=mm,
                    lora1=take(ew.lora1), lora2=take(ew.lora2))
    return jnp.einsum("TkD,Tk->TD", y.reshape(T, k, -1), routing.weights).astype(dt)


def expert_outputs(x, ew: ExpertWeights, routing: Routing, *, alpha, limit):
    """What each chosen expert returned for each token, before the routing weights: [T, k, D] fp32.

    For inspection (`model(..., capture="experts")`): one expert is decoded at a time and run on
    every token, so memory stays at one expert's weights; compute is E/k times the MoE layer's.
    `einsum("TkD,Tk->TD", out, routing.weights)` is the layer's output."""
    T, k = routing.ids.shape

    def one(acc, e):
        y = _one_expert(e, x, ew, alpha=alpha, limit=limit)
        return jnp.where((routing.ids == e)[..., None], y[:, None, :], acc), None

    init = jnp.zeros((T, k, x.shape[-1]), jnp.float32)
    return jax.lax.scan(one, init, jnp.arange(ew.b1.shape[0]))[0]


MOE_IMPLS = {"dense": moe_dense_reference, "ragged": moe_ragged, "buckets": moe_buckets,
             "chunks": moe_chunks, "gather": moe_gather}


def moe(x, router_w, router_b, ew: ExpertWeights, *, k: int, alpha: float, limit: float, impl: str,
        **options):
    """x [T, D] -> (out [T, D], routing) through `MOE_IMPLS[impl]`; `options` are that path's own
    (see `plan.Plan.moe_options`: the model resolves them from its `KernelOptions`)."""
    if impl not in MOE_IMPLS:
        raise ValueError(f"unknown MoE implementation {impl!r}; choose one of {sorted(MOE_IMPLS)}")
    routing = route(x, router_w, router_b, k)
    return MOE_IMPLS[impl](x, ew, routing, alpha=alpha, limit=limit, **options), routing
