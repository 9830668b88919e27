"""Errors shared by modules that do not import each other."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, or does not hold exactly the tensors of the model."""
