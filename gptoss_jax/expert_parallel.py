"""The MoE layer on a device mesh: `shard_map` over every mesh axis, experts split over `expert`.

Each device routes its own tokens (the token axis is split over data x fsdp x expert), sends each
(token, expert) row to the device that owns the expert, runs its local experts with the grouped
matmul (dense or packed MXFP4), sends the results back and combines them with the routing weights.
With `tensor` > 1 each device also holds only a slice of every expert's hidden width F: the
down-projection gives partial sums, added over `tensor` after the combine (the bias b2 once,
after the sum).

Two dispatch strategies, one interface:

- "all_to_all": fixed-capacity buffers [ep, E_local, C, D] and two `all_to_all`s; runs everywhere,
  XLA:CPU included. By default C is dropless: the smallest of a few static sizes that holds the
  largest (source device, expert) group on any device of the expert axis, picked at run time by
  `lax.switch` (the last size, all local tokens, always suffices). With `capacity_factor`,
  C = ceil(capacity_factor * t * k / E) for t local tokens; rows past C are dropped (they add
  nothing to their token) and counted exactly.
- "ragged_all_to_all": no padding on the wire: rows sorted by expert, one `ragged_all_to_all`
  there and one back, offsets from an all-gathered [ep, ep, E_local] count table. Dropless by
  default, so each device's receive buffer (and every activation of its local experts) is sized
  for the worst case, all ep devices' rows: ep times the mean load. With `capacity_factor` the
  buffer holds ceil(capacity_factor * t * k) rows and the overflow is dropped and counted (for
  120b on eight H100s the dropless buffers do not fit; see configs/README.md). For GPU and TPU;
  XLA:CPU cannot compile it, so on CPU it is tested through an emulation with the documented
  semantics (`ragged_all_to_all_emulated`) and lowered for cuda and tpu.

Weights are stored as the sharding rules say (`gptoss_jax.sharding`); the in-specs here give the
layout this computation needs (experts over `expert`, F over `tensor`, everything else whole), so
FSDP-sharded dimensions are all-gathered on entry, as FSDP does.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from gptoss_jax import moe as moe_lib
from gptoss_jax import plan as plan_lib
from gptoss_jax import targets
from gptoss_jax.kernels.groups import row_experts
from gptoss_jax.mxfp4 import BLOCK, MXFP4
from gptoss_jax.sharding import BATCH_AXES

DISPATCH = plan_lib.DISPATCH


class ShardedMoEOutput(NamedTuple):
    out: jax.Array  # [T, D]
    routing: moe_lib.Routing
    dropped: jax.Array  # int32 []: (token, expert) assignments dropped for capacity, whole mesh


def _decode_one_at_a_time(ew: moe_lib.ExpertWeights, platform: str) -> bool:
    """This device's packed experts are too large to decode at once on CPU (`plan.DECODE_AT_ONCE_BYTES`)."""
    return (
        platform == "cpu" and isinstance(ew.w1, MXFP4) and 4 * (ew.w1.size + ew.w2.size) > plan_lib.DECODE_AT_ONCE_BYTES
    )


def capacity(capacity_factor: float, tokens: int, k: int, num_experts: int) -> int:
    """Rows per (source device, expert) buffer for a capacity factor (1.0 = the mean load)."""
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    return max(1, min(tokens, math.ceil(capacity_factor * tokens * k / num_experts)))


def _expert_specs(ew: moe_lib.ExpertWeights, tp: int):
    """in_specs of the expert weights: experts over `expert`, the hidden width over `tensor`."""
    t = "tensor" if tp > 1 else None  # (a size-1 axis named here would make the outputs vary on it)
    if isinstance(ew.w1, MXFP4):
        w1 = MXFP4(P("expert", t, None, None), P("expert", t, None))  # [E, 2F, D/32, 16]
        w2 = MXFP4(P("expert", None, t, None), P("expert", None, t))  # [E, D, F/32, 16]
    else:
        w1, w2 = P("expert", None, t), P("expert", t, None)  # [E, D, 2F], [E, F, D]
    # LoRA: A1 [E, D, r], B1 [E, r, 2F], A2 [E, F, r], B2 [E, r, D]. With F split over tensor each
    # device's (a_t A2_t) B2 is a partial sum, completed by the same psum as the base's.
    lora1 = None if ew.lora1 is None else moe_lib.Adapter(P("expert", None, None), P("expert", None, t))
    lora2 = None if ew.lora2 is None else moe_lib.Adapter(P("expert", t, None), P("expert", None, None))
    return moe_lib.ExpertWeights(w1, P("expert", t), w2, P("expert", None), lora1, lora2)


def _check_divisible(ew: moe_lib.ExpertWeights, ep: int, tp: int) -> None:
    E, two_f = ew.b1.shape
    F = two_f // 2
    if E % ep:
        raise ValueError(f"mesh axis expert={ep} must divide the {E} experts")
    unit = BLOCK if isinstance(ew.w1, MXFP4) else 1  # packed F is split in whole 32-wide blocks
    if F % (unit * tp):
        raise ValueError(
            f"mesh axis tensor={tp} must divide the expert width {F}"
            + (f" in whole MXFP4 blocks ({F // BLOCK} blocks)" if unit > 1 else "")
            + "; give those devices to another mesh axis"
        )


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """`jax.lax.ragged_all_to_all` (one slice per peer) from an all-gather and a scatter: the same
    result, ep times the traffic. It lets the ragged dispatch run, and be checked, on XLA:CPU."""
    del recv_sizes  # implied by the senders' sizes
    me = jax.lax.axis_index(axis_name)
    rows = jax.lax.all_gather(operand, axis_name)  # [n, N, ...] every sender's operand
    start = jax.lax.all_gather(input_offsets, axis_name)[:, me]  # [n] what each sender sends me
    size = jax.lax.all_gather(send_sizes, axis_name)[:, me]
    at = jax.lax.all_gather(output_offsets, axis_name)[:, me]
    i = jnp.arange(operand.shape[0])[None]
    inside = (i >= start[:, None]) & (i < (start + size)[:, None])
    dest = jnp.where(inside, at[:, None] + i - start[:, None], output.shape[0])  # outside: dropped
    return output.at[dest.reshape(-1)].set(rows.reshape((-1,) + operand.shape[1:]), mode="drop")


def _all_to_all_rows(x, valid, routing, ew, *, ep, num_experts, capacity_factor, local_mlp):
    """Per-slot expert outputs [t, k, D] (zero where dropped), kept mask [t, k], local drops.
    local_mlp(h [E_loc, n, D], ew) runs this device's experts on their received rows."""
    t, D = x.shape
    k = routing.ids.shape[1]
    E, E_loc = num_experts, num_experts // ep
    ids = jnp.where(valid[:, None], routing.ids, E)  # padding rows go to a sentinel expert E
    srt = moe_lib.sort_by_expert(ids, E + 1)
    rank = moe_lib.bucket_ranks(srt)
    real = srt.experts < E

    def run(cap: int, x, ew, experts, tokens, rank, real):
        keep = real & (rank < cap)
        slot = jnp.where(keep, experts * cap + rank, E * cap)
        buf = jnp.zeros((E * cap, D), x.dtype).at[slot].set(x[tokens], mode="drop")
        recv = jax.lax.all_to_all(buf.reshape(ep, E_loc * cap, D), "expert", 0, 0, tiled=True)
        h = recv.reshape(ep, E_loc, cap, D).transpose(1, 0, 2, 3).reshape(E_loc, ep * cap, D)
        y = local_mlp(h, ew).astype(x.dtype)
        back = y.reshape(E_loc, ep, cap, D).transpose(1, 0, 2, 3).reshape(ep, E_loc * cap, D)
        ret = jax.lax.all_to_all(back, "expert", 0, 0, tiled=True).reshape(E * cap, D)
        rows = jnp.where(keep[:, None], ret[jnp.minimum(slot, E * cap - 1)], 0)
        return rows.astype(jnp.float32), keep

    operands = (x, ew, srt.experts, srt.tokens, rank, real)
    if capacity_factor is None:
        caps = moe_lib.bucket_capacities(t, k, E)
        need = jax.lax.pmax(jnp.max(srt.group_sizes[:E]), "expert")  # every peer takes one branch
        rows, keep = moe_lib.capacity_switch(run, caps, jnp.searchsorted(jnp.asarray(caps), need), *operands)
    else:
        rows, keep = run(capacity(capacity_factor, t, k, E), *operands)
    dropped = jnp.sum(real & ~keep, dtype=jnp.int32)
    y = jnp.zeros_like(rows).at[srt.order].set(rows).reshape(t, k, D)
    keep = jnp.zeros_like(keep).at[srt.order].set(keep).reshape(t, k)
    return y, keep, dropped


def receive_capacity(capacity_factor: float, tokens: int, k: int, ep: int, experts_local: int) -> int:
    """Rows one device's ragged receive buffer holds: ceil(capacity_factor * t * k) (1.0 = the
    mean load), at most the dropless worst case ep * t * min(k, E_local)."""
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    return max(1, min(ep * tokens * min(k, experts_local), math.ceil(capacity_factor * tokens * k)))


def _inverse(perm):
    """The inverse of a permutation: a[perm][_inverse(perm)] == a (a gather instead of scattering
    into a zero buffer)."""
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def _receive_buffer(shape, after):
    """Zeros for a `ragged_all_to_all` to write into, made once `after` exists. A plain
    `jnp.zeros` is a constant: XLA shared one such buffer between exchanges (each of which writes
    into its own) and kept copies of it alive from every layer's forward to its backward
    (XLA:GPU, 120b LoRA on eight H100s: nine [16384, 2880] buffers per layer)."""
    zeros, _ = jax.lax.optimization_barrier((jnp.zeros(shape, after.dtype), after))
    return zeros


def _ragged_rows(x, valid, routing, *, ep, num_experts, grouped, emulate, capacity_factor=None):
    """Ragged dispatch: per-slot outputs [t, k, D], the mask of rows that were computed, and the
    count of dropped rows. Dropless by default: the receive buffer holds the worst case, every
    device's rows for my experts (ep * t * min(k, E_local) rows, ep times the mean load). With
    `capacity_factor` it holds `receive_capacity` rows; a receiver takes its senders in device
    order and each sender's slice (sorted by expert) up to the room left, so a cut drops the tail
    of a slice: those rows add nothing to their token and are counted."""
    t, D = x.shape
    k = routing.ids.shape[1]
    E, E_loc = num_experts, num_experts // ep
    exchange = (
        functools.partial(ragged_all_to_all_emulated, axis_name="expert")
        if emulate
        else functools.partial(jax.lax.ragged_all_to_all, axis_name="expert")
    )
    ids = jnp.where(valid[:, None], routing.ids, E).reshape(-1)
    order = jnp.argsort(ids, stable=True)
    xs = x[order // k]
    counts = jnp.bincount(ids, length=E + 1)[:E].astype(jnp.int32).reshape(ep, E_loc)
    table = jax.lax.all_gather(counts, "expert")  # [src, dst, E_loc] rows each pair would move
    me = jax.lax.axis_index("expert")
    per_pair = table.sum(-1)  # [src, dst] rows
    R = ep * t * min(k, E_loc)  # the most rows one device can receive: dropless
    if capacity_factor is not None:
        R = receive_capacity(capacity_factor, t, k, ep, E_loc)
    earlier = jnp.cumsum(per_pair, axis=0) - per_pair  # [src, dst] rows of lower-numbered senders
    sent = jnp.clip(R - earlier, 0, per_pair)  # [src, dst] rows that fit (all of them if dropless)
    kept = jnp.clip(sent[..., None] - (jnp.cumsum(table, -1) - table), 0, table)  # [src, dst, E_loc]
    mine = kept[:, me]  # [src, E_loc] rows I receive

    start = jnp.cumsum(per_pair[me]) - per_pair[me]  # each destination's slice of my sorted rows
    send = sent[me]
    lands_at = (jnp.cumsum(sent, axis=0) - sent)[me]  # my slice's offset on each receiver
    recv = mine.sum(-1)
    got = exchange(xs, _receive_buffer((R, D), xs), start, send, lands_at, recv)

    segment = row_experts(mine.reshape(-1), R)  # (src, local expert) segment of each row
    local = jnp.where(segment < ep * E_loc, segment % E_loc, E_loc)
    perm = jnp.argsort(local, stable=True)
    y = grouped(got[perm], mine.sum(0)).astype(x.dtype)[_inverse(perm)]

    back_at = (jnp.cumsum(per_pair, axis=1) - per_pair)[:, me]  # where my rows sit in each sender
    ret = exchange(y, _receive_buffer((t * k, D), y), jnp.cumsum(recv) - recv, recv, back_at, send)
    rows = ret[_inverse(order)].reshape(t, k, D).astype(jnp.float32)
    dest = jnp.minimum(ids[order] // E_loc, ep - 1)  # sentinel rows (padding) are never kept
    fits = (jnp.arange(t * k) - start[dest] < send[dest]) & (ids[order] < E)
    keep = jnp.zeros((t * k,), bool).at[order].set(fits).reshape(t, k)
    dropped = jnp.sum(valid[:, None] & ~keep).astype(jnp.int32)
    return rows, keep, dropped


def moe_sharded(
    x,
    router_w,
    router_b,
    ew: moe_lib.ExpertWeights,
    *,
    mesh: Mesh,
    k: int,
    alpha: float,
    limit: float,
    dispatch: str | None = None,
    capacity_factor: float | None = None,
    local_impl: str | None = None,
    mxfp4_impl: str | None = None,
    interpret: bool = False,
    emulate_ragged: bool = False,
    platform: str | None = None,
) -> ShardedMoEOutput:
    """x [T, D] (a global array inside jit) -> ShardedMoEOutput. Equal to `moe.moe` on one device
    (exactly so when nothing is dropped).

    dispatch: "all_to_all" | "ragged_all_to_all"; None = by platform (`plan.default_dispatch`).
    capacity_factor: None = dropless; else buffers sized by it that may drop rows (counted):
        all_to_all per (device, expert), ragged_all_to_all per receiving device.
    local_impl: how a device computes its experts: "ragged" (grouped matmul; MXFP4 stays packed
        through `mxfp4_impl`) or "buckets" (one batched einsum; the CPU default). With expert=1 any
        `moe.MOE_IMPLS` name, run on the local tokens (default: `plan.default_moe_impl`).
    emulate_ragged: run "ragged_all_to_all" through `ragged_all_to_all_emulated` (XLA:CPU).
    platform: picks the defaults; None = the platform of the mesh's devices (`targets.platform_of`)."""
    platform = platform or targets.platform_of(mesh.devices.flat)
    dispatch = dispatch or plan_lib.default_dispatch(platform)
    mxfp4_impl = mxfp4_impl or plan_lib.default_mxfp4_impl(platform)
    if dispatch not in DISPATCH:
        raise ValueError(f"unknown expert dispatch {dispatch!r}; choose one of {DISPATCH}")
    for name in ("data", "fsdp", "tensor", "expert"):
        if name not in mesh.shape:
            raise ValueError(f"mesh lacks axis {name!r}; build it with gptoss_jax.make_mesh")
    ep, tp = mesh.shape["expert"], mesh.shape["tensor"]
    _check_divisible(ew, ep, tp)
    T, D = x.shape
    E = router_b.shape[0]
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    pad = -T % shards  # e.g. a decode step of one token: padding rows route nowhere
    valid = jnp.arange(T + pad) < T
    xp = jnp.pad(x, ((0, pad), (0, 0)))
    if local_impl is None:  # expert > 1 exchanges fixed-capacity buffers: buckets on CPU
        cpu = platform == "cpu"
        local_impl = (
            plan_lib.default_moe_impl(T, k, E, large_packed_on_cpu=False, platform=platform, per_device=False)
            if ep == 1
            else ("buckets" if cpu else "ragged")
        )
    allowed = moe_lib.MOE_IMPLS if ep == 1 else ("ragged", "buckets")
    if local_impl not in allowed:
        raise ValueError(
            f"local expert implementation {local_impl!r} is not one of {sorted(allowed)}"
            + (" (with expert > 1)" if ep > 1 else "")
        )

    def body(x, valid, rw, rb, ew):
        routing = moe_lib.route(x, rw, rb, k)
        if tp > 1:  # b2 once, after the partial sums over tensor
            ew_local = ew._replace(b2=jnp.zeros_like(ew.b2))
        else:
            ew_local = ew
        mlp_kw = dict(alpha=alpha, limit=limit)
        if ep == 1:
            extra = plan_lib.moe_options(
                local_impl,
                mxfp4_impl=mxfp4_impl,
                interpret=interpret,
                one_at_a_time=_decode_one_at_a_time(ew_local, platform),
                gathered_decode=platform == "cpu",
            )
            y = moe_lib.MOE_IMPLS[local_impl](x, ew_local, routing, **mlp_kw, **extra).astype(jnp.float32)
            keep = jnp.ones(routing.ids.shape, bool)
            dropped = jnp.zeros((), jnp.int32)
        else:
            grouped = functools.partial(moe_lib.grouped_mlp, mxfp4_impl=mxfp4_impl, interpret=interpret, **mlp_kw)
            if dispatch == "all_to_all":
                if local_impl == "ragged":

                    def local_mlp(h, ew):  # [E_loc, n, D]: equal groups through the grouped matmul
                        sizes = jnp.full((h.shape[0],), h.shape[1], jnp.int32)
                        return grouped(h.reshape(-1, h.shape[-1]), sizes, ew).reshape(h.shape)
                else:
                    local_mlp = functools.partial(
                        moe_lib.bucket_mlp, one_at_a_time=_decode_one_at_a_time(ew_local, platform), **mlp_kw
                    )
                rows, keep, dropped = _all_to_all_rows(
                    x,
                    valid,
                    routing,
                    ew_local,
                    ep=ep,
                    num_experts=E,
                    capacity_factor=capacity_factor,
                    local_mlp=local_mlp,
                )
            else:
                rows, keep, dropped = _ragged_rows(
                    x,
                    valid,
                    routing,
                    ep=ep,
                    num_experts=E,
                    grouped=functools.partial(grouped, ew=ew_local),
                    emulate=emulate_ragged,
                    capacity_factor=capacity_factor,
                )
            y = jnp.einsum("TkD,Tk->TD", rows, routing.weights)
        if tp > 1:
            y = jax.lax.psum(y, "tensor")
            b2 = jax.lax.all_gather(ew.b2, "expert", tiled=True)[routing.ids]  # [t, k, D]
            y = y + jnp.einsum("TkD,Tk->TD", b2.astype(jnp.float32), routing.weights * keep)
        if ep > 1:
            dropped = jax.lax.psum(dropped, BATCH_AXES)
        return y.astype(x.dtype), routing, dropped

    tok = P(BATCH_AXES)
    spec_routing = moe_lib.Routing(tok, tok, tok)
    fn = jax.shard_map(
        body, mesh=mesh, in_specs=(tok, tok, P(), P(), _expert_specs(ew, tp)), out_specs=(tok, spec_routing, P())
    )
    y, routing, dropped = fn(xp, valid, router_w, router_b, ew)
    if pad:
        y = y[:T]
        routing = moe_lib.Routing(*(a[:T] for a in routing))
    return ShardedMoEOutput(y, routing, dropped)


# ------------------------------------------------------------------------ communication volume
def communication_per_token(
    cfg, mesh_shape: dict, *, dispatch: str = "ragged_all_to_all", capacity_factor: float = 1.0, dtype_bytes: int = 2
) -> dict:
    """Bytes one device sends per local token in one MoE layer's forward, from the shapes alone.

    Routing is taken as uniform, so a fraction (ep - 1) / ep of the rows leaves the device.
    - dispatch / combine: the two all-to-alls. ragged: k rows of D per token each way; all_to_all:
      the padded buffer, capacity_factor * k rows per token (dropless picks 1.25, 2, 4 or E/k
      times the mean at run time, from the largest group).
    - tensor_psum: the all-reduce of the fp32 partial outputs over `tensor` (ring: 2 (tp-1)/tp).
    The FSDP all-gather of the expert weights is per step, not per token: see `fsdp_gather_bytes`."""
    ep, tp = mesh_shape.get("expert", 1), mesh_shape.get("tensor", 1)
    k, D = cfg.experts_per_token, cfg.d_model
    rows = k if dispatch == "ragged_all_to_all" else capacity_factor * k
    one_way = (ep - 1) / ep * rows * D * dtype_bytes
    return {
        "dispatch": one_way,
        "combine": one_way,
        "tensor_psum": 2 * (tp - 1) / tp * D * 4,
        "total": 2 * one_way + 2 * (tp - 1) / tp * D * 4,
    }


def fsdp_gather_bytes(cfg, mesh_shape: dict) -> float:
    """Bytes one device receives per MoE layer per forward to gather its packed expert weights
    over `fsdp` (the shard_map needs each (expert, tensor) slice whole)."""
    ep, tp, fs = (mesh_shape.get(a, 1) for a in ("expert", "tensor", "fsdp"))
    E, D, F = cfg.num_experts, cfg.d_model, cfg.expert_dim
    packed = E * (2 * F * D + D * F) * (0.5 + 1 / BLOCK) / (ep * tp)  # 4 bits + a scale byte per 32
    b2 = E * D * 2 / ep  # [E, D] bf16; b1 has no embed axis and is not fsdp-sharded
    return (fs - 1) / fs * (packed + b2)
