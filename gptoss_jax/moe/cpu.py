"""How the MoE runs on a CPU: three execution strategies for the model's block (`moe.core`),
built on one per-expert function and one capacity switch.

- `moe_chunks`: tokens sorted by expert, each group padded to a multiple of a static chunk height,
  and a loop over the experts and their chunks with plain 2-D matmuls (its own backward loop).
  XLA:CPU runs ragged_dot very slowly; this is the CPU path (from 16 rows per expert): dropless,
  and its work follows the group sizes however skewed the routing.
- `moe_buckets`: tokens sorted by expert into per-expert buckets of one static capacity and one
  batched einsum; dropless: the capacity is the smallest of a few static sizes that holds the
  largest group (`capacity_switch`), so a skewed routing costs up to E/k times the work. The
  expert-parallel CPU path's fixed-capacity buffers use its `bucket_mlp`.
- `moe_gather`: each (token, slot) gathers its expert's weights (decoding packed ones after the
  gather, or inside the reduction: `mxfp4.gathered_matvec`). For decode steps.

One expert (`expert_fns`): its weights, packed ones decoded once, as the two halves of its MLP,
functions of its float leaves (so gradients reach dense weights, biases and adapters, never packed
blocks). The chunk loop, the bucket path's one-expert-at-a-time mode (packed experts too large to
decode at once) and `expert_outputs` all run experts through it.

Which strategy runs is the plan's choice (`gptoss_jax.plan`), from the devices and the shapes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax import cpu_matvec
from gptoss_jax.adapters import Adapter
from gptoss_jax.kernels import vma
from gptoss_jax.layers import swiglu
from gptoss_jax.moe.core import (
    ExpertWeights,
    Routing,
    bucket_ranks,
    combine,
    expert_mlp,
    in_out,
    lora_delta,
    sort_by_expert,
)
from gptoss_jax.mxfp4 import MXFP4, gathered_matvec


# ---------------------------------------------------------------------- the pieces they share
def float_leaves(tree):
    """(the float leaves of `tree`, which leaves are float, rebuild(float leaves) -> tree):
    gradients flow to dense weights, biases and adapters, never to packed blocks, scales or ids."""
    leaves, treedef = jax.tree.flatten(tree)
    floating = [jnp.issubdtype(a.dtype, jnp.floating) for a in leaves]

    def rebuild(float_leaves):
        it = iter(float_leaves)
        return jax.tree.unflatten(treedef, [next(it) if f else a for a, f in zip(leaves, floating)])

    return [a for a, f in zip(leaves, floating) if f], floating, rebuild


def cotangent(tree, float_grads):
    """The cotangent of `tree` in a custom VJP: `float_grads` for its float leaves, float0 zeros
    for the others (packed blocks, ids)."""
    _, floating, _ = float_leaves(tree)
    it = iter(float_grads)
    return jax.tree.unflatten(
        jax.tree.structure(tree),
        [next(it) if f else np.zeros(a.shape, jax.dtypes.float0) for a, f in zip(jax.tree.leaves(tree), floating)],
    )


def capacity_switch(fn, caps: tuple[int, ...], choice, *operands):
    """fn(caps[choice], *operands): one static capacity picked at run time (`lax.switch`).

    Differentiating through `lax.switch` makes every branch carry the residuals of all the others
    (zeros), which on XLA:CPU cost more than the experts themselves (3x the whole layer's backward
    at 4 capacities); so the backward pass is its own switch over per-capacity VJPs, recomputing
    the chosen branch's forward. Gradients flow to the float leaves of `operands`."""
    return _switch(fn, tuple(caps), choice, operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _switch(fn, caps, choice, operands):
    return jax.lax.switch(choice, [functools.partial(fn, c) for c in caps], *operands)


def _switch_fwd(fn, caps, choice, operands):
    return _switch(fn, caps, choice, operands), (choice, operands)


def _switch_bwd(fn, caps, res, dy):
    choice, operands = res
    floats, _, rebuild = float_leaves(operands)

    def branch(cap):
        def vjp(floats, dy):
            return jax.vjp(lambda fl: fn(cap, *rebuild(fl)), floats)[1](dy)[0]

        return vjp

    d_floats = jax.lax.switch(choice, [branch(c) for c in caps], floats, dy)
    return np.zeros(choice.shape, jax.dtypes.float0), cotangent(operands, d_floats)


_switch.defvjp(_switch_fwd, _switch_bwd)


def expert_at(ew: ExpertWeights, e) -> ExpertWeights:
    """Expert `e`'s weights (a traced index; packed ones stay packed)."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, e, keepdims=False), ew)


def expert_fns(ew_e: ExpertWeights, dt, alpha, limit):
    """One expert's MLP as (float leaves, first, second): h = first(x, fl) = x W1 + b1 (+ LoRA),
    y = second(h, fl) = swiglu(h) W2 + b2 (+ LoRA), fp32 accumulation, as functions of its float
    leaves (so gradients flow to dense weights, biases and adapters, never to packed blocks).
    Packed matrices are decoded here, once, in their [out, in] layout (no transpose)."""
    fl, _, rebuild = float_leaves(ew_e)
    decoded = {
        n: getattr(ew_e, n).dequantize(jnp.float32) for n in ("w1", "w2") if isinstance(getattr(ew_e, n), MXFP4)
    }  # [out, in]

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


def one_expert(e, x, ew: ExpertWeights, *, alpha, limit):
    """Expert `e` (a traced index) on x [C, D] -> fp32 [C, D], decoding only its weights. Plain
    2-D matmuls: XLA:CPU runs a batched matmul with a batch of one several times slower."""
    fl, first, second = expert_fns(expert_at(ew, e), x.dtype, alpha, limit)
    return second(first(x, fl), fl)


def expert_outputs(x, ew: ExpertWeights, routing: Routing, *, alpha, limit):
    """What each chosen expert returned for each token, before the routing weights: [T, k, D] fp32.

    For inspection (`model(..., capture="experts")`): one expert is decoded at a time and run on
    every token, so memory stays at one expert's weights; compute is E/k times the MoE layer's.
    `einsum("TkD,Tk->TD", out, routing.weights)` is the layer's output."""
    T, k = routing.ids.shape

    def one(acc, e):
        y = one_expert(e, x, ew, alpha=alpha, limit=limit)
        return jnp.where((routing.ids == e)[..., None], y[:, None, :], acc), None

    init = jnp.zeros((T, k, x.shape[-1]), jnp.float32)
    return jax.lax.scan(one, init, jnp.arange(ew.b1.shape[0]))[0]


# --------------------------------------------------------------------------------- buckets
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
        return jax.lax.map(lambda a: one_expert(a[1], a[0], ew, alpha=alpha, limit=limit), (buf, jnp.arange(E)))
    dt = buf.dtype
    mm = lambda a, w: jnp.einsum("ECI,EIO->ECO", a, w, preferred_element_type=jnp.float32)
    return expert_mlp(
        buf,
        in_out(ew.w1, dt),
        ew.b1[:, None],
        in_out(ew.w2, dt),
        ew.b2[:, None],
        alpha=alpha,
        limit=limit,
        matmul=mm,
        lora1=ew.lora1,
        lora2=ew.lora2,
    )


def moe_buckets(x, ew: ExpertWeights, routing: Routing, *, alpha, limit, one_at_a_time: bool = False):
    """Per-expert buckets [E, C, D] and one batched einsum; C is the smallest static capacity that
    holds the largest group, so no token is ever dropped (`one_at_a_time`: see `bucket_mlp`)."""
    T, k = routing.ids.shape
    E = ew.b1.shape[0]
    caps = bucket_capacities(T, k, E)
    largest = jnp.max(jnp.bincount(routing.ids.reshape(-1), length=E))
    fn = functools.partial(_buckets_at, alpha=float(alpha), limit=float(limit), one_at_a_time=bool(one_at_a_time))
    return capacity_switch(fn, caps, jnp.searchsorted(jnp.asarray(caps), largest), x, ew, routing.ids, routing.weights)


def _buckets_at(cap: int, x, ew: ExpertWeights, ids, weights, *, alpha, limit, one_at_a_time):
    """The bucketed MoE at one static capacity `cap` (which must hold the largest group)."""
    E = ew.b1.shape[0]
    srt = sort_by_expert(ids, E)
    slot = srt.experts * cap + bucket_ranks(srt)
    buf = jnp.zeros((E * cap, x.shape[1]), x.dtype).at[slot].set(x[srt.tokens])
    y = bucket_mlp(buf.reshape(E, cap, -1), ew, alpha=alpha, limit=limit, one_at_a_time=one_at_a_time).reshape(
        E * cap, -1
    )[slot]
    return combine(y, srt, Routing(None, ids, weights), x.dtype)


# ---------------------------------------------------------------------------------- chunks
def chunk_rows(num_rows: int, num_experts: int) -> int:
    """The chunked MoE's static chunk height: about half the mean group, a multiple of 8 between
    8 and 256 (XLA:CPU's 2-D matmuls reach ~80% of their large-size rate from 64 rows)."""
    return int(min(256, max(8, 8 * round(num_rows / num_experts / 16))))


def chunk_count(num_rows: int, num_experts: int, chunk: int) -> int:
    """Chunks enough for any routing: sum_e ceil(g_e / m) <= (R + E (m - 1)) / m."""
    return -(-(num_rows + num_experts * (chunk - 1)) // chunk)


def native_grouped_ok(ew: ExpertWeights, dtype) -> bool:
    """Whether `cpu_matvec.grouped_matmul` can run these experts' forward pass: dense weights
    in the activations' dtype, no adapters, and the CPU's support for that dtype (bf16:
    AVX512-BF16; fp32: AVX-512F)."""
    dt = jnp.dtype(dtype)
    if isinstance(ew.w1, MXFP4) or isinstance(ew.w2, MXFP4) or ew.lora1 is not None or ew.lora2 is not None:
        return False
    if ew.w1.dtype != dt or ew.w2.dtype != dt:
        return False
    if dt == jnp.bfloat16:
        return cpu_matvec.has_bf16_dot()
    return dt == jnp.float32 and cpu_matvec.has_grouped_f32()


def moe_chunks(x, ew: ExpertWeights, routing: Routing, *, alpha, limit, chunk: int | None = None, native: bool = False):
    """Sort by expert, pad each group to a multiple of `chunk` rows, and loop over the experts and,
    within each, over its chunks only (a loop with a run-time trip count): plain 2-D matmuls, one
    expert's weights at a time (packed ones decoded once per expert), work that follows the
    groups (at most `chunk` - 1 padding rows per expert) whatever the routing, dropless. The
    bucket path instead pads every group to a capacity holding the largest one: 4x the work on
    the benchmark model, whose random router sends most tokens to one expert. The backward pass
    is its own loop (`jax.custom_vjp`), reusing the saved pre-activations.

    `native` (the CPU plan where the kernels build): where `native_grouped_ok`, the forward pass
    that nothing differentiates runs each expert's two products on exactly its rows through
    `cpu_matvec.grouped_matmul` (XLA:CPU's matmuls at chunk sizes reach a fraction of their
    large-size rate); under differentiation the loop above runs, as without it."""
    T, k = routing.ids.shape
    E, R = ew.b1.shape[0], T * k
    m = chunk or chunk_rows(R, E)
    n = chunk_count(R, E, m)
    srt = sort_by_expert(routing.ids, E)
    chunks = (srt.group_sizes + m - 1) // m
    row = (jnp.cumsum(chunks) - chunks)[srt.experts] * m + bucket_ranks(srt)  # padded row of each
    buf = jnp.zeros((n * m, x.shape[1]), x.dtype).at[row].set(x[srt.tokens])
    # inside shard_map: the float weights take the rows' mesh-varying type before the custom VJP,
    # so JAX's own transpose of that cast sums their gradients over the token shards
    ew = jax.tree.map(lambda a: vma.varying_like(a, buf) if jnp.issubdtype(a.dtype, jnp.floating) else a, ew)
    use_native = bool(native) and native_grouped_ok(ew, buf.dtype)
    y = _chunked(buf, ew, chunks, srt.group_sizes, float(alpha), float(limit), m, use_native)
    return combine(y[row], srt, routing, x.dtype)


def _chunk_loop(chunks, m, ew, dt, alpha, limit, body, carry, acc=None, done=None):
    """For each expert e (with its `expert_fns`, built once per expert), run
    body(fns, first_row, carry, acc) -> (carry, acc) over its chunks, `acc` starting at
    acc(fns) (default none) and finished by done(e, carry, acc) -> carry."""
    starts = jnp.cumsum(chunks) - chunks

    def expert(e, carry):
        fns = expert_fns(expert_at(ew, e), dt, alpha, limit)
        state = (carry, acc(fns) if acc else ())
        state = jax.lax.fori_loop(0, chunks[e], lambda c, st: body(fns, (starts[e] + c) * m, *st), state)
        return done(e, *state) if done else state[0]

    return jax.lax.fori_loop(0, chunks.shape[0], expert, carry)


def _zeros(shape, dtype, *refs):
    """Zeros for a loop's initial carry: inside `shard_map` it must vary over the same mesh axes
    as the loop's outputs, computed from `refs`."""
    return vma.varying_like(jnp.zeros(shape, dtype), *jax.tree.leaves(refs))


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


def _grouped_native(buf, ew, chunks, sizes, alpha, limit, m):
    """`_chunked`'s forward through `cpu_matvec.grouped_matmul`: expert e's rows are the first
    sizes[e] of its chunks; the other rows hold bias-only outputs (never read)."""
    E, n = chunks.shape[0], buf.shape[0]
    starts = (jnp.cumsum(chunks) - chunks) * m
    expert = jnp.repeat(jnp.arange(E), chunks * m, total_repeat_length=n)  # padding rows: any expert
    h = cpu_matvec.grouped_matmul(buf, ew.w1, starts, sizes) + ew.b1.astype(jnp.float32)[expert]
    a = swiglu(h, alpha=alpha, limit=limit).astype(buf.dtype)
    return cpu_matvec.grouped_matmul(a, ew.w2, starts, sizes) + ew.b2.astype(jnp.float32)[expert]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _chunked(buf, ew, chunks, sizes, alpha, limit, m, native):
    """The expert MLPs of the padded, expert-sorted rows `buf` [n m, D] -> fp32 [n m, D]. Only
    each expert's own rows are read afterwards: the loop leaves unused chunks 0 and padding rows
    of used chunks with the bias-only output, the native path (`native`) gives every row that is
    no expert's a bias-only output. `sizes` [E]: each expert's rows (the first of its chunks')."""
    if native:
        return _grouped_native(buf, ew, chunks, sizes, alpha, limit, m)
    return _chunked_run(buf, ew, chunks, alpha, limit, m, keep_h=False)[0]


def _chunked_fwd(buf, ew, chunks, sizes, alpha, limit, m, native):
    y, h = _chunked_run(buf, ew, chunks, alpha, limit, m, keep_h=True)
    return y, (buf, ew, chunks, h)


def _chunked_bwd(alpha, limit, m, native, res, dy):
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

    fl_all = float_leaves(ew)[0]
    carry = (_zeros(buf.shape, buf.dtype, *refs), [_zeros(a.shape, a.dtype, *refs) for a in fl_all])
    d_buf, grads = _chunk_loop(
        chunks,
        m,
        ew,
        buf.dtype,
        alpha,
        limit,
        body,
        carry,
        acc=lambda fns: [_zeros(a.shape, jnp.float32, *refs) for a in fns[0]],
        done=done,
    )
    float0 = np.zeros(chunks.shape, jax.dtypes.float0)
    return d_buf, cotangent(ew, grads), float0, float0


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


# ---------------------------------------------------------------------------------- gather
def _take_experts(w, ids):
    """The weights of the experts `ids` [n] as a dense [n, in, out] (packed ones decoded after the
    gather, so only n experts are ever decoded)."""
    if isinstance(w, MXFP4):
        return MXFP4(w.blocks[ids], w.scales[ids])
    return w[ids]


def moe_gather(
    x, ew: ExpertWeights, routing: Routing, *, alpha, limit, gathered_decode: bool = False, native: bool = False
):
    """Gather each (token, slot)'s expert weights and run them as a batch. For decoding, where
    T*k is far below E, this reads k experts per token instead of all E. `gathered_decode` (the
    CPU plan): packed experts are never decoded to memory, `mxfp4.gathered_matvec` decodes them
    inside the reduction. `native` (the CPU plan where it builds): the native kernels
    (`gptoss_jax.cpu_matvec`) read each chosen expert once, packed or dense, in place."""
    dt = x.dtype
    T, k = routing.ids.shape
    ids = routing.ids.reshape(-1)
    rows = lambda a, w: jnp.einsum("RI,RIO->RO", a, w, preferred_element_type=jnp.float32)
    if native:
        w1, w2 = ew.w1, ew.w2
        mm = lambda a, w: cpu_matvec.mxfp4_matvec(a, w, ids) if isinstance(w, MXFP4) else cpu_matvec.matvec(a, w, ids)
    elif isinstance(ew.w1, MXFP4) and gathered_decode:
        w1, w2 = ew.w1, ew.w2
        mm = lambda a, w: gathered_matvec(a, w, ids) if isinstance(w, MXFP4) else rows(a, w)
    else:
        w1, w2 = in_out(_take_experts(ew.w1, ids), dt), in_out(_take_experts(ew.w2, ids), dt)
        mm = rows
    xs = jnp.repeat(x, k, axis=0)  # row r = token r // k, slot r % k
    take = lambda ad: None if ad is None else Adapter(ad.a[ids], ad.b[ids])
    y = expert_mlp(
        xs,
        w1,
        ew.b1[ids],
        w2,
        ew.b2[ids],
        alpha=alpha,
        limit=limit,
        matmul=mm,
        lora1=take(ew.lora1),
        lora2=take(ew.lora2),
        delta=lambda a, ad: lora_delta(a, ad, rows),  # the adapters are gathered per row
    )
    return jnp.einsum("TkD,Tk->TD", y.reshape(T, k, -1), routing.weights).astype(dt)
