# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Activations, attention sinks and the logit lens
#
# How the residual stream grows through the layers, how much attention mass each head sends to its
# learned sink on sliding vs full layers, how spread out each head's attention is, and what the
# residual stream already predicts at each depth (the logit lens: final norm + unembedding applied
# to an intermediate residual).
#
# Default: a tiny random gpt-oss with random sinks (a random model's sinks are all zero, which
# would make every head look alike). Set `CHECKPOINT` (or `GPTOSS_CHECKPOINT`) to a real
# gpt-oss folder to see the learned ones.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import gptoss_jax as gj
from gptoss_jax import inspect

CHECKPOINT = os.environ.get("GPTOSS_CHECKPOINT")  # e.g. "gpt-oss-20b"; None = a tiny random model
FIGURES = os.environ.get("GPTOSS_FIGURES", "figures")
os.makedirs(FIGURES, exist_ok=True)

if CHECKPOINT:
    model = gj.load(CHECKPOINT, dtype="float32")
else:
    model = gj.init(gj.tiny(vocab_size=201088, num_layers=6, num_heads=8, sliding_window=16), seed=0, dtype=jnp.float32)
    for i, layer in enumerate(model.layers):  # stand-in for learned sinks: N(0, 2) logits
        layer.attn.sinks.set_value(2.0 * jax.random.normal(jax.random.key(i), layer.attn.sinks.shape))
cfg = model.cfg
tokenizer = gj.load_tokenizer(CHECKPOINT or "o200k_harmony")
text = (
    "The old lighthouse keeper climbed the stairs every evening, lit the lamp, and wrote one line "
    "in his log about the weather, the ships, and the birds that rested on the rail."
)
tokens = jnp.asarray([tokenizer.encode(text)])
T = tokens.shape[1]
out = jax.jit(lambda m, t: m(t, capture=True))(model, tokens)
inter = out.intermediates
print(f"{T} tokens, {cfg.num_layers} layers, {cfg.num_heads} query heads")

# %% [markdown]
# ## The residual stream
# RMS of the stream entering each layer, and of what attention and the MoE add to it.

# %%
rms = lambda x: float(jnp.sqrt(jnp.mean(jnp.square(x))))
for l, layer in enumerate(inter):
    print(
        f"layer {l}: residual {rms(layer['residual']):.4f}  + attention {rms(layer['attn_out']):.4f}"
        f"  + MoE {rms(layer['mlp_out']):.4f}  -> {rms(layer['residual_out']):.4f}"
    )

# %% [markdown]
# ## Sink mass per head, sliding vs full
# The sink is an extra logit in each head's softmax with no value: mass sent there is attention
# "not spent". On sliding layers a query sees at most `sliding_window` keys; on full layers all
# earlier ones, so the same sink logit takes a smaller share as the context grows.

# %%
sinks = inspect.sink_mass(inter)  # [L, N]
kinds = ["sliding" if cfg.is_sliding(l) else "full" for l in range(cfg.num_layers)]
for l in range(cfg.num_layers):
    print(f"layer {l} ({kinds[l]:7s}) sink mass per head", np.round(sinks[l], 3))
per_kind = {k: float(np.mean([sinks[l].mean() for l in range(cfg.num_layers) if kinds[l] == k])) for k in set(kinds)}
print("mean sink mass:", {k: round(v, 3) for k, v in per_kind.items()})

# %% [markdown]
# ## Attention entropy and distance
# Recomputed from each layer's captured input (`inspect.attention_maps`): the entropy of each
# query's distribution (the sink counted as one outcome) and how far back the attended keys are.

# %%
ent, dist, maps = [], [], []
for l in range(cfg.num_layers):
    probs, sink = inspect.attention_maps(model, inter, l)
    np.testing.assert_allclose(probs.sum(-1) + sink, 1.0, rtol=1e-5)  # sink + keys = 1
    ent.append(inspect.attention_entropy(probs, sink)[0].mean(-1))
    dist.append(inspect.attention_distance(probs)[0].mean(-1))
    maps.append(probs[0])
ent, dist = np.array(ent), np.array(dist)
for l in range(cfg.num_layers):
    print(f"layer {l} ({kinds[l]:7s}) entropy {ent[l].mean():.3f} nats, mean distance {dist[l].mean():.1f} tokens")

# %% [markdown]
# ## The logit lens
# What each layer's output residual predicts for the next token. The last layer's lens is exactly
# the model's logits.

# %%
lens = inspect.logit_lens(model, inter)
np.testing.assert_allclose(lens[-1], out.logits, rtol=1e-5, atol=1e-5)
agree = [(lens[l, 0].argmax(-1) == lens[-1, 0].argmax(-1)).mean() for l in range(cfg.num_layers)]
print("share of positions whose lens top-1 equals the final top-1, per layer:", np.round(agree, 3))
ids, p = inspect.logit_lens_top(model, inter, k=1)
t = T // 2
print(
    f"token {t} {tokenizer.decode([int(tokens[0, t])])!r}: lens top-1 per layer",
    [tokenizer.decode([int(i)]) for i in ids[:, 0, t, 0]],
)

fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
im = axes[0].imshow(sinks, aspect="auto", cmap="magma", vmin=0, vmax=1)
axes[0].set(xlabel="query head", ylabel="layer", title="mean sink mass")
axes[0].set_yticks(range(cfg.num_layers), [f"{l} {k}" for l, k in enumerate(kinds)])
fig.colorbar(im, ax=axes[0])
im = axes[1].imshow(ent, aspect="auto", cmap="viridis")
axes[1].set(xlabel="query head", ylabel="layer", title="attention entropy (nats)")
fig.colorbar(im, ax=axes[1])
axes[2].imshow(maps[0][0], cmap="Blues")
axes[2].set(xlabel="key", ylabel="query", title=f"layer 0 head 0 ({kinds[0]}): attention")
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "03_sinks_and_attention.png"), dpi=110)
