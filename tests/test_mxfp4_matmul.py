"""The MXFP4 grouped matmul's XLA path and the MoE layer's use of it (the Pallas kernels have their
own test files)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax as gj
from gptoss_jax.kernels.mxfp4_matmul import mxfp4_grouped_matmul, mxfp4_grouped_matmul_reference
from gptoss_jax.mxfp4 import dequantize_np
from tests.factory import grouped_mxfp4_case, rel_err

_case = functools.partial(grouped_mxfp4_case, E=5, N=96, K=64, M=70, sizes=(20, 0, 33, 7, 6))


def test_matches_a_numpy_loop():
    x, blocks, scales, sizes, bias = _case()
    w = dequantize_np(np.asarray(blocks), np.asarray(scales))
    want, start = np.zeros((x.shape[0], w.shape[1])), 0
    for e, g in enumerate(np.asarray(sizes)):  # rows past sum(sizes) stay 0
        want[start : start + g] = np.asarray(x)[start : start + g] @ w[e].T + np.asarray(bias)[e]
        start += g
    assert rel_err(mxfp4_grouped_matmul(x, blocks, scales, sizes, bias=bias), want) <= 1e-5


@pytest.mark.parametrize("swiglu", [None, (1.702, 7.0)])
@pytest.mark.parametrize("sizes", [(20, 0, 33, 7, 6), (0, 0, 70, 0, 0), (0, 30, 0, 30, 0)])
def test_forward_and_gradients_vs_reference(swiglu, sizes):
    x, blocks, scales, sizes, bias = _case(sizes=sizes)
    got = mxfp4_grouped_matmul(x, blocks, scales, sizes, bias=bias, swiglu=swiglu, block_sizes=None)
    want = mxfp4_grouped_matmul_reference(x, blocks, scales, sizes, bias=bias, swiglu=swiglu)
    assert rel_err(got, want) <= 1e-5

    def loss(fn):
        return lambda x, b: jnp.sum(jnp.sin(fn(x, blocks, scales, sizes, bias=b, swiglu=swiglu)))

    g = jax.grad(loss(mxfp4_grouped_matmul), (0, 1))(x, bias)
    r = jax.grad(loss(mxfp4_grouped_matmul_reference), (0, 1))(x, bias)
    assert rel_err(g[0], r[0]) <= 1e-4 and rel_err(g[1], r[1]) <= 1e-4


def test_bf16_inputs():
    x, blocks, scales, sizes, bias = _case(dtype=jnp.bfloat16)
    got = mxfp4_grouped_matmul(x, blocks, scales, sizes, bias=bias)
    want = mxfp4_grouped_matmul_reference(x.astype(jnp.float32), blocks, scales, sizes, bias=bias)
    assert got.dtype == jnp.bfloat16 and rel_err(got, want) <= 1e-2


def _largest_buffer(hlo: str) -> int:
    sizes = [
        int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        for dims in re.findall(r"\b(?:f32|bf16|f16|u8|s32)\[([0-9,]*)\]", hlo)
    ]
    return max(sizes)


def test_xla_path_never_holds_the_whole_decoded_weight():
    E, N, K, M = 16, 256, 256, 64
    x, blocks, scales, _, bias = _case(E=E, N=N, K=K, M=M)
    sizes = jnp.full((E,), M // E, jnp.int32)
    whole = E * N * K

    def hlo(fn):
        f = lambda x: fn(x, blocks, scales, sizes, bias=bias)
        fwd = jax.jit(f).lower(x).compile().as_text()
        bwd = jax.jit(jax.grad(lambda x: jnp.sum(f(x)))).lower(x).compile().as_text()
        return max(_largest_buffer(fwd), _largest_buffer(bwd))

    # the check can fail: the reference decodes every expert at once
    assert hlo(mxfp4_grouped_matmul_reference) >= whole
    largest = hlo(mxfp4_grouped_matmul)
    print(f"largest buffer: {largest} elements (one expert: {N * K}; all experts: {whole})")
    assert largest < whole


def test_moe_ragged_uses_packed_matmul(original_dir):
    dense = gj.load(original_dir, dtype="float32", kernel=gj.KernelOptions(moe_impl="dense"))
    ragged = gj.load(original_dir, dtype="float32", kernel=gj.KernelOptions(moe_impl="ragged", mxfp4_impl="xla"))
    t = np.arange(40)[None] * 11 % dense.cfg.vocab_size
    assert rel_err(ragged(t).logits, dense(t).logits) <= 1e-5


def test_20b_memory_account():
    packed = gj.parameter_bytes(gj.abstract(gj.gpt_oss_20b(), experts="mxfp4"))
    dense = gj.parameter_bytes(gj.abstract(gj.gpt_oss_20b(), experts="dense"))
    cfg = gj.gpt_oss_20b()
    experts = cfg.num_layers * cfg.num_experts * 3 * cfg.d_model * cfg.expert_dim  # 2F*D + D*F weights
    packed_experts = experts // 2 + experts // 32  # 4 bits + one scale byte per 32 weights
    print(
        f"20b parameters: {packed:,} B packed ({packed / 1e9:.2f} GB, {packed / 2**30:.2f} GiB); "
        f"bf16-dequantized equivalent {dense:,} B ({dense / 1e9:.2f} GB); experts packed {packed_experts / 1e9:.2f} GB"
    )
    assert packed == dense - 2 * experts + packed_experts
    assert packed / 2**30 <= 13.0
