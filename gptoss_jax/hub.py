"""Hugging Face hub ids ("openai/gpt-oss-20b") -> a local folder.

A path that exists locally always wins. Otherwise an id is looked up in the local Hugging Face cache
(`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`), laid out as the hub
client writes it:

    models--openai--gpt-oss-20b/refs/main            -> the commit hash of the cached main branch
    models--openai--gpt-oss-20b/snapshots/<commit>/  -> the repo's files (often links into blobs/)

When the cached snapshot lacks what is needed and `huggingface_hub` is installed (and
`HF_HUB_OFFLINE` is not set), only the needed files are downloaded: the HF layout's weights,
config and tokenizer files (never `original/` beside them), or the tokenizer files alone.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

from gptoss_jax.errors import CheckpointError

# The HF layout of a gpt-oss repo, without its `original/` and `metal/` copies of the weights.
# Patterns are matched against the whole path in the repo, and `*` crosses "/": every pattern is
# anchored at a root-level name so none of them reaches into a subfolder.
HF_LAYOUT_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "model*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
ORIGINAL_LAYOUT_PATTERNS = ("original/*",)
TOKENIZER_PATTERNS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class HubError(CheckpointError, OSError):
    """A hub id that is neither cached nor downloadable; the message says where it looked."""


def is_repo_id(text: str) -> bool:
    """ "owner/name" as the hub spells repo ids (not "./x", "/x", "a/b/c", "a/.."...)."""
    return bool(_REPO_ID.match(text)) and ".." not in text and not text.endswith(".")


def cache_dir() -> str:
    """The hub cache folder, resolved from the environment as the hub client does."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    home = os.environ.get("HF_HOME")
    if not home:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        home = os.path.join(xdg, "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def repo_folder(repo_id: str, cache: str | None = None) -> str:
    """Where the cache keeps a model repo: models--{owner}--{name}."""
    return os.path.join(cache or cache_dir(), "models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id: str, cache: str | None = None) -> str | None:
    """The snapshot folder that refs/main points to; with no refs/main, the only snapshot there is."""
    folder = repo_folder(repo_id, cache)
    snapshots = os.path.join(folder, "snapshots")
    ref = os.path.join(folder, "refs", "main")
    if os.path.isfile(ref):
        with open(ref) as f:
            commit = f.read().strip()
        snap = os.path.join(snapshots, commit)
        return snap if commit and os.path.isdir(snap) else None
    if os.path.isdir(snapshots):
        found = [d for d in os.listdir(snapshots) if os.path.isdir(os.path.join(snapshots, d))]
        if len(found) == 1:
            return os.path.join(snapshots, found[0])
    return None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _download(repo_id: str, cache: str, patterns: Sequence[str], ignore: Sequence[str]) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(
        repo_id, cache_dir=cache, allow_patterns=list(patterns), ignore_patterns=list(ignore) or None
    )


def resolve(
    path_or_id: str | os.PathLike,
    *,
    usable: Callable[[str], bool],
    patterns: Sequence[str],
    ignore: Sequence[str] = (),
    what: str = "checkpoint",
    accept_partial: bool = False,
) -> str:
    """A local path (returned as given when it exists or does not look like a hub id), or the
    cache snapshot folder of a hub id: the cached one when `usable(snapshot)`, else one
    downloaded with `patterns`. `accept_partial`: an unusable cached snapshot is still returned
    when nothing can be downloaded (the caller has a fallback for what is missing)."""
    text = os.fspath(path_or_id)
    if os.path.exists(text) or not is_repo_id(text):
        return text
    cache = cache_dir()
    snap = cached_snapshot(text, cache)
    if snap is not None and usable(snap):
        return snap
    where = repo_folder(text, cache)
    fix = (
        f"download it with `hf download {text}` (or `huggingface-cli download {text}`) where the "
        f"network is reachable, set HF_HUB_CACHE to the cache that holds it, or give the {what} folder"
    )
    state = "is incomplete" if snap is not None else "is not there"
    if offline():
        reason = "HF_HUB_OFFLINE is set, so nothing is downloaded"
    else:
        try:
            import huggingface_hub  # noqa: F401
        except ImportError:
            reason = "huggingface_hub is not installed (pip install huggingface_hub), so nothing is downloaded"
        else:
            try:
                got = _download(text, cache, patterns, ignore)
            except Exception as e:  # network, auth, unknown repo: one line for the user
                first = (str(e).strip().splitlines() or [""])[0]
                reason = f"downloading it failed ({type(e).__name__}: {first})"
            else:
                if usable(got):
                    return got
                reason = f"the downloaded snapshot {got} does not hold a usable {what}"
    if snap is not None and accept_partial:
        return snap
    raise HubError(
        f"{text}: no such local folder, and the Hugging Face cache entry {where} {state}; {reason}. To fix: {fix}"
    )


def resolve_tokenizer(path_or_id: str | os.PathLike) -> str:
    """A folder holding a hub id's tokenizer files (only those are downloaded when not cached).
    A cached snapshot without tokenizer.json (an `original/`-only download) is still returned when
    nothing can be downloaded: the tokenizer loader falls back to o200k_harmony for it."""
    return resolve(
        path_or_id,
        usable=lambda d: os.path.isfile(os.path.join(d, "tokenizer.json")),
        patterns=TOKENIZER_PATTERNS,
        what="tokenizer",
        accept_partial=True,
    )
