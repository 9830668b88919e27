"""How the model's math runs: the options a user gives, and the plan resolved from them once.

    model = gj.load(path, kernel=gj.KernelOptions(remat="full"))   # options: None = "pick for me"
    plan = model.kernel.resolve(model.mesh, tokens=B * T, cfg=model.cfg, packed=True)

`KernelOptions` is what a user or a config sets; any field left None is chosen here. `resolve`
turns it into a `Plan` with every choice made, from the devices the program is built for (the
mesh's devices: a mesh of compile-only TPU devices plans for TPU on a CPU host) and the shapes of
the call. `GptOss.__call__` resolves once, at its top, and every layer reads the plan; nothing
below it asks which backend it runs on. Every choice computes the same function; they differ in
speed and memory, and the thresholds below are measured (figures in `experiments/`).
"""

from __future__ import annotations

import dataclasses

import jax

from gptoss_jax import cpu_matvec, targets

PLATFORMS = ("cpu", "gpu", "tpu")
ATTENTION_IMPLS = ("xla", "pallas_gpu", "pallas_tpu", "cpu_native")
MXFP4_IMPLS = ("xla", "pallas_gpu", "pallas_tpu")
MOE_IMPLS = ("dense", "ragged", "buckets", "chunks", "gather")
DISPATCH = ("all_to_all", "ragged_all_to_all")
REMAT = ("none", "dots", "full")

# -------------------------------------------------------------------- measured thresholds (CPU)
# Packed experts whose fp32 decode exceeds this many bytes are decoded one expert at a time on CPU
# (the bucket path's `lax.map`; the gather path decodes inside its reduction): 3.2 GB per
# gpt-oss-20b layer at once, against 2.5x slower one at a time on a 16-token 20b prefill.
DECODE_AT_ONCE_BYTES = 512 * 2**20
# Large packed experts on CPU take the gather path up to this many (token, slot) rows per expert:
# a 16-token 2-layer gpt-oss-20b prefill ran 2.2 s gathered, 7.3 s bucketed one expert at a time,
# 2.9 s bucketed all at once (with 3 GiB of decoded experts); experiments/BENCHMARKS.md.
PACKED_GATHER_ROWS_PER_EXPERT = 4
# Below this many (token, slot) rows per expert on average, buckets instead of chunks on CPU:
# batch-8 decoding on the benchmark config ran 1.6-4x slower through the chunk loop
# (scripts/bench.py decode, experiments/BENCHMARKS.md).
CHUNKS_MIN_ROWS_PER_EXPERT = 16
# Up to this many rows of logits, the CPU output head is a multiply-reduce over the bf16 table
# instead of a matmul that first converts the table to fp32 (`layers.unembed`).
UNEMBED_ROWS_AS_REDUCTION = 8
# Beyond twice this many rows of logits (a long prompt's every position), the CPU output head runs
# this many rows at a time (`layers.unembed`): XLA:CPU's one fused [T, D] x [D, V] dot with the
# final norm ran at half the rate of 1,024-row chunks at 8,192 rows, and at the same rate at
# 2,048 (experiments/2026-12-06-prefill-attention/README.md).
UNEMBED_CHUNK_ROWS = 1024
# Up to this many rows, the projections and the output head run through the native CPU
# matrix-vector kernels (`gptoss_jax.cpu_matvec`), which read each weight once in its stored
# format; the gathered experts always do (their rows are grouped by expert). Where each row makes
# its own pass over the weights, the kernels fell behind XLA's matmuls at 8 rows (the rows of
# experiments/2026-12-06-cpu-matvec/table.md): NATIVE_MATVEC_ROWS. Where the rows of a matrix
# share its loads they stay ahead at 8 rows: a bf16 model on a CPU with AVX512-BF16 (the kernels'
# bf16 dot products, experiments/2026-12-06-bf16-dot/table.md) and an fp32 model on a CPU with
# AVX-512 (`cpu_matvec.has_shared_rows`; the fp32 projections 1.5-4.0x and the benchmark model's
# fp32 head 1.9x XLA's code at 8 rows, experiments/2026-12-06-matvec-rows/table.md):
# NATIVE_MATVEC_ROWS_SHARED. A bf16 model without AVX512-BF16 keeps NATIVE_MATVEC_ROWS (its bf16
# head, widened in registers, stayed behind XLA's at 8 rows in the same table).
NATIVE_MATVEC_ROWS = 2
NATIVE_MATVEC_ROWS_SHARED = 8
# Dense experts take the gather path, through the native kernels, up to this many (token, slot)
# rows per expert on average: each chosen expert read once, its rows sharing the loads. The
# benchmark model's MoE block at 16 tokens (4 rows per expert) ran 1.7x (fp32) and 2.2x (bf16)
# faster than through the buckets, at 8 tokens 2.2x and 3.0x
# (experiments/2026-12-06-matvec-rows/moe_decode.json). Beyond, the bf16 chunk loop comes close
# and trades places with the gather path between runs (32 tokens: 2.2 vs 2.0 ms in the record,
# 2.7 vs 3.7 ms in an earlier unrecorded run), so the bulk paths keep larger batches.
NATIVE_DENSE_GATHER_ROWS_PER_EXPERT = 4
# Large packed experts on CPU take the gather path, decoded by the native kernel, up to this many
# (token, slot) rows per expert: a 128-token gpt-oss-20b prefill (16 rows per expert) ran ~15x
# faster than through the chunk loop (experiments/2026-12-06-cpu-matvec/prefill_T128.json), and
# the 512-token prompts of the llama.cpp comparison (64 rows per expert) take it too.
NATIVE_PACKED_GATHER_ROWS_PER_EXPERT = 64
# Small packed experts (below DECODE_AT_ONCE_BYTES a layer, which the bulk paths decode whole) take
# it too, up to this many: the benchmark model's MXFP4 experts decoded 3.0x / 4.5x (fp32 / bf16,
# B = 32 tokens) to 14.9x / 26.9x (B = 1) faster than through the buckets, and an uncached forward
# ran 1.12x / 1.75x faster than through the chunk loop at 256 rows per expert, 0.99x / 1.50x at 512
# (experiments/2026-12-07-packed-gather/decode_rows.json). Before, they took the gather path only
# up to E / 2 rows in all.
NATIVE_SMALL_PACKED_GATHER_ROWS_PER_EXPERT = 256


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """How the math runs (not what it computes); None fields are chosen by `resolve`.

    moe_impl: "ragged" | "chunks" | "buckets" | "gather" | "dense" (`moe.MOE_IMPLS`); None picks
        by platform and batch size (ragged on GPU/TPU, chunks on CPU, gather for decode-sized
        batches).
    attention_impl: "xla" | "pallas_gpu" | "pallas_tpu" | "cpu_native" (the native CPU kernel
        `cpu_matvec.prefill_attention`: an unsharded model on a CPU with AVX-512F, head size a
        multiple of 16, else XLA's code); None = Pallas on GPU/TPU, on CPU the native kernel where
        it is built and the native kernels are on (`cpu_matvec`), else XLA. Cached decoding and
        capture=True always use the XLA path (a decode step's own native kernel aside).
    mxfp4_impl: the packed grouped matmul of the "ragged" MoE path: "xla" | "pallas_gpu" |
        "pallas_tpu"; None = the platform's Pallas kernel on GPU/TPU, "xla" on CPU.
    interpret: run Pallas kernels in interpret mode (CPU testing).
    cpu_matvec: the native CPU matrix-vector kernels (`gptoss_jax.cpu_matvec`) for few-row products
        (decoding): None = on where they build and the model is not sharded, True = required
        (an error says why they cannot be used), False = XLA's code.
    platform: "cpu" | "gpu" | "tpu", the devices the program is built for; every default above
        follows it. None = the platform of the model's mesh (`targets.platform_of`), else this
        host's default backend.

    On a mesh (`model.mesh`), the MoE layer is expert-parallel (`gptoss_jax.expert_parallel`):
    expert_dispatch: "all_to_all" (fixed-capacity buffers; the CPU default) | "ragged_all_to_all"
        (no padding on the wire; GPU/TPU default); moe_impl then names how each device runs its
        local experts ("ragged" grouped matmul or "buckets").
    capacity_factor: None = dropless; else buffers sized by it and the overflow dropped and
        counted (captured as "dropped"): all_to_all holds ceil(capacity_factor * tokens * k /
        experts) rows per (device, expert), ragged_all_to_all ceil(capacity_factor * tokens * k)
        rows per receiving device (dropless it holds expert-axis-size times that at 1.0).
    emulate_ragged: run ragged_all_to_all through an all-gather emulation (XLA:CPU cannot compile
        the real collective).
    remat: what the backward pass recomputes instead of keeping, per layer: "none" (keep every
        activation), "dots" (keep only the outputs of matmuls without batch dimensions: the
        projections), "full" (keep only each layer's input)."""

    moe_impl: str | None = None
    attention_impl: str | None = None
    mxfp4_impl: str | None = None
    interpret: bool = False
    expert_dispatch: str | None = None
    capacity_factor: float | None = None
    emulate_ragged: bool = False
    remat: str = "none"
    cpu_matvec: bool | None = None
    platform: str | None = None

    def __post_init__(self):
        for name, allowed in (
            ("moe_impl", MOE_IMPLS),
            ("attention_impl", ATTENTION_IMPLS),
            ("mxfp4_impl", MXFP4_IMPLS),
            ("expert_dispatch", DISPATCH),
            ("platform", PLATFORMS),
        ):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.remat not in REMAT:
            raise ValueError(f"remat must be one of {REMAT}, got {self.remat!r}")

    def platform_for(self, mesh) -> str:
        """The platform: as given, else the mesh's devices', else this host's default backend."""
        if self.platform is not None:
            return self.platform
        if mesh is not None:
            return targets.platform_of(mesh.devices.flat)
        return jax.default_backend()

    def resolve(
        self, mesh, *, tokens: int, num_experts: int, k: int, packed_bytes: int = 0, bf16: bool = False
    ) -> Plan:
        """Every choice made for a call of `tokens` rows on `mesh` (None: one device).
        packed_bytes: one layer's packed expert weights decoded to fp32 (0 for dense experts).
        bf16: the activations are bf16 (the model's dtype), which the native kernels multiply with
        bf16 dot products where the CPU has them."""
        platform = self.platform_for(mesh)
        cpu = platform == "cpu"
        large_packed_on_cpu = cpu and packed_bytes > DECODE_AT_ONCE_BYTES
        expert_axis = mesh.shape.get("expert", 1) if mesh is not None else 1
        sharded = mesh is not None and mesh.size > 1
        native = cpu and not sharded and self.cpu_matvec is not False
        if native and self.cpu_matvec is None:
            native = cpu_matvec.available()
        elif native:
            cpu_matvec.require()
        elif self.cpu_matvec and not (cpu and not sharded):
            raise ValueError("cpu_matvec=True needs an unsharded model on the CPU")
        attention = self.attention_impl or default_attention_impl(platform)
        if self.attention_impl is None and native and cpu_matvec.has_prefill_attention():
            attention = "cpu_native"
        elif attention == "cpu_native" and not (native and cpu_matvec.has_prefill_attention()):
            raise ValueError(
                "attention_impl='cpu_native' needs an unsharded model on a CPU with AVX-512F and the native "
                f"kernels on ({cpu_matvec.unavailable_reason() or 'cpu_matvec off, sharded, or no AVX-512F'})"
            )
        moe = self.moe_impl
        if moe is None:
            if sharded and expert_axis > 1:  # devices exchange fixed-capacity buffers: buckets on CPU
                moe = "buckets" if cpu else "ragged"
            else:
                moe = default_moe_impl(
                    tokens,
                    k,
                    num_experts,
                    large_packed_on_cpu=large_packed_on_cpu,
                    platform=platform,
                    per_device=not sharded,
                    native_packed=native and packed_bytes > 0,
                    native_dense=native and not packed_bytes,
                )
        return Plan(
            platform=platform,
            attention=attention,
            mxfp4=self.mxfp4_impl or default_mxfp4_impl(platform),
            moe=moe,
            decode_one_expert_at_a_time=large_packed_on_cpu,
            gathered_decode=cpu,
            unembed_reduction_rows=UNEMBED_ROWS_AS_REDUCTION if cpu else 0,
            native_rows=native_matvec_rows(bf16) if native else 0,
            interpret=self.interpret,
            expert_dispatch=self.expert_dispatch or default_dispatch(platform),
            capacity_factor=self.capacity_factor,
            emulate_ragged=self.emulate_ragged,
            remat=self.remat,
        )


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every implementation choice of one model call, made (`KernelOptions.resolve`)."""

    platform: str
    attention: str  # Pallas kernel or XLA for uncached attention
    mxfp4: str  # the packed grouped matmul of the ragged MoE path
    moe: str  # the MoE path (on an expert-parallel mesh: how each device runs its experts)
    decode_one_expert_at_a_time: bool  # buckets: large packed experts decoded one at a time
    gathered_decode: bool  # gather: packed experts decoded inside the reduction (CPU)
    unembed_reduction_rows: int  # up to this many rows, the output head is a multiply-reduce
    native_rows: int  # up to this many rows, projections and head run through `gptoss_jax.cpu_matvec` (0: never)
    interpret: bool
    expert_dispatch: str
    capacity_factor: float | None
    emulate_ragged: bool
    remat: str

    def unembed_options(self) -> dict:
        """The keyword arguments of `layers.unembed` beyond (h, w)."""
        return dict(
            reduction_rows=self.unembed_reduction_rows,
            native_rows=self.native_rows,
            chunk_rows=UNEMBED_CHUNK_ROWS if self.platform == "cpu" else 0,
        )

    def moe_options(self, impl: str | None = None) -> dict:
        """The keyword arguments `moe.MOE_IMPLS[impl]` takes beyond (x, ew, routing, alpha, limit)."""
        return moe_options(
            impl or self.moe,
            mxfp4_impl=self.mxfp4,
            interpret=self.interpret,
            one_at_a_time=self.decode_one_expert_at_a_time,
            gathered_decode=self.gathered_decode,
            native=self.native_rows > 0,
        )


def moe_options(
    impl: str, *, mxfp4_impl: str, interpret: bool, one_at_a_time: bool, gathered_decode: bool, native: bool = False
) -> dict:
    """Each MoE path's own keyword arguments, from the choices that concern it."""
    if impl == "ragged":
        return dict(mxfp4_impl=mxfp4_impl, interpret=interpret)
    if impl == "buckets":
        return dict(one_at_a_time=one_at_a_time)
    if impl == "gather":
        return dict(gathered_decode=gathered_decode, native=native)
    if impl == "chunks":
        return dict(native=native)
    return {}


def default_attention_impl(platform: str) -> str:
    return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform, "xla")


def default_mxfp4_impl(platform: str) -> str:
    """The packed grouped matmul of the "ragged" path: the Pallas kernel of the platform."""
    return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform, "xla")


def default_dispatch(platform: str) -> str:
    return "all_to_all" if platform == "cpu" else "ragged_all_to_all"


def native_matvec_rows(bf16: bool) -> int:
    """Rows up to which the projections and the head run through the native CPU kernels (where
    they are on): more where the rows of a matrix share its loads (`NATIVE_MATVEC_ROWS_SHARED`)."""
    shared = cpu_matvec.has_bf16_dot() if bf16 else cpu_matvec.has_shared_rows()
    return NATIVE_MATVEC_ROWS_SHARED if shared else NATIVE_MATVEC_ROWS


def default_moe_impl(
    tokens: int,
    k: int,
    num_experts: int,
    *,
    large_packed_on_cpu: bool,
    platform: str,
    per_device: bool = True,
    native_packed: bool = False,
    native_dense: bool = False,
) -> str:
    """per_device=False: the tokens are split over a mesh (no expert axis), the rows per device
    are not known here: the platform's bulk path. native_packed: packed experts that the native
    CPU kernel decodes (`NATIVE_PACKED_GATHER_ROWS_PER_EXPERT` when large,
    `NATIVE_SMALL_PACKED_GATHER_ROWS_PER_EXPERT` otherwise); native_dense: dense experts that the
    native CPU kernels multiply (`NATIVE_DENSE_GATHER_ROWS_PER_EXPERT`)."""
    rows = tokens * k
    if large_packed_on_cpu:
        gather_rows = NATIVE_PACKED_GATHER_ROWS_PER_EXPERT if native_packed else PACKED_GATHER_ROWS_PER_EXPERT
    elif native_packed:
        gather_rows = NATIVE_SMALL_PACKED_GATHER_ROWS_PER_EXPERT
    else:
        gather_rows = NATIVE_DENSE_GATHER_ROWS_PER_EXPERT if native_dense else 0
    if per_device and (2 * rows <= num_experts or rows <= gather_rows * num_experts):
        return "gather"  # decode-sized batches: touch only the chosen experts
    if platform != "cpu":
        return "ragged"
    if per_device and rows < CHUNKS_MIN_ROWS_PER_EXPERT * num_experts:
        return "buckets"  # decode-sized batches: a loop over E experts of tiny chunks costs more
    return "chunks"
