import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax as gj
from gptoss_jax.cache import cache_bytes, init_cache
from gptoss_jax.sampling import ASSISTANT_STOP_TOKENS, SamplingParams, generate, sample
from tests.factory import rel_err


@pytest.fixture(scope="module")
def model(original_dir):
    return gj.load(original_dir, dtype="float32")


def test_cached_decode_equals_full_forward(model, tiny_cfg):
    # 3 rows with prompts of 11, 3 and 17 tokens, decoded one token at a time to 30 tokens:
    # well past 2 windows (W = 8), so every ring buffer wraps several times.
    T, prompts = 30, (11, 3, 17)
    W = tiny_cfg.sliding_window
    assert T > 2 * W
    toks = np.random.default_rng(0).integers(0, tiny_cfg.vocab_size, (3, T))
    full = np.asarray(jax.jit(lambda m, t: m(t).logits)(model, toks))
    cache = init_cache(tiny_cfg, 3, T, jnp.float32)
    P = max(prompts)
    seg = (np.arange(P)[None] < np.array(prompts)[:, None]).astype(np.int32)
    out = jax.jit(lambda m, t, s, c: m(t, segment_ids=s, cache=c))(model, np.where(seg, toks[:, :P], 0), seg, cache)
    got = {(b, t): np.asarray(out.logits[b, t]) for b in range(3) for t in range(prompts[b])}
    cache, pos = out.cache, list(prompts)
    step = jax.jit(lambda m, t, s, c: m(t, segment_ids=s, cache=c))
    while min(pos) < T:
        live = np.array([p < T for p in pos])
        t = np.array([[toks[b, min(pos[b], T - 1)]] for b in range(3)])
        o = step(model, jnp.asarray(t), jnp.asarray(live[:, None].astype(np.int32)), cache)
        cache = o.cache
        for b in range(3):
            if live[b]:
                got[(b, pos[b])] = np.asarray(o.logits[b, 0])
                pos[b] += 1
    assert np.asarray(cache.lengths).tolist() == [T] * 3
    ours = np.stack([np.stack([got[(b, t)] for t in range(T)]) for b in range(3)])
    rel = rel_err(ours, full)
    print(f"cached decode vs full forward: {rel:.2e}")
    assert rel <= 1e-5


def test_chunked_prefill_equals_single_chunk(model, tiny_cfg):
    toks = np.random.default_rng(1).integers(0, tiny_cfg.vocab_size, (1, 23))
    full = np.asarray(jax.jit(lambda m, t: m(t).logits)(model, toks))
    cache = init_cache(tiny_cfg, 1, 23, jnp.float32)
    outs = []
    step = jax.jit(lambda m, t, c: m(t, cache=c))
    for c in range(0, 23, 5):  # chunks of 5 < W = 8, last one partial
        o = step(model, toks[:, c : c + 5], cache)
        cache = o.cache
        outs.append(np.asarray(o.logits))
    assert rel_err(np.concatenate(outs, axis=1), full) <= 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_first_chunk_of_a_new_cache_attends_on_the_plans_path(dtype):
    """`empty_cache=True` (generate's first prefill chunk): the new tokens attend among themselves
    on the plan's attention path (the native CPU kernel here, in the HLO once per layer; through the
    cache it is XLA's) with the same logits as through the cache (fp32: 1e-5 of their scale; bf16:
    2 ulps; every expert on every token, so no routing choice flips on a rounding) on right-padded
    prompts longer than the window, and the same cache after: positions
    equal, keys and values equal in layer 0 (nothing before them differs) and within the logits'
    tolerance after. Control: the promise broken (a cache that holds tokens) gives other logits."""
    from gptoss_jax import cpu_matvec

    if not cpu_matvec.has_prefill_attention():
        pytest.skip("the native prefill attention kernel needs AVX-512F")  # hardware condition
    tiny_cfg = gj.tiny(experts_per_token=gj.tiny().num_experts)
    m = gj.init(tiny_cfg, seed=4, dtype=dtype, experts="dense")
    assert m.plan(3 * 16).attention == "cpu_native" and tiny_cfg.head_dim % 16 == 0
    W, prompts = tiny_cfg.sliding_window, (13, 4, 16)
    assert max(prompts) > W  # the sliding layers' rings keep the last W of the chunk
    toks = np.random.default_rng(5).integers(0, tiny_cfg.vocab_size, (3, 16))
    seg = (np.arange(16)[None] < np.array(prompts)[:, None]).astype(np.int32)
    toks = np.where(seg, toks, 0)
    cache = init_cache(tiny_cfg, 3, 40, m.dtype)
    fn = jax.jit(lambda m, t, s, c, e: m(t, segment_ids=s, cache=c, empty_cache=e), static_argnums=4)
    lowered = {e: fn.lower(m, toks, seg, cache, e).as_text() for e in (True, False)}
    assert lowered[True].count("gptoss_prefill_attention") == tiny_cfg.num_layers
    assert "gptoss_prefill_attention" not in lowered[False]
    new, old = fn(m, toks, seg, cache, True), fn(m, toks, seg, cache, False)
    valid = seg.astype(bool)
    a, b = np.asarray(new.logits, np.float32)[valid], np.asarray(old.logits, np.float32)[valid]
    tol = (1e-5 if dtype == "float32" else 2 * 2.0**-7) * np.abs(b).max()
    assert np.abs(a - b).max() <= tol
    np.testing.assert_array_equal(np.asarray(new.cache.lengths), prompts)
    for i, (x, y) in enumerate(zip(new.cache.layers, old.cache.layers)):
        np.testing.assert_array_equal(np.asarray(x.pos), np.asarray(y.pos))
        for u, w in ((x.k, y.k), (x.v, y.v)):
            u, w = np.asarray(u, np.float32), np.asarray(w, np.float32)
            assert np.array_equal(u, w) if i == 0 else np.abs(u - w).max() <= tol, i
    # control: the promise broken, the same chunk again into the cache it filled (the same programs)
    again = {e: np.asarray(fn(m, toks, seg, new.cache, e).logits, np.float32)[valid] for e in (True, False)}
    assert np.abs(again[True] - again[False]).max() > 10 * tol


def test_prefill_chunks():
    """generate's chunking: by default a first chunk of `first` tokens on a new cache (FIRST_CHUNK
    over the rows, PREFILL_CHUNK a row at least, halved while the MoE would change path), then
    PREFILL_CHUNK (padded); an explicit prefill_chunk for every chunk; none longer than the prompt."""
    from gptoss_jax.sampling import FIRST_CHUNK, PREFILL_CHUNK, _chunks, first_chunk

    F, P = FIRST_CHUNK, PREFILL_CHUNK
    assert _chunks(100, None, F) == [(0, 100)]
    assert _chunks(F + 1, None, F) == [(0, F), (F, P)]
    assert _chunks(F + P + 1, None, F) == [(0, F), (F, P), (F + P, P)]
    assert _chunks(23, 5, F) == [(0, 5), (5, 5), (10, 5), (15, 5), (20, 5)]
    assert _chunks(23, 50, F) == [(0, 23)]

    class Model:  # the plan's MoE path by tokens: gpt-oss-20b's on CPU, gathered up to 512 tokens
        def __init__(self, gather_up_to):
            self.gather_up_to = gather_up_to

        def plan(self, tokens):
            return types.SimpleNamespace(moe="gather" if tokens <= self.gather_up_to else "chunks")

    assert first_chunk(Model(10**9), rows=1) == F
    assert first_chunk(Model(10**9), rows=4) == F // 4
    assert first_chunk(Model(10**9), rows=F) == P  # PREFILL_CHUNK a row at least
    assert first_chunk(Model(512), rows=1) == 512  # halved until the path is the one at P tokens
    assert first_chunk(Model(300), rows=1) == P
    assert first_chunk(Model(100), rows=1) == F  # the path at P is already the bulk one: no change


@pytest.mark.parametrize("prefill_chunk", [8, None])
def test_greedy_generate_equals_repeated_full_forwards(model, tiny_cfg, prefill_chunk, monkeypatch):
    from gptoss_jax import sampling

    # the default chunking at this scale: a first chunk of 30 // 3 rows = 10 tokens on the new cache
    # (the MoE's path at 30 tokens is the one at 12), then chunks of 4
    monkeypatch.setattr(sampling, "FIRST_CHUNK", 30)
    monkeypatch.setattr(sampling, "PREFILL_CHUNK", 4)
    assert sampling.first_chunk(model, 3) == 10
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(0, tiny_cfg.vocab_size, n)) for n in (13, 4, 9)]
    n_new = 20
    g = generate(model, None, prompts, max_new_tokens=n_new, temperature=0, stop_tokens=(), prefill_chunk=prefill_chunk)
    assert g.stop_reason == ["length"] * 3
    # Oracle: the full forward without a cache, re-run on the whole sequence for every new token.
    # Padded to one length (causal: padding after the last token cannot change its logits) so
    # that one compilation serves every step.
    L = max(map(len, prompts)) + n_new
    full = jax.jit(lambda m, t, i: m(t, logits_at=i).logits[:, 0])
    for b, p in enumerate(prompts):
        seq = list(p)
        for _ in range(n_new):
            padded = np.array([seq + [0] * (L - len(seq))])
            seq.append(int(np.argmax(np.asarray(full(model, padded, np.array([len(seq) - 1]))[0]))))
        assert g.tokens[b] == seq[len(p) :]


def test_stop_tokens_and_streaming(model, tiny_cfg):
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11]]
    free = generate(model, None, prompts, max_new_tokens=6, temperature=0, stop_tokens=())
    stop_at = free.tokens[0][2]  # the third greedy token of row 0 becomes a stop token
    streamed = {0: [], 1: []}
    g = generate(
        model,
        None,
        prompts,
        max_new_tokens=6,
        temperature=0,
        stop_tokens=(stop_at,),
        stream=lambda row, toks: streamed[row].extend(toks),
    )
    first = free.tokens[0].index(stop_at)
    assert g.tokens[0] == free.tokens[0][: first + 1] and g.stop_reason[0] == "stop"
    assert streamed == {0: g.tokens[0], 1: g.tokens[1]}
    # <|end|> (200007) ends analysis messages mid-turn: it must not stop an assistant turn
    assert ASSISTANT_STOP_TOKENS == (200002, 200012)


def test_sampling_rules():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    key = jax.random.key(0)
    assert int(sample(logits, key, SamplingParams(temperature=0))[0]) == 0
    assert int(sample(logits, key, SamplingParams(temperature=1.0, top_k=1))[0]) == 0
    assert int(sample(logits, key, SamplingParams(temperature=1.0, top_p=0.4))[0]) == 0
    draws = jax.vmap(lambda k: sample(logits, k, SamplingParams(temperature=1.0, top_p=0.8))[0])(
        jax.random.split(key, 4000)
    )
    freq = np.bincount(np.asarray(draws), minlength=4) / 4000
    # top_p=0.8 keeps {0.5, 0.3} (the mass before 0.15 is already 0.8): renormalised 0.625/0.375
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)
    draws = jax.vmap(lambda k: sample(logits, k, SamplingParams(temperature=1.0))[0])(jax.random.split(key, 4000))
    np.testing.assert_allclose(np.bincount(np.asarray(draws), minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_seeded_sampling_is_reproducible(model):
    a = generate(model, None, [[5, 6, 7]], max_new_tokens=8, temperature=1.0, seed=3, stop_tokens=())
    b = generate(model, None, [[5, 6, 7]], max_new_tokens=8, temperature=1.0, seed=3, stop_tokens=())
    assert a.tokens == b.tokens


def test_generate_errors(model, tiny_cfg):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, None, [[1, 2, 10_000]], max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds the context"):
        generate(model, None, [[1] * 10], max_new_tokens=tiny_cfg.max_position)
    with pytest.raises(ValueError, match="empty"):
        generate(model, None, [[]], max_new_tokens=2)


def test_cache_memory_20b():
    cfg = gj.gpt_oss_20b()
    ours = cache_bytes(cfg, 1, 131072)
    naive = cfg.num_layers * 2 * 131072 * cfg.num_kv_heads * cfg.head_dim * 2  # bf16 K and V
    print(
        f"gpt-oss-20b KV cache at 131,072 tokens: {ours / 2**30:.3f} GiB (full-length on every layer: "
        f"{naive / 2**30:.3f} GiB, ratio {ours / naive:.4f})"
    )
    assert 0.5 <= ours / naive < 0.51


def test_large_weights_are_not_hoisted_out_of_the_decode_loop(tiny_cfg, monkeypatch):
    """The decode loop ties the weights to its step counter (`sampling.TIE_WEIGHTS`): XLA:CPU then
    cannot hoist the fp32 conversions of the bf16 weights out of the loop, and the compiled
    program holds no fp32 copy of them (the copies measured 6.7 GiB on a 2-layer gpt-oss-20b).
    The tokens are the same either way. (XLA's own products: the native CPU kernels read bf16
    weights in place, so their program holds no fp32 copy, tied or not; checked last.)"""
    from flax import nnx

    from gptoss_jax import cpu_matvec, sampling

    m = gj.init(tiny_cfg, seed=0, dtype=jnp.bfloat16, experts="dense", kernel=gj.KernelOptions(cpu_matvec=False))
    graphdef, state = nnx.split(m)
    cache = init_cache(tiny_cfg, 1, 16, m.dtype)
    args = (
        state,
        cache,
        jnp.zeros((1, tiny_cfg.vocab_size), jnp.float32),
        jax.random.key(0),
        jnp.zeros((1,), bool),
        jnp.zeros((1,), jnp.int32),
        jnp.full((1,), 4, jnp.int32),
    )
    params = SamplingParams(0.0, 1.0, 0)
    build = sampling._decode_fn.__wrapped__  # uncached: the flag is read when tracing
    temp, tokens = {}, {}
    for tie, flag in (("hoisted", False), ("tied", True)):
        monkeypatch.setattr(sampling, "TIE_WEIGHTS", flag)
        fn = build(graphdef, params, (), 4, False)
        temp[tie] = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
        tokens[tie] = np.asarray(fn(*args)[5])
    weight_f32 = sum(a.size * 4 for a in jax.tree.leaves(state) if a.dtype == jnp.bfloat16)
    assert temp["hoisted"] - temp["tied"] > weight_f32 / 2, (temp, weight_f32)
    np.testing.assert_array_equal(tokens["tied"], tokens["hoisted"])
    if cpu_matvec.available():
        m.kernel = gj.KernelOptions()
        graphdef, state = nnx.split(m)
        fn = build(graphdef, params, (), 4, False)
        assert fn.lower(state, *args[1:]).compile().memory_analysis().temp_size_in_bytes < weight_f32 / 2
