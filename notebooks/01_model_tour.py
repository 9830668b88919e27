# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # A tour of gpt-oss in JAX
#
# A tiny random gpt-oss with the real structure: alternating sliding-window / full attention
# layers with learned sinks, grouped-query attention, and a mixture of experts whose weights stay
# packed as MXFP4. We run it once with `capture=True` and read what each layer did.

# %%
import jax
import jax.numpy as jnp
import numpy as np

import gptoss_jax as gj

cfg = gj.tiny(sliding_window=8)
model = gj.init(cfg, seed=0)
print(cfg)
print(f"{gj.parameter_count(model):,} parameters, {gj.parameter_bytes(model):,} bytes as stored")

# %% [markdown]
# ## Packed experts
# Each expert matrix is an `MXFP4` pytree: uint8 blocks holding two 4-bit E2M1 codes per byte and
# one power-of-two scale per 32 values. Decoding is exact.

# %%
mlp = model.layers[0].mlp
w1 = mlp.expert_weights().w1
print("blocks", w1.blocks.shape, w1.blocks.dtype, "scales", w1.scales.shape, "-> logical", w1.shape)
print("first decoded values of expert 0, row 0:", np.asarray(w1.dequantize(jnp.float32)[0, 0, :8]))

# %% [markdown]
# ## One forward pass, everything captured
# Sliding layers (even) see 8 keys including the current token; full layers see all previous ones.
# The sink takes part of every row's probability mass; the router picks top-k experts, then
# softmaxes over just those k.

# %%
tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 32)))
out = model(tokens, capture=True)
for i, layer in enumerate(out.intermediates):
    kind = "sliding" if cfg.is_sliding(i) else "full"
    load = np.bincount(np.asarray(layer["expert_ids"]).ravel(), minlength=cfg.num_experts)
    print(f"layer {i} ({kind:7s}) sink mass {float(layer['sink_mass'].mean()):.3f}  expert load {load.tolist()}")

# %% [markdown]
# ## The next-token distribution
# Logits come back in float32 whatever the parameter dtype.

# %%
probs = jax.nn.softmax(out.logits[0, -1])
top = jnp.argsort(-probs)[:5]
print("top-5 next tokens:", [(int(t), round(float(probs[t]), 4)) for t in top])
