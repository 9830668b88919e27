# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Block-sparse attention: which tiles a sliding layer visits
#
# The attention kernels cut queries and keys into tiles of `block_q` x `block_k` tokens and visit
# only the tiles that the causal (+ sliding window) mask leaves partly or fully open. A FULL tile
# needs no mask, a PARTIAL tile does, and skipped tiles cost nothing: that is why a sliding layer's
# cost grows linearly with the length while a full layer's grows quadratically.
#
# The map comes from positions alone (`kernels.attention.attention_block_map`); here we draw it,
# count it, and check against a real model that no attention probability ever falls in a skipped
# tile, then run the kernel (interpret mode on CPU) against the XLA path.

# %%
import os

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import gptoss_jax as gj
from gptoss_jax import inspect, kernels
from gptoss_jax.kernels.attention import FULL, PARTIAL, attention_block_map

CHECKPOINT = os.environ.get("GPTOSS_CHECKPOINT")  # e.g. "gpt-oss-20b"; None = a tiny random model
FIGURES = os.environ.get("GPTOSS_FIGURES", "figures")
os.makedirs(FIGURES, exist_ok=True)


def dense_map(bm, num_kv_blocks):
    """[q blocks, kv blocks]: 0 skipped, 1 partial, 2 full."""
    m = np.zeros((bm.kv_index.shape[0], num_kv_blocks), np.int32)
    for i in range(bm.kv_index.shape[0]):
        for n in range(int(bm.num_visits[i])):
            m[i, bm.kv_index[i, n]] = bm.kind[i, n]
    return m


# %% [markdown]
# ## gpt-oss-20b's sliding layer at 8k tokens
# Window 128 (keys, the current one included), tiles of 128 x 128.

# %%
real = gj.gpt_oss_20b()
T, B = 8192, 128
maps = {
    name: attention_block_map(T, block_q=B, block_k=B, sliding_window=w)
    for name, w in (("sliding", real.sliding_window), ("full", None))
}
nblocks = T // B
for name, bm in maps.items():
    m = dense_map(bm, nblocks)
    print(
        f"{name:7s}: {bm.total_visits:5d} of {nblocks * nblocks} tiles visited "
        f"({bm.total_visits / (nblocks * nblocks):.1%}); full {int((m == FULL).sum())}, "
        f"partial {int((m == PARTIAL).sum())}; at most {int(bm.num_visits.max())} per query block"
    )

# %% [markdown]
# Growth with length: tiles visited at 4k, 8k, 16k, 32k tokens.

# %%
for L in (4096, 8192, 16384, 32768):
    s = attention_block_map(L, block_q=B, block_k=B, sliding_window=real.sliding_window).total_visits
    f = attention_block_map(L, block_q=B, block_k=B).total_visits
    print(f"T={L:6d}: sliding {s:6d} tiles, full {f:7d} tiles (ratio {f / s:.0f}x)")

fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
cmap = matplotlib.colors.ListedColormap(["white", "tab:orange", "tab:blue"])
T_small, B_small = 1024, 64
for ax, (name, w) in zip(axes[:2], (("sliding", real.sliding_window), ("full", None))):
    bm = attention_block_map(T_small, block_q=B_small, block_k=B_small, sliding_window=w)
    ax.imshow(dense_map(bm, T_small // B_small), cmap=cmap, vmin=0, vmax=2)
    ax.set(
        xlabel="key block",
        ylabel="query block",
        title=f"{name}, T={T_small}, tiles {B_small}: {bm.total_visits} visited\n(blue full, orange partial)",
    )

# %% [markdown]
# ## On a model: no probability outside the visited tiles
# Recompute a sliding layer's attention probabilities from the captured residual and check that
# every tile holding any mass is one the kernel visits.

# %%
if CHECKPOINT:
    model = gj.load(CHECKPOINT, dtype="float32")
else:
    model = gj.init(gj.tiny(sliding_window=16), seed=0, dtype=jnp.float32)
cfg = model.cfg
Tm, bq = 128, 16
tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, Tm)))
out = model(tokens, capture=True)
layer = next(l for l in range(cfg.num_layers) if cfg.is_sliding(l))
probs, sink = inspect.attention_maps(model, out.intermediates, layer)
bm = attention_block_map(Tm, block_q=bq, block_k=bq, sliding_window=cfg.sliding_window)
visited = dense_map(bm, Tm // bq) > 0
mass = probs[0].sum(0).reshape(Tm // bq, bq, Tm // bq, bq).sum((1, 3))  # per tile, all heads
assert mass[~visited].max() == 0, "attention mass in a skipped tile"
print(
    f"layer {layer}: {int(visited.sum())} of {visited.size} tiles visited hold all "
    f"{mass.sum():.1f} units of key mass (and {mass[~visited].sum():.1f} outside)"
)
axes[2].imshow(np.log10(probs[0].mean(0) + 1e-6), cmap="viridis")
for i in range(Tm // bq + 1):
    axes[2].axhline(i * bq - 0.5, color="w", lw=0.3)
    axes[2].axvline(i * bq - 0.5, color="w", lw=0.3)
axes[2].set(xlabel="key", ylabel="query", title=f"tiny model, sliding layer {layer}: log10 attention, tiles {bq}")
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "04_block_map.png"), dpi=110)

# %% [markdown]
# ## The kernel against the XLA path
# The same q/k/v through the Pallas kernel (interpret mode: a CPU emulation of what runs on the
# GPU) and through the XLA path.

# %%
q, k, v = inspect._qkv(model, layer, out.intermediates[layer]["residual"], jnp.arange(Tm)[None])
sinks_ = model.layers[layer].attn.sinks[...]
ref = kernels.attention(q, k, v, sinks_, sliding_window=cfg.sliding_window, implementation="xla")
ker = kernels.attention(
    q,
    k,
    v,
    sinks_,
    sliding_window=cfg.sliding_window,
    implementation="pallas_gpu",
    interpret=True,
    block_sizes=kernels.BlockSizes(bq, bq),
)
err = float(jnp.max(jnp.abs(ker - ref)) / jnp.max(jnp.abs(ref)))
print(f"Pallas (GPU kernel, interpreted) vs XLA: max relative difference {err:.2e}")
assert err < 1e-4
