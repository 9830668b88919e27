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

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax.moe import Adapter

ATTENTION_TARGETS = ("q", "k", "v", "o")
EXPERT_TARGETS = ("w1", "w2")  # gate/up [D -> 2F] and down [F -> D] of every expert
TARGETS = ATTENTION_TARGETS + EXPERT_TARGETS


class LoRAParam(nnx.Param):
    """A trainable low-rank adapter factor."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets must be a non-empty subset of {TARGETS}, got {self.targets}")
        if not (isinstance(self.rank, int) and self.rank > 0):
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


def _declare_adapters(module, shapes: dict, lora: LoRAConfig, dtype, key) -> None:
    """`a_<t>`, `b_<t>` on `module` for each target t of `shapes` (None where not a target).
    shapes: {t: (A shape, A logical axes, B shape, B logical axes, fan-in)}.
    A ~ N(0, 1/fan_in), so x A has the scale of x; B = 0."""
    for i, (t, (a_shape, a_axes, b_shape, b_axes, fan_in)) in enumerate(shapes.items()):
        a = b = None
        if t in lora.targets:
            a_value = jax.random.normal(jax.random.fold_in(key, i), a_shape, jnp.float32) / math.sqrt(fan_in)
            a = LoRAParam(a_value.astype(dtype), axes=a_axes, eager_sharding=False)
            b = LoRAParam(jnp.zeros(b_shape, dtype), axes=b_axes, eager_sharding=False)
        setattr(module, f"a_{t}", a)
        setattr(module, f"b_{t}", b)


class AttentionLoRA(nnx.Module):
    """Adapters of q/k/v ([D] -> [heads, H]) and o ([N, H] -> [D])."""

    def __init__(self, cfg, lora: LoRAConfig, *, dtype, key):
        D, N, K, H, r = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, lora.rank
        self.scale = lora.scale
        shapes = {"q": ((D, r), ("embed", None), (r, N, H), (None, "q_heads", "head_dim"), D),
                  "k": ((D, r), ("embed", None), (r, K, H), (None, "kv_heads", "head_dim"), D),
                  "v": ((D, r), ("embed", None), (r, K, H), (None, "kv_heads", "head_dim"), D),
                  "o": ((N, H, r), ("q_heads", "head_dim", None), (r, D), (None, "embed"), N * H)}
        _declare_adapters(self, shapes, lora, dtype, key)

    def delta(self, target: str, h, spec_in: str, spec_out: str):
        """scale * (h A) B in fp32 (`target` must have an adapter). spec_in / spec_out: the
        einsums of h with A and of (h A) with B."""
        ha = jnp.einsum(spec_in, h, getattr(self, f"a_{target}")[...],
                        preferred_element_type=jnp.float32).astype(h.dtype)
        return self.scale * jnp.einsum(spec_out, ha, getattr(self, f"b_{target}")[...],
                                       preferred_element_type=jnp.float32)

    def delta_available(self, target: str) -> bool:
        return getattr(self, f"a_{target}") is not None

    def dense_delta(self, target: str):
        """The update scale * A B as a weight of the base's shape (fp32), for merging."""
        a, b = getattr(self, f"a_{target}")[...], getattr(self, f"b_{target}")[...]
        if target == "o":
            return self.scale * jnp.einsum("NHr,rD->NHD", a.astype(jnp.float32), b.astype(jnp.float32))
        return self.scale * jnp.einsum("Dr,rKH->DKH", a.astype(jnp.float32), b.astype(jnp.float32))


class ExpertLoRA(nnx.Module):
    """Per-expert adapters: w1 (A [E, D, r], B [E, r, 2F]) and w2 (A [E, F, r], B [E, r, D])."""

    def __init__(self, cfg, lora: LoRAConfig, *, dtype, key):
        D, E, F, r = cfg.d_model, cfg.num_experts, cfg.expert_dim, lora.rank
        self.scale = lora.scale
        shapes = {"w1": ((E, D, r), ("experts", "embed", None), (E, r, 2 * F), ("experts", None, "expert_mlp"), D),
                  "w2": ((E, F, r), ("experts", "expert_mlp", None), (E, r, D), ("experts", None, "embed"), F)}
        _declare_adapters(self, shapes, lora, dtype, key)

    def adapter(self, target: str) -> Adapter | None:
        """(A, scale * B) for `moe.ExpertWeights`, or None."""
        a = getattr(self, f"a_{target}")
        if a is None:
            return None
        b = getattr(self, f"b_{target}")[...]
        return Adapter(a[...], (b.astype(jnp.float32) * self.scale).astype(b.dtype))


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
        from gptoss_jax.sharding import shard_model
        shard_model(model, model.mesh)
    return model


def has_lora(model) -> bool:
    return getattr(model, "lora_config", None) is not None


def merge_lora(model, *, experts: str | None = None):
    """A new model with every adapter folded into its base weight (fp32 sums, then the model's
    dtype) and no adapters. experts: "mxfp4" | "dense" | None (= as the model stores them);
    packed experts are decoded, updated and re-encoded one expert at a time."""
    from gptoss_jax.model import EXPERT_FORMATS, abstract

    experts = experts or model.experts
    if experts not in EXPERT_FORMATS:
        raise ValueError(f"experts must be one of {EXPERT_FORMATS}, got {experts!r}")
    target = abstract(model.cfg, dtype=model.dtype, experts=experts)
    graphdef, state = nnx.split(target)
    source = dict(nnx.to_flat_state(nnx.state(model)))
    layers = {}
    for path, var in nnx.to_flat_state(state):
        value = source[path].get_value() if path in source else None  # None: experts, filled below
        if len(path) == 4 and path[0] == "layers":
            layer, module, name = model.layers[path[1]], path[2], path[3]
            if module == "attn" and name in ATTENTION_TARGETS and layer.attn.lora is not None \
                    and layer.attn.lora.delta_available(name):
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
    merged_model = nnx.merge(graphdef, state)
    merged_model.kernel, merged_model.mesh = model.kernel, model.mesh
    return merged_model


@functools.partial(jax.jit, static_argnames=("packed", "dtype"))
def _merged_experts(w, adapter, packed: bool, dtype):
    """w: dense [E, in, out] or MXFP4 logical [E, out, in]; adapter: (A [E, in, r], scale*B
    [E, r, out]) or None. One expert at a time (`lax.map`): never more than one decoded expert."""
    from gptoss_jax.mxfp4 import MXFP4, quantize

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
    import numpy as np

    from gptoss_jax.safetensors_io import save_file

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
    from gptoss_jax.safetensors_io import open_all

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
            raise ValueError(f"{path}: adapter {key} has shape {list(value.shape)}, the model "
                             f"expects {list(var.get_value().shape)}")
        var.set_value(jax.device_put(value.astype(var.get_value().dtype), var.get_value().sharding))
    nnx.update(model, state)
    return model
