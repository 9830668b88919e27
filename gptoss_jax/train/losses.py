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


def chunked_token_cross_entropy(hidden, table, targets, weights=None, *, chunk: int = 1024):
    """`token_cross_entropy` of the logits hidden [B, T, D] @ table[V, D]^T, computed `chunk`
    positions at a time: each chunk's logits are made, reduced and dropped, and the backward pass
    recomputes them (`jax.checkpoint`), so at most one chunk of [B, chunk, V] fp32 logits lives at
    once instead of three copies of [B, T, V] (9.2 GiB per 4,096-token row at V = 201,088)."""
    B, T, D = hidden.shape
    n = -(-T // chunk)
    pad = n * chunk - T
    w = jnp.ones((B, T), jnp.float32) if weights is None else weights.astype(jnp.float32)
    split = lambda a: jnp.moveaxis(
        jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)).reshape((B, n, chunk) + a.shape[2:]), 1, 0
    )  # padding positions get weight 0

    @jax.checkpoint
    def one(h, t, wc):
        logits = jnp.einsum("BTD,VD->BTV", h, table, preferred_element_type=jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, t[..., None].astype(jnp.int32), axis=-1)[..., 0]
        return jnp.sum(nll * wc)

    sums = jax.lax.map(lambda a: one(*a), (split(hidden), split(targets), split(w)))
    total = jnp.sum(w)
    return jnp.sum(sums) / jnp.maximum(total, 1.0), total


def next_token_targets(tokens, loss_mask=None, segment_ids=None):
    """The one definition of next-token targets: position t (t < T-1) predicts tokens[:, t+1].
    Returns (targets [B, T-1], weights [B, T-1] fp32). A target is scored when loss_mask[:, t+1]
    is set (None = every token) and, with segment_ids [B, T] (packed rows, 0 = padding), when it
    lies in the same document as its context: segment_ids[:, t+1] == segment_ids[:, t] != 0. So a
    row of packed documents is scored exactly as the documents run separately."""
    targets = tokens[:, 1:]
    w = jnp.ones(targets.shape, jnp.float32) if loss_mask is None else loss_mask[:, 1:].astype(jnp.float32)
    if segment_ids is not None:
        same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
        w = w * same.astype(jnp.float32)
    return targets, w


def next_token_loss(logits, tokens, loss_mask=None, segment_ids=None):
    """Mean cross-entropy of the targets of `next_token_targets` from logits[:, :-1] [B, T, V].
    Returns (loss, scored tokens)."""
    targets, w = next_token_targets(tokens, loss_mask, segment_ids)
    return token_cross_entropy(logits[:, :-1], targets, w)


def chunked_next_token_loss(hidden, table, tokens, loss_mask=None, segment_ids=None, *, chunk: int = 1024):
    """`next_token_loss` with the logits hidden [B, T, D] @ table[V, D]^T made `chunk` positions at
    a time (`chunked_token_cross_entropy`): the same targets and weights, without [B, T, V]."""
    targets, w = next_token_targets(tokens, loss_mask, segment_ids)
    return chunked_token_cross_entropy(hidden[:, :-1], table, targets, w, chunk=chunk)


# ------------------------------------------------------------------------------ RL objectives
# Shapes: G sequences of a prompt form a group; batches are [N, T] with N = prompts * G, rows of
# one group adjacent. logp / old_logp / ref_logp: per-token log-probs of the sampled tokens under
# the current policy, the policy that sampled them, and the reference; mask: 1 on response tokens.


def group_advantages(rewards, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6):
    """GRPO advantages: each reward minus its group's mean, divided by the group's std (population,
    as the paper) when `normalize_std`. rewards [N] -> [N]."""
    r = rewards.astype(jnp.float32).reshape(-1, group_size)
    a = r - r.mean(axis=1, keepdims=True)
    if normalize_std:
        a = a / (r.std(axis=1, keepdims=True) + eps)
    return a.reshape(-1)


def kl_k3(logp, ref_logp):
    """Per-token k3 estimator of KL(policy || reference) on samples from the policy:
    exp(ref - logp) - (ref - logp) - 1 (unbiased, never negative)."""
    d = (ref_logp - logp).astype(jnp.float32)
    return jnp.exp(d) - d - 1.0


def _aggregate(per_token, mask, how: str):
    mask = mask.astype(jnp.float32)
    if how == "token":  # every response token of the batch weighs the same
        return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    if how == "sequence":  # each sequence's token mean, then the mean over sequences
        per_seq = jnp.sum(per_token * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        return jnp.mean(per_seq)
    raise ValueError(f"aggregation must be 'token' or 'sequence', got {how!r}")


def grpo_loss(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    clip_eps: float = 0.2,
    kl_coef: float = 0.0,
    ref_logp=None,
    aggregate: str = "token",
):
    """GRPO: the PPO clipped surrogate per token with the sequence's advantage, minus
    kl_coef * k3 KL to the reference, negated and averaged (`aggregate`: "token" | "sequence").
    Returns (loss, metrics: ratio mean, clip fraction, kl)."""
    ratio = jnp.exp((logp - old_logp).astype(jnp.float32))
    adv = advantages.astype(jnp.float32)[:, None]
    unclipped, clipped = ratio * adv, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    objective = jnp.minimum(unclipped, clipped)
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else jnp.zeros_like(ratio)
    loss = -_aggregate(objective - kl_coef * kl, mask, aggregate)
    metrics = {
        "ratio": _aggregate(ratio, mask, "token"),
        "clip_fraction": _aggregate((clipped < unclipped).astype(jnp.float32), mask, "token"),
        "kl": _aggregate(kl, mask, "token"),
    }
    return loss, metrics


def gspo_loss(logp, old_logp, advantages, mask, *, clip_eps: float = 3e-4, kl_coef: float = 0.0, ref_logp=None):
    """GSPO: one importance ratio per sequence, s = exp(mean over its tokens of logp - old_logp)
    (length-normalized), clipped as in PPO around 1 with the sequence's advantage; the loss is
    minus the mean over sequences (plus kl_coef * token-mean k3 KL). Returns (loss, metrics)."""
    m = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m, axis=1), 1.0)
    log_s = jnp.sum((logp - old_logp).astype(jnp.float32) * m, axis=1) / n
    s = jnp.exp(log_s)
    adv = advantages.astype(jnp.float32)
    unclipped, clipped = s * adv, jnp.clip(s, 1 - clip_eps, 1 + clip_eps) * adv
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else jnp.zeros_like(m)
    kl_mean = _aggregate(kl, mask, "token")
    loss = -jnp.mean(jnp.minimum(unclipped, clipped)) + kl_coef * kl_mean
    metrics = {
        "ratio": jnp.mean(s),
        "clip_fraction": jnp.mean((clipped < unclipped).astype(jnp.float32)),
        "kl": kl_mean,
    }
    return loss, metrics


def token_logprobs(logits, tokens):
    """log p(tokens[:, t+1] | ...) from logits[:, t], in fp32: [B, T-1]; and the entropy of each
    of those next-token distributions [B, T-1]."""
    logp_all = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    lp = jnp.take_along_axis(logp_all, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return lp, entropy
