import os

import pytest

from gptoss_jax.tokenizer import (NAMED_SPECIALS, VOCAB_SIZE, TokenizerError, load_tokenizer,
                                  read_o200k_base, special_tokens)

CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX.",
    "I'm sure they'll say it's fine; WE'RE NOT, you'd think. O'Neil's",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // C-style",
    "    four leading spaces, then      six inside, trailing   ",
    "\n\n\n\r\n\r\n \n \n\t\t\n",
    "1234567890123456789 3.14159265358979 -42 1e-10 0x7fffffff 1,000,000",
    "Ünïcödé naïve café résumé — “quotes” ‘single’ … ellipsis",
    "日本語のテキストと漢字、カタカナ。中文文本，标点符号！한국어 문장입니다.",
    "русский текст, ελληνικά, עברית, العربية, हिन्दी, ไทย",
    "emoji 🙂🤖👩🏽‍🚀 flags 🇫🇷🇯🇵 and ZWJ sequences 👨‍👩‍👧",
    "<|start|>user<|message|>special-token text is ordinary text here<|end|>",
    "https://example.com/path?query=1&x=y#frag user@example.org",
    "$$\\int_0^1 x^2\\,dx = \\frac{1}{3}$$ and `inline code` **bold**",
    "a" * 300 + " " + "ab" * 150,
    "   ",
    "",
    "x",
    "Tabs\tand\tspaces \t mixed\t \t.",
    "CamelCaseIdentifiers and snake_case_names and SCREAMING_CASE",
    "!!!???...,,,;;;:::---___===+++",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE",
    "数字123と英語abcの混在",
]


def test_rows_and_specials(tokenizer):
    assert tokenizer.vocab_size == VOCAB_SIZE == 201088
    names = special_tokens()
    assert len(names) == 201088 - 199998 and len(set(names.values())) == len(names)  # one name per id
    for i, name in NAMED_SPECIALS.items():
        assert tokenizer.token_id(name) == i and tokenizer.decode([i]) == name
    assert tokenizer.token_id("<|reserved_200018|>") == 200018
    assert tokenizer.token_id("<|reserved_201087|>") == 201087
    with pytest.raises(TokenizerError, match="not a special token"):
        tokenizer.token_id("<|nope|>")


def test_ids_equal_tiktoken_o200k_harmony(tokenizer):
    import tiktoken

    enc = tiktoken.get_encoding("o200k_harmony")
    for text in CORPUS:
        assert tokenizer.encode(text) == enc.encode_ordinary(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    batch = tokenizer.encode_batch(CORPUS)
    assert batch == [enc.encode_ordinary(t) for t in CORPUS]
    print(f"tokenizer parity: {len(CORPUS)} texts, {sum(map(len, batch))} tokens")
    # every special id decodes to the same text as tiktoken, except 200018 (see tokenizer.py)
    for i in list(range(199998, 200030)) + [201087]:
        if i != 200018:
            assert tokenizer.decode([i]) == enc.decode([i])


def test_ids_equal_openai_harmony_encoding(tokenizer, harmony_encoding):
    for text in CORPUS:
        assert tokenizer.encode(text) == harmony_encoding.encode(text, allowed_special=set(), disallowed_special=()), text
    assert tokenizer.decode([200018]) == harmony_encoding.decode_utf8([200018])


def test_spec_vector(tokenizer):
    assert tokenizer.encode("analysis") == [35644]
    assert tokenizer.encode("assistant") == [173781]
    assert tokenizer.encode("final") == [17196]


def test_hf_tokenizer_json_round_trip(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(tokenizer.hf.to_str())
    again = load_tokenizer(tmp_path)  # a checkpoint folder with tokenizer.json
    assert again.encode(CORPUS[9]) == tokenizer.encode(CORPUS[9])


def test_missing_or_corrupt_ranks(monkeypatch, tmp_path):
    bad = tmp_path / "o200k_base.tiktoken"
    bad.write_bytes(b"IQ== 0\n")
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "none"))
    import gptoss_jax.tokenizer as tk

    monkeypatch.setattr(tk, "_candidates", lambda: [("TIKTOKEN_ENCODINGS_BASE", str(bad))])
    with pytest.raises(TokenizerError, match="sha256"):
        read_o200k_base()
    with pytest.raises(TokenizerError, match="no tokenizer at"):
        load_tokenizer(os.path.join(tmp_path, "nothing-here"))
