"""What `gptoss demo` and `gptoss info` show without a real checkpoint: the demo builds a small
random gpt-oss with the real structure, writes it as an HF checkpoint, loads it back and prints
what the model does (routing, sinks, windows, KV-cached generation); the info lines give the sizes
of the released presets from their shapes alone."""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import gptoss_jax as gj
from gptoss_jax import inspect
from gptoss_jax.cache import cache_bytes


def fmt_bytes(n: float) -> str:
    """A byte count for people: '512 B', '1.50 KiB', ... '2.00 TiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


PRESETS = {"20b": gj.gpt_oss_20b, "120b": gj.gpt_oss_120b}


def preset_info(name: str) -> list[str]:
    """The released model `name` ('20b' or '120b'): structure, parameters and stored bytes, packed
    and dense (from abstract shapes: no memory needed)."""

    cfg = PRESETS[name]()
    packed = gj.abstract(cfg, experts="mxfp4")
    dense_bytes = gj.parameter_bytes(gj.abstract(cfg, experts="dense"))
    return [
        f"gpt-oss-{name}: {cfg.num_layers} layers, {cfg.num_experts} experts (top-{cfg.experts_per_token}), "
        f"d_model {cfg.d_model}, window {cfg.sliding_window}",
        f"  parameters       {gj.parameter_count(packed):,}",
        f"  stored, packed   {fmt_bytes(gj.parameter_bytes(packed))}  (MXFP4 experts, bf16 rest)",
        f"  stored, dense    {fmt_bytes(dense_bytes)}  (bf16 everywhere)",
    ]


def config() -> gj.ModelConfig:
    """The demo's model: gpt-oss's structure at a size that runs in seconds on a CPU."""
    return gj.tiny(
        vocab_size=1024,
        d_model=128,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        head_dim=32,
        num_experts=16,
        experts_per_token=4,
        expert_dim=128,
        sliding_window=16,
    )


def run(out_dir: str, *, seed: int = 0, new_tokens: int = 8, out=None) -> bool:
    """The walk-through, printed to `out` (default stdout); the checkpoint goes to
    `out_dir`/checkpoint (replaced if there). False, and nothing more printed, if the loaded
    checkpoint's logits differ from the in-memory model's."""

    out = out or sys.stdout

    def say(line: str) -> None:
        print(line, file=out)

    t0 = time.time()
    cfg = config()
    say("== 1. a small gpt-oss with the real structure")
    say(
        f"   {cfg.num_layers} layers alternating sliding(window {cfg.sliding_window} keys, itself included)"
        f"/full attention, {cfg.num_heads} query heads sharing {cfg.num_kv_heads} KV heads, "
        f"{cfg.num_experts} experts top-{cfg.experts_per_token}, YaRN RoPE x{cfg.rope_factor:g}"
    )
    model = gj.init(cfg, seed=seed)
    say(
        f"   {gj.parameter_count(model):,} parameters, {fmt_bytes(gj.parameter_bytes(model))} as stored "
        f"(experts packed as MXFP4: uint8 blocks + e8m0 scales)"
    )

    ck = os.path.join(out_dir, "checkpoint")
    say(f"\n== 2. write it in the HF hub layout -> {ck}")
    gj.save_hf(model, ck, max_shard_bytes=1 << 20, overwrite=True)  # the demo's own folder, rerun
    for name in sorted(os.listdir(ck)):
        say(f"   {name:40s} {fmt_bytes(os.path.getsize(os.path.join(ck, name)))}")

    say("\n== 3. load it back (layout detected from the files; packed experts stay packed)")
    loaded = gj.load(ck)
    rng = np.random.default_rng(seed)
    # two documents packed into one row: segment ids keep them apart in attention
    lens = (40, 24)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, sum(lens)))[None]
    positions = jnp.asarray(np.concatenate([np.arange(n) for n in lens]))[None]
    segments = jnp.asarray(np.repeat([1, 2], lens))[None]
    fwd = jax.jit(lambda m, t, p, s: m(t, positions=p, segment_ids=s, capture=True))
    result = fwd(loaded, tokens, positions, segments)
    same = bool(jnp.array_equal(result.logits, fwd(model, tokens, positions, segments).logits))
    say(f"   logits {tuple(result.logits.shape)} {result.logits.dtype}; identical to the in-memory model: {same}")
    if not same:
        return False

    say("\n== 4. inside the forward pass (captured intermediates, no hooks)")
    say("   layer  kind     mean sink mass  router entropy  tokens per expert")
    sink = inspect.sink_mass(result.intermediates).mean(-1)  # [L]: over tokens, then heads
    entropy = inspect.routing_entropy(result.intermediates)  # [L] nats
    load = inspect.expert_counts(result.intermediates, cfg.num_experts)  # [L, E]
    for i in range(cfg.num_layers):
        kind = "sliding" if cfg.is_sliding(i) else "full"
        say(f"   {i:5d}  {kind:8s} {sink[i]:14.3f}  {entropy[i]:14.3f}  {load[i].tolist()}")

    say("\n== 5. generate: both documents as a batch of prompts of different lengths, KV-cached")
    prompts = [[int(t) for t in np.asarray(tokens[0, : lens[0]])], [int(t) for t in np.asarray(tokens[0, lens[0] :])]]
    gen = gj.generate(loaded, None, prompts, max_new_tokens=new_tokens, temperature=0, stop_tokens=())
    for i, (p, new) in enumerate(zip(prompts, gen.tokens)):
        say(f"   prompt {i}: {len(p)} tokens -> greedy {new}")
    say(
        f"   the cache keeps {cfg.sliding_window} slots on sliding layers and the full length on full "
        f"layers: {cache_bytes(cfg, 2, max(lens) + new_tokens):,} bytes here; for gpt-oss-20b at "
        f"131,072 tokens {cache_bytes(gj.gpt_oss_20b(), 1, 131072) / 2**30:.2f} GiB per sequence (bf16)"
    )
    say(f"\ndone in {time.time() - t0:.1f}s; the checkpoint is in {ck}")
    return True
