"""Losses as pure functions of arrays, in fp32 whatever the compute dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits, targets, weights=None):
    """Weighted mean of -log p(target) over tokens: logits [B, T, V], targets [B, T] int,
    weights [B, T] (e.g. a loss mask; None = all ones). Returns (loss, total weight)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    w = jnp.ones_like(nll) if weights is None else weights.astype(jnp.float32)
    total = jnp.sum(w)
    return jnp.sum(nll * w) / jnp.maximum(total, 1.0), total


def next_token_loss(logits, tokens, loss_mask=None):
    """Predict tokens[:, 1:] from logits[:, :-1]; loss_mask [B, T] marks the tokens to predict
    (position t is scored when loss_mask[:, t] is set, t >= 1). Returns (loss, scored tokens)."""
    weights = None if loss_mask is None else loss_mask[:, 1:]
    return token_cross_entropy(logits[:, :-1], tokens[:, 1:], weights)
