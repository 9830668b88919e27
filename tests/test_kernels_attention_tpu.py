"""The TPU Pallas attention kernel (gptoss_jax.kernels.attention_tpu).

Execution runs in Pallas interpret mode on CPU (small shapes); the real target is checked by
lowering for TPU at gpt-oss shapes (Mosaic dialect verification happens during that lowering).

Oracles: `attention_reference` (the [T, T] fp32 computation) and its `jax.grad`; JAX's own splash
attention with `sinks=` (interpret mode) for a causal and a sliding case.
Tolerances (max|delta| / max|ref|): forward 1e-5 fp32, 2e-2 bf16 inputs; gradients 1e-4 fp32.
"""

import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from gptoss_jax.kernels import attention_tpu as at
from gptoss_jax.kernels.attention import FULL, PARTIAL, SKIP, BlockSizes, attention_block_map, attention_reference
from gptoss_jax.kernels.attention import attention as dispatch_attention

FWD_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
GRAD_TOL = 1e-4


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def make_inputs(B, T, K, G, H=64, dtype=jnp.float32, seed=0):
    kq, kk, kv, ks, kc = jax.random.split(jax.random.key(seed), 5)
    N = K * G
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, T, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, T, K, H), jnp.float32).astype(dtype)
    sinks = 2.0 * jax.random.normal(ks, (N,), jnp.float32)  # large enough that sinks matter
    cot = jax.random.normal(kc, (B, T, N, H), jnp.float32)
    return q, k, v, sinks, cot


def out_and_grads(f, q, k, v, sinks, cot):
    """f(q, k, v, sinks) and the gradients of sum(f * cot) w.r.t. q, k, v, sinks, in one compiled call."""

    def run(q, k, v, sinks, cot):
        out, vjp = jax.vjp(f, q, k, v, sinks)
        return out, vjp(cot.astype(out.dtype))

    return jax.jit(run)(q, k, v, sinks, cot)


def segments(B, T, boundaries):
    """Row b gets segment ids that change at `boundaries[b]` (token indices; mid-block on purpose).
    Labels run 1, 0, 2, 3, ...: not monotone, so a mask that compared ids with < or > would fail."""
    seg = np.ones((B, T), np.int32)
    for b in range(B):
        for n, start in enumerate(boundaries[b % len(boundaries)]):
            seg[b, start:] = 0 if n == 0 else n + 1
    return jnp.asarray(seg)


# (B, T, K, G, window, segment boundaries or None, (block_q, block_k), sm_scale)
CASES = [
    pytest.param(2, 300, 2, 8, 128, [(50, 200), (131,)], (128, 128), None, id="T300-W128-G8-seg"),
    pytest.param(1, 300, 1, 8, None, [(70, 190)], (128, 128), None, id="T300-full-G8-seg"),
    pytest.param(1, 300, 2, 1, 128, None, (128, 128), None, id="T300-W128-G1"),
    pytest.param(1, 256, 4, 1, None, None, (128, 128), 0.3, id="T256-full-G1-scale"),
    pytest.param(1, 256, 1, 8, 5, None, (64, 32), None, id="T256-W5-G8-bq64-bk32"),
    pytest.param(1, 37, 1, 8, 5, [(9, 20)], (16, 16), None, id="T37-W5-G8-seg"),
    pytest.param(1, 37, 2, 1, 1, None, (8, 8), None, id="T37-W1-G1"),
    pytest.param(1, 1, 2, 1, 1, None, (128, 128), None, id="T1-W1-G1"),
    pytest.param(1, 1, 1, 8, None, [()], (128, 128), None, id="T1-full-G8-seg"),
]


@pytest.mark.parametrize("B,T,K,G,W,bounds,blocks,scale", CASES)
def test_forward_and_gradients_fp32(B, T, K, G, W, bounds, blocks, scale):
    q, k, v, sinks, cot = make_inputs(B, T, K, G)
    seg = None if bounds is None else segments(B, T, bounds)
    bs = BlockSizes(*blocks)

    def kernel(q, k, v, s):
        return at.attention(
            q, k, v, s, sliding_window=W, segment_ids=seg, sm_scale=scale, interpret=True, block_sizes=bs
        )

    def ref(q, k, v, s):
        return attention_reference(q, k, v, s, sliding_window=W, segment_ids=seg, sm_scale=scale)

    out, g = out_and_grads(kernel, q, k, v, sinks, cot)
    r, gr = out_and_grads(ref, q, k, v, sinks, cot)
    assert out.shape == r.shape and out.dtype == r.dtype
    assert rel(out, r) <= FWD_TOL[jnp.float32], rel(out, r)
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), g, gr):
        assert a.shape == b.shape, name
        assert rel(a, b) <= GRAD_TOL, (name, rel(a, b))


@pytest.mark.parametrize(
    "T,K,G,W,bounds",
    [
        pytest.param(300, 2, 8, 128, [(50, 200)], id="T300-W128-G8-seg"),
        pytest.param(256, 2, 1, None, None, id="T256-full-G1"),
    ],
)
def test_forward_bf16(T, K, G, W, bounds):
    q, k, v, sinks, _ = make_inputs(1, T, K, G, dtype=jnp.bfloat16, seed=1)
    seg = None if bounds is None else segments(1, T, bounds)
    out = at.attention(q, k, v, sinks, sliding_window=W, segment_ids=seg, interpret=True)
    # fp32 math on the bf16 inputs
    r = jax.jit(attention_reference, static_argnames="sliding_window")(
        q, k, v, sinks, sliding_window=W, segment_ids=seg
    )
    assert out.dtype == jnp.bfloat16
    assert rel(out, r.astype(jnp.float32)) <= FWD_TOL[jnp.bfloat16], rel(out, r)


def test_gradients_bf16():
    """bf16 inputs, gradients vs the fp32 reference on the same (bf16-representable) values; bf16
    tolerance as for the forward."""
    q, k, v, sinks, cot = make_inputs(1, 300, 2, 8, dtype=jnp.bfloat16, seed=1)
    seg = segments(1, 300, [(50, 200)])
    _, g = out_and_grads(
        lambda *a: at.attention(*a, sliding_window=128, segment_ids=seg, interpret=True), q, k, v, sinks, cot
    )
    f32 = lambda x: x.astype(jnp.float32)
    _, gr = out_and_grads(
        lambda *a: attention_reference(*a, sliding_window=128, segment_ids=seg), f32(q), f32(k), f32(v), sinks, cot
    )
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), g, gr):
        assert a.dtype == (jnp.float32 if name == "dsinks" else jnp.bfloat16), name
        assert rel(a, b) <= FWD_TOL[jnp.bfloat16], (name, rel(a, b))


def test_dispatch_pallas_tpu():
    q, k, v, sinks, _ = make_inputs(1, 37, 2, 4)
    seg = segments(1, 37, [(20,)])
    out = dispatch_attention(
        q,
        k,
        v,
        sinks,
        sliding_window=5,
        segment_ids=seg,
        implementation="pallas_tpu",
        interpret=True,
        block_sizes=BlockSizes(16, 16),
    )
    r = jax.jit(attention_reference, static_argnames="sliding_window")(
        q, k, v, sinks, sliding_window=5, segment_ids=seg
    )
    assert rel(out, r) <= FWD_TOL[jnp.float32]


def test_tpu_faithful_interpreter():
    """TPU-semantics interpreter: uninitialized VMEM reads as NaN and races are detected, so a
    missing scratch initialisation or a bad index map would show up here."""
    q, k, v, sinks, cot = make_inputs(1, 37, 1, 2)
    seg = segments(1, 37, [(20,)])
    ip = pltpu.InterpretParams(uninitialized_memory="nan", detect_races=True)
    bs = BlockSizes(16, 16)
    kernel = lambda *a: at.attention(*a, sliding_window=5, segment_ids=seg, interpret=ip, block_sizes=bs)
    ref = lambda *a: attention_reference(*a, sliding_window=5, segment_ids=seg)
    out, g = out_and_grads(kernel, q, k, v, sinks, cot)
    r, gr = out_and_grads(ref, q, k, v, sinks, cot)
    assert rel(out, r) <= FWD_TOL[jnp.float32]
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), g, gr):
        assert rel(a, b) <= GRAD_TOL, (name, rel(a, b))


# ---------------------------------------------------------------------------------------------
# JAX's splash attention (its sinks: the running max starts at the sink, the denominator at 1,
# no value and no scaling -- the same definition as ours; q must be pre-scaled)
# ---------------------------------------------------------------------------------------------


def splash_attention(q, k, v, sinks, *, window, segment_ids):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, T, N, H = q.shape
    if window is None:
        head_mask = sm.CausalMask((T, T))
    else:  # key j visible iff i - (W - 1) <= j <= i
        head_mask = sm.LocalMask((T, T), window_size=(window - 1, 0), offset=0)
    mask = sm.MultiHeadMask([head_mask] * N)
    kernel = sk.make_splash_mha(
        mask,
        head_shards=1,
        q_seq_shards=1,
        interpret=True,
        block_sizes=sk.BlockSizes(block_q=128, block_kv=128, block_kv_compute=128),
    )

    def one(q, k, v, seg):  # q [N, T, H], k/v [K, T, H]
        ids = None if seg is None else sk.SegmentIds(q=seg, kv=seg)
        return kernel(q, k, v, ids, sinks)

    qs = (q.astype(jnp.float32) * H**-0.5).astype(q.dtype).transpose(0, 2, 1, 3)
    out = jax.vmap(one)(qs, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), segment_ids)
    return out.transpose(0, 2, 1, 3)


@pytest.mark.parametrize(
    "W,bounds", [pytest.param(None, None, id="causal"), pytest.param(128, [(70, 190)], id="sliding128-seg")]
)
def test_forward_matches_splash(W, bounds):
    B, T, K, G = 1, 256, 2, 4
    q, k, v, sinks, _ = make_inputs(B, T, K, G, seed=2)
    seg = None if bounds is None else segments(B, T, bounds)
    ours = at.attention(q, k, v, sinks, sliding_window=W, segment_ids=seg, interpret=True)
    theirs = splash_attention(q, k, v, sinks, window=W, segment_ids=seg)
    r = jax.jit(attention_reference, static_argnames="sliding_window")(
        q, k, v, sinks, sliding_window=W, segment_ids=seg
    )
    assert rel(theirs, r) <= FWD_TOL[jnp.float32], rel(theirs, r)  # same sink definition as ours
    assert rel(ours, theirs) <= FWD_TOL[jnp.float32], rel(ours, theirs)


# ---------------------------------------------------------------------------------------------
# Block sparsity: the visit map, and that the kernels are launched with exactly that map
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 37, 256, 300, 8192])
@pytest.mark.parametrize("block", [16, 128])
@pytest.mark.parametrize("W", [128, 5, 1, 300])
def test_sliding_visit_bound(T, block, W):
    bm = attention_block_map(T, block_q=block, block_k=block, sliding_window=W)
    bound = math.ceil((W - 1) / block) + 1
    nq = math.ceil(T / block)
    assert bm.num_visits.max() <= bound
    # Tight for long sequences: a query block away from the start needs exactly `bound` blocks.
    i = nq - 1
    if i * block >= W + block:
        assert bm.num_visits[i] == bound
    # Visits are contiguous, end at the diagonal block and cover every visible (query, key) pair.
    for i in range(nq):
        ks = bm.kv_index[i, : bm.num_visits[i]]
        assert ks[-1] == i and np.all(np.diff(ks) == 1)
        first_query = i * block
        assert ks[0] == max(0, first_query - W + 1) // block


@pytest.mark.parametrize("T,block", [(256, 128), (300, 128), (37, 8), (8192, 128)])
def test_full_visits_causal_triangle(T, block):
    bm = attention_block_map(T, block_q=block, block_k=block)
    nq = math.ceil(T / block)
    np.testing.assert_array_equal(bm.num_visits, np.arange(1, nq + 1))
    assert bm.total_visits == nq * (nq + 1) // 2
    for i in range(nq):
        np.testing.assert_array_equal(bm.kv_index[i, : i + 1], np.arange(i + 1))
        assert np.all(bm.kind[i, :i] == FULL)  # strictly below the diagonal: no mask needed
        last_full = (i + 1) * block <= T
        assert bm.kind[i, i] == PARTIAL or not last_full
        assert np.all(bm.kind[i, i + 1 :] == SKIP)
        assert np.all(bm.kv_index[i, i + 1 :] == i)  # padding repeats the last block: no new DMA


def _pallas_calls(closed):
    """(grid, scalar-prefetch operand values) of every pallas_call in a closed jaxpr (recursively)."""
    found = []

    def walk(jaxpr, env):
        for e in jaxpr.eqns:
            if e.primitive.name == "pallas_call":
                gm = e.params["grid_mapping"]
                vals = [
                    np.asarray(v.val) if hasattr(v, "val") else np.asarray(env[v])
                    for v in e.invars[: gm.num_index_operands]
                ]
                found.append((tuple(gm.grid), vals))
            for p in e.params.values():
                if isinstance(p, jax.extend.core.ClosedJaxpr):
                    inner = dict(zip(p.jaxpr.constvars, p.consts))
                    for ov, iv in zip(e.invars, p.jaxpr.invars):
                        if hasattr(ov, "val"):
                            inner[iv] = ov.val
                        elif ov in env:
                            inner[iv] = env[ov]
                    walk(p.jaxpr, inner)

    walk(closed.jaxpr, dict(zip(closed.jaxpr.constvars, closed.consts)))
    return found


@pytest.mark.parametrize("W", [128, None])
def test_kernels_launch_with_the_block_map(W):
    """The forward, dq and dk/dv pallas_calls at gpt-oss shapes: grids are (B, K, q blocks, max visits)
    and (B, K, KV blocks, max visitors), and their scalar-prefetched visit lists are exactly
    `attention_block_map` (and its transpose)."""
    B, T, N, K, H = 1, 8192, 64, 8, 64
    args = [
        jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16),
        jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16),
        jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16),
        jax.ShapeDtypeStruct((N,), jnp.float32),
    ]
    loss = lambda q, k, v, s: jnp.sum(at.attention(q, k, v, s, sliding_window=W).astype(jnp.float32))
    calls = _pallas_calls(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args))
    assert len(calls) == 3  # forward, dq, dk/dv

    bm = attention_block_map(T, block_q=128, block_k=128, sliding_window=W)
    nq = nk = T // 128
    width = 2 if W == 128 else nq  # ceil((W-1)/128)+1 for the sliding layer, the triangle otherwise
    assert bm.kv_index.shape == (nq, width)
    fwd_like = [c for c in calls if np.array_equal(c[1][0], bm.kv_index.reshape(-1))]
    assert len(fwd_like) == 2  # forward and dq
    for grid, (_, kind) in fwd_like:
        assert grid == (B, K, nq, width)
        np.testing.assert_array_equal(kind, bm.kind.reshape(-1))
    ((grid, (q_index, q_kind)),) = [c for c in calls if not any(c is f for f in fwd_like)]
    # Transposed map: KV block j is visited by the query blocks i whose list contains j, with the same kind.
    pairs = {(i, int(bm.kv_index[i, n])): int(bm.kind[i, n]) for i in range(nq) for n in range(bm.num_visits[i])}
    q_index, q_kind = q_index.reshape(nk, -1), q_kind.reshape(nk, -1)
    assert grid == (B, K, nk, q_index.shape[1])
    seen = {
        (int(q_index[j, n]), j): int(q_kind[j, n])
        for j in range(nk)
        for n in range(q_index.shape[1])
        if q_kind[j, n] != SKIP
    }
    assert seen == pairs
    assert q_index.shape[1] == (2 if W == 128 else nk)
    assert int(np.sum(q_kind != SKIP)) == bm.total_visits


# ---------------------------------------------------------------------------------------------
# Lowering for the real target at gpt-oss shapes (lower only; Mosaic verifies the kernels)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("segmented", [False, True], ids=["noseg", "seg"])
@pytest.mark.parametrize("W", [128, None], ids=["sliding128", "full"])
def test_lowers_for_tpu_at_gpt_oss_shapes(W, segmented):
    B, T, N, K, H = 1, 8192, 64, 8, 64
    args = [
        jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16),
        jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16),
        jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16),
        jax.ShapeDtypeStruct((N,), jnp.float32),
    ]
    if segmented:
        args.append(jax.ShapeDtypeStruct((B, T), jnp.int32))

    def f(q, k, v, s, seg=None):
        return at.attention(q, k, v, s, sliding_window=W, segment_ids=seg)

    def loss(q, k, v, s, seg=None):
        return jnp.sum(f(q, k, v, s, seg).astype(jnp.float32))

    fwd = jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert fwd.count("tpu_custom_call") == 1
    assert bwd.count("tpu_custom_call") == 3  # forward (residuals), dq, dk/dv


def test_lowering_rejects_untiled_blocks():
    q, k, v, sinks, _ = make_inputs(1, 64, 1, 1)
    with pytest.raises(ValueError, match="multiple of 128"):
        at.attention(q, k, v, sinks, block_sizes=BlockSizes(64, 128))
