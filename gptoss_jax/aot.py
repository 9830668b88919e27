"""Compile the programs users run for a named target, without its hardware, and read the compiler's
own figures: per-device memory against the device's HBM, compile time, the Pallas kernels in the
optimized program, the compiler's cost estimate.

    report = aot.compile_train_step(load_config("configs/lora_20b_gpu80.yaml"), "h100")
    report = aot.compile_forward(gpt_oss_20b(), "tpu-v5e-8", batch=1, length=8192, mesh={"expert": 8})
    report = aot.compile_decode(gpt_oss_20b(), "h100", batch=64, context=8192)
    print(report.table())

Every program is built from abstract arrays (`jax.ShapeDtypeStruct`s carrying the target's
shardings): nothing is allocated, and the model's kernel plan follows the target's platform
(`KernelOptions.platform` from the mesh's devices), so a TPU target gets the Mosaic kernels and
ragged expert dispatch, an H100 the Triton kernels.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gptoss_jax import lora as lora_lib
from gptoss_jax import sharding as sharding_lib
from gptoss_jax import targets as targets_lib
from gptoss_jax.cache import init_cache
from gptoss_jax.config import ModelConfig
from gptoss_jax.model import GptOss, KernelOptions
from gptoss_jax.train import rl as rl_lib
from gptoss_jax.train import sft as sft_lib
from gptoss_jax.train.memory import estimate
from gptoss_jax.train.step import make_optimizer, make_trainer, trainable_filter

GIB = 2**30


@dataclasses.dataclass
class CompileReport:
    program: str
    target: str
    devices: int
    hbm_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    compile_seconds: float
    kernels: dict  # Pallas kernel name -> count of calls in the optimized program
    custom_calls: dict  # custom-call target -> count (tpu_custom_call, __gpu$xla.gpu.triton, ...)
    flops: float | None = None
    estimate_bytes: float | None = None  # `train.memory.estimate` of the same config, when there is one
    mesh: dict = dataclasses.field(default_factory=dict)
    largest_arrays: list = dataclasses.field(default_factory=list)  # [(bytes, "dtype[shape]")], see largest_arrays
    scoped_vmem: dict = dataclasses.field(default_factory=dict)  # Mosaic kernel -> scoped VMEM bytes (TPU)
    refused: str | None = None  # the compiler's out-of-memory refusal (XLA:TPU); figures from its message

    @property
    def total_bytes(self) -> int:
        """Per-device peak as the compiler lays it out: arguments + outputs (less donated
        aliases) + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool:
        return self.refused is None and self.total_bytes <= self.hbm_bytes

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(total_bytes=self.total_bytes, fits=self.fits)
        return d

    def table(self) -> str:
        gib = lambda b: f"{b / GIB:8.2f} GiB"
        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.items() if v > 1) or "one device"
        lines = [
            f"{self.program} on {self.target} ({self.devices} device{'s' * (self.devices > 1)}; mesh {mesh}); "
            f"compiled in {self.compile_seconds:.1f} s",
            f"  per device: arguments {gib(self.argument_bytes)}, outputs {gib(self.output_bytes)}, "
            f"aliased {gib(self.alias_bytes)}, temporaries {gib(self.temp_bytes)}",
            f"  total {gib(self.total_bytes)} of {gib(self.hbm_bytes)} HBM "
            f"({self.total_bytes / self.hbm_bytes:.0%}): {'fits' if self.fits else 'DOES NOT FIT'}",
        ]
        if self.refused:
            lines.insert(1, f"  the compiler refused it: {self.refused}")
            lines[2] = (
                f"  per device: arguments {gib(self.argument_bytes)} (from their shardings), temporaries "
                f"{gib(self.temp_bytes)} (from the refusal)"
            )
        if self.estimate_bytes:
            ratio = self.total_bytes / self.estimate_bytes
            lines.append(f"  --estimate-memory {gib(self.estimate_bytes)} (compiler / estimate = {ratio:.2f})")
        if self.kernels:
            vmem = lambda k: f" ({self.scoped_vmem[k] / 2**20:.1f} MiB VMEM)" if k in self.scoped_vmem else ""
            lines.append("  kernels: " + ", ".join(f"{k} x{n}{vmem(k)}" for k, n in sorted(self.kernels.items())))
        else:
            lines.append("  kernels: none (XLA only)")
        if self.flops:
            lines.append(f"  compiler's cost estimate: {self.flops:.3e} flops per device")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ compile + read
def _custom_calls(hlo: str) -> tuple[dict, dict, dict]:
    """(Pallas kernel name -> count, custom-call target -> count, Mosaic kernel -> scoped VMEM
    bytes) from optimized HLO text."""
    calls, kernels, scoped_vmem = collections.Counter(), collections.Counter(), {}
    for line in hlo.splitlines():
        m = re.search(r'custom_call_target="([^"]+)"', line)
        if not m:
            continue
        target = m.group(1)
        calls[target] += 1
        if target == "tpu_custom_call":  # Mosaic: the instruction is named after the kernel
            name = re.match(r"\s*%([A-Za-z0-9_]+?)(?:\.\d+)* = ", line)
            kernels[name.group(1) if name else target] += 1
            vmem = re.findall(r'"used_scoped_memory_configs":\[\{[^]]*?"size":"(\d+)"', line)
            if vmem and name:
                key = name.group(1)
                scoped_vmem[key] = max(scoped_vmem.get(key, 0), int(vmem[0]))
        elif target in ("__gpu$xla.gpu.triton", "mosaic_gpu", "mosaic_gpu_v2"):
            names = re.findall(r'\bname = \\?"([A-Za-z0-9_.]+)', line)  # the embedded Triton module's
            kernels[names[-1] if names else target] += 1
    return dict(kernels), dict(calls), scoped_vmem


_BUFFER = re.compile(r"\b([a-z0-9]+)\[([0-9,]*)\]")
_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}


def largest_arrays(hlo: str, n: int = 5) -> list:
    """The n largest arrays the optimized program materializes, [(bytes, "f32[...]")]: results of
    instructions outside fusion bodies (values inside a fusion never reach memory). A cheap look at
    what holds the memory: a whole layer's dequantized experts would show here."""
    fused = set(re.findall(r"fusion\(.*?calls=(%[\w.\-]+)", hlo))
    sizes, skip = {}, False
    for line in hlo.splitlines():
        if line and not line[0].isspace():  # a computation's header (or its closing brace)
            name = line.split(" ", 2)[1] if line.startswith("ENTRY") else line.split(" ", 1)[0]
            skip = name in fused
            continue
        if skip or "=" not in line:
            continue
        result = (
            line.split("=", 1)[1].split("(", 1)[0] if " = (" not in line else line.split(" = ", 1)[1].split(")", 1)[0]
        )
        for dt, dims in _BUFFER.findall(result):
            if dt in _BYTES:
                shape = [int(d) for d in dims.split(",") if d]
                sizes[f"{dt}[{dims}]"] = int(np.prod(shape, dtype=np.int64)) * _BYTES[dt]
    return sorted(((b, s) for s, b in sizes.items()), reverse=True)[:n]


class _Progress:
    """A line on stderr while a long compile runs (elapsed seconds), removed when it ends."""

    def __init__(self, what: str, enabled: bool):
        self.what, self.enabled, self.stop = what, enabled and sys.stderr.isatty(), threading.Event()

    def __enter__(self):
        if self.enabled:
            t0 = time.time()

            def tick():
                while not self.stop.wait(1.0):
                    sys.stderr.write(f"\rcompiling {self.what} ... {time.time() - t0:.0f} s")
                    sys.stderr.flush()

            self.thread = threading.Thread(target=tick, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.enabled:
            self.thread.join()
            sys.stderr.write("\r" + " " * 60 + "\r")


def compile_jitted(
    jitted, args, *, program: str, target, mesh=None, progress: bool = True, estimate_bytes=None
) -> tuple:
    """Lower and compile `jitted` for the abstract `args`; -> (compiled, CompileReport)."""
    target = targets_lib.get(target)
    mesh_shape = dict(mesh.shape) if mesh is not None else {}
    with _Progress(f"{program} for {target.name}", progress):
        t0 = time.perf_counter()
        lowered = jitted.lower(*args)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            # XLA:TPU refuses a program whose memory exceeds the HBM: that is a finding
            # ("does not fit", with the compiler's figure), not a crash. Two forms: the temporaries
            # alone, or the whole use ("Used 15.76G of 15.75G hbm"), less the arguments here
            size = lambda m, i: int(float(m.group(i)) * 1024 ** " KMGT".index(m.group(i + 1)))
            need = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM", str(e))
            used = re.search(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm", str(e))
            if not (need or used):
                raise
            args_bytes = sum(a.size * a.dtype.itemsize // _split(a) for a in jax.tree.leaves(args))
            temps = size(need, 1) if need else max(0, size(used, 1) - args_bytes)
            return None, CompileReport(
                program,
                target.name,
                target.num_devices,
                target.hbm_bytes,
                args_bytes,
                0,
                0,
                temps,
                time.perf_counter() - t0,
                {},
                {},
                None,
                estimate_bytes,
                mesh_shape,
                [],
                {},
                refused=str(e).splitlines()[0],
            )
        seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    kernels, calls, vmem = _custom_calls(hlo)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) and cost else cost
    flops = float(cost.get("flops", 0.0)) if isinstance(cost, dict) else None
    report = CompileReport(
        program,
        target.name,
        target.num_devices,
        target.hbm_bytes,
        mem.argument_size_in_bytes,
        mem.output_size_in_bytes,
        mem.alias_size_in_bytes,
        mem.temp_size_in_bytes,
        seconds,
        kernels,
        calls,
        flops or None,
        estimate_bytes,
        mesh_shape,
        largest_arrays(hlo),
        vmem,
    )
    return compiled, report


def _split(a) -> int:
    """Into how many pieces an abstract array's sharding cuts it (1 without one)."""
    sharding = getattr(a, "sharding", None)
    if sharding is None:
        return 1
    shard = sharding.shard_shape(a.shape)
    return max(1, int(np.prod(a.shape, dtype=np.int64)) // max(1, int(np.prod(shard, dtype=np.int64))))


# ------------------------------------------------------------------------------ abstract inputs
def _mesh(target, mesh) -> jax.sharding.Mesh:
    target = targets_lib.get(target)
    if isinstance(mesh, jax.sharding.Mesh):
        return mesh
    return target.mesh_from_config(dict(mesh or {}))


def abstract_model(build, mesh):
    """(graphdef, state of ShapeDtypeStructs carrying each variable's sharding on `mesh`) of the
    model `build()` makes; nothing is allocated."""
    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    shardings = sharding_lib.variable_shardings(state, mesh)
    for path, var in nnx.to_flat_state(state):
        v = var.get_value()
        var.set_value(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[path]))
    return graphdef, state


def _batch_sharding(mesh, batch: int, ndim: int = 2):
    """Rows over the batch axes when they divide the batch, else replicated."""
    axes = tuple(a for a in sharding_lib.BATCH_AXES if mesh.shape[a] > 1)
    split = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    spec = P(axes if axes and batch % split == 0 else None, *([None] * (ndim - 1)))
    return NamedSharding(mesh, spec)


def _model_builder(cfg: ModelConfig, *, dtype, experts, kernel, mesh, lora=None):
    def build():
        model = GptOss(cfg, rngs=nnx.Rngs(0), dtype=dtype, experts=experts, kernel=kernel, mesh=mesh)
        if lora is not None:
            lora_lib.add_lora(model, lora)
        return model

    return build


# ------------------------------------------------------------------------------ the programs
def compile_forward(
    cfg: ModelConfig,
    target,
    *,
    batch: int = 1,
    length: int = 8192,
    mesh=None,
    dtype=jnp.bfloat16,
    experts: str = "mxfp4",
    kernel=None,
    progress: bool = True,
):
    """The prefill forward: tokens [batch, length] -> the last position's logits [batch, 1, V]
    (the pass that fills a prompt; all positions' logits would add batch x length x V fp32)."""

    m = _mesh(target, mesh)
    graphdef, state = abstract_model(
        _model_builder(cfg, dtype=dtype, experts=experts, kernel=kernel or KernelOptions(), mesh=m), m
    )
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=_batch_sharding(m, batch))

    def forward(state, tokens):
        last = jnp.full((tokens.shape[0],), tokens.shape[1] - 1, jnp.int32)
        return nnx.merge(graphdef, state)(tokens, logits_at=last).logits

    return compile_jitted(
        jax.jit(forward), (state, tokens), program=f"forward {batch}x{length}", target=target, mesh=m, progress=progress
    )


def compile_decode(
    cfg: ModelConfig,
    target,
    *,
    batch: int = 1,
    context: int = 8192,
    mesh=None,
    dtype=jnp.bfloat16,
    experts: str = "mxfp4",
    kernel=None,
    progress: bool = True,
):
    """One decode step with the KV cache: tokens [batch, 1] + a cache of `context` positions ->
    logits [batch, 1, V] and the updated cache (donated, as the sampler does)."""

    m = _mesh(target, mesh)
    graphdef, state = abstract_model(
        _model_builder(cfg, dtype=dtype, experts=experts, kernel=kernel or KernelOptions(), mesh=m), m
    )
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, context, dtype))
    cache = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=_batch_sharding(m, batch, a.ndim)), cache
    )
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=_batch_sharding(m, batch))

    def step(state, cache, tokens):
        out = nnx.merge(graphdef, state)(tokens, cache=cache)
        return out.logits, out.cache

    return compile_jitted(
        jax.jit(step, donate_argnums=(1,)),
        (state, cache, tokens),
        program=f"decode step {batch}x1 (cache {context})",
        target=target,
        mesh=m,
        progress=progress,
    )


def compile_train_step(exp_cfg, target, *, progress: bool = True):
    """One full training step of an experiment config (forward, backward, optimizer update with
    accumulation over data.accum_steps micro-batches) on the config's mesh of `target`, with the
    config's dtype, experts, remat and LoRA; SFT objective (`algorithm: sft`) or the RL policy
    loss on rollout-shaped batches (`grpo` / `gspo`)."""

    target = targets_lib.get(target)
    mcfg = exp_cfg.model
    model_cfg = sft_lib.model_config(exp_cfg)
    m = _mesh(target, exp_cfg.mesh)
    lora = sft_lib.lora_config(exp_cfg) if exp_cfg.lora.enabled else None
    build = _model_builder(
        model_cfg, dtype=mcfg.dtype, experts=mcfg.experts, kernel=sft_lib.kernel_options(exp_cfg), mesh=m, lora=lora
    )
    graphdef, state = abstract_model(build, m)
    model = nnx.merge(graphdef, state)
    trainable = trainable_filter(lora=exp_cfg.lora.enabled, norms_and_sinks=exp_cfg.lora.train_norms_and_sinks)
    if exp_cfg.algorithm == "sft":
        rows, objective = exp_cfg.data.batch_size, None
    else:
        rows = exp_cfg.rl.prompts_per_step * exp_cfg.rl.group_size
        objective = rl_lib.rl_objective(exp_cfg.algorithm, exp_cfg.rl)
    trainer = make_trainer(
        model,
        make_optimizer(exp_cfg.optim),
        accum_steps=exp_cfg.data.accum_steps,
        trainable=trainable,
        router_aux_loss=exp_cfg.optim.router_aux_loss,
        objective=objective,
        loss_chunk=mcfg.loss_chunk,
    )
    # The state's layout is what jit gives the initial state from the sharded model, as in a run.
    init = jax.jit(trainer.init).lower(model).compile()
    state_struct = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(trainer.init, model),
        init.output_shardings,
    )
    T = exp_cfg.data.seq_len  # RL: prompt + response rows of up to seq_len tokens
    if objective is None:  # packed rows, as train.data makes them
        shapes = {k: ((rows, T), jnp.int32) for k in ("tokens", "loss_mask", "segment_ids", "positions")}
    else:  # a rollout batch, as rl.build_batch makes it
        shapes = {
            "tokens": ((rows, T), jnp.int32),
            "segment_ids": ((rows, T), jnp.int32),
            "mask": ((rows, T - 1), jnp.float32),
            "old_logp": ((rows, T - 1), jnp.float32),
            "advantages": ((rows,), jnp.float32),
        }
        if exp_cfg.rl.kl_coef > 0:
            shapes["ref_logp"] = ((rows, T - 1), jnp.float32)
    batch = {
        k: jax.ShapeDtypeStruct(shape, dt, sharding=_batch_sharding(m, rows, len(shape)))
        for k, (shape, dt) in shapes.items()
    }
    est = estimate(exp_cfg).total
    name = f"train step ({exp_cfg.algorithm}{', LoRA' if lora else ''}, {rows}x{T}, accum {exp_cfg.data.accum_steps})"
    return compile_jitted(
        trainer.step_fn,
        (state_struct, batch, trainer.frozen),
        program=name,
        target=target,
        mesh=m,
        progress=progress,
        estimate_bytes=est,
    )[1]


__all__ = [
    "CompileReport",
    "compile_jitted",
    "compile_forward",
    "compile_decode",
    "compile_train_step",
    "abstract_model",
    "largest_arrays",
]
