"""The quickstart experiment: a tiny gpt-oss learns multi-digit addition from scratch.

    gptoss quickstart [--out runs/quickstart] [key=value ...]      (the README's `make run`)

1. data: synthetic problems (`tasks.arithmetic`, 1-3 digit operands) with a column-by-column
   analysis and a final answer, as jsonl conversations; held-out problems never occur in training;
2. tokenizer: a small byte-level BPE trained on the task's text and the harmony framing, with
   the harmony special tokens and one token per digit (o200k_harmony's 201,088-row embedding
   would cost more than the whole model here);
3. SFT (`train.sft.train`, the same loop as `gptoss train`) with the config `quickstart.yaml`
   beside this file, then held-out loss and task accuracy (greedy answers, parsed `final`);
4. a few answers sampled in the chat format, with their analysis;
5. a report: `report.md` (numbers, samples), `curves.png`, `summary.json`.
"""

from __future__ import annotations

import json
import os
import time

import gptoss_jax as gj
from gptoss_jax import harmony
from gptoss_jax.tasks import arithmetic
from gptoss_jax.tokenizer import train_bpe
from gptoss_jax.train.config import load_config
from gptoss_jax.train.data import parse_conversation
from gptoss_jax.train.metrics import read_metrics
from gptoss_jax.train.sft import load_trained, train

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.yaml")


def _framing_texts(tokenizer_probe) -> list[str]:
    """The harmony framing as plain text pieces (role names, channels, the system message), cut at
    the special tokens of a rendered conversation, so the BPE learns them as few tokens."""

    conv = parse_conversation(arithmetic.conversation(12, 345))
    ids, _ = harmony.render_for_training(conv, tokenizer_probe, auto_drop_analysis=False)
    pieces, current = [], []
    for t in ids + [tokenizer_probe.token_id("<|end|>")]:
        if tokenizer_probe.is_special(t):
            if current:
                pieces.append(tokenizer_probe.decode(current))
            current = []
        else:
            current.append(t)
    return pieces


def build_tokenizer(path: str, *, vocab_size: int = 384):
    probe = train_bpe(arithmetic.corpus(500), 300)
    texts = list(arithmetic.corpus(4000)) + _framing_texts(probe) * 50
    tok = train_bpe(texts, vocab_size, name="quickstart-bpe")
    tok.hf.save(path)
    return tok


def sample_chat(model, tokenizer, problems, *, temperature: float = 0.7, seed: int = 0) -> list[dict]:
    """Answer `problems` [(a, b)] in the chat format; the analysis and final message of each."""

    convs = [[harmony.system_message(reasoning_effort="low"), harmony.user(f"What is {a} + {b}?")] for a, b in problems]
    gen = gj.generate(
        model,
        tokenizer,
        [harmony.render_for_completion(c, tokenizer) for c in convs],
        max_new_tokens=96,
        temperature=temperature,
        seed=seed,
    )
    out = []
    for (a, b), toks in zip(problems, gen.tokens):
        msgs = harmony.parse_completion(toks, tokenizer)
        text = {m.get("channel"): "".join(p.get("text", "") for p in m["content"]) for m in msgs}
        out.append(
            {
                "question": f"What is {a} + {b}?",
                "analysis": text.get("analysis"),
                "final": text.get("final"),
                "expected": str(a + b),
                "correct": (text.get("final") or "").strip() == str(a + b),
            }
        )
    return out


def run(
    out: str = "runs/quickstart",
    overrides=(),
    *,
    train_size: int = 20000,
    eval_size: int = 500,
    final_noise: float = 0.0,
    log=print,
) -> dict:
    """The quickstart in `out`. final_noise (`tasks.arithmetic.write_splits`): the fraction of
    training answers made wrong in their final message alone (0 for the quickstart; the RL
    experiment's start uses it)."""
    import dataclasses

    t0 = time.time()
    data_dir = os.path.join(out, "data")
    os.makedirs(data_dir, exist_ok=True)
    train_path, eval_path = os.path.join(data_dir, "train.jsonl"), os.path.join(data_dir, "eval.jsonl")
    sizes = arithmetic.write_splits(
        train_path, eval_path, train_size=train_size, eval_size=eval_size, seed=0, final_noise=final_noise
    )
    log(
        f"== data: {sizes['train']} training and {sizes['eval']} held-out addition problems "
        f"({sizes['min_digits']}-{sizes['max_digits']} digit operands) in {data_dir}"
        + (f"; {sizes['train_finals_perturbed']} training final answers made wrong" if final_noise else "")
    )
    tok_path = os.path.join(out, "tokenizer.json")
    tokenizer = build_tokenizer(tok_path)
    log(f"== tokenizer: byte-level BPE of {tokenizer.vocab_size} ids with the harmony specials -> {tok_path}")

    cfg = load_config(
        CONFIG,
        list(overrides)
        + [
            f"data.train={train_path}",
            f"data.eval={eval_path}",
            f"model.tokenizer={tok_path}",
            f"run.out_dir={os.path.join(out, 'sft')}",
        ],
    )
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, overrides={**cfg.model.overrides, "vocab_size": tokenizer.vocab_size})
    )
    log(f"== SFT from scratch: {cfg.run.steps} steps of {cfg.data.batch_size} x {cfg.data.seq_len} tokens")
    t_train = time.time()
    summary = train(cfg, log=lambda s: log("   " + s))
    train_seconds = time.time() - t_train

    model = load_trained(cfg)
    held = [tuple(p) for p in sizes["heldout_first"][:4]]
    samples = sample_chat(model, tokenizer, held, seed=cfg.run.seed)
    log("== sampled in the chat format (temperature 0.7):")
    for s in samples:
        log(
            f"   user: {s['question']}\n   analysis: {s['analysis']}\n   final: {s['final']} "
            f"({'right' if s['correct'] else 'wrong, expected ' + s['expected']})"
        )

    metrics = read_metrics(os.path.join(cfg.run.out_dir, "metrics.jsonl"))
    tokens_seen = cfg.run.steps * cfg.data.batch_size * cfg.data.seq_len
    ev = summary["eval"]
    result = {
        "seconds_total": round(time.time() - t0, 1),
        "seconds_training": metrics[-1]["seconds"],
        "seconds_sft_and_eval": round(train_seconds, 1),
        "parameters": gj.parameter_count(model),
        "vocab_size": tokenizer.vocab_size,
        "steps": cfg.run.steps,
        "tokens_per_second": round(tokens_seen / max(metrics[-1]["seconds"], 1e-9)),
        "train_loss_first": metrics[0]["loss"],
        "train_loss_last": metrics[-1]["loss"],
        "eval_loss": ev["loss"],
        "eval_perplexity": ev["perplexity"],
        "heldout_accuracy": ev["task"]["accuracy"],
        "heldout_scored": ev["task"]["total"],
        "samples": samples,
        "data": sizes,
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(result, f, indent=2)
    write_report(os.path.join(out, "report.md"), result, cfg)
    log(
        f"== held-out accuracy {result['heldout_accuracy']:.1%} on {result['heldout_scored']} unseen problems; "
        f"eval loss {result['eval_loss']:.4f}; {result['seconds_total']:.0f} s in all"
    )
    log(f"   report: {os.path.join(out, 'report.md')}, curves: {os.path.join(cfg.run.out_dir, 'curves.png')}")
    return result


def write_report(path: str, r: dict, cfg) -> None:
    m = cfg.model.overrides
    lines = [
        "# Quickstart: a tiny gpt-oss learns addition",
        "",
        f"- model: {r['parameters']:,} parameters; {m.get('num_layers')} layers (sliding window "
        f"{m.get('sliding_window')} / full), d_model {m.get('d_model')}, {m.get('num_experts')} experts "
        f"top-{m.get('experts_per_token')}, vocabulary {r['vocab_size']} (byte-level BPE + harmony specials)",
        f"- data: {r['data']['train']} training problems, {r['data']['eval']} held out "
        f"({r['data']['min_digits']}-{r['data']['max_digits']} digit operands), harmony conversations",
        f"- training: {r['steps']} steps x {cfg.data.batch_size} rows x {cfg.data.seq_len} tokens, "
        f"AdamW lr {cfg.optim.learning_rate:g}, {r['seconds_training']:.0f} s "
        f"({r['tokens_per_second']:,} tokens/s)",
        "",
        "| figure | value |",
        "|---|---|",
        f"| train loss, first -> last logged step | {r['train_loss_first']:.3f} -> {r['train_loss_last']:.4f} |",
        f"| held-out loss (perplexity) | {r['eval_loss']:.4f} ({r['eval_perplexity']:.3f}) |",
        f"| held-out accuracy (greedy, exact final answer) | {r['heldout_accuracy']:.1%} of {r['heldout_scored']} |",
        f"| wall time (data, tokenizer, training, evaluation, samples) | {r['seconds_total']:.0f} s |",
        "",
        "![training curves](sft/curves.png)",
        "",
        "## Sampled answers (temperature 0.7)",
        "",
    ]
    for s in r["samples"]:
        lines += [
            f"- **{s['question']}** analysis: `{s['analysis']}` final: `{s['final']}` "
            f"({'right' if s['correct'] else 'wrong; expected ' + s['expected']})"
        ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
