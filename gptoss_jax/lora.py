"""LoRA adapters beside the frozen base: attention projections and every expert's two matrices.

    model = gj.load("gpt-oss-20b")                       # MXFP4 experts stay packed
    lora.add_lora(model, lora.LoRAConfig(rank=16, alpha=32, targets=("q", "k", "v", "o", "w1", "w2")))
    ...train the `LoRAParam`s (train.step.make_trainer(model, opt, trainable=lora.LoRAParam))...
    merged = lora.merge_lora(model, experts="mxfp4")     # or "dense"; adapters folded into the base
    gj.save_hf(merged, "out/")                           # transformers loads it

A target W (used as y = x W) gains y += scale * (x A) B with A [in, r], B [r, out] and
scale = alpha / rank; B starts at zero, so a fresh adapter leaves the model unchanged.
Per-expert adapters (`w1`: gate/up, `w2`: down) are stacks [E, in, r] / [E, r, out] that go
through the same grouped dispatch as the tokens (`moe.ExpertWeights.lora1/lora2`): the packed
base is never decoded for them, and each token only touches the adapters of its own experts.

The base matrices are never dequantized as a whole: training reads them packed, and merging into
MXFP4 decodes, adds and re-encodes one expert at a time. Note that re-encoding to MXFP4 rounds
the merged weights to 4-bit values, which can swamp small adapter updates; `experts="dense"`
keeps the update exactly (at four times the expert memory).

Adapters are `LoRAParam`s (a subclass of `nnx.Param`), so `nnx.Param` filters include them and
`LoRAParam` filters select only them.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax import sharding
from gptoss_jax.adapters import (  # noqa: F401  (re-exported: the adapter types belong to the LoRA API)
    ATTENTION_TARGETS,
    EXPERT_TARGETS,
    TARGETS,
    Adapter,
    AttentionLoRA,
    ExpertLoRA,
    LoRAConfig,
    LoRAParam,
)
from gptoss_jax.model import EXPERT_FORMATS, abstract
from gptoss_jax.mxfp4 import MXFP4, quantize
from gptoss_jax.safetensors_io import open_all, save_file


# --------------------------------------------------------------------------- on a whole model
def add_lora(model, lora: LoRAConfig, *, seed: int = 0):
    """Attach fresh adapters (B = 0: the model's function is unchanged) to every layer, in place;
    returns the model. On a mesh the adapters are placed by their logical axes."""
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    key = jax.random.key(seed)
    for i, layer in enumerate(model.layers):
        if set(lora.targets) & set(ATTENTION_TARGETS):
            layer.attn.lora = AttentionLoRA(model.cfg, lora, dtype=model.dtype, key=jax.random.fold_in(key, 2 * i))
        if set(lora.targets) & set(EXPERT_TARGETS):
            layer.mlp.lora = ExpertLoRA(model.cfg, lora, dtype=model.dtype, key=jax.random.fold_in(key, 2 * i + 1))
    model.lora_config = lora
    if model.mesh is not None:
        sharding.shard_model(model, model.mesh)
    return model


def has_lora(model) -> bool:
    return getattr(model, "lora_config", None) is not None


def merge_lora(model, *, experts: str | None = None):
    """A new model with every adapter folded into its base weight (fp32 sums, then the model's
    dtype) and no adapters. experts: "mxfp4" | "dense" | None (= as the model stores them);
    packed experts are decoded, updated and re-encoded one expert at a time."""
    experts = experts or model.experts
    if experts not in EXPERT_FORMATS:
        raise ValueError(f"experts must be one of {EXPERT_FORMATS}, got {experts!r}")
    target = abstract(model.cfg, dtype=model.dtype, experts=experts, kernel=model.kernel, mesh=model.mesh)
    graphdef, state = nnx.split(target)
    source = dict(nnx.to_flat_state(nnx.state(model)))
    layers = {}
    for path, var in nnx.to_flat_state(state):
        value = source[path].get_value() if path in source else None  # None: experts, filled below
        if len(path) == 4 and path[0] == "layers":
            layer, module, name = model.layers[path[1]], path[2], path[3]
            if module == "attn" and name in ATTENTION_TARGETS and layer.attn.adapter(name) is not None:
                value = (value.astype(jnp.float32) + layer.attn.lora.dense_delta(name)).astype(value.dtype)
            elif module == "mlp" and name in ("w1", "w2", "w1_blocks", "w2_blocks", "w1_scales", "w2_scales"):
                layers.setdefault(path[1], {})[name] = var
                continue
        var.set_value(value)
    for i, vars_ in layers.items():
        mlp = model.layers[i].mlp
        ew = mlp.expert_weights()
        for t, w in (("w1", ew.w1), ("w2", ew.w2)):
            ad = mlp.lora.adapter(t) if mlp.lora is not None else None
            if ad is None and mlp.experts == experts:  # untouched: the stored values as they are
                for name, var in vars_.items():
                    if name.startswith(t):
                        var.set_value(source[("layers", i, "mlp", name)].get_value())
                continue
            merged = _merged_experts(w, ad, experts == "mxfp4", model.dtype)
            if experts == "mxfp4":
                vars_[f"{t}_blocks"].set_value(merged.blocks)
                vars_[f"{t}_scales"].set_value(merged.scales)
            else:
                vars_[t].set_value(merged)
    return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnames=("packed", "dtype"))
def _merged_experts(w, adapter, packed: bool, dtype):
    """w: dense [E, in, out] or MXFP4 logical [E, out, in]; adapter: (A [E, in, r], scale*B
    [E, r, out]) or None. One expert at a time (`lax.map`): never more than one decoded expert."""

    def one(args):
        w_e, ad = args
        dense = jnp.swapaxes(w_e.dequantize(jnp.float32), 0, 1) if isinstance(w_e, MXFP4) else w_e.astype(jnp.float32)
        if ad is not None:
            dense = dense + ad[0].astype(jnp.float32) @ ad[1].astype(jnp.float32)
        return quantize(dense.T) if packed else dense.astype(dtype)

    return jax.lax.map(one, (w, adapter))


# ---------------------------------------------------------------------------- adapter files
ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def adapter_state(model) -> dict[str, jax.Array]:
    """{"layers.3.attn.lora.a_q": array, ...}: the adapters alone."""
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, LoRAParam))}


def save_adapters(model, path: str, *, extra: dict | None = None) -> None:
    """adapters.safetensors + adapter_config.json (rank, alpha, targets, and `extra`, e.g. the base)."""
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapters to save")
    os.makedirs(path, exist_ok=True)
    tensors = {k: np.asarray(jax.device_get(v)) for k, v in adapter_state(model).items()}
    save_file(tensors, os.path.join(path, ADAPTER_FILE), metadata={"format": "gptoss_jax-lora"})
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump({**model.lora_config.to_dict(), **(extra or {})}, f, indent=2)


def load_adapters(model, path: str):
    """Attach the adapters saved at `path` to `model` (in place; returns it). Every adapter tensor
    must be present with its shape; unknown tensors are errors."""
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        meta = json.load(f)
    cfg = LoRAConfig(rank=meta["rank"], alpha=meta["alpha"], targets=tuple(meta["targets"]))
    add_lora(model, cfg)
    _, where = open_all([os.path.join(path, ADAPTER_FILE)])
    state = nnx.state(model, LoRAParam)
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
    missing, unknown = sorted(set(flat) - set(where)), sorted(set(where) - set(flat))
    if missing or unknown:
        raise ValueError(f"{path}: adapters do not fit the model: missing {missing[:4]}, unknown {unknown[:4]}")
    for key, var in flat.items():
        value = where[key].get(key)
        if tuple(value.shape) != tuple(var.get_value().shape):
            raise ValueError(
                f"{path}: adapter {key} has shape {list(value.shape)}, the model expects {list(var.get_value().shape)}"
            )
        var.set_value(jax.device_put(value.astype(var.get_value().dtype), var.get_value().sharding))
    nnx.update(model, state)
    return model
