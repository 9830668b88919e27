"""The native CPU matrix-vector kernels (`gptoss_jax.cpu_matvec`) against NumPy in float64 on the
weights' exact values: bf16 decoded by ml_dtypes, MXFP4 by ml_dtypes' float4_e2m1fn and
float8_e8m0fnu (the OCP formats; the spec's byte order: low nibble first). Shapes cross every
edge of the kernels' tiling (row blocks of 8 and 4, column tiles of 256 and strips of 64/32/16, 64
(dense) output rows per work item and packed runs of 16 rows or more, inputs not a multiple of
16), rows share and skip matrices.
Tolerance: fp32 sums of the exact products, |error| <= 1e-5 * sum |x w| per output."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import gptoss_jax as gj
from gptoss_jax import cpu_matvec, moe, mxfp4
from gptoss_jax.plan import KernelOptions

# Skipped only where the kernels cannot exist (no C++ compiler, an unsupported platform, or
# GPTOSS_NATIVE=0); a build or load that fails where a compiler is present fails every test here.
_REASON = cpu_matvec.unavailable_reason()
pytestmark = pytest.mark.skipif(
    _REASON is not None and _REASON.startswith(("no C++ compiler", "not built for", "turned off")),
    reason=f"native kernels: {_REASON}",
)

RTOL = 1e-5


def close(y, x64, w64, ids, out_in):
    """|y - exact| <= RTOL * sum |x w| per output; w64 [E, O, I] if out_in else [E, I, O]."""
    ws = w64[ids] if out_in else np.swapaxes(w64[ids], 1, 2)  # [R, O, I]
    exact = np.einsum("ROI,RI->RO", ws, x64)
    scale = np.einsum("ROI,RI->RO", np.abs(ws), np.abs(x64)) + 1e-30
    err = np.abs(np.asarray(y, np.float64) - exact) / scale
    return float(err.max())


@pytest.mark.parametrize("out_in", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("R", [1, 2, 3, 7, 9])
@pytest.mark.parametrize("inputs", ["fp32", "bf16"])  # bf16 values x bf16 weights: the AVX512-BF16 path
def test_dense_matvec_against_numpy(out_in, dtype, R, inputs):
    rng = np.random.default_rng(R)
    # I: 3 chunks of 64 input rows + 11 (pairs of rows and a lone last one; a 32-word tail of the
    # [O, I] dot); O: 10 groups of 32 columns + 13, one 256-column tile
    E, I, O = 3, 203, 333
    w = rng.standard_normal((E, O, I) if out_in else (E, I, O)).astype(np.float32)
    wq = w.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else w
    w64 = wq.astype(np.float64)
    x = rng.standard_normal((R, I)).astype(np.float32)
    if inputs == "bf16":
        x = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    ids = rng.integers(0, E - 1, R).astype(np.int32)  # the last matrix is never chosen
    if R == 7:  # every row through one matrix (a batch through a projection): blocks of 4 + 3 rows
        ids[:] = 1
    y = jax.jit(lambda x, w, i: cpu_matvec.matvec(x, w, i, out_in=out_in))(x, jnp.asarray(wq), ids)
    assert y.dtype == jnp.float32 and y.shape == (R, O)
    assert close(y, x.astype(np.float64), w64, ids, out_in) < RTOL
    # control: the same check sees a matrix read at the wrong id
    assert close(y, x.astype(np.float64), w64, (ids + 1) % E, out_in) > 1e-2


def test_single_matrix_and_einsum_layouts():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    w = rng.standard_normal((64, 40)).astype(np.float32)
    np.testing.assert_allclose(cpu_matvec.matvec(x, w), x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cpu_matvec.matvec(x, w.T.copy(), out_in=True), x @ w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_matvec.matvec(x, w.T.copy())
    with pytest.raises(ValueError, match="bf16 or fp32"):
        cpu_matvec.matvec(x, w.astype(np.float16))


def oracle_mxfp4(blocks, scales):
    """[E, O, G, 16] bytes + [E, O, G] e8m0 -> float64 [E, O, G*32] by ml_dtypes' formats."""
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)  # low nibble first
    vals = np.asarray(codes, np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float64)
    scale = scales.view(ml_dtypes.float8_e8m0fnu).astype(np.float64)
    return (vals * scale[..., None]).reshape(*blocks.shape[:-2], -1)


@pytest.mark.parametrize("inputs", ["fp32", "bf16"])  # bf16 values take the AVX512-BF16 path where built
@pytest.mark.parametrize("R", [1, 2, 3, 4, 5, 12, 17])
@pytest.mark.parametrize("O", [37, 300])
def test_mxfp4_matvec_against_ml_dtypes(R, inputs, O):
    rng = np.random.default_rng(10 + R)
    # O = 37: two 16-row work items and a tail; O = 300: items of 48 rows or more (runs of rows
    # sized to the work) and a tail; G odd: the bf16 path's tail block
    E, G = 5, 7
    blocks = rng.integers(0, 256, (E, O, G, 16), dtype=np.uint8)
    scales = rng.integers(118, 136, (E, O, G), dtype=np.uint8)
    t = mxfp4.MXFP4(jnp.asarray(blocks), jnp.asarray(scales))
    x = rng.standard_normal((R, G * 32)).astype(np.float32)
    if inputs == "bf16":
        x = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    ids = rng.integers(0, 3, R).astype(np.int32)  # repeated ids: rows share a matrix
    y = jax.jit(lambda x, t, i: cpu_matvec.mxfp4_matvec(x, t, i))(x, t, ids)
    w64 = oracle_mxfp4(blocks, scales)  # [E, O, I]
    assert close(y, x.astype(np.float64), w64, ids, True) < RTOL
    # control: nibbles read high first would be caught
    swapped = oracle_mxfp4(((blocks & 0x0F) << 4) | (blocks >> 4), scales)
    assert close(y, x.astype(np.float64), swapped, ids, True) > 1e-2


def test_cpu_specific_paths_are_built_where_the_cpu_has_them():
    """-march=native defines __AVX512BF16__ / __AVX512F__ where the CPU has them, so a skip below
    (no bf16 dot, no fp32 grouped matmul) can only mean the CPU lacks the instructions."""
    from gptoss_jax.bench.peaks import cpu_info

    isa = cpu_info()["isa"]
    if "avx512_bf16" in isa:
        assert cpu_matvec.has_bf16_dot()
    if "avx512f" in isa:
        assert cpu_matvec.has_grouped_f32()
    if {"avx512f", "avx512bw", "avx512vl"} <= set(isa):
        assert cpu_matvec.has_shared_rows()


def test_ids_out_of_range_fail_the_call():
    x = np.ones((2, 32), np.float32)
    w = np.ones((3, 32, 8), np.float32)
    with pytest.raises(Exception, match="out of range"):
        jax.block_until_ready(cpu_matvec.matvec(x, w, np.array([0, 3], np.int32)))


def test_gradients_match_einsum():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 48)).astype(np.float32)
    w = rng.standard_normal((4, 48, 20)).astype(np.float32)
    ids = np.array([1, 3, 1], np.int32)
    c = rng.standard_normal((3, 20)).astype(np.float32)
    f_native = lambda x, w: jnp.sum(cpu_matvec.matvec(x, w, ids) * c)
    f_ref = lambda x, w: jnp.sum(jnp.einsum("RI,RIO->RO", x, w[ids]) * c)
    for a, b in zip(jax.grad(f_native, (0, 1))(x, w), jax.grad(f_ref, (0, 1))(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    blocks = rng.integers(0, 256, (2, 6, 2, 16), dtype=np.uint8)
    scales = np.full((2, 6, 2), 127, np.uint8)
    t = mxfp4.MXFP4(jnp.asarray(blocks), jnp.asarray(scales))
    xq = rng.standard_normal((2, 64)).astype(np.float32)
    qids = np.array([1, 0], np.int32)
    wd = t.dequantize(jnp.float32)
    g_native = jax.grad(lambda x: jnp.sum(cpu_matvec.mxfp4_matvec(x, t, qids) ** 2))(xq)
    g_ref = jax.grad(lambda x: jnp.sum(jnp.einsum("RI,ROI->RO", x, wd[qids]) ** 2))(xq)
    np.testing.assert_allclose(g_native, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("experts", ["dense", "mxfp4"])
def test_model_decode_with_and_without_native_kernels(experts, dtype):
    """The plan turns the kernels on for few-row CPU calls; a one-token step's logits agree with
    XLA's code (fp32: to fp32 summation order; bf16: the activations round to bf16 between the
    layers, so the two orders may round a value differently: 2 bf16 ulps of the largest logit),
    and fp32 greedy decoding of 2 and of 8 rows emits the same tokens."""
    # the uncached one-token forward's attention on XLA's path on both sides (the native kernel's
    # own model test: test_model_prefill_through_native_attention)
    model = gj.init(gj.tiny(), seed=0, experts=experts, dtype=dtype, kernel=KernelOptions(attention_impl="xla"))
    xla = gj.init(gj.tiny(), seed=0, experts=experts, dtype=dtype)
    xla.kernel = dataclasses.replace(xla.kernel, cpu_matvec=False)
    assert model.plan(1).native_rows > 0 and xla.plan(1).native_rows == 0
    tok = jnp.array([[5, 17, 3]])
    a = np.asarray(model(tok[:, :1]).logits, np.float32)
    b = np.asarray(xla(tok[:, :1]).logits, np.float32)
    tol = 1e-5 if dtype == "float32" else 2 * 2.0**-8
    assert np.abs(a - b).max() <= tol * np.abs(b).max()
    if dtype == "float32":
        # batch 8: 16 (token, slot) rows for 8 experts; dense and (small) packed experts take the
        # native gather path (XLA's side: buckets) and 8 rows share each load of the projections
        # where built
        assert model.plan(8).moe == "gather" and xla.plan(8).moe == "buckets"
        for prompts in ([[1, 2, 3, 4], [9, 8]], [[1 + i, 2 * i, 7] for i in range(8)]):
            ga = gj.generate(model, None, prompts, max_new_tokens=12, temperature=0, stop_tokens=())
            gb = gj.generate(xla, None, prompts, max_new_tokens=12, temperature=0, stop_tokens=())
            assert ga.tokens == gb.tokens


def grouped_built(dtype: str) -> bool:
    """Where the kernels exist, whether grouped_matmul takes `dtype` on this CPU."""
    return _REASON is None and (cpu_matvec.has_bf16_dot() if dtype == "bfloat16" else cpu_matvec.has_grouped_f32())


def skip_unless_grouped(dtype: str):
    if _REASON is None and not grouped_built(dtype):
        pytest.skip(f"this CPU lacks grouped_matmul's {dtype} path (bf16: AVX512-BF16, fp32: AVX-512F)")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("I", [203, 64])  # odd: the last input pairs with zeros (bf16)
def test_grouped_matmul_against_numpy(I, dtype):
    """Each expert's rows through its matrix; empty groups, a gap of rows no group owns (zeros),
    groups in any order, row tiles of 8 with tails, 32-column tiles with a tail (O = 333)."""
    skip_unless_grouped(dtype)
    rng = np.random.default_rng(I)
    E, O, R = 5, 333, 80
    cast = (lambda a: a.astype(ml_dtypes.bfloat16)) if dtype == "bfloat16" else (lambda a: a.astype(np.float32))
    w = cast(rng.standard_normal((E, I, O)))
    x = cast(rng.standard_normal((R, I)))
    starts = np.array([0, 3, 45, 25, 5], np.int32)  # rows 3-4 in no group (expert 1 is empty)
    sizes = np.array([3, 0, 35, 8, 17], np.int32)
    y = np.asarray(jax.jit(cpu_matvec.grouped_matmul)(jnp.asarray(x), jnp.asarray(w), starts, sizes), np.float64)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    ids = np.full(R, -1)
    for e in range(E):
        ids[starts[e] : starts[e] + sizes[e]] = e
    mine = ids >= 0
    assert not y[~mine].any()  # rows outside every group are zeros
    assert close(y[mine], x64[mine], np.swapaxes(w64, 1, 2), ids[mine], True) < RTOL
    # control: the same check sees rows multiplied by a neighbouring expert's matrix
    assert close(y[mine], x64[mine], np.swapaxes(w64, 1, 2), (ids[mine] + 1) % E, True) > 1e-2


def test_grouped_matmul_refuses_bad_groups():
    skip_unless_grouped("bfloat16")
    x, w = jnp.zeros((8, 4), jnp.bfloat16), jnp.zeros((2, 4, 3), jnp.bfloat16)
    with pytest.raises(Exception, match="outside x"):
        jax.block_until_ready(cpu_matvec.grouped_matmul(x, w, np.array([0, 6]), np.array([2, 3])))
    with pytest.raises(Exception, match="overlap"):
        jax.block_until_ready(cpu_matvec.grouped_matmul(x, w, np.array([0, 1]), np.array([2, 3])))
    with pytest.raises(ValueError, match="both bf16 or both fp32"):
        cpu_matvec.grouped_matmul(x.astype(jnp.float32), w, np.array([0, 2]), np.array([2, 3]))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_model_prefill_moe_through_grouped_matmul(dtype):
    """A prefill long enough for the chunked MoE runs its experts through grouped_matmul
    (checked by counting the custom calls in the compiled program) and agrees with XLA's chunk
    loop (bf16: to 2 bf16 ulps of the largest logit; fp32: 1e-5 of it, the sums' order); under
    differentiation the loop runs (gradients equal with and without the kernels)."""
    skip_unless_grouped(dtype)
    cfg = gj.tiny()
    # attention on XLA's path on both sides: in bf16 the native kernel's fp32 probabilities move
    # the router's inputs by bf16 roundings, enough to flip near-tied expert choices of a random model
    model = gj.init(cfg, seed=0, experts="dense", dtype=dtype, kernel=KernelOptions(attention_impl="xla"))
    xla = gj.init(cfg, seed=0, experts="dense", dtype=dtype)
    xla.kernel = dataclasses.replace(xla.kernel, cpu_matvec=False)
    for i in range(cfg.num_layers):  # biases start at zero; random ones show they reach their rows
        for m in (model, xla):
            for name in ("b1", "b2"):
                b = getattr(m.layers[i].mlp, name)
                b[...] = jnp.asarray(np.random.default_rng(10 * i + len(name)).standard_normal(b.shape), b.dtype)
    T = 16 * cfg.num_experts  # rows >= 16 per expert: the chunked MoE
    assert model.plan(T).moe == "chunks"
    tok = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, T)))
    hlo = jax.jit(lambda t: model(t).logits).lower(tok).as_text()
    assert hlo.count("gptoss_grouped_matmul") == 2 * cfg.num_layers
    assert "gptoss_grouped_matmul" not in jax.jit(lambda t: xla(t).logits).lower(tok).as_text()
    a = np.asarray(model(tok).logits, np.float32)
    b = np.asarray(xla(tok).logits, np.float32)
    assert np.abs(a - b).max() <= (2 * 2.0**-8 if dtype == "bfloat16" else 1e-5) * np.abs(b).max()
    # differentiated, the chunk loop's own VJP runs: the same gradients with the kernels on
    mlp = model.layers[0].mlp
    ew = mlp.expert_weights()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((T, cfg.d_model)), dtype)
    routing = moe.route(x, mlp.router[...], mlp.router_bias[...], mlp.k)

    def loss(x, native):
        y = moe.moe_chunks(x, ew, routing, alpha=mlp.alpha, limit=mlp.limit, native=native)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    assert "gptoss_grouped_matmul" in jax.jit(lambda x: loss(x, True)).lower(x).as_text()
    g_native = np.asarray(jax.grad(loss)(x, True), np.float32)
    g_loop = np.asarray(jax.grad(loss)(x, False), np.float32)
    np.testing.assert_array_equal(g_native, g_loop)


def test_required_kernels_refuse_a_sharded_or_other_platform_plan():
    with pytest.raises(ValueError, match="unsharded model on the CPU"):
        KernelOptions(cpu_matvec=True, platform="gpu").resolve(None, tokens=1, num_experts=4, k=2)
    assert KernelOptions(platform="gpu").resolve(None, tokens=1, num_experts=4, k=2).native_rows == 0


def test_build_failure_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTOSS_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(cpu_matvec.NativeUnavailable, match="compiling matvec.cc failed"):
        cpu_matvec.build(force=True)


# ------------------------------------------------------------------------- decode attention
def attention_oracle(q, k, v, sinks, k_pos, q_pos, window, scale):
    """NumPy float64: softmax over the visible keys' scores and the sink logit, per query head."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, N, H = q.shape
    G = N // k.shape[2]
    out, mass = np.zeros((B, N, H)), np.zeros((B, N))
    for b in range(B):
        vis = (k_pos[b] >= 0) & (k_pos[b] <= q_pos[b])
        if window:
            vis &= q_pos[b] - k_pos[b] < window
        for n in range(N):
            logits = np.append(k[b, vis, n // G] @ q[b, n] * scale, sinks[n])
            p = np.exp(logits - logits.max())
            p /= p.sum()
            out[b, n], mass[b, n] = p[:-1] @ v[b, vis, n // G], p[-1]
    return out, mass


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(
    "N, K, H, S, window",
    [
        (8, 2, 64, 37, None),  # 4 query heads per KV head (half the lanes)
        (16, 2, 64, 200, None),  # 8 per KV head; keys in several chunks
        (12, 1, 40, 131, 16),  # 12 per KV head (two blocks of lanes); H not a multiple of 8; window
        (6, 3, 24, 9, 3),
    ],
)
def test_decode_attention_against_numpy(N, K, H, S, window, dtype):
    """Rows with empty slots, keys in any slot order, windows, and one row whose query precedes
    every key (all mass to the sink). Tolerance: 1e-5 of max |v| for the outputs (a convex
    combination of v's rows), 1e-6 for the sink mass; fp32 products, sums and exp."""
    rng = np.random.default_rng(S)
    B = 3
    q = (2 * rng.standard_normal((B, N, H))).astype(np.float32)
    k = rng.standard_normal((B, S, K, H)).astype(getattr(ml_dtypes, dtype, np.float32))
    v = rng.standard_normal((B, S, K, H)).astype(k.dtype)
    sinks = rng.standard_normal(N).astype(np.float32)
    k_pos = np.stack([rng.permutation(S) for _ in range(B)]).astype(np.int32)
    k_pos[:, : S // 5] = -1  # empty slots
    q_pos = np.array([S - 1, S // 2, -1], np.int32)  # the last row sees no key
    out, mass = cpu_matvec.decode_attention(q, k, v, sinks, k_pos, q_pos, window=window)
    ref_out, ref_mass = attention_oracle(q, k, v, sinks, k_pos, q_pos, window, H**-0.5)
    tol = 1e-5 * np.abs(np.asarray(v, np.float32)).max()
    assert np.abs(np.asarray(out) - ref_out).max() <= tol
    assert np.abs(np.asarray(mass) - ref_mass).max() <= 1e-6
    np.testing.assert_array_equal(np.asarray(mass)[2], 1.0)
    # control: half the window (fewer keys in view) moves the result far beyond the tolerance
    narrower, _ = attention_oracle(q, k, v, sinks, k_pos, q_pos, (window or S) // 2, H**-0.5)
    assert np.abs(np.asarray(out) - narrower)[:2].max() > 100 * tol


def test_decode_attention_refuses_bad_inputs():
    q = np.zeros((1, 4, 8), np.float32)
    kv = np.zeros((1, 5, 2, 8), np.float32)
    pos, qp = np.zeros((1, 5), np.int32), np.zeros((1,), np.int32)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_matvec.decode_attention(q, kv[..., :4], kv[..., :4], np.zeros(4), pos, qp)
    with pytest.raises(ValueError, match="multiple"):
        cpu_matvec.decode_attention(q[:, :3], kv, kv, np.zeros(3), pos, qp)
    with pytest.raises(ValueError, match="window"):
        cpu_matvec.decode_attention(q, kv, kv, np.zeros(4), pos, qp, window=0)
    with pytest.raises(ValueError, match="bf16 or fp32"):
        cpu_matvec.decode_attention(q, kv.astype(np.float16), kv.astype(np.float16), np.zeros(4), pos, qp)


def test_decode_attention_gradients_match_attend():
    from gptoss_jax.attention import attend, attention_mask

    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 4, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, 9, 2, 16)).astype(np.float32) for _ in range(2))
    sinks = rng.standard_normal(4).astype(np.float32)
    k_pos = np.tile(np.arange(9, dtype=np.int32), (2, 1))
    q_pos = np.array([8, 4], np.int32)
    c = rng.standard_normal((2, 4, 16)).astype(np.float32)

    def ref(q, k, v, s):
        mask = attention_mask(q_pos[:, None], k_pos, np.ones((2, 1)), np.ones((2, 9)), window=4)
        out, mass = attend(q[:, None], k, v, s, mask)
        return jnp.sum(out[:, 0] * c) + jnp.sum(mass**2)

    def native(q, k, v, s):
        out, mass = cpu_matvec.decode_attention(q, k, v, s, k_pos, q_pos, window=4)
        return jnp.sum(out * c) + jnp.sum(mass**2)

    for a, b in zip(jax.grad(native, (0, 1, 2, 3))(q, k, v, sinks), jax.grad(ref, (0, 1, 2, 3))(q, k, v, sinks)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------- prefill attention (uncached)
needs_prefill = pytest.mark.skipif(
    cpu_matvec.available() and not cpu_matvec.has_prefill_attention(), reason="prefill_attention needs AVX-512F"
)


def self_attention_oracle(q, k, v, sinks, pos, seg, window):
    """NumPy float64: each token's softmax over the keys of its segment at positions <= its own
    (and within the window) and its head's sink logit."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, N, H = q.shape
    G = N // k.shape[2]
    out, mass = np.zeros((B, T, N, H)), np.zeros((B, T, N))
    for b in range(B):
        for t in range(T):
            vis = (seg[b] == seg[b, t]) & (pos[b] <= pos[b, t])
            if window:
                vis &= pos[b, t] - pos[b] < window
            for n in range(N):
                logits = np.append(k[b, vis, n // G] @ q[b, t, n] * H**-0.5, sinks[n])
                p = np.exp(logits - logits.max())
                p /= p.sum()
                out[b, t, n], mass[b, t, n] = p[:-1] @ v[b, vis, n // G], p[-1]
    return out, mass


@needs_prefill
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(
    "B, T, N, K, H, window, segments",
    [
        (1, 70, 8, 2, 64, None, None),  # 4 query heads per KV head; T across key blocks of 32, rows of 16
        (2, 45, 8, 1, 16, 8, None),  # 8 per KV head (query tiles of 8 and 6 with tails); a window
        (1, 100, 12, 4, 48, 33, [40, 27, 33]),  # packed segments; H = 48: three vectors of columns
        (2, 37, 4, 4, 32, None, [5, 20, 12]),  # one query head per KV head; short segments
    ],
)
def test_prefill_attention_against_numpy(B, T, N, K, H, window, segments, dtype):
    """The native self-attention against NumPy float64 on the same (bf16-valued) inputs. fp32:
    |error| <= 1e-5 * max |v| (the outputs are convex combinations of v's rows), 1e-6 for the sink
    mass. bf16 outputs are rounded to bf16 once: within half a bf16 ulp (2^-8 relative) of the
    exact value, plus the fp32 tolerance."""
    rng = np.random.default_rng(T)
    dt = getattr(ml_dtypes, dtype, np.float32)
    q = (2 * rng.standard_normal((B, T, N, H))).astype(dt)
    k, v = (rng.standard_normal((B, T, K, H)).astype(dt) for _ in range(2))
    sinks = (2 * rng.standard_normal(N)).astype(np.float32)
    if segments is None:
        pos, seg = np.tile(np.arange(T, dtype=np.int32), (B, 1)), np.ones((B, T), np.int32)
    else:
        seg = np.tile(np.repeat(np.arange(len(segments)), segments).astype(np.int32), (B, 1))
        pos = np.tile(np.concatenate([np.arange(n) for n in segments]).astype(np.int32), (B, 1))
    out, mass = cpu_matvec.prefill_attention(q, k, v, sinks, pos, seg, window=window)
    assert out.dtype == jnp.dtype(dtype) and out.shape == q.shape and mass.shape == (B, T, N)
    ref_out, ref_mass = self_attention_oracle(q, k, v, sinks, pos, seg, window)
    tol = 1e-5 * np.abs(np.asarray(v, np.float32)).max()
    err = np.abs(np.asarray(out, np.float64) - ref_out)
    assert (err <= tol + (2.0**-8 * np.abs(ref_out) if dtype == "bfloat16" else 0)).all(), err.max()
    assert np.abs(np.asarray(mass) - ref_mass).max() <= 1e-6
    # control: a window one key narrower (for full layers: one key shorter than the longest
    # segment) moves the result far outside the tolerance
    narrower, _ = self_attention_oracle(q, k, v, sinks, pos, seg, (window or max(segments or [T])) - 1)
    assert np.abs(np.asarray(out, np.float64) - narrower).max() > 100 * tol


@needs_prefill
def test_prefill_attention_refuses_bad_inputs():
    q, kv = np.zeros((1, 5, 4, 16), np.float32), np.zeros((1, 5, 2, 16), np.float32)
    pos, seg = np.zeros((1, 5), np.int32), np.ones((1, 5), np.int32)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_matvec.prefill_attention(q, kv[:, :4], kv[:, :4], np.zeros(4), pos, seg)
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_matvec.prefill_attention(q[..., :8], kv[..., :8], kv[..., :8], np.zeros(4), pos, seg)
    with pytest.raises(ValueError, match="heads"):
        cpu_matvec.prefill_attention(q[:, :, :3], kv, kv, np.zeros(3), pos, seg)
    with pytest.raises(ValueError, match="all bf16 or all fp32"):
        cpu_matvec.prefill_attention(q, kv.astype(ml_dtypes.bfloat16), kv, np.zeros(4), pos, seg)
    with pytest.raises(ValueError, match="window"):
        cpu_matvec.prefill_attention(q, kv, kv, np.zeros(4), pos, seg, window=0)


@needs_prefill
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_prefill_through_native_attention(dtype):
    """The CPU plan's default attention for an uncached forward is the native kernel (in the HLO),
    with logits equal to XLA's attention path (fp32: 1e-5 of the logits' scale; bf16: XLA rounds
    the probabilities to bf16, so 2 bf16 ulps of it; every expert on every token, so no routing
    choice flips on a rounding), on packed segments; gradients (which are
    XLA's path under differentiation, by the custom VJP) equal with and without it."""
    # every token to every expert: no discrete routing choice that a bf16 rounding could flip
    cfg = gj.tiny(experts_per_token=gj.tiny().num_experts)
    assert cfg.head_dim % 16 == 0
    native = gj.init(cfg, seed=3, dtype=dtype, experts="dense")
    xla = gj.init(cfg, seed=3, dtype=dtype, experts="dense", kernel=KernelOptions(attention_impl="xla"))
    assert native.plan(40).attention == "cpu_native" and xla.plan(40).attention == "xla"
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 40)), jnp.int32)
    seg = jnp.asarray(np.repeat([1, 2, 3], [17, 15, 8])[None].repeat(2, 0), jnp.int32)
    pos = jnp.asarray(np.concatenate([np.arange(17), np.arange(15), np.arange(8)])[None].repeat(2, 0), jnp.int32)
    fwd = lambda m: nnx.jit(lambda m, t: m(t, positions=pos, segment_ids=seg).logits)
    hlo = jax.jit(lambda t: native(t, positions=pos, segment_ids=seg).logits).lower(tokens).as_text()
    assert hlo.count("gptoss_prefill_attention") == cfg.num_layers
    a, b = np.asarray(fwd(native)(native, tokens), np.float32), np.asarray(fwd(xla)(xla, tokens), np.float32)
    scale = np.abs(b).max()
    assert np.abs(a - b).max() <= (1e-5 if dtype == "float32" else 2 * 2.0**-7) * scale
    if dtype == "float32":
        loss = lambda m: jnp.mean(m(tokens, positions=pos, segment_ids=seg).logits ** 2)
        ga, gb = nnx.grad(loss)(native), nnx.grad(loss)(xla)
        for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
