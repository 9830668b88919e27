# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Expert routing over a corpus
#
# Which experts fire, how evenly the load spreads over them in each layer, how decided the router
# is, which experts fire together, and which tokens each expert receives. `inspect.run_corpus`
# streams documents through the model in packed rows and reduces each batch on the device; only the
# chosen expert ids come back to the host.
#
# Default: a tiny random gpt-oss (random routers spread load almost evenly; a trained model will
# not). Set `CHECKPOINT` (or `GPTOSS_CHECKPOINT`) to a real gpt-oss folder to read the real one,
# and `CORPUS` to your own .txt / .jsonl.

# %%
import os

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import gptoss_jax as gj
from gptoss_jax import inspect
from gptoss_jax.tasks import arithmetic

CHECKPOINT = os.environ.get("GPTOSS_CHECKPOINT")  # e.g. "gpt-oss-20b"; None = a tiny random model
CORPUS = os.environ.get("GPTOSS_CORPUS")  # .txt (a document per line) or .jsonl; None = built in
FIGURES = os.environ.get("GPTOSS_FIGURES", "figures")
os.makedirs(FIGURES, exist_ok=True)

if CHECKPOINT:
    model = gj.load(CHECKPOINT)
else:
    model = gj.init(gj.tiny(vocab_size=201088, num_experts=16, experts_per_token=4), seed=0)
cfg = model.cfg
tokenizer = gj.load_tokenizer(CHECKPOINT or "o200k_harmony")
E, L = cfg.num_experts, cfg.num_layers

# %% [markdown]
# ## A mixed corpus
# Harmony conversations (arithmetic with an analysis and a final answer), plain English, and code:
# three kinds of text whose routing we can compare.

# %%
english = [
    "The committee met on Tuesday to review the budget and agreed to postpone the vote.",
    "Rivers carry sediment to the sea, where it settles into layers over thousands of years.",
    "She opened the window, and the smell of rain filled the small kitchen.",
] * 4
code = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "import numpy as np\nx = np.zeros((3, 4))\n",
] * 4
conversations = [{"messages": arithmetic.conversation(*p)["messages"]} for p in arithmetic.problems(24, seed=1)]
corpus = CORPUS or english + code + [c["messages"] for c in conversations]
stats = inspect.run_corpus(model, tokenizer, corpus, seq_len=256, batch_size=4, lens=False, progress=False)
print(f"{stats.tokens:,} tokens from {stats.documents} documents")

# %% [markdown]
# ## Load per layer
# Each expert's share of the routed (token, slot) assignments, relative to the uniform share 1/E.
# The imbalance is the busiest expert's share over the uniform share (1 = perfectly even).

# %%
load = stats.expert_load
for l in range(L):
    kind = "sliding" if cfg.is_sliding(l) else "full"
    print(
        f"layer {l} ({kind:7s}): imbalance {inspect.load_imbalance(load)[l]:.2f}, router entropy "
        f"{stats.routing_entropy[l]:.3f} of {np.log(E):.3f} nats"
    )

# %% [markdown]
# ## Which experts fire together
# Co-occurrence counts tokens routed to both experts in the same layer; normalized by the diagonal
# it is P(expert j | expert i).

# %%
cooc = stats.cooccurrence[0].astype(float)
cond = cooc / np.maximum(np.diag(cooc)[:, None], 1)
np.fill_diagonal(cond, np.nan)
print("most frequent pair in layer 0:", np.unravel_index(np.nanargmax(cond), cond.shape))

fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
im = axes[0].imshow(load * E, aspect="auto", cmap="viridis")
axes[0].set(xlabel="expert", ylabel="layer", title="load / uniform share")
fig.colorbar(im, ax=axes[0])
im = axes[1].imshow(cond, cmap="magma")
axes[1].set(xlabel="expert j", ylabel="expert i", title="layer 0: P(j chosen | i chosen)")
fig.colorbar(im, ax=axes[1])
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "02_expert_routing.png"), dpi=110)

# %% [markdown]
# ## Routing by kind of text
# The same statistics per sub-corpus: do digits, prose and code go to different experts?

# %%
kinds = {"english": english, "code": code, "conversations": [c["messages"] for c in conversations]}
per_kind = {
    name: inspect.run_corpus(model, tokenizer, docs, seq_len=256, batch_size=4, lens=False, progress=False)
    for name, docs in kinds.items()
}
for name, s in per_kind.items():
    top = np.argsort(-s.expert_load[-1])[:4]
    print(
        f"{name:13s} {s.tokens:5d} tokens; last layer's busiest experts {top.tolist()} "
        f"({', '.join(f'{s.expert_load[-1][e]:.1%}' for e in top)})"
    )

# %% [markdown]
# ## What each expert receives
# The tokens routed most often to the busiest expert of each layer.

# %%
for l in range(L):
    e = int(np.argmax(load[l]))
    print(f"layer {l} expert {e}:", stats.top_tokens(l, e, 8, tokenizer))

# %% [markdown]
# ## Token by token
# The chosen experts (best first) and their weights for one sentence, in every layer.

# %%
sentence = "What is 17 + 25?"
ids = jnp.asarray([tokenizer.encode(sentence)])
out = model(ids, capture=True)
for rec in inspect.token_expert_table(ids, out.intermediates, tokenizer):
    print(f"{rec['text']!r:10s}", "  ".join(f"L{l}:{rec['experts'][l]}" for l in range(L)))
