"""Checks a command makes against a checkpoint before any of its weights are read: its config.json,
the token ids of a prompt, a tokenizer's size against the model's vocabulary. Also the
tokenizer.json that travels beside a checkpoint when it is copied. Each check raises ValueError
with a message fit to show a user as it is."""

from __future__ import annotations

import os

import gptoss_jax as gj
from gptoss_jax import atomic
from gptoss_jax.checkpoint import find_checkpoint
from gptoss_jax.config import ModelConfig
from gptoss_jax.train.config import PRESETS


def checkpoint_config(path) -> ModelConfig:
    """A checkpoint's ModelConfig from its config.json alone (no weights read)."""

    return ModelConfig.from_pretrained(find_checkpoint(path).root)


def check_tokenizer_fits(tokenizer, vocab_size: int, fix: str) -> None:
    """A tokenizer with more ids than the model's embedding rows would feed it invalid ids; `fix`
    ends the message with what to do about it."""

    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer{' ' + tokenizer.name if tokenizer.name else ''} has {tokenizer.vocab_size} ids but "
            f"the model's vocabulary only {vocab_size}: {fix}"
        )


def check_prompt(ids, cfg: ModelConfig, max_new_tokens: int) -> None:
    """What `generate` checks of a prompt's ids, before the model is loaded: every id in the
    vocabulary, and room in the context for the prompt and `max_new_tokens` more."""

    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(
            f"the prompt has token ids outside the vocabulary [0, {cfg.vocab_size}) of the checkpoint: "
            f"{bad[:5]} (is --tokenizer the checkpoint's tokenizer?)"
        )
    if len(ids) + max_new_tokens > cfg.max_position:
        raise ValueError(
            f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the context of "
            f"{cfg.max_position} tokens (lower --max-new-tokens or shorten the prompt)"
        )


def check_run_tokenizer(cfg, checkpoint=None) -> None:
    """A run's data are ids of `model.tokenizer` of the experiment config `cfg`, checked against
    the vocabulary of the model it trains or evaluates (`checkpoint`, model.checkpoint, or the
    preset with its overrides)."""

    source = checkpoint or cfg.model.checkpoint
    if source:
        vocab = checkpoint_config(source).vocab_size
        fix = f"set model.tokenizer to the tokenizer of {source}"
    else:
        vocab = PRESETS[cfg.model.preset]().replace(**cfg.model.overrides).vocab_size
        fix = "set model.tokenizer to the model's tokenizer or model.overrides.vocab_size to the tokenizer's size"
    check_tokenizer_fits(gj.load_tokenizer(cfg.model.tokenizer), vocab, fix)


def copy_tokenizer(src: str, dst: str) -> str | None:
    """Copy the tokenizer.json of the checkpoint `src` (in its folder, else the folder above, as
    `load_tokenizer` looks) into the folder `dst`; returns the file copied, None if there is none."""

    for folder in (src, os.path.dirname(os.path.abspath(src))):
        path = os.path.join(folder, "tokenizer.json")
        if os.path.isfile(path):
            atomic.copy_file(path, os.path.join(dst, "tokenizer.json"))
            return path
    return None
