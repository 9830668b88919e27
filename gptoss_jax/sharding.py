"""One device mesh, logical axis names, and one rules table from the first to the second.

The mesh has four named axes, always in this order (an axis of size 1 costs nothing):

    data    pure data parallelism: weights replicated, the batch split
    fsdp    the batch split *and* the weights' `embed` dimension sharded (gathered where used)
    tensor  attention heads, expert hidden width and vocabulary split (Megatron-style)
    expert  experts split; outside the MoE layer it acts as one more batch axis

Every weight is declared with logical axes (`model._declare`) and activations name theirs where
they are constrained; `DEFAULT_RULES` maps each logical axis to a mesh axis, a tuple of mesh axes,
or None (replicated). A mesh axis used twice within one spec is an error, as is a rule naming an
axis the mesh lacks. A dimension that the mesh axes do not divide is left replicated on those axes
rather than failing, so small test models load on any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")  # the mesh axes that split tokens outside the MoE layer

Rule = str | tuple[str, ...] | None

DEFAULT_RULES: Mapping[str, Rule] = {
    # weights
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "experts": "expert",
    "expert_mlp": "tensor",
    "embed_blocks": "fsdp",  # the D/32 axis of packed expert weights: whole MXFP4 blocks per shard
    "expert_mlp_blocks": "tensor",
    # activations
    "batch": BATCH_AXES,
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_vocab": "tensor",
}


def _as_tuple(rule: Rule) -> tuple[str, ...]:
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def check_rules(rules: Mapping[str, Rule]) -> None:
    """Every rule names mesh axes that exist, each at most once."""
    for name, rule in rules.items():
        axes = _as_tuple(rule)
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(
                f"sharding rule {name!r} -> {rule!r} names unknown mesh axes {bad}; the mesh axes are {MESH_AXES}"
            )
        if len(set(axes)) != len(axes):
            raise ValueError(f"sharding rule {name!r} -> {rule!r} repeats a mesh axis")


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Mapping[str, Rule] = DEFAULT_RULES
) -> PartitionSpec:
    """The PartitionSpec that `rules` give an array of `shape` with logical `axes` on `mesh`."""
    if len(axes) != len(shape):
        raise ValueError(f"{len(axes)} logical axes {tuple(axes)} for a shape of rank {len(shape)}")
    used: dict[str, str] = {}
    spec = []
    for name, dim in zip(axes, shape):
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        chosen = []
        for target in _as_tuple(rules.get(name) if name is not None else None):
            if target not in MESH_AXES:
                raise ValueError(f"sharding rule {name!r} names unknown mesh axis {target!r}")
            if target not in mesh.shape:
                continue
            if target in used:
                raise ValueError(
                    f"mesh axis {target!r} is used twice (by logical axes "
                    f"{used[target]!r} and {name!r}); fix the sharding rules"
                )
            if dim % (math.prod(mesh.shape[a] for a in chosen) * mesh.shape[target]):
                continue  # does not divide: stay replicated on this mesh axis
            chosen.append(target)
            used[target] = name
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def named_sharding(axes, shape, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def variable_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """{variable path: NamedSharding} for every variable of an (abstract) model state."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        shape = var.get_value().shape
        axes = var.get_metadata().get("axes") or (None,) * len(shape)
        out[path] = named_sharding(axes, shape, mesh, rules)
    return out


def shard_model(model, mesh: Mesh, rules=DEFAULT_RULES):
    """Move an existing model's weights onto `mesh` by their logical axes (in place) and return it;
    it then runs expert-parallel there. `init`/`load` with `mesh=` never materialise it whole."""
    state = nnx.state(model)
    shardings = variable_shardings(state, mesh, rules)
    for path, var in nnx.to_flat_state(state):
        var.set_value(jax.device_put(var.get_value(), shardings[path]))
    nnx.update(model, state)
    model.mesh = mesh
    return model


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None, rules=DEFAULT_RULES):
    """`with_sharding_constraint` by logical axes; a no-op without a mesh or on one device."""
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(axes, x.shape, mesh, rules))


def make_mesh(
    *, data: int = 1, fsdp: int = 1, tensor: int = 1, expert: int = 1, devices: Sequence | None = None
) -> Mesh:
    """A mesh with the axes ("data", "fsdp", "tensor", "expert") over `devices` (all devices of
    all processes by default). One size may be -1: it takes whatever the others leave.

    Devices are laid out in jax.devices() order with `expert` fastest: on multi-host runs the
    innermost axes (expert, tensor) stay within a host when they fit, where links are fastest."""
    devices = np.asarray(devices if devices is not None else jax.devices(), dtype=object).reshape(-1)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert}
    for name, n in sizes.items():
        if not isinstance(n, (int, np.integer)) or (n < 1 and n != -1):
            raise ValueError(f"mesh axis {name} must be a positive int or -1, got {n!r}")
    free = [a for a, n in sizes.items() if n == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free}")
    known = math.prod(n for n in sizes.values() if n != -1)
    if free:
        if devices.size % known:
            raise ValueError(f"{devices.size} devices do not split into {sizes}")
        sizes[free[0]] = devices.size // known
    total = math.prod(sizes.values())
    if total != devices.size:
        raise ValueError(f"mesh {sizes} needs {total} devices, have {devices.size}")
    # Auto axes: jit propagates shardings from the weights (jax.make_mesh would make them Explicit).
    return Mesh(devices.reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)


def mesh_from_config(spec: Mapping[str, int] | None, devices=None) -> Mesh:
    """`make_mesh` from a config mapping such as {"data": 2, "expert": 4}; unknown keys are errors.
    None or {} puts every device on `data`."""
    spec = dict(spec or {"data": -1})
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; the mesh axes are {MESH_AXES}")
    return make_mesh(**{k: int(v) for k, v in spec.items()}, devices=devices)


def parse_mesh(text: str) -> dict[str, int]:
    """ "data=2,expert=4" -> {"data": 2, "expert": 4} (the CLI's --mesh)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--mesh wants axis=size pairs such as 'data=2,expert=4', got {part!r}")
        try:
            out[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"mesh axis {name.strip()!r} needs an integer size, got {value!r}") from None
    return out


def batch_spec(mesh: Mesh, batch_size: int, rules=DEFAULT_RULES) -> PartitionSpec:
    """How a [batch, ...] input is split over the mesh."""
    return logical_to_spec(("batch",), (batch_size,), mesh, rules)


check_rules(DEFAULT_RULES)
