"""Training: losses as pure functions, the data pipeline, and the jitted step (loops build on them)."""

from gptoss_jax.train.losses import next_token_loss, token_cross_entropy

__all__ = ["next_token_loss", "token_cross_entropy"]
