"""The mixture-of-experts block, in two rooms:

- `moe.core`: the model's MoE — routing (top-k, then a softmax over the k), sorting tokens by
  expert, the expert MLPs, the weighted combine; the dense reference and the grouped path that
  GPUs and TPUs run (`moe_ragged`, the MXFP4 grouped matmul for packed experts).
- `moe.cpu`: how it runs on a CPU (`moe_chunks`, `moe_buckets`, `moe_gather`), built on one
  per-expert function and one capacity switch.

`MOE_IMPLS` names the five paths; `moe()` routes and runs one of them with its own options,
which the model's plan resolves (`gptoss_jax.plan`). On a device mesh the layer runs
expert-parallel (`gptoss_jax.expert_parallel`), built from the same pieces.
"""

from gptoss_jax.adapters import Adapter
from gptoss_jax.moe.core import (
    ExpertWeights,
    Routing,
    Sorted,
    bucket_ranks,
    combine,
    expert_mlp,
    grouped_lora_delta,
    grouped_lora_factors,
    grouped_mlp,
    in_out,
    load_balancing_loss,
    lora_delta,
    moe_dense_reference,
    moe_ragged,
    route,
    sort_by_expert,
)
from gptoss_jax.moe.cpu import (
    bucket_capacities,
    bucket_mlp,
    capacity_switch,
    chunk_count,
    chunk_rows,
    expert_outputs,
    moe_buckets,
    moe_chunks,
    moe_gather,
    one_expert,
)

MOE_IMPLS = {
    "dense": moe_dense_reference,
    "ragged": moe_ragged,
    "buckets": moe_buckets,
    "chunks": moe_chunks,
    "gather": moe_gather,
}


def moe(x, router_w, router_b, ew: ExpertWeights, *, k: int, alpha: float, limit: float, impl: str, **options):
    """x [T, D] -> (out [T, D], routing) through `MOE_IMPLS[impl]`; `options` are that path's own
    (see `plan.Plan.moe_options`: the model resolves them from its `KernelOptions`)."""
    if impl not in MOE_IMPLS:
        raise ValueError(f"unknown MoE implementation {impl!r}; choose one of {sorted(MOE_IMPLS)}")
    routing = route(x, router_w, router_b, k)
    return MOE_IMPLS[impl](x, ew, routing, alpha=alpha, limit=limit, **options), routing


__all__ = [
    "Adapter",
    "ExpertWeights",
    "MOE_IMPLS",
    "Routing",
    "Sorted",
    "bucket_capacities",
    "bucket_mlp",
    "bucket_ranks",
    "capacity_switch",
    "chunk_count",
    "chunk_rows",
    "combine",
    "expert_mlp",
    "expert_outputs",
    "grouped_lora_delta",
    "grouped_lora_factors",
    "grouped_mlp",
    "in_out",
    "load_balancing_loss",
    "lora_delta",
    "moe",
    "moe_buckets",
    "moe_chunks",
    "moe_dense_reference",
    "moe_gather",
    "moe_ragged",
    "one_expert",
    "route",
    "sort_by_expert",
]
