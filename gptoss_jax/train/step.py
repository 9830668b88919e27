"""The training step: a jitted pure function of (state, batch).

- Mixed precision: the model computes in its own dtype (bf16 by default; norms and sinks fp32)
  while `TrainState.params` holds fp32 master copies of the trainable variables, which the
  optimizer updates; they are cast to the model's dtypes inside the step.
- Only `nnx.Param`s train (or what `trainable` selects); packed MXFP4 experts are `PackedWeight`s
  and stay frozen, passed through untouched.
- optax AdamW with linear warmup + cosine decay and global-norm clipping (`make_optimizer`);
  weight decay on matrices only.
- Optionally the router load-balancing loss (`moe.load_balancing_loss`) times a coefficient.
- Gradient accumulation over `accum_steps` micro-batches (a `lax.scan`); the loss is the mean
  over all targets of the whole batch, so accumulation gives the same update as one big batch.
- A step whose loss or gradient norm is not finite changes nothing but the counters
  (`skipped`, `bad_in_a_row`); the loop decides when to stop.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from gptoss_jax.lora import LoRAParam
from gptoss_jax.model import traced_token_check
from gptoss_jax.train.losses import chunked_next_token_loss, next_token_loss


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 1000
    end_learning_rate_fraction: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    router_aux_loss: float = 0.0  # coefficient of the router load-balancing loss (0 = off)


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    if cfg.total_steps <= cfg.warmup_steps:
        raise ValueError(f"total_steps ({cfg.total_steps}) must exceed warmup_steps ({cfg.warmup_steps})")
    return optax.warmup_cosine_decay_schedule(
        0.0,
        cfg.learning_rate,
        cfg.warmup_steps,
        cfg.total_steps,
        end_value=cfg.learning_rate * cfg.end_learning_rate_fraction,
    )


def _decay_mask(params):
    """Weight decay on matrices only: norm gains, biases and sinks (vectors) are not decayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(
        make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask
    )
    return adamw if cfg.clip_norm is None else optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)


class TrainState(NamedTuple):
    params: Any  # fp32 master copies of the trainable variables (an nnx.State)
    opt_state: Any
    step: jax.Array  # int32: updates applied + skipped
    skipped: jax.Array  # int32: steps skipped for a non-finite loss or gradient
    bad_in_a_row: jax.Array  # int32: consecutive skipped steps


class Trainer(NamedTuple):
    init: Any  # model -> TrainState
    step: Any  # (TrainState, batch) -> (TrainState, metrics)
    model: Any  # (TrainState) -> the model with the trained weights (in its compute dtypes)
    merge: Any  # (master params) -> the model with those weights (e.g. a reference policy's)
    step_fn: Any = None  # jitted (TrainState, batch, frozen) -> (TrainState, metrics): `step`'s program
    frozen: Any = None  # the variables that do not train (packed experts, ...), `step_fn`'s third argument


def next_token_objective(router_aux_loss: float = 0.0, loss_chunk: int = 0):
    """The SFT objective: mean next-token cross-entropy over the loss mask (targets inside their
    own document), plus `router_aux_loss` times the load-balancing loss. Batches: tokens,
    loss_mask, and optionally segment_ids / positions (packed rows). `loss_chunk` > 0 makes the
    logits that many positions at a time (`losses.chunked_next_token_loss`): the same loss,
    without the [B, T, V] fp32 logits."""

    def objective(model, micro):
        tokens = micro["tokens"]
        out = model(
            tokens,
            positions=micro.get("positions"),
            segment_ids=micro.get("segment_ids"),
            router_loss=router_aux_loss > 0,
            head=not loss_chunk,
        )
        # targets inside their own document (`losses.next_token_targets`)
        mask, seg = micro["loss_mask"], micro.get("segment_ids")
        if loss_chunk:
            mean, count = chunked_next_token_loss(out.hidden, model.unembed[...], tokens, mask, seg, chunk=loss_chunk)
        else:
            mean, count = next_token_loss(out.logits, tokens, mask, seg)
        sums = {"loss": mean * count}
        total = mean
        if router_aux_loss > 0:
            sums["router_loss"] = out.router_loss * count
            total = mean + router_aux_loss * out.router_loss
        return total * count, count, sums

    return objective


def make_trainer(
    model,
    optimizer: optax.GradientTransformation,
    *,
    accum_steps: int = 1,
    trainable=nnx.Param,
    router_aux_loss: float = 0.0,
    objective=None,
    loss_chunk: int = 0,
) -> Trainer:
    """Build the step for `model`'s structure. Batches are dicts of [accum_steps * B, ...] arrays,
    cut into `accum_steps` micro-batches along the first axis.

    objective(model, micro) -> (weighted sum, weight, {name: weighted sum}): the batch's loss is
        sum(weighted sums) / sum(weights) over the micro-batches, so accumulation gives the update
        of one big batch; each named metric is averaged the same way. Default: the next-token
        objective (`next_token_objective(router_aux_loss)`).
    trainable: an nnx filter of the variables to train (`nnx.Param`: everything but the packed
        experts; `lora.LoRAParam`: the adapters alone; see `trainable_filter`)."""
    objective = objective or next_token_objective(router_aux_loss, loss_chunk)
    graphdef, frozen_params, rest = nnx.split(model, trainable, ...)
    dtypes = jax.tree.map(lambda v: v.dtype, frozen_params)
    to_compute = lambda master: jax.tree.map(lambda p, d: p.astype(d), master, dtypes)
    merge = lambda master, rest=rest: nnx.merge(graphdef, to_compute(master), rest)
    # Every tree shaped like the trainable variables (master copies, AdamW moments, gradients) is
    # laid out as the variable itself. Nothing else says so: zeros (the moments, the accumulators)
    # depend on no input, and under jit the compiler replicated them on every device (a 20b SFT on
    # a v5e-8 held 8.6 GiB of replicated moments of the two embedding tables per chip).
    layouts = jax.tree.map(
        lambda v: v.sharding if isinstance(getattr(v, "sharding", None), NamedSharding) else False, frozen_params
    )
    place = lambda x, s: x if s is False else jax.lax.with_sharding_constraint(x, s)
    lay_out = lambda tree: jax.tree.map(place, tree, layouts)
    lay_out_opt = lambda opt_state: optax.tree_map_params(optimizer, place, opt_state, layouts)

    def init(m) -> TrainState:
        params = nnx.state(m, trainable)
        # copies: the step donates its state, which must not free the model's own arrays
        master = lay_out(jax.tree.map(lambda p: jnp.array(p, dtype=jnp.float32, copy=True), params))
        zero = lambda: jnp.zeros((), jnp.int32)
        return TrainState(master, lay_out_opt(optimizer.init(master)), zero(), zero(), zero())

    def step(state: TrainState, batch, rest):
        def weighted(master, micro):
            # no in-program token-id check (`model.traced_token_check`): it would add a host callback
            # to every step; the data pipeline checks the ids on the host (`train.sft.check_token_ids`)
            with traced_token_check(False):
                total, weight, sums = objective(merge(master, rest), micro)
            return total, (weight, sums)

        micro = jax.tree.map(lambda a: a.reshape((accum_steps, -1) + a.shape[1:]), batch)

        def one(carry, mb):
            g_acc, w_acc, s_acc = carry
            (_, (w, sums)), g = jax.value_and_grad(weighted, has_aux=True)(state.params, mb)
            return (jax.tree.map(jnp.add, g_acc, g), w_acc + w, jax.tree.map(jnp.add, s_acc, sums)), None

        zeros = lay_out(jax.tree.map(jnp.zeros_like, state.params))
        _, (_, sums_shape) = jax.eval_shape(weighted, state.params, jax.tree.map(lambda a: a[0], micro))
        sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), sums_shape)
        (grads, weight, sums), _ = jax.lax.scan(one, (zeros, jnp.float32(0.0), sums0), micro)
        weight = jnp.maximum(weight, 1e-9)
        grads = jax.tree.map(lambda g: g / weight, grads)
        metrics = {k: v / weight for k, v in sums.items()}
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(grad_norm)
        for v in metrics.values():
            finite &= jnp.all(jnp.isfinite(v))

        def apply(params, opt_state, grads):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return lay_out(optax.apply_updates(params, updates)), lay_out_opt(opt_state)

        # a branch, not `where(finite, new, old)` over the trees: that keeps old and new copies of the
        # parameters and moments alive at once (on CPU the update took 1.4-1.7x as long)
        params, opt_state = jax.lax.cond(finite, apply, lambda p, s, g: (p, s), state.params, state.opt_state, grads)
        # as the input state, so that the new state can take its buffers (donated)
        params, opt_state = lay_out(params), lay_out_opt(opt_state)
        new_state = TrainState(
            params,
            opt_state,
            state.step + 1,
            state.skipped + (~finite).astype(jnp.int32),
            jnp.where(finite, 0, state.bad_in_a_row + 1).astype(jnp.int32),
        )
        metrics.update(grad_norm=grad_norm, targets=weight, finite=finite)
        return new_state, metrics

    # the frozen variables are an argument, not constants closed over: the same program then
    # compiles from abstract arrays (`gptoss_jax.aot`)
    step_fn = jax.jit(step, donate_argnums=(0,))
    return Trainer(
        init, lambda state, batch: step_fn(state, batch, rest), lambda state: merge(state.params), merge, step_fn, rest
    )


def trainable_filter(*, lora: bool, norms_and_sinks: bool = False):
    """The nnx filter of what trains: the Params (full fine-tuning; packed experts stay frozen),
    or the LoRA adapters, optionally with the norm gains and attention sinks."""

    if not lora:
        return nnx.Param
    if not norms_and_sinks:
        return LoRAParam
    return nnx.Any(LoRAParam, nnx.All(nnx.Param, nnx.Any(nnx.PathContains("norm"), nnx.PathContains("sinks"))))
