"""Training: losses as pure functions, the data pipeline, and the jitted step (loops build on them)."""

from gptoss_jax.train.losses import chunked_next_token_loss, next_token_loss, next_token_targets, token_cross_entropy

__all__ = ["next_token_loss", "next_token_targets", "chunked_next_token_loss", "token_cross_entropy"]
