"""`gptoss inspect` as a library: a checkpoint run over a text and/or a corpus (options checked
against its config.json before the weights are read), the report of corpus statistics as json plus
three plots (headless), and the per-layer summary the command prints."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

import gptoss_jax as gj
from gptoss_jax import inspect, preflight


def text_table(model, tokenizer, text: str) -> dict:
    """One text through the model: per token, the experts of every layer, the sink mass per
    layer (mean over heads) and the logit lens's top-1 guess per layer."""

    ids = tokenizer.encode(text, disallowed_special=())
    if not ids:
        raise ValueError("--text is empty after tokenization")
    tokens = jnp.asarray([ids], jnp.int32)
    out = model(tokens, capture=True)
    table = inspect.token_expert_table(tokens, out.intermediates, tokenizer)
    sinks = inspect.stacked(out.intermediates, "sink_mass")[:, 0].mean(-1)  # [L, T]
    lens_ids, _ = inspect.logit_lens_top(model, out.intermediates, k=1)
    for t, rec in enumerate(table):
        rec["sink_mass"] = [round(float(s), 4) for s in sinks[:, t]]
        rec["lens_top1"] = [inspect.token_text(tokenizer, int(i)) for i in lens_ids[:, 0, t, 0]]
    return {"text": text, "tokens": table}


def write(
    out_dir: str, model, stats: inspect.CorpusStats, tokenizer, *, text: dict | None = None, source: str = ""
) -> dict:
    """report.json + expert_load.png, sink_mass.png, layers.png in `out_dir`; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    cfg = model.cfg
    kinds = ["sliding" if cfg.is_sliding(i) else "full" for i in range(cfg.num_layers)]
    report = {"source": source, "layers": kinds, "corpus": stats.to_json(tokenizer)}
    if text is not None:
        report["text"] = text
    paths = {"report": os.path.join(out_dir, "report.json")}
    with open(paths["report"], "w") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)

    ylabels = [f"{i} {k}" for i, k in enumerate(kinds)]
    height = max(2.5, 0.3 * cfg.num_layers + 1.5)

    def heatmap(name, values, columns, xlabel, title, **imshow):
        fig, ax = plt.subplots(figsize=(max(5, 0.3 * columns + 2), height))
        im = ax.imshow(values, aspect="auto", **imshow)
        ax.set(xlabel=xlabel, ylabel="layer", title=title)
        ax.set_yticks(range(cfg.num_layers), ylabels)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        paths[name] = os.path.join(out_dir, f"{name}.png")
        fig.savefig(paths[name], dpi=110)
        plt.close(fig)

    heatmap(
        "expert_load",
        stats.expert_load * cfg.num_experts,
        cfg.num_experts,
        "expert",
        f"expert load / uniform share ({stats.tokens:,} tokens)",
        cmap="viridis",
    )
    heatmap(
        "sink_mass",
        stats.sink_mass,
        cfg.num_heads,
        "query head",
        "mean attention mass on the sink",
        cmap="magma",
        vmin=0,
        vmax=1,
    )

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    x = np.arange(cfg.num_layers)
    axes[0].plot(x, stats.routing_entropy, "o-", label="router entropy")
    axes[0].axhline(np.log(cfg.num_experts), color="gray", ls="--", label="log E (undecided)")
    axes[0].set(xlabel="layer", ylabel="nats", title="routing entropy")
    axes[0].legend()
    if stats.lens_targets:
        axes[1].plot(x, stats.lens_accuracy, "o-")
    axes[1].set(
        xlabel="layer",
        ylabel="top-1 = next token",
        ylim=(0, 1),
        title="logit lens accuracy" + ("" if stats.lens_targets else " (not computed)"),
    )
    fig.tight_layout()
    paths["layers"] = os.path.join(out_dir, "layers.png")
    fig.savefig(paths["layers"], dpi=110)
    plt.close(fig)
    return paths


def run(
    checkpoint: str,
    out_dir: str,
    *,
    text: str | None = None,
    file: str | None = None,
    tokenizer: str | None = None,
    seq_len: int = 512,
    batch_size: int = 4,
    max_tokens: int | None = None,
    lens: bool = True,
    dtype="bfloat16",
):
    """Run `checkpoint` over the corpus `file` and/or the one `text` (also reported token by token)
    and write the report to `out_dir`; returns (model, stats, paths). `seq_len` and the tokenizer
    (default: the checkpoint's) are checked against the checkpoint's config before its weights are
    read."""

    cfg = preflight.checkpoint_config(checkpoint)
    if not 1 <= seq_len <= cfg.max_position:
        raise ValueError(
            f"--seq-len must be an integer from 1 to the model's context of {cfg.max_position}, got {seq_len}"
        )
    tok = gj.load_tokenizer(tokenizer or checkpoint)
    preflight.check_tokenizer_fits(tok, cfg.vocab_size, "give --tokenizer the checkpoint's own tokenizer")
    model = gj.load(checkpoint, dtype=dtype, progress=True)
    stats = None
    if file:
        stats = inspect.run_corpus(
            model, tok, file, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens, lens=lens
        )
    table = None
    if text:
        stats = inspect.run_corpus(
            model, tok, [text], seq_len=seq_len, batch_size=batch_size, progress=False, stats=stats, lens=lens
        )
        table = text_table(model, tok, text)
    source = " + ".join(filter(None, [file, text and "--text"]))
    paths = write(out_dir, model, stats, tok, text=table, source=source)
    return model, stats, paths


def summary(model, stats: inspect.CorpusStats) -> list[str]:
    """The lines `gptoss inspect` prints: token and document counts, then one line per layer."""

    lines = [f"{stats.tokens:,} tokens in {stats.documents} documents; per layer:"]
    for i in range(model.cfg.num_layers):
        load = stats.expert_load[i]
        lines.append(
            f"  layer {i:2d} {'sliding' if model.cfg.is_sliding(i) else 'full':7s}  router entropy "
            f"{stats.routing_entropy[i]:.3f}  busiest expert {int(load.argmax())} ({load.max():.1%})  "
            f"sink mass {stats.sink_mass[i].mean():.3f}"
            + (f"  lens accuracy {stats.lens_accuracy[i]:.3f}" if stats.lens_targets else "")
        )
    return lines
