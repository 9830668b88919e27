# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # What fine-tuning did to the routing
#
# The same held-out conversations through the model before and after SFT: per-layer expert load,
# router entropy, how many tokens changed their top expert, and whether experts specialized by
# kind of token (digits, harmony special tokens, everything else).
#
# `RUN` is a training run's folder (`gptoss train` / `gptoss quickstart` write them): "before" is
# the model the run started from (its `model.checkpoint`, or its seeded random init when trained
# from scratch), "after" is what it wrote (full weights, or the base plus LoRA adapters). The
# default is the quickstart's run (`make run` -> `runs/quickstart/sft`); when that does not exist,
# a short quickstart is trained here first (about a minute). Point `RUN` at a fine-tuning run of
# gpt-oss-20b to read the real thing.

# %%
import os
import tempfile

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import gptoss_jax as gj
from gptoss_jax import harmony, inspect
from gptoss_jax.tasks import arithmetic
from gptoss_jax.train import data as data_lib
from gptoss_jax.train import quickstart, sft
from gptoss_jax.train.config import load_config

RUN = os.environ.get("GPTOSS_RUN", "runs/quickstart/sft")
FIGURES = os.environ.get("GPTOSS_FIGURES", "figures")
os.makedirs(FIGURES, exist_ok=True)

if not os.path.isfile(os.path.join(RUN, "config.json")):
    # the quickstart's recipe, shortened: its data, tokenizer and config, 50 steps, no sampling
    out = tempfile.mkdtemp(prefix="quickstart-")
    print(f"no run at {RUN}: a 50-step quickstart SFT in {out}")
    arithmetic.write_splits(f"{out}/train.jsonl", f"{out}/eval.jsonl", train_size=2000, eval_size=64)
    vocab = quickstart.build_tokenizer(f"{out}/tokenizer.json").vocab_size
    short = load_config(
        quickstart.CONFIG,
        [
            "run.steps=50",
            "optim.total_steps=50",
            "optim.warmup_steps=10",
            "eval.accuracy=false",
            "run.progress=false",
            f"model.overrides.vocab_size={vocab}",
            f"data.train={out}/train.jsonl",
            f"data.eval={out}/eval.jsonl",
            f"model.tokenizer={out}/tokenizer.json",
            f"run.out_dir={out}/sft",
        ],
    )
    sft.train(short, log=lambda s: None)
    RUN = os.path.join(out, "sft")
cfg = sft.run_config(RUN)
before = sft.build_model(cfg, adapters=False)
after = sft.load_trained(cfg)
tokenizer = gj.load_tokenizer(cfg.model.tokenizer or "o200k_harmony")
mc = after.cfg
E, L = mc.num_experts, mc.num_layers
print(
    f"run {RUN}: {cfg.run.steps} steps of {cfg.data.batch_size} x {cfg.data.seq_len} tokens; "
    f"{L} layers, {E} experts top-{mc.experts_per_token}"
)

# %% [markdown]
# ## The held-out conversations, packed
# The run's own evaluation set, rendered in the harmony format.

# %%
conversations, _ = data_lib.read_jsonl(cfg.data.eval, reasoning_effort=cfg.data.reasoning_effort)
docs = [harmony.render_conversation(c, tokenizer, auto_drop_analysis=False) for c in conversations[:64]]
batch = next(inspect.pack_stream(iter(docs), 512, 8))
mask = batch["segment_ids"] != 0
run = lambda m: m(
    jnp.asarray(batch["tokens"]),
    positions=jnp.asarray(batch["positions"]),
    segment_ids=jnp.asarray(batch["segment_ids"]),
    capture=True,
).intermediates
inter = {"before": run(before), "after": run(after)}
print(f"{int(mask.sum())} tokens in {len(docs)} conversations")

# %% [markdown]
# ## Load and router entropy, before vs after

# %%
load = {k: inspect.expert_load(v, E, mask) for k, v in inter.items()}
entropy = {k: inspect.routing_entropy(v, mask) for k, v in inter.items()}
for l in range(L):
    print(
        f"layer {l}: imbalance {inspect.load_imbalance(load['before'])[l]:.2f} -> "
        f"{inspect.load_imbalance(load['after'])[l]:.2f}, router entropy {entropy['before'][l]:.3f} -> "
        f"{entropy['after'][l]:.3f} nats (max {np.log(E):.3f})"
    )

# %% [markdown]
# ## Tokens that changed their top expert

# %%
top1 = {k: inspect.stacked(v, "expert_ids")[..., 0] for k, v in inter.items()}  # [L, B, T]
changed = [(top1["before"][l] != top1["after"][l])[mask].mean() for l in range(L)]
print("share of tokens whose top-1 expert changed, per layer:", np.round(changed, 3))

# %% [markdown]
# ## Did experts specialize by kind of token?
# Mutual information between the token's kind (digit / harmony special / other) and its top-1
# expert, in bits: 0 when routing ignores the kind, up to log2(3) when the kind decides the expert.


# %%
def kind_of(t):
    if tokenizer.is_special(t):
        return 1
    return 0 if tokenizer.decode([t]).strip().isdigit() else 2


kinds = np.vectorize(kind_of)(batch["tokens"])[mask]


def mutual_information(a, b, na, nb):
    joint = np.zeros((na, nb))
    np.add.at(joint, (a, b), 1)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log2(joint[nz] / (pa @ pb)[nz])).sum())


mi = {k: [mutual_information(kinds, top1[k][l][mask], 3, E) for l in range(L)] for k in top1}
for l in range(L):
    print(f"layer {l}: MI(kind; top-1 expert) {mi['before'][l]:.3f} -> {mi['after'][l]:.3f} bits")
digits_after = np.bincount(top1["after"][0][mask][kinds == 0], minlength=E)
print("after: layer 0 top-1 experts of digit tokens:", digits_after.tolist())

fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
vmax = max(load["before"].max(), load["after"].max()) * E
for ax, k in zip(axes[:2], ("before", "after")):
    im = ax.imshow(load[k] * E, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
    ax.set(xlabel="expert", ylabel="layer", title=f"load / uniform share, {k}")
fig.colorbar(im, ax=axes[1])
x = np.arange(L)
axes[2].plot(x, mi["before"], "o-", label="MI(kind; expert) before")
axes[2].plot(x, mi["after"], "o-", label="MI(kind; expert) after")
axes[2].plot(x, changed, "s--", label="share of tokens with a new top-1")
axes[2].set(xlabel="layer", title="routing changes from SFT")
axes[2].legend()
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "05_routing_before_after.png"), dpi=110)
