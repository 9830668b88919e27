"""The LoRA adapter modules the model carries: low-rank factors beside a frozen base weight.

A target W (used as y = x W) gains y += scale * (x A) B with A [in, r], B [r, out] and
scale = alpha / rank; B starts at zero, so a fresh adapter leaves the model unchanged. Attention's
q/k/v/o get one pair each (`AttentionLoRA`); each expert's two matrices get a stack of pairs
(`ExpertLoRA`), handed to the MoE as `Adapter`s that go through the same grouped dispatch as the
tokens. Attaching, merging and saving adapters on a whole model is `gptoss_jax.lora`.

Adapters are `LoRAParam`s (a subclass of `nnx.Param`), so `nnx.Param` filters include them and
`LoRAParam` filters select only them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax.layers import LowRank


class Adapter(NamedTuple):
    """A per-expert LoRA update of an expert matrix: x -> (x a_e) b_e, the LoRA scale folded into b."""

    a: jax.Array  # [E, in, r]
    b: jax.Array  # [E, r, out]


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
        shapes = {
            "q": ((D, r), ("embed", None), (r, N, H), (None, "q_heads", "head_dim"), D),
            "k": ((D, r), ("embed", None), (r, K, H), (None, "kv_heads", "head_dim"), D),
            "v": ((D, r), ("embed", None), (r, K, H), (None, "kv_heads", "head_dim"), D),
            "o": ((N, H, r), ("q_heads", "head_dim", None), (r, D), (None, "embed"), N * H),
        }
        _declare_adapters(self, shapes, lora, dtype, key)

    def adapter(self, target: str) -> LowRank | None:
        """The adapter of `target` for `layers.linear`, or None."""
        a = getattr(self, f"a_{target}")
        return None if a is None else LowRank(a[...], getattr(self, f"b_{target}")[...], self.scale)

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
        shapes = {
            "w1": ((E, D, r), ("experts", "embed", None), (E, r, 2 * F), ("experts", None, "expert_mlp"), D),
            "w2": ((E, F, r), ("experts", "expert_mlp", None), (E, r, D), ("experts", None, "embed"), F),
        }
        _declare_adapters(self, shapes, lora, dtype, key)

    def adapter(self, target: str) -> Adapter | None:
        """(A, scale * B) for `moe.ExpertWeights`, or None."""
        a = getattr(self, f"a_{target}")
        if a is None:
            return None
        b = getattr(self, f"b_{target}")[...]
        return Adapter(a[...], (b.astype(jnp.float32) * self.scale).astype(b.dtype))
