# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # The forward pass of gpt-oss, top to bottom
#
# One harmony-formatted prompt goes through the model while we recompute each step by hand and
# check it against what the model captured: embedding, RoPE with YaRN, grouped-query attention
# with a learned sink, and a single MoE routing decision down to the experts' outputs.
#
# By default this runs on a tiny random gpt-oss with the real structure and the real tokenizer.
# To read a real model, set `CHECKPOINT` (or the `GPTOSS_CHECKPOINT` environment variable) to a
# gpt-oss-20b folder: nothing else changes.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import gptoss_jax as gj
from gptoss_jax import harmony, inspect, layers

CHECKPOINT = os.environ.get("GPTOSS_CHECKPOINT")  # e.g. "gpt-oss-20b"; None = a tiny random model
FIGURES = os.environ.get("GPTOSS_FIGURES", "figures")
os.makedirs(FIGURES, exist_ok=True)

if CHECKPOINT:
    model = gj.load(CHECKPOINT, dtype="float32")
else:
    model = gj.init(gj.tiny(vocab_size=201088, sliding_window=8), seed=0, dtype=jnp.float32)
cfg = model.cfg
tokenizer = gj.load_tokenizer(CHECKPOINT or "o200k_harmony")
print(cfg)
print(f"{gj.parameter_count(model):,} parameters, {gj.parameter_bytes(model):,} bytes as stored")

# %% [markdown]
# ## Packed experts
# Each expert matrix is an `MXFP4` pytree: uint8 blocks holding two 4-bit E2M1 codes per byte and
# one power-of-two scale per 32 values. Decoding is exact; the model never decodes them all at once.

# %%
mlp = model.layers[0].mlp
w1 = mlp.expert_weights().w1
print("blocks", w1.blocks.shape, w1.blocks.dtype, "scales", w1.scales.shape, "-> logical", w1.shape)
print("first decoded values of expert 0, row 0:", np.asarray(w1.dequantize(jnp.float32)[0, 0, :8]))

# %% [markdown]
# ## The prompt in the harmony format
# A system message (with the reasoning effort), a user message, and the header of the assistant's
# turn: the model continues from `<|start|>assistant`.

# %%
conversation = [harmony.system_message(reasoning_effort="low"), harmony.user("What is 17 + 25?")]
ids = harmony.render_for_completion(conversation, tokenizer)
print(len(ids), "tokens:", repr(tokenizer.decode(ids)))
tokens = jnp.asarray([ids], jnp.int32)
T = tokens.shape[1]

# %% [markdown]
# ## One forward pass, everything captured
# `capture="experts"` returns, per layer, the residual stream entering and leaving each block, the
# attention and MoE outputs, each query head's sink mass, the router logits, the chosen experts and
# their weights, and each chosen expert's own output. No hooks: these are ordinary outputs of a
# pure function, and with `capture=False` (the default) none of it is computed.

# %%
out = jax.jit(lambda m, t: m(t, capture="experts"))(model, tokens)
for k, v in out.intermediates[0].items():
    print(f"{k:15s} {tuple(np.shape(v))}")

# %% [markdown]
# ## Embedding and rotary positions
# Token embeddings are looked up, never scaled. RoPE uses YaRN: low frequencies are interpolated by
# the rope factor, high ones kept, and cos/sin are multiplied by the "concentration"
# 0.1 ln(factor) + 1.

# %%
x0 = model.embed[...][tokens]
np.testing.assert_array_equal(x0, out.intermediates[0]["residual"])
inv_freq = layers.rope_inv_freq(cfg)
positions = jnp.arange(T)[None]
cos, sin = layers.rope_cos_sin(positions, inv_freq, cfg.rope_concentration)
print(
    "head_dim",
    cfg.head_dim,
    "-> frequencies",
    inv_freq.shape,
    "cos/sin",
    cos.shape,
    f"concentration {cfg.rope_concentration:.4f} (rope factor {cfg.rope_factor:g})",
)

# %% [markdown]
# ## Attention of layer 0 by hand
# Query heads are grouped over fewer KV heads (GQA). Each query row's softmax has one extra logit,
# the head's learned sink, whose probability mass is thrown away. Layer 0 is a sliding layer: a
# query sees at most `sliding_window` keys, itself included.

# %%
attn = model.layers[0].attn
h = layers.rms_norm(x0, attn.norm[...], cfg.rms_eps)
q = layers.apply_rope(jnp.einsum("BTD,DNH->BTNH", h, attn.q[...]) + attn.q_bias[...], cos, sin)
k = layers.apply_rope(jnp.einsum("BTD,DKH->BTKH", h, attn.k[...]) + attn.k_bias[...], cos, sin)
v = jnp.einsum("BTD,DKH->BTKH", h, attn.v[...]) + attn.v_bias[...]
G = cfg.num_heads // cfg.num_kv_heads
print(f"q {q.shape}, k {k.shape}, v {v.shape}: {G} query heads share each KV head")
scores = jnp.einsum("BTNH,BSNH->BNTS", q, jnp.repeat(k, G, axis=2)) / np.sqrt(cfg.head_dim)
i, j = np.arange(T)[:, None], np.arange(T)[None, :]
visible = (j <= i) & ((i - j) < cfg.sliding_window if cfg.is_sliding(0) else True)
scores = jnp.where(visible, scores, -jnp.inf)
with_sink = jnp.concatenate(
    [scores, jnp.broadcast_to(attn.sinks[...][None, :, None, None], scores.shape[:3] + (1,))], -1
)
p = jax.nn.softmax(with_sink, axis=-1)
probs, sink = p[..., :-1], p[..., -1]
o = jnp.einsum("BNTS,BSNH->BTNH", probs, jnp.repeat(v, G, axis=2))
attn_out = jnp.einsum("BTNH,NHD->BTD", o, attn.o[...]) + attn.o_bias[...]
np.testing.assert_allclose(attn_out, out.intermediates[0]["attn_out"], rtol=1e-4, atol=1e-5)
np.testing.assert_allclose(sink, out.intermediates[0]["sink_mass"].transpose(0, 2, 1), rtol=1e-4, atol=1e-6)
print(
    "attention by hand == captured attn_out; sink mass of the last query per head:",
    np.round(np.asarray(sink[0, :, -1]), 3),
)

# %% [markdown]
# ## One routing decision, traced
# Take the last token at layer 0. The router scores all experts from the normalized residual; the
# top-k are kept and softmaxed among themselves; each chosen expert runs its SwiGLU MLP; the
# weighted sum is what the MoE adds to the residual stream.

# %%
layer0 = out.intermediates[0]
t = T - 1
x_mid = layer0["residual_mid"][0, t]
hm = layers.rms_norm(x_mid, mlp.norm[...], cfg.rms_eps)
router_logits = hm @ mlp.router[...] + mlp.router_bias[...]
np.testing.assert_allclose(router_logits, layer0["router_logits"][0, t], rtol=1e-4, atol=1e-5)
top_vals, top_ids = jax.lax.top_k(router_logits, cfg.experts_per_token)
weights = jax.nn.softmax(top_vals)
print("chosen experts", np.asarray(top_ids), "weights", np.round(np.asarray(weights), 3))
expert_out = layer0["expert_out"][0, t]  # [k, D], before the weights
mixed = jnp.einsum("kD,k->D", expert_out, weights)
np.testing.assert_allclose(mixed, layer0["mlp_out"][0, t], rtol=1e-4, atol=1e-5)
print("sum of weighted expert outputs == the MoE's output: the decision is fully accounted for")

fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
colors = ["tab:orange" if e in set(np.asarray(top_ids).tolist()) else "tab:gray" for e in range(cfg.num_experts)]
axes[0].bar(range(cfg.num_experts), np.asarray(router_logits), color=colors)
axes[0].set(xlabel="expert", ylabel="router logit", title=f"layer 0, token {t}: top-{cfg.experts_per_token} in orange")
row = np.concatenate([np.asarray(probs[0, :, t]).mean(0), [float(sink[0, :, t].mean())]])
axes[1].bar(range(T + 1), row, color=["tab:blue"] * T + ["tab:red"])
axes[1].set(
    xlabel="key position (red: the sink)",
    ylabel="probability (mean over heads)",
    title=f"layer 0 attention of token {t} ({'sliding' if cfg.is_sliding(0) else 'full'})",
)
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "01_routing_decision.png"), dpi=110)

# %% [markdown]
# ## The next-token distribution
# Logits come back in float32 whatever the parameter dtype. The last layer's residual through the
# final norm and the unembedding *is* the logits (the logit lens at the last layer).

# %%
np.testing.assert_allclose(
    inspect.unembed(model, out.intermediates[-1]["residual_out"]), out.logits, rtol=1e-5, atol=1e-5
)
probs_next = jax.nn.softmax(out.logits[0, -1])
top = jnp.argsort(-probs_next)[:5]
print("top-5 next tokens:", [(tokenizer.decode([int(t)]), f"{float(probs_next[t]):.2e}") for t in top])
