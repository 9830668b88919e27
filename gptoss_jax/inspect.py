"""Looking inside: statistics over `model(tokens, capture=True)` intermediates. No plotting here.

    out = model(tokens, capture=True)
    load = inspect.expert_load(out.intermediates, cfg.num_experts)      # [L, E] share of routed slots
    sinks = inspect.sink_mass(out.intermediates)                        # [L, N] mean per head
    lens = inspect.logit_lens(model, out.intermediates)                 # [L, B, T, V]
    probs, sink = inspect.attention_maps(model, out.intermediates, layer=0)
    stats = inspect.run_corpus(model, tokenizer, "corpus.jsonl")        # streamed, reduced on device

Every function takes the per-layer list of dicts that `capture=True` returns (see
`model.Block.__call__` for the keys) and an optional `mask` [B, T] of the tokens to count
(e.g. `segment_ids != 0` to leave padding out). Results are numpy arrays, layer first.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from gptoss_jax import attention as attn_lib
from gptoss_jax import harmony, layers
from gptoss_jax.train import data as data_lib
from gptoss_jax.train.losses import next_token_targets

# ------------------------------------------------------------------------------ routing


def _mask(mask, shape):
    return np.ones(shape, bool) if mask is None else np.asarray(mask, bool)


def stacked(intermediates, key: str) -> np.ndarray:
    """One captured quantity for every layer: [L, ...]."""
    if not intermediates:
        raise ValueError("no intermediates: run the model with capture=True")
    if key not in intermediates[0]:
        raise KeyError(
            f"{key!r} was not captured; keys are {sorted(intermediates[0])}"
            + (" (expert_out needs capture='experts')" if key == "expert_out" else "")
        )
    return np.stack([np.asarray(layer[key]) for layer in intermediates])


def expert_counts(intermediates, num_experts: int, mask=None) -> np.ndarray:
    """[L, E] int: how many (token, slot) assignments each expert received."""
    ids = stacked(intermediates, "expert_ids")  # [L, B, T, k]
    m = _mask(mask, ids.shape[1:3])
    return np.stack([np.bincount(layer[m].ravel(), minlength=num_experts) for layer in ids])


def expert_load(intermediates, num_experts: int, mask=None) -> np.ndarray:
    """[L, E]: each expert's share of the routed assignments (rows sum to 1; uniform = 1/E)."""
    c = expert_counts(intermediates, num_experts, mask).astype(np.float64)
    return c / np.maximum(c.sum(-1, keepdims=True), 1)


def load_imbalance(load: np.ndarray) -> np.ndarray:
    """[L]: max expert share / uniform share (1 = perfectly balanced, E = one expert takes all)."""
    return load.max(-1) * load.shape[-1]


def _entropy(p, axis=-1):
    """Entropy (nats) of the distributions along `axis`; outcomes of probability 0 add nothing.
    NumPy in float64, or a jax array (traced too, e.g. inside `run_corpus`'s reduction) as is."""
    if isinstance(p, jax.Array):
        return -jnp.sum(p * jnp.log(jnp.where(p > 0, p, 1.0)), axis)
    p = np.asarray(p, np.float64)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis)


def routing_entropy(intermediates, mask=None) -> np.ndarray:
    """[L]: mean entropy (nats) of the router's softmax over all E experts (log E = undecided)."""
    logits = stacked(intermediates, "router_logits")  # [L, B, T, E]
    m = _mask(mask, logits.shape[1:3])
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    return np.array([_entropy(layer[m]).mean() for layer in probs])


def expert_cooccurrence(intermediates, num_experts: int, mask=None) -> np.ndarray:
    """[L, E, E] int: tokens routed to both experts i and j in the same layer (the diagonal is each
    expert's token count)."""
    ids = stacked(intermediates, "expert_ids")
    m = _mask(mask, ids.shape[1:3])
    out = np.zeros((ids.shape[0], num_experts, num_experts), np.int64)
    for l, layer in enumerate(ids):
        onehot = np.zeros((int(m.sum()), num_experts), np.int64)
        np.put_along_axis(onehot, layer[m], 1, axis=1)
        out[l] = onehot.T @ onehot
    return out


def token_expert_table(
    tokens, intermediates, tokenizer=None, *, row: int = 0, layers_: Sequence[int] | None = None
) -> list[dict]:
    """One record per token of batch row `row`: its text, and per layer the chosen experts (best
    first) with their weights."""
    tokens = np.asarray(tokens)[row]
    ids = stacked(intermediates, "expert_ids")[:, row]
    weights = stacked(intermediates, "expert_weights")[:, row]
    chosen = range(ids.shape[0]) if layers_ is None else layers_
    table = []
    for t, tok in enumerate(tokens):
        rec = {"position": t, "token": int(tok)}
        if tokenizer is not None:
            rec["text"] = token_text(tokenizer, int(tok))
        rec["experts"] = {int(l): [int(e) for e in ids[l, t]] for l in chosen}
        rec["weights"] = {int(l): [round(float(w), 4) for w in weights[l, t]] for l in chosen}
        table.append(rec)
    return table


# --------------------------------------------------------------------------- attention


def sink_mass(intermediates, mask=None) -> np.ndarray:
    """[L, N]: mean probability each query head gave its sink (1 - the mass on real keys)."""
    s = stacked(intermediates, "sink_mass")  # [L, B, T, N]
    m = _mask(mask, s.shape[1:3])
    return np.stack([layer[m].mean(0) for layer in s])


def attention_maps(model, intermediates, layer: int, *, positions=None, segment_ids=None):
    """Recompute layer `layer`'s attention probabilities from its captured input residual.

    -> (probs [B, N, T, T] fp32 over the keys, sink [B, N, T]): each row of `probs` plus its sink
    entry sums to 1. Uses the model's own weights and masks (sliding window, segments), so
    `probs @ v` projected by the output matrix is the captured `attn_out`."""
    attn = model.layers[layer].attn
    x = jnp.asarray(intermediates[layer]["residual"])
    B, T, _ = x.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    q, k, _ = _qkv(model, layer, x, positions)
    mask = attn_lib.attention_mask(positions, positions, segment_ids, segment_ids, window=attn.window)
    N, H = q.shape[2], q.shape[3]
    G = N // k.shape[2]
    s = jnp.einsum("BTNH,BSNH->BNTS", q.astype(jnp.float32), jnp.repeat(k, G, axis=2).astype(jnp.float32)) * H**-0.5
    s = jnp.where(mask[:, None], s, -jnp.inf)
    probs, sink = attn_lib.softmax_with_sink(s, attn.sinks[...].astype(jnp.float32)[None, :, None])
    return np.asarray(probs), np.asarray(sink)


def _qkv(model, layer: int, x, positions):
    """The layer's rotated q, k and v for residual input x (the attention block's own code)."""
    cfg = model.cfg
    rope = layers.rope_cos_sin(positions, layers.rope_inv_freq(cfg), cfg.rope_concentration)
    return model.layers[layer].attn.qkv(jnp.asarray(x), rope, eps=cfg.rms_eps)


def attention_entropy(probs, sink) -> np.ndarray:
    """[B, N, T]: entropy (nats) of each query's attention distribution, the sink counted as one
    more outcome."""
    p = np.concatenate([np.asarray(probs), np.asarray(sink)[..., None]], axis=-1)
    return _entropy(p)


def attention_distance(probs) -> np.ndarray:
    """[B, N, T]: mean distance (in tokens) from each query back to the keys it attends to,
    weighted by probability over the real keys."""
    p = np.asarray(probs, np.float64)
    T = p.shape[-1]
    dist = np.arange(T)[:, None] - np.arange(T)[None, :]
    mass = p.sum(-1)
    return (p * np.maximum(dist, 0)).sum(-1) / np.where(mass > 0, mass, 1)


# ---------------------------------------------------------------------------- logit lens


def unembed(model, x):
    """The model's head on any residual [..., D]: final RMS norm then the unembedding (fp32)."""
    h = layers.rms_norm(jnp.asarray(x), model.norm[...], model.cfg.rms_eps)
    return jnp.einsum("...D,VD->...V", h, model.unembed[...], preferred_element_type=jnp.float32)


def logit_lens(
    model, intermediates, *, layers_: Sequence[int] | None = None, where: str = "residual_out"
) -> np.ndarray:
    """[L', B, T, V]: what each layer's residual stream (`where`: "residual" entering the layer,
    "residual_mid" after attention, "residual_out" leaving it) predicts through the model's head.
    The last layer's "residual_out" gives exactly the model's logits."""
    chosen = range(len(intermediates)) if layers_ is None else layers_
    return np.stack([np.asarray(unembed(model, intermediates[l][where])) for l in chosen])


def logit_lens_top(model, intermediates, k: int = 5, *, where: str = "residual_out"):
    """(ids [L, B, T, k], probs [L, B, T, k]): the top-k tokens of the lens at every layer, one
    layer at a time (the full [L, B, T, V] array of a real vocabulary is large)."""
    ids, probs = [], []
    for layer in intermediates:
        p = jax.nn.softmax(unembed(model, layer[where]), axis=-1)
        v, i = jax.lax.top_k(p, k)
        ids.append(np.asarray(i))
        probs.append(np.asarray(v))
    return np.stack(ids), np.stack(probs)


# ---------------------------------------------------------------------- corpus runner


@dataclasses.dataclass
class CorpusStats:
    """Statistics of a corpus streamed through the model (`run_corpus`). Counts, not means, so
    two runs can be added; the properties turn them into shares and averages."""

    num_layers: int
    num_experts: int
    num_heads: int
    tokens: int = 0  # real (non-padding) tokens seen
    documents: int = 0
    split_documents: int = 0  # longer than a row: cut into row-sized pieces, each read on its own
    expert_counts: np.ndarray = None  # [L, E]
    cooccurrence: np.ndarray = None  # [L, E, E]
    entropy_sum: np.ndarray = None  # [L] summed router entropy
    sink_sum: np.ndarray = None  # [L, N] summed sink mass
    lens_hits: np.ndarray = None  # [L] tokens whose next token is the lens's top-1 at that layer
    lens_targets: int = 0  # tokens with a next token in the same document (counted with lens=True)
    token_experts: dict = None  # (layer, expert) -> Counter(token id -> count)

    def __post_init__(self):
        L, E, N = self.num_layers, self.num_experts, self.num_heads
        for name, shape in (
            ("expert_counts", (L, E)),
            ("cooccurrence", (L, E, E)),
            ("entropy_sum", (L,)),
            ("sink_sum", (L, N)),
            ("lens_hits", (L,)),
        ):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(shape, np.float64 if "sum" in name else np.int64))
        if self.token_experts is None:
            self.token_experts = collections.defaultdict(collections.Counter)

    @property
    def expert_load(self) -> np.ndarray:
        """[L, E] share of assignments (rows sum to 1)."""
        return self.expert_counts / np.maximum(self.expert_counts.sum(-1, keepdims=True), 1)

    @property
    def routing_entropy(self) -> np.ndarray:
        return self.entropy_sum / max(self.tokens, 1)

    @property
    def sink_mass(self) -> np.ndarray:
        return self.sink_sum / max(self.tokens, 1)

    @property
    def lens_accuracy(self) -> np.ndarray:
        """[L]: how often the logit lens at each layer already predicts the next token."""
        return self.lens_hits / max(self.lens_targets, 1)

    def top_tokens(self, layer: int, expert: int, n: int = 10, tokenizer=None) -> list:
        """The n tokens routed most often to `expert` at `layer`: [(token, count)]."""
        common = self.token_experts[(layer, expert)].most_common(n)
        return [(token_text(tokenizer, t) if tokenizer is not None else t, c) for t, c in common]

    def to_json(self, tokenizer=None, top: int = 8) -> dict:
        L, E = self.num_layers, self.num_experts
        return {
            "tokens": self.tokens,
            "documents": self.documents,
            "split_documents": self.split_documents,
            "expert_load": np.round(self.expert_load, 5).tolist(),
            "load_imbalance": np.round(load_imbalance(self.expert_load), 4).tolist(),
            "routing_entropy": np.round(self.routing_entropy, 5).tolist(),
            "max_routing_entropy": float(np.log(E)),
            "sink_mass": np.round(self.sink_mass, 5).tolist(),
            "lens_accuracy": np.round(self.lens_accuracy, 5).tolist() if self.lens_targets else None,
            "top_tokens": {f"{l}/{e}": self.top_tokens(l, e, top, tokenizer) for l in range(L) for e in range(E)},
        }


def read_corpus(source) -> Iterator[str | list]:
    """Documents from a list of strings, a .txt file (one document per non-empty line), or a
    .jsonl file (records with "text", or harmony/chat "messages", rendered as conversations)."""
    if not isinstance(source, (str, os.PathLike)):
        yield from source
        return
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"corpus {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not path.endswith(".jsonl"):
                yield line.rstrip("\n")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                yield record["text"]
            elif isinstance(record, dict) and "messages" in record:
                yield record["messages"]
            else:
                raise ValueError(f"{path}:{lineno}: expected a 'text' string or 'messages'")


def token_text(tokenizer, token_id: int) -> str:
    """The text of one id; "<id N>" for an id past the tokenizer's vocabulary (a model's vocabulary
    may be padded beyond its tokenizer's, and its predictions can land there)."""
    if token_id >= tokenizer.vocab_size:
        return f"<id {token_id}>"
    return tokenizer.decode([token_id])


def _encode(doc, tokenizer) -> list[int]:
    if isinstance(doc, str):
        return tokenizer.encode(doc)
    return harmony.render_conversation(
        data_lib.parse_conversation({"messages": doc}), tokenizer, auto_drop_analysis=False
    )


def pack_stream(docs: Iterable[list[int]], seq_len: int, batch_size: int, stats: CorpusStats | None = None):
    """Token lists -> batches {tokens, positions, segment_ids} [batch_size, seq_len], filled in
    order (`train.data.pack_batches`, next fit); a document longer than a row is cut into
    row-sized pieces, each packed on its own. Counts documents (and cut ones) into `stats`."""

    def pieces():
        for doc in docs:
            if not doc:
                continue
            if stats is not None:
                stats.documents += 1
                stats.split_documents += len(doc) > seq_len
            for start in range(0, len(doc), seq_len):
                yield doc[start : start + seq_len], None

    for packed in data_lib.pack_batches(pieces(), seq_len, batch_size, fit="next"):
        yield {k: getattr(packed, k) for k in ("tokens", "positions", "segment_ids")}


def _batch_reductions(model, tokens, positions, segment_ids, lens: bool):
    """Per-batch statistics reduced on device (jitted by `run_corpus`)."""
    out = model(tokens, positions=positions, segment_ids=segment_ids, capture=True)
    E = model.cfg.num_experts
    valid = segment_ids != 0
    w = valid.astype(jnp.float32)
    nxt = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    # position t counts when its next-token target is scored (`train.losses.next_token_targets`)
    _, scored = next_token_targets(tokens, None, segment_ids)
    has_next = jnp.concatenate([scored > 0, jnp.zeros_like(valid[:, :1])], axis=1)
    counts, cooc, ent, sink, hits, ids = [], [], [], [], [], []
    for layer in out.intermediates:
        onehot = jax.nn.one_hot(layer["expert_ids"], E, dtype=jnp.float32).sum(-2) * w[..., None]
        counts.append(onehot.sum((0, 1)))
        cooc.append(jnp.einsum("BTi,BTj->ij", onehot, onehot))
        ent.append(jnp.sum(_entropy(jax.nn.softmax(layer["router_logits"], -1)) * w))
        sink.append(jnp.sum(layer["sink_mass"] * w[..., None], (0, 1)))
        if lens:
            top1 = jnp.argmax(unembed(model, layer["residual_out"]), -1)
            hits.append(jnp.sum((top1 == nxt) & has_next))
        else:
            hits.append(jnp.zeros((), jnp.int32))
        ids.append(layer["expert_ids"])
    return dict(
        counts=jnp.stack(counts),
        cooc=jnp.stack(cooc),
        entropy=jnp.stack(ent),
        sink=jnp.stack(sink),
        hits=jnp.stack(hits),
        targets=jnp.sum(has_next),
        ids=jnp.stack(ids),
    )


@functools.lru_cache(maxsize=8)
def _reduction_fn(graphdef, lens: bool):
    return jax.jit(lambda st, t, p, s: _batch_reductions(nnx.merge(graphdef, st), t, p, s, lens))


def run_corpus(
    model,
    tokenizer,
    source,
    *,
    seq_len: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = None,
    lens: bool = True,
    progress: bool = True,
    stats: CorpusStats | None = None,
) -> CorpusStats:
    """Stream a corpus (see `read_corpus`) through the model with capture on and accumulate
    expert load, co-occurrence, routing entropy, per-head sink mass, the tokens each expert
    receives and (with `lens`) the logit lens's next-token accuracy per layer, which costs one
    unembedding per layer. Batches are reduced on device; only the routing ids come back to the
    host. Stops after `max_tokens` real tokens if given; `stats` continues an earlier result."""
    cfg = model.cfg
    stats = stats or CorpusStats(cfg.num_layers, cfg.num_experts, cfg.num_heads)
    graphdef, state = nnx.split(model)
    step = _reduction_fn(graphdef, lens)
    docs = (_encode(d, tokenizer) for d in read_corpus(source))
    bar = tqdm(total=max_tokens, unit="tok", desc="inspect") if progress else None
    try:
        for b in pack_stream(docs, seq_len, batch_size, stats):
            r = jax.device_get(step(state, b["tokens"], b["positions"], b["segment_ids"]))
            valid = b["segment_ids"] != 0
            n = int(valid.sum())
            stats.tokens += n
            stats.expert_counts += np.rint(r["counts"]).astype(np.int64)
            stats.cooccurrence += np.rint(r["cooc"]).astype(np.int64)
            stats.entropy_sum += r["entropy"]
            stats.sink_sum += r["sink"]
            stats.lens_hits += r["hits"]
            stats.lens_targets += int(r["targets"]) if lens else 0
            V = cfg.vocab_size
            for l, ids in enumerate(r["ids"]):
                key = ids[valid].astype(np.int64) * V + b["tokens"][valid][:, None]
                uniq, cnt = np.unique(key, return_counts=True)
                for u, c in zip(uniq.tolist(), cnt.tolist()):
                    stats.token_experts[(l, u // V)][u % V] += c
            if bar is not None:
                bar.update(n)
            if max_tokens is not None and stats.tokens >= max_tokens:
                break
    finally:
        if bar is not None:
            bar.close()
    return stats


__all__ = [
    "stacked",
    "expert_counts",
    "expert_load",
    "load_imbalance",
    "routing_entropy",
    "expert_cooccurrence",
    "token_expert_table",
    "sink_mass",
    "attention_maps",
    "attention_entropy",
    "attention_distance",
    "unembed",
    "logit_lens",
    "logit_lens_top",
    "CorpusStats",
    "read_corpus",
    "pack_stream",
    "run_corpus",
]
