"""Kernels inside `shard_map`: keeping track of which mesh axes a value varies over.

Under `shard_map(check_vma=True)` every value carries the set of manual mesh axes it varies over
(`jax.typeof(x).mat.varying`). Three places need it spelled out: a loop carry created from
constants must vary like the operands it accumulates, a `pallas_call` output shape must say how
it varies, and a custom_vjp cotangent for a weight replicated over some axes must be summed over
them (the gradient of a shared weight is the sum of every device's contribution). Outside
`shard_map` all three are the identity.
"""

from __future__ import annotations

import jax
from jax.sharding import ManualAxisType


def vma(a) -> frozenset:
    """The manual mesh axes `a` varies over (empty outside shard_map)."""
    aval = jax.typeof(a)
    mat = getattr(aval, "mat", None)
    return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", ()) or ())


def union(*operands) -> frozenset:
    return frozenset().union(*(vma(a) for a in operands if a is not None))


def varying_like(init, *operands):
    """`init` (e.g. zeros for a loop carry) varying over the operands' axes as well as its own."""
    axes = union(*operands) - vma(init)
    return jax.lax.pcast(init, tuple(sorted(axes)), to="varying") if axes else init


def out_struct(shape, dtype, *operands) -> jax.ShapeDtypeStruct:
    """A `pallas_call` out_shape that varies like its operands."""
    axes = union(*operands)
    if not axes:
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=ManualAxisType(varying=axes))


def sum_to(ct, primal):
    """A cotangent summed over the axes it varies on but its primal does not."""
    if ct is None:
        return None
    extra = vma(ct) - vma(primal)
    return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct
