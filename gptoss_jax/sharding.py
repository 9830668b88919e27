"""Logical axis names -> mesh axes, in one rules table.

Every weight is declared with logical axes (`model._declare`); a rules table maps each logical axis
to a mesh axis (or None = replicated). A mesh axis used twice within one weight is an error, as is a
rule naming a mesh axis the mesh lacks. Axes whose size the mesh axis does not divide are left
replicated rather than failing, so small test models load on any mesh.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

DEFAULT_RULES: Mapping[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "experts": "expert",
    "expert_mlp": "tensor",
    "embed_blocks": "fsdp",
    "expert_mlp_blocks": "tensor",
}


def logical_to_spec(axes, shape, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES) -> PartitionSpec:
    used: dict[str, str] = {}
    spec = []
    for name, dim in zip(axes, shape):
        target = rules.get(name) if name is not None else None
        if target is not None and target not in mesh.shape:
            target = None  # this mesh does not have that axis: replicate
        if target is not None:
            if target in used:
                raise ValueError(f"mesh axis {target!r} is used twice (by logical axes "
                                 f"{used[target]!r} and {name!r}); fix the sharding rules")
            if dim % mesh.shape[target]:
                target = None
            else:
                used[target] = name
        spec.append(target)
    return PartitionSpec(*spec)


def variable_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """{variable path: NamedSharding} for every variable of an (abstract) model state."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("axes") or (None,) * len(var.get_value().shape)
        out[path] = NamedSharding(mesh, logical_to_spec(axes, var.get_value().shape, mesh, rules))
    return out


def make_mesh(shape: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A mesh over all devices; unnamed axes have size 1. Default: everything on `fsdp`."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    shape = dict(shape or {"fsdp": devices.size})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if int(np.prod(sizes)) != devices.size:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"have {devices.size}")
    # Auto axes: jit propagates shardings from the weights (jax.make_mesh would default to Explicit).
    return Mesh(devices.reshape(sizes), MESH_AXES)
