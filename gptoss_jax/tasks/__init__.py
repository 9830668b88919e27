"""Synthetic tasks shipped with the package (data generators, answer checkers) for the
quickstart and the fine-tuning experiments."""
