"""The plan: every implementation choice resolved once, from the target's devices and the shapes."""

import os
import re

import jax
import pytest

import gptoss_jax as gj
from gptoss_jax import cpu_matvec, plan, targets

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "gptoss_jax")
E, K = 32, 4
BIG_PACKED = plan.DECODE_AT_ONCE_BYTES + 1


def test_cpu_choices_follow_the_shapes():
    opts = gj.KernelOptions(platform="cpu")
    resolve = lambda tokens, packed=0: opts.resolve(None, tokens=tokens, num_experts=E, k=K, packed_bytes=packed)
    assert resolve(1).moe == "gather"  # decode: 4 rows for 32 experts
    native = cpu_matvec.available()  # the native kernels where they build (tests/test_cpu_matvec.py)
    # dense experts: through the native kernels up to 4 rows per expert on average, then buckets
    assert resolve(32).moe == ("gather" if native else "buckets")  # 128 rows: 4 per expert
    assert resolve(33).moe == "buckets"  # 132 rows < 16 per expert on average
    assert resolve(4096).moe == "chunks"
    assert resolve(16, BIG_PACKED).moe == "gather"  # large packed experts: gathered up to 4 rows per expert
    assert resolve(4096, BIG_PACKED).decode_one_expert_at_a_time and not resolve(4096).decode_one_expert_at_a_time
    p = resolve(4096)
    attention = "cpu_native" if native and cpu_matvec.has_prefill_attention() else "xla"
    assert (p.attention, p.mxfp4, p.expert_dispatch, p.unembed_reduction_rows) == (
        attention,
        "xla",
        "all_to_all",
        plan.UNEMBED_ROWS_AS_REDUCTION,
    )
    assert p.moe_options("gather") == {"gathered_decode": True, "native": native}
    # more rows where the rows of a matrix share its loads: fp32 with AVX-512, bf16 with AVX512-BF16
    rows = lambda shared: plan.NATIVE_MATVEC_ROWS_SHARED if shared else plan.NATIVE_MATVEC_ROWS  # noqa: E731
    assert p.native_rows == (rows(cpu_matvec.has_shared_rows()) if native else 0)
    b = opts.resolve(None, tokens=4096, num_experts=E, k=K, bf16=True)
    assert b.native_rows == (rows(cpu_matvec.has_bf16_dot()) if native else 0)
    # large packed experts: the native kernel's gather up to 64 rows per expert (a 512-token prompt here)
    assert resolve(512, BIG_PACKED).moe == ("gather" if native else "chunks")
    assert resolve(513, BIG_PACKED).moe == "chunks"
    # small packed experts (a layer below DECODE_AT_ONCE_BYTES): the native gather up to 256 rows per
    # expert (a 2,048-token prompt here); without the kernels only up to E / 2 rows in all
    assert resolve(2048, 1).moe == ("gather" if native else "chunks")
    assert resolve(32, 1).moe == ("gather" if native else "buckets")
    assert resolve(2049, 1).moe == "chunks"
    assert (
        gj.KernelOptions(platform="cpu", cpu_matvec=False)
        .resolve(None, tokens=5, num_experts=E, k=K, packed_bytes=1)
        .moe
        == "buckets"
    )
    off = gj.KernelOptions(platform="cpu", cpu_matvec=False).resolve(None, tokens=1, num_experts=E, k=K)
    assert (
        gj.KernelOptions(platform="cpu", cpu_matvec=False)
        .resolve(None, tokens=512, num_experts=E, k=K, packed_bytes=BIG_PACKED)
        .moe
        == "chunks"
    )
    assert off.native_rows == 0 and off.moe_options("gather") == {"gathered_decode": True, "native": False}
    assert (
        gj.KernelOptions(platform="cpu", cpu_matvec=False).resolve(None, tokens=32, num_experts=E, k=K).moe == "buckets"
    )
    assert off.attention == "xla"  # the native attention goes with the other kernels
    asked = gj.KernelOptions(platform="cpu", attention_impl="xla")
    assert asked.resolve(None, tokens=9, num_experts=E, k=K).attention == "xla"
    with pytest.raises(ValueError, match="cpu_native"):  # asked for where it cannot run
        gj.KernelOptions(platform="cpu", cpu_matvec=False, attention_impl="cpu_native").resolve(
            None, tokens=9, num_experts=E, k=K
        )
    assert off.unembed_options() == {
        "reduction_rows": plan.UNEMBED_ROWS_AS_REDUCTION,
        "native_rows": 0,
        "chunk_rows": plan.UNEMBED_CHUNK_ROWS,
    }


@pytest.mark.parametrize("platform,kernel", [("gpu", "pallas_gpu"), ("tpu", "pallas_tpu")])
def test_accelerator_choices(platform, kernel):
    p = gj.KernelOptions(platform=platform).resolve(None, tokens=4096, num_experts=E, k=K, packed_bytes=BIG_PACKED)
    assert (p.attention, p.mxfp4, p.moe, p.expert_dispatch) == (kernel, kernel, "ragged", "ragged_all_to_all")
    assert p.unembed_reduction_rows == 0 and not p.decode_one_expert_at_a_time
    assert p.moe_options() == {"mxfp4_impl": kernel, "interpret": False}
    # what the user set is kept
    q = gj.KernelOptions(platform=platform, moe_impl="buckets", attention_impl="xla").resolve(
        None, tokens=4096, num_experts=E, k=K
    )
    assert (q.moe, q.attention) == ("buckets", "xla")


def test_platform_comes_from_the_mesh_devices():
    host = gj.make_mesh(data=8)
    assert gj.KernelOptions().platform_for(host) == "cpu"
    tpu = targets.get("tpu-v5e-8").mesh(expert=8)
    p = gj.KernelOptions().resolve(tpu, tokens=4096, num_experts=E, k=K)
    assert (p.platform, p.attention, p.moe, p.expert_dispatch) == ("tpu", "pallas_tpu", "ragged", "ragged_all_to_all")
    assert gj.KernelOptions().resolve(host, tokens=4096, num_experts=E, k=K).platform == "cpu"  # control


def test_bad_options_are_refused():
    for bad in (
        dict(moe_impl="fast"),
        dict(attention_impl="cuda"),
        dict(platform="metal"),
        dict(remat="some"),
        dict(expert_dispatch="gather"),
    ):
        with pytest.raises(ValueError, match="must be one of"):
            gj.KernelOptions(**bad)


def test_only_the_plan_asks_for_the_default_backend():
    """No module of the package but `plan` reads `jax.default_backend()` (the plan is resolved once
    per model call; nothing below it asks where it runs)."""
    pattern = re.compile(r"jax\.default_backend\(\)")
    hits = []
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                code = "\n".join(line.split("#")[0] for line in open(path).read().splitlines())
                if pattern.search(code):
                    hits.append(os.path.relpath(path, PACKAGE))
    assert "plan.py" in hits  # control: the search finds the one place that asks
    assert hits == ["plan.py"], hits


def test_model_call_uses_one_plan():
    model = gj.init(gj.tiny(), seed=0, kernel=gj.KernelOptions(platform="cpu", moe_impl="buckets"))
    p = model.plan(8)
    assert p.moe == "buckets" and p.platform == "cpu"
    assert model.plan(1).moe == "buckets"  # the user's choice is not overridden by the shapes
    assert gj.init(gj.tiny(), seed=0).plan(1).moe == "gather"  # control: left open, decode gathers
    assert isinstance(
        jax.eval_shape(lambda t: model(t).logits, jax.ShapeDtypeStruct((1, 8), "int32")), jax.ShapeDtypeStruct
    )
