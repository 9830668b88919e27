"""Device memory of a training config, estimated from the shapes alone (nothing is allocated).

    gptoss train configs/lora_20b_gpu80.yaml --estimate-memory

Per device, in bytes:
- weights: every variable of the model as stored (packed MXFP4 experts, compute-dtype Params,
  LoRA adapters), divided by how the sharding rules split it on the config's mesh;
- master / optimizer / gradients: fp32 master copy, AdamW's two moments and the fp32 gradient
  accumulator of each trainable variable, split like the variable;
- activations: what the backward pass keeps from the forward pass for one micro-batch
  (batch_size / accum_steps rows of seq_len tokens, split over the batch axes of the mesh), by
  remat policy, assuming the fused attention kernels (no [T, S] score matrix is kept) and the
  packed grouped matmul; plus the fp32 logits, their log-softmax and gradient;
- RL (`algorithm: grpo | gspo`): micro-batches of the rollout's prompts x group_size rows of
  data.seq_len tokens (prompt + response), the reference copy of what trains (none with LoRA:
  the reference is the base) and the sampler's KV cache for one rollout;
- the working set of one layer's backward: the expert MLP's rows (per device: tokens x top-k, or
  the exchange buffer's rows with expert parallelism) with their fp32 gate/up pre-activation and
  its gradient, and the rows in and out;
- with an fsdp axis, the vocabulary tables gathered where they are used (compute dtype), plus the
  fp32 gradient of one before its reduce-scatter when the tables train;
- with an expert axis, the rows each layer's exchange received, kept until that layer's backward
  (the compiled programs hold them: `experiments/2026-12-05-compile/README.md`);
- not modelled: other XLA temporaries and layout copies (on TPU, relayout copies of the packed
  weights), and the gaps of the compiler's heap layout: this is a count of bytes live together,
  while `compiled.memory_analysis()` reports what XLA allocates (the 20b SFT step on a v5e-8: peak
  live 10.02 GiB, estimate 11.28, allocated 14.04; `experiments/2026-12-05-compile/README.md`).
  Keep a margin, and let `gptoss compile` decide whether a config fits.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np
from flax import nnx

from gptoss_jax import lora as lora_lib
from gptoss_jax import sharding as sharding_lib
from gptoss_jax.cache import cache_bytes
from gptoss_jax.checkpoint import find_checkpoint
from gptoss_jax.config import ModelConfig
from gptoss_jax.expert_parallel import capacity, receive_capacity
from gptoss_jax.model import GptOss
from gptoss_jax.train.sft import kernel_options, lora_config, model_config
from gptoss_jax.train.step import trainable_filter


@dataclasses.dataclass
class MemoryEstimate:
    weights: float
    master: float
    optimizer: float
    gradients: float
    activations: float
    logits: float
    trainable_parameters: int
    devices: int
    reference: float = 0.0  # RL: the frozen reference copy of what trains (none with LoRA)
    kv_cache: float = 0.0  # RL: the sampler's cache for one rollout batch
    layer_backward: float = 0.0  # the expert MLP working set of one layer's backward
    gathered: float = 0.0  # fsdp: the vocabulary tables gathered where used (+ one fp32 gradient)
    exchange: float = 0.0  # expert parallelism: each layer's received rows, kept for its backward

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.master
            + self.optimizer
            + self.gradients
            + self.activations
            + self.logits
            + self.reference
            + self.kv_cache
            + self.layer_backward
            + self.gathered
            + self.exchange
        )

    def table(self, device_bytes: float | None = None) -> str:
        gib = lambda b: f"{b / 2**30:8.2f} GiB"
        rows = [
            ("weights (as stored)", self.weights),
            ("fp32 master copies", self.master),
            ("AdamW moments", self.optimizer),
            ("fp32 gradients", self.gradients),
            ("activations kept for backward", self.activations),
            ("logits (fp32, x3)", self.logits),
        ]
        if self.reference or self.kv_cache:
            rows += [("RL reference (fp32)", self.reference), ("RL sampler KV cache", self.kv_cache)]
        rows.append(("one layer's backward (experts)", self.layer_backward))
        if self.gathered:
            rows.append(("vocabulary tables gathered", self.gathered))
        if self.exchange:
            rows.append(("expert exchange, kept per layer", self.exchange))
        lines = [
            f"per device ({self.devices} device{'s' if self.devices > 1 else ''}); "
            f"{self.trainable_parameters:,} trainable parameters"
        ]
        lines += [f"  {name:32s}{gib(v)}" for name, v in rows]
        lines.append(f"  {'total':32s}{gib(self.total)}")
        if device_bytes:
            lines.append(f"  {'device memory':32s}{gib(device_bytes)}  ({self.total / device_bytes:.0%} used)")
        return "\n".join(lines)


def _abstract_mesh(mesh_cfg: dict):
    sizes = {a: int(mesh_cfg.get(a, 1)) for a in sharding_lib.MESH_AXES}
    return jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))


def _per_device(var, mesh) -> float:
    value = var.get_value()
    nbytes = math.prod(value.shape) * np.dtype(value.dtype).itemsize
    axes = var.get_metadata().get("axes") or (None,) * len(value.shape)
    spec = sharding_lib.logical_to_spec(axes, value.shape, mesh)
    split = 1
    for entry in spec:
        for name in (entry,) if isinstance(entry, str) else (entry or ()):
            split *= mesh.shape[name]
    return nbytes / split


def activation_bytes_per_token(model_cfg, remat: str, dtype_bytes: int) -> float:
    """Bytes one token keeps for the backward pass, summed over layers (see the module doc)."""
    D, N, K, H = model_cfg.d_model, model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.head_dim
    E, k, F = model_cfg.num_experts, model_cfg.experts_per_token, model_cfg.expert_dim
    b = dtype_bytes
    if remat == "full":  # each layer's input only
        per_layer = D * b
    elif remat == "dots":  # the outputs of the projections and expert matmuls
        per_layer = (2 * N + 2 * K) * H * b + E * 4 + k * (2 * F + D) * 4
    else:
        norms = 2 * (D * 4 + D * b)  # two RMSNorms: fp32 normalized input, scaled output
        attention = D * b + (2 * N + 2 * K) * H * b + N * 4  # input, q/k/v/output, softmax statistics
        moe = D * b + E * 4 + k * (D * b + 2 * F * 4 + F * b + D * 4)  # input, router, rows, h, act, y
        per_layer = norms + attention + moe
    return per_layer * model_cfg.num_layers


def expert_rows(model_cfg, tokens: float, mesh_shape, *, dispatch: str | None, capacity_factor) -> float:
    """Rows one device's expert MLP computes for `tokens` local tokens: tokens x top-k without an
    expert axis; with one, the exchange's buffer (`expert_parallel`): all_to_all E x C rows, the
    ragged exchange its receive capacity (dropless: every expert-axis device's rows)."""
    E, k = model_cfg.num_experts, model_cfg.experts_per_token
    ep = mesh_shape["expert"]
    t = max(1, int(tokens))
    if ep == 1:
        return t * k
    if (dispatch or "ragged_all_to_all") == "all_to_all":
        return E * (capacity(capacity_factor, t, k, E) if capacity_factor else t)
    if capacity_factor:
        return receive_capacity(capacity_factor, t, k, ep, E // ep)
    return ep * t * min(k, E // ep)


def estimate(cfg) -> MemoryEstimate:
    """`cfg`: an `ExperimentConfig`. Builds the model abstractly (config.json of the checkpoint,
    or `model.preset` when the checkpoint is not on this machine), adapters included, and applies
    the config's mesh to its logical axes."""

    m = cfg.model
    if m.checkpoint and os.path.isdir(m.checkpoint):
        model_cfg = ModelConfig.from_pretrained(find_checkpoint(m.checkpoint).root)
    else:
        model_cfg = model_config(cfg)

    def build():
        model = GptOss(model_cfg, rngs=nnx.Rngs(0), dtype=m.dtype, experts=m.experts, kernel=kernel_options(cfg))
        if cfg.lora.enabled:
            lora_lib.add_lora(model, lora_config(cfg))
        return model

    model = nnx.eval_shape(build)
    mesh = _abstract_mesh(cfg.mesh)
    devices = math.prod(mesh.shape.values())
    weights = sum(_per_device(v, mesh) for _, v in nnx.to_flat_state(nnx.state(model)))
    trainable = nnx.state(
        model, trainable_filter(lora=cfg.lora.enabled, norms_and_sinks=cfg.lora.train_norms_and_sinks)
    )
    flat = list(nnx.to_flat_state(trainable))
    count = sum(math.prod(v.get_value().shape) for _, v in flat)
    fp32_share = sum(_per_device(v, mesh) * 4 / np.dtype(v.get_value().dtype).itemsize for _, v in flat)
    batch_split = math.prod(mesh.shape[a] for a in sharding_lib.BATCH_AXES)
    reference = kv_cache = 0.0
    if cfg.algorithm == "sft":
        rows = cfg.data.batch_size
    else:  # rollout rows of up to data.seq_len tokens (prompt + response)
        rows = cfg.rl.prompts_per_step * cfg.rl.group_size
        reference = 0.0 if cfg.lora.enabled else fp32_share
        kv_cache = cache_bytes(model_cfg, max(1, rows // batch_split), cfg.data.seq_len, m.dtype)
    tokens = rows // cfg.data.accum_steps * cfg.data.seq_len / batch_split
    dtype_bytes = np.dtype(m.dtype).itemsize
    acts = tokens * activation_bytes_per_token(model_cfg, m.remat, dtype_bytes)
    vocab_split = mesh.shape["tensor"] if model_cfg.vocab_size % mesh.shape["tensor"] == 0 else 1
    if m.loss_chunk and cfg.algorithm == "sft":  # one chunk of positions at a time
        tokens_with_logits = tokens * min(1.0, m.loss_chunk / cfg.data.seq_len)
    else:
        tokens_with_logits = tokens
    logits = 3 * tokens_with_logits * model_cfg.vocab_size * 4 / vocab_split
    D, F = model_cfg.d_model, model_cfg.expert_dim
    rows = expert_rows(model_cfg, tokens, mesh.shape, dispatch=m.expert_dispatch, capacity_factor=m.capacity_factor)
    width_split = mesh.shape["tensor"] if F % mesh.shape["tensor"] == 0 else 1
    # fp32 gate/up pre-activation and its gradient, the rows in (compute dtype) and dx (fp32)
    layer_backward = rows * (2 * (2 * F // width_split) * 4 + D * (dtype_bytes + 4))
    gathered = 0.0
    if mesh.shape["fsdp"] > 1:
        tables_train = not cfg.lora.enabled
        gathered = model_cfg.vocab_size / vocab_split * D * (dtype_bytes + (4 if tables_train else 0))
    exchange = rows * D * dtype_bytes * model_cfg.num_layers if mesh.shape["expert"] > 1 else 0.0
    return MemoryEstimate(
        weights,
        fp32_share,
        2 * fp32_share,
        fp32_share,
        acts,
        logits,
        count,
        devices,
        reference,
        kv_cache,
        layer_backward,
        gathered,
        exchange,
    )
