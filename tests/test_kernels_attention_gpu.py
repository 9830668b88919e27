"""Pallas-Triton attention (`gptoss_jax.kernels.attention_gpu`): parity with `attention_reference`
in interpret mode on CPU (forward and every gradient), the block maps it consumes, and lowering of
forward and backward to Triton for cuda at real gpt-oss shapes (lower only: no GPU here)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax.attention import attend, attention_mask
from gptoss_jax.kernels import attention_gpu as ag
from gptoss_jax.kernels.attention import (
    FULL,
    PARTIAL,
    SKIP,
    BlockSizes,
    attention,
    attention_block_map,
    attention_reference,
    transpose_block_map,
)
from tests.factory import rel_err


def _inputs(B, T, N, K, H, dtype=jnp.float32, seed=0, sink_shift=0.0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k = rng.normal(size=(B, T, K, H)).astype(np.float32)
    v = rng.normal(size=(B, T, K, H)).astype(np.float32)
    s = (rng.normal(size=(N,)) + sink_shift).astype(np.float32)
    ct = rng.normal(size=(B, T, N, H)).astype(np.float32)  # the output cotangent dO
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(s), jnp.asarray(ct))


def _segments(B, T, starts):
    """Row b's segment id increments at each position of starts[b] (chosen mid-block)."""
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        for p in starts[b]:
            seg[b, p:] += 1
    return jnp.asarray(seg)


# (window, G, T, segment starts per batch row or None, block sizes or None for the default).
# Every window {None, 128, 5, 1}, group {8, 1}, T {1, 37, 256, 300}, with and without segments;
# segment starts (20, 70, 100, 201...) are inside blocks, not on block edges.
CASES = [
    pytest.param(None, 8, 256, None, None, id="full-G8-T256"),
    pytest.param(128, 8, 300, [[70], [201, 250]], None, id="W128-G8-T300-seg"),
    pytest.param(128, 1, 300, None, BlockSizes(64, 64), id="W128-G1-T300-b64"),
    pytest.param(5, 1, 37, [[20], [3, 30]], BlockSizes(16, 16), id="W5-G1-T37-seg-b16"),
    pytest.param(1, 8, 37, None, BlockSizes(16, 16), id="W1-G8-T37-b16"),
    pytest.param(None, 1, 300, [[100], [7, 150]], BlockSizes(32, 64), id="full-G1-T300-seg-bq32-bk64"),
    pytest.param(None, 1, 1, None, None, id="full-G1-T1"),
    pytest.param(5, 8, 1, [[], []], None, id="W5-G8-T1-seg"),
    pytest.param(None, 3, 37, [[20], []], BlockSizes(16, 16), id="full-G3(padded heads)-T37-seg"),
]


@pytest.mark.parametrize("window,G,T,starts,bs", CASES)
def test_forward_and_gradients_fp32(window, G, T, starts, bs):
    B, K, H = 2, (1 if G == 8 else 2), 32
    N = K * G
    q, k, v, s, ct = _inputs(B, T, N, K, H, seed=T + G)
    seg = None if starts is None else _segments(B, T, starts)

    def kern(q, k, v, s):
        return ag.attention(q, k, v, s, sliding_window=window, segment_ids=seg, interpret=True, block_sizes=bs)

    def ref(q, k, v, s):
        return attention_reference(q, k, v, s, sliding_window=window, segment_ids=seg)

    out, vjp = jax.vjp(kern, q, k, v, s)
    out_r, vjp_r = jax.vjp(ref, q, k, v, s)
    assert rel_err(out, out_r) <= 1e-5
    for name, g, g_r in zip(("dq", "dk", "dv", "dsinks"), vjp(ct), vjp_r(ct)):
        assert g.shape == g_r.shape and g.dtype == g_r.dtype, name
        assert rel_err(g, g_r) <= 1e-4, (name, rel_err(g, g_r))


@pytest.mark.parametrize(
    "window,G,T,starts", [(128, 8, 300, [[70], [201, 250]]), (None, 1, 37, None), (5, 8, 256, [[100], []])]
)
def test_forward_bf16(window, G, T, starts):
    B, K, H = 2, 1, 64
    N = K * G
    q, k, v, s, _ = _inputs(B, T, N, K, H, dtype=jnp.bfloat16, seed=1)
    seg = None if starts is None else _segments(B, T, starts)
    out = ag.attention(q, k, v, s, sliding_window=window, segment_ids=seg, interpret=True)
    ref = attention_reference(q, k, v, s, sliding_window=window, segment_ids=seg)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, ref) <= 2e-2


def test_dispatch_reaches_kernel():
    """`kernels.attention(implementation="pallas_gpu")` is this kernel, with sm_scale honoured."""
    q, k, v, s, _ = _inputs(1, 37, 4, 2, 16, seed=3)
    a = attention(
        q,
        k,
        v,
        s,
        sliding_window=5,
        sm_scale=0.3,
        implementation="pallas_gpu",
        interpret=True,
        block_sizes=BlockSizes(16, 16),
    )
    b = attention_reference(q, k, v, s, sliding_window=5, sm_scale=0.3)
    assert rel_err(a, b) <= 1e-5


def test_dsinks_formula():
    """The derivation the backward uses: dsinks[n] = -sum_rows(p_sink * D), D = sum(dO * O),
    checked against autodiff of the reference (independent of the kernel)."""
    B, T, N, K, H = 2, 37, 4, 2, 16
    q, k, v, s, ct = _inputs(B, T, N, K, H, seed=5)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    seg = _segments(B, T, [[20], []])
    mask = attention_mask(pos, pos, seg, seg, window=5)
    out, sink_mass = attend(q, k, v, s, mask)  # sink_mass = p_sink = exp(sink - lse)
    d = jnp.sum(ct * out, axis=-1)  # [B, T, N]
    formula = -jnp.sum(sink_mass * d, axis=(0, 1))
    _, vjp = jax.vjp(lambda s: attend(q, k, v, s, mask)[0], s)
    assert rel_err(formula, vjp(ct)[0]) <= 1e-5


def test_fully_masked_rows_output_zero():
    """In self-attention every real token sees itself (j = i, same segment, 0 < W), so no real row
    is fully masked. Inside the kernel such rows do exist: padded query rows (T=37 -> 48) whose
    window holds only padded keys (W=1), or whose segment (-1) no real key has. The kernel must give
    them exactly 0 and lse == sink (the sink takes all the mass) rather than NaN."""
    B, T, N, K, H = 1, 37, 4, 2, 16
    q, k, v, s, _ = _inputs(B, T, N, K, H, seed=7)
    for window, seg in ((1, None), (None, jnp.zeros((B, T), jnp.int32))):
        cfg = ag._config(
            q, k, seg, sliding_window=window, sm_scale=None, interpret=True, block_sizes=BlockSizes(16, 16)
        )
        assert cfg.Tp == 48
        o, lse = ag._forward(*ag._pad_in(q, k, v, s, seg, cfg), cfg)
        o, lse = np.asarray(o), np.asarray(lse)
        assert np.all(np.isfinite(o[:, :T])) and np.all(o[:, T:] == 0.0)
        np.testing.assert_array_equal(lse[:, T:], np.broadcast_to(np.asarray(s), lse[:, T:].shape))
        assert np.all(lse[:, :T] > np.asarray(s))  # real rows see at least themselves


def test_sink_only_limit():
    """The sink-only limit on real rows: a huge sink takes (numerically) all the mass, so out -> 0
    and every gradient -> 0, in agreement with the reference (which does the same at +60)."""
    B, T, N, K, H = 1, 37, 4, 2, 16
    q, k, v, s, ct = _inputs(B, T, N, K, H, seed=8, sink_shift=60.0)
    f = lambda q, k, v, s: ag.attention(q, k, v, s, sliding_window=5, interpret=True, block_sizes=BlockSizes(16, 16))
    out, vjp = jax.vjp(f, q, k, v, s)
    out_r, vjp_r = jax.vjp(lambda *a: attention_reference(*a, sliding_window=5), q, k, v, s)
    assert np.max(np.abs(np.asarray(out))) < 1e-15
    assert np.max(np.abs(np.asarray(out) - np.asarray(out_r))) < 1e-15
    for g, g_r in zip(vjp(ct), vjp_r(ct)):
        assert np.all(np.isfinite(np.asarray(g)))
        assert np.max(np.abs(np.asarray(g) - np.asarray(g_r))) < 1e-12


# ------------------------------------------------------------------------------------------------
# Block maps and what the kernel consumes
# ------------------------------------------------------------------------------------------------


def _brute_force_visits(T, bq, bk, window):
    """From the dense mask: per query block, {kv block: FULL/PARTIAL} for blocks holding any visible
    pair; FULL iff every (real query, real key) pair is visible and the block is not past T."""
    pos = np.arange(T)
    m = pos[None, :] <= pos[:, None]
    if window is not None:
        m &= (pos[:, None] - pos[None, :]) < window
    out = []
    for i in range(math.ceil(T / bq)):
        row = {}
        for j in range(math.ceil(T / bk)):
            tile = m[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
            if tile.any():
                row[j] = FULL if tile.all() and (j + 1) * bk <= T else PARTIAL
        out.append(row)
    return out


@pytest.mark.parametrize(
    "T,bq,bk,window",
    [
        (300, 16, 16, 5),
        (300, 64, 64, 128),
        (257, 32, 32, None),
        (300, 16, 64, 128),
        (37, 16, 16, 1),
        (8192, 64, 64, 128),
    ],
)
def test_block_map_matches_mask(T, bq, bk, window):
    bm = attention_block_map(T, block_q=bq, block_k=bk, sliding_window=window)
    if T <= 300:
        for i, row in enumerate(_brute_force_visits(T, bq, bk, window)):
            n = bm.num_visits[i]
            assert dict(zip(bm.kv_index[i, :n].tolist(), bm.kind[i, :n].tolist())) == row
            assert np.all(bm.kind[i, n:] == SKIP)
    if bq == bk and window is not None:
        bound = math.ceil((window - 1) / bk) + 1
        assert bm.num_visits.max() <= bound
        if T >= 2 * window + bk:
            assert bm.num_visits.max() == bound  # the bound is reached, not just respected
    if bq == bk and window is None:
        assert bm.num_visits.tolist() == [i + 1 for i in range(math.ceil(T / bq))]  # causal triangle


def test_block_map_counts_at_gpt_oss_shape():
    """T=8192, 64x64 tiles: a sliding layer (W=128) visits 3 = ceil(127/64)+1 KV blocks per query
    block (2 on the first two), a full layer the causal triangle."""
    sliding = attention_block_map(8192, block_q=64, block_k=64, sliding_window=128)
    assert sliding.num_visits.tolist() == [1, 2] + [3] * 126
    full = attention_block_map(8192, block_q=64, block_k=64)
    assert full.total_visits == 128 * 129 // 2


@pytest.mark.parametrize("T,bq,bk,window", [(300, 16, 64, 128), (300, 32, 32, None), (37, 16, 16, 5)])
def test_transposed_block_map(T, bq, bk, window):
    bm = attention_block_map(T, block_q=bq, block_k=bk, sliding_window=window)
    tm = transpose_block_map(bm)
    fwd = {
        (i, int(bm.kv_index[i, n])): int(bm.kind[i, n])
        for i in range(len(bm.num_visits))
        for n in range(bm.num_visits[i])
    }
    bwd = [
        (int(tm.kv_index[j, n]), j, int(tm.kind[j, n]))
        for j in range(len(tm.num_visits))
        for n in range(tm.num_visits[j])
    ]
    assert len(bwd) == len(fwd) == bm.total_visits == tm.total_visits  # each pair exactly once
    assert {(i, j): kd for i, j, kd in bwd} == fwd
    assert len(tm.num_visits) == math.ceil(T / bk)


@pytest.mark.parametrize(
    "window,G,T,bs,expect_bounds",
    [
        (128, 8, 300, None, None),  # the default (16-token, 64-key) tiles
        (128, 1, 300, BlockSizes(64, 64), [1, 2, 3, 3, 3]),  # ceil(127/64)+1 = 3
        (None, 1, 256, BlockSizes(32, 32), list(range(1, 9))),  # causal triangle
    ],
)
def test_kernel_consumes_block_map(window, G, T, bs, expect_bounds):
    """The forward kernel's own counters: each program processes exactly num_visits[i] KV tiles of
    its query block, of which exactly the FULL ones take the mask-free branch."""
    B, K, H = 2, 1, 16
    q, k, v, s, _ = _inputs(B, T, K * G, K, H, seed=11)
    out, visits, full, bm = ag.forward_visit_counts(q, k, v, s, sliding_window=window, interpret=True, block_sizes=bs)
    assert visits.shape == (B, K, len(bm.num_visits))
    np.testing.assert_array_equal(visits, np.broadcast_to(bm.num_visits, visits.shape))
    n_full = np.array([(bm.kind[i, : bm.num_visits[i]] == FULL).sum() for i in range(len(bm.num_visits))])
    np.testing.assert_array_equal(full, np.broadcast_to(n_full, full.shape))
    assert n_full.sum() > 0 and visits.sum() == B * K * bm.total_visits
    if expect_bounds is not None:
        assert bm.num_visits.tolist() == expect_bounds
    else:  # default tiles for G=8: 16 query tokens (128 rows) x 64 keys
        assert (bm.block_q, bm.block_k) == (16, 64)
    ref = attention_reference(q, k, v, s, sliding_window=window)
    assert rel_err(out, ref) <= 1e-5


# ------------------------------------------------------------------------------------------------
# Lowering to Triton for cuda at gpt-oss shapes (no execution)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [128, None])
def test_lowers_to_triton_for_cuda(window, verified_triton_modules):
    B, T, N, K, H = 1, 8192, 64, 8, 64
    sds = jax.ShapeDtypeStruct
    args = (
        sds((B, T, N, H), jnp.bfloat16),
        sds((B, T, K, H), jnp.bfloat16),
        sds((B, T, K, H), jnp.bfloat16),
        sds((N,), jnp.float32),
    )

    def f(q, k, v, s):
        return ag.attention(q, k, v, s, sliding_window=window)

    def loss(q, k, v, s):
        return jnp.sum(f(q, k, v, s).astype(jnp.float32))

    fwd = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert fwd.count("__gpu$xla.gpu.triton") == 1 and "mosaic_gpu" not in fwd
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert bwd.count("__gpu$xla.gpu.triton") == 3 and "mosaic_gpu" not in bwd  # fwd, dq, dk/dv
    assert verified_triton_modules == [True] * 4


def test_lowering_check_has_teeth():
    """Control for the test above: head_dim 48 gives non-power-of-two tiles, which the Triton
    lowering rejects; so a successful lowering is evidence, not a formality."""
    sds = jax.ShapeDtypeStruct
    args = (
        sds((1, 256, 8, 48), jnp.bfloat16),
        sds((1, 256, 1, 48), jnp.bfloat16),
        sds((1, 256, 1, 48), jnp.bfloat16),
        sds((8,), jnp.float32),
    )
    with pytest.raises(ValueError, match="power of 2"):
        jax.jit(lambda *a: ag.attention(*a, sliding_window=128)).trace(*args).lower(lowering_platforms=("cuda",))
