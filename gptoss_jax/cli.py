"""`gptoss` command line: thin wrappers over the package.

gptoss demo     build a small random gpt-oss, write it as an HF checkpoint, load it back and
                show what the model does (routing, sinks, windows) -- the README's first command
gptoss quickstart  train a tiny gpt-oss on addition from scratch, evaluate it, sample it, write
                a report (the README's main job)
gptoss info     parameter counts and stored bytes of the presets (no memory needed)
gptoss convert  any supported checkpoint (HF, original/, native) -> native (fast) or HF layout
gptoss generate one harmony turn from --prompt or --conversation, streamed
gptoss chat     interactive harmony chat; analysis of finished turns is dropped from history
gptoss train    fine-tuning from a YAML experiment config with key=value overrides: SFT, or
                RL (GRPO / GSPO) with `algorithm: grpo | gspo`
gptoss eval     held-out loss / perplexity and task accuracy (generated final answers)
gptoss export   a training run's model in the HF layout, LoRA adapters merged
gptoss inspect  expert routing, sink mass and logit lens over a text or corpus: report.json + plots
gptoss compile  a config's train step / forward / decode compiled for a TPU or H100 target on this
                host (no hardware): per-device memory vs HBM, compile time, kernels
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import gptoss_jax as gj
from gptoss_jax import aot, atomic, distributed, harmony, inspect, inspect_report, targets
from gptoss_jax.cache import cache_bytes
from gptoss_jax.checkpoint import CheckpointError, find_checkpoint
from gptoss_jax.config import ConfigError, ModelConfig
from gptoss_jax.host import reexec_with_huge_pages
from gptoss_jax.safetensors_io import SafetensorsError
from gptoss_jax.sampling import check_sampling_options, generate
from gptoss_jax.tokenizer import TokenizerError
from gptoss_jax.train import memory as train_memory
from gptoss_jax.train import quickstart, rl, sft
from gptoss_jax.train.config import PRESETS, check_dtype, load_config, to_dict


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


def cmd_info(args) -> int:
    presets = {"20b": gj.gpt_oss_20b, "120b": gj.gpt_oss_120b}
    names = [args.preset] if args.preset else list(presets)
    for name in names:
        cfg = presets[name]()
        packed = gj.abstract(cfg, experts="mxfp4")
        dense_bytes = gj.parameter_bytes(gj.abstract(cfg, experts="dense"))
        print(
            f"gpt-oss-{name}: {cfg.num_layers} layers, {cfg.num_experts} experts (top-{cfg.experts_per_token}), "
            f"d_model {cfg.d_model}, window {cfg.sliding_window}"
        )
        print(f"  parameters       {gj.parameter_count(packed):,}")
        print(f"  stored, packed   {_fmt_bytes(gj.parameter_bytes(packed))}  (MXFP4 experts, bf16 rest)")
        print(f"  stored, dense    {_fmt_bytes(dense_bytes)}  (bf16 everywhere)")
    return 0


def cmd_convert(args) -> int:
    """The destination is written whole or not at all: the checkpoint and tokenizer go to a
    temporary folder beside it that is renamed into place at the end (see `gptoss_jax.atomic`)."""

    # checked before the (long) load: dst must not be src, inside it or around it, nor non-empty
    with atomic.folder(args.dst, overwrite=args.overwrite, sources=[args.src]) as tmp:
        model = gj.load(args.src, dtype=args.dtype, experts=args.experts, progress=True)
        if args.to == "native":
            gj.save_native(model, tmp)
        else:
            gj.save_hf(model, tmp, dtype=args.dtype)
        _copy_tokenizer(args.src, tmp)
    print(f"wrote {args.dst} ({args.to} layout, {model.experts} experts)")
    return 0


def _copy_tokenizer(src: str, dst: str) -> None:
    for folder in (src, os.path.dirname(os.path.abspath(src))):
        path = os.path.join(folder, "tokenizer.json")
        if os.path.isfile(path):
            atomic.copy_file(path, os.path.join(dst, "tokenizer.json"))
            return


# ------------------------------------------------------------------------- checking options
# Every option is checked before a checkpoint's weights are read: numbers for finiteness and range,
# names against the known ones, and what depends on the model against its config.json.
def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _need_count(value, flag: str, low: int = 1, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    _need(value is not None and value >= low, f"{flag} must be an integer >= {low}, got {value}")


def _check_seed(seed, flag: str = "--seed") -> None:
    _need(0 <= seed < 2**63, f"{flag} must be an integer in [0, 2**63), got {seed}")


def _check_dtype_arg(dtype) -> None:
    check_dtype(dtype, "--dtype")


def _checkpoint_config(path):
    """A checkpoint's ModelConfig from its config.json alone (no weights read)."""

    return ModelConfig.from_pretrained(find_checkpoint(path).root)


def _check_tokenizer_fits(tokenizer, vocab_size: int, fix: str) -> None:
    """A tokenizer with more ids than the model's embedding rows would feed it invalid ids."""
    _need(
        tokenizer.vocab_size <= vocab_size,
        f"the tokenizer{' ' + tokenizer.name if tokenizer.name else ''} has {tokenizer.vocab_size} ids but "
        f"the model's vocabulary only {vocab_size}: {fix}",
    )


def _check_prompt(ids, cfg, max_new_tokens: int) -> None:
    """What `generate` checks, before the model is loaded."""
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    _need(
        not bad,
        f"the prompt has token ids outside the vocabulary [0, {cfg.vocab_size}) of the checkpoint: "
        f"{bad[:5]} (is --tokenizer the checkpoint's tokenizer?)",
    )
    _need(
        len(ids) + max_new_tokens <= cfg.max_position,
        f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the context of "
        f"{cfg.max_position} tokens (lower --max-new-tokens or shorten the prompt)",
    )


def _check_run_tokenizer(cfg, checkpoint=None) -> None:
    """A run's data are ids of `model.tokenizer`, checked against the vocabulary of the model it
    trains or evaluates (`checkpoint`, model.checkpoint, or the preset with its overrides)."""

    source = checkpoint or cfg.model.checkpoint
    if source:
        vocab = _checkpoint_config(source).vocab_size
        fix = f"set model.tokenizer to the tokenizer of {source}"
    else:
        vocab = PRESETS[cfg.model.preset]().replace(**cfg.model.overrides).vocab_size
        fix = "set model.tokenizer to the model's tokenizer or model.overrides.vocab_size to the tokenizer's size"
    _check_tokenizer_fits(gj.load_tokenizer(cfg.model.tokenizer), vocab, fix)


_SAMPLING_FLAGS = {
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "max_new_tokens": "--max-new-tokens",
    "seed": "--seed",
}


# ------------------------------------------------------------------------------ talking to it
def _load_for_chat(args, check_prompt=None):
    """Options, the checkpoint's config, the tokenizer and `check_prompt(tokenizer, cfg)` are all
    checked before the weights are loaded."""

    _check_dtype_arg(args.dtype)
    mesh_spec = gj.sharding.parse_mesh(args.mesh) if args.mesh else None
    cfg = _checkpoint_config(args.checkpoint)
    check_sampling_options(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        vocab_size=cfg.vocab_size,
        names=_SAMPLING_FLAGS,
    )
    tokenizer = gj.load_tokenizer(args.tokenizer or args.checkpoint)
    if check_prompt is not None:
        check_prompt(tokenizer, cfg)
    mesh = gj.sharding.mesh_from_config(mesh_spec) if mesh_spec is not None else None
    model = gj.load(args.checkpoint, dtype=args.dtype, mesh=mesh)
    return model, tokenizer


def _sampling_kwargs(args) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def _reply(model, tokenizer, conversation, args, out=None):
    """Generate one assistant turn, streaming the final channel (and analysis if asked) to `out`;
    returns the parsed messages."""

    out = out or sys.stdout
    prompt = harmony.render_for_completion(conversation, tokenizer)
    parser = harmony.StreamParser(tokenizer, role="assistant")
    shown = {"printed": 0, "channel": None}

    def visible(channel):
        return channel in ("final", None) or (args.show_analysis and channel in ("analysis", "commentary"))

    def completed(msg):
        text = msg["content"][0]["text"] if msg.get("content") else ""
        if msg.get("malformed"):  # never hide what the model wrote, even when it broke the format
            out.write(f"{text[shown['printed'] :]}\n[not valid harmony: {msg['malformed']}]\n")
        elif visible(msg.get("channel")) or msg.get("warnings"):
            out.write(text[shown["printed"] :] + "\n")
            if msg.get("warnings"):  # accepted by openai-harmony, but not what a caller expects
                out.write(f"[harmony: {msg['warnings']}]\n")
        shown["printed"] = 0

    def on_tokens(_row, toks):
        for t in toks:
            for msg in parser.feed(t):
                completed(msg)
            cur = parser.current
            if cur and cur["state"] == "content" and visible(cur["channel"]):
                if shown["printed"] == 0 and cur["channel"] != "final":
                    out.write(f"[{cur['channel']}] ")
                out.write(cur["content"][shown["printed"] :])
                shown["printed"] = len(cur["content"])
        out.flush()

    gen = generate(model, tokenizer, [prompt], stream=on_tokens, **_sampling_kwargs(args))
    for msg in parser.finish():
        completed(msg)
    messages = parser.messages
    if gen.stop_reason[0] == "length":
        out.write("\n[stopped at --max-new-tokens]\n")
    return messages


def _conversation_start(args) -> list[dict]:
    msgs = [harmony.system_message(reasoning_effort=args.reasoning_effort)]
    if args.developer:
        msgs.append(harmony.developer_message(args.developer))
    return msgs


def cmd_generate(args) -> int:
    if (args.prompt is None) == (args.conversation is None):
        raise ValueError("give exactly one of --prompt or --conversation")
    if args.raw and args.prompt is None:
        raise ValueError("--raw needs --prompt (plain text, no chat format)")
    conversation = None
    if args.conversation:
        with open(args.conversation) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"--conversation {args.conversation} is not valid JSON: {e}") from None
        try:
            conversation = harmony.normalize_conversation(data)
        except ValueError as e:
            raise ValueError(f"--conversation {args.conversation}: {e}") from None
    elif not args.raw:
        conversation = _conversation_start(args) + [harmony.user(args.prompt)]

    def check_prompt(tokenizer, cfg):
        ids = (
            tokenizer.encode(args.prompt, disallowed_special=())
            if args.raw
            else harmony.render_for_completion(conversation, tokenizer)
        )
        _check_prompt(ids, cfg, args.max_new_tokens)

    model, tokenizer = _load_for_chat(args, check_prompt)
    if args.raw:
        generate(
            model,
            tokenizer,
            [args.prompt],
            stop_tokens=(tokenizer.token_id("<|endoftext|>"),),
            stream=lambda _r, t: print(tokenizer.decode(t), end="", flush=True),
            **_sampling_kwargs(args),
        )
        print()
        return 0
    _reply(model, tokenizer, conversation, args)
    return 0


def cmd_chat(args) -> int:
    def check_prompt(tokenizer, cfg):  # the system (and developer) messages every turn starts with
        _check_prompt(harmony.render_for_completion(_conversation_start(args), tokenizer), cfg, args.max_new_tokens)

    model, tokenizer = _load_for_chat(args, check_prompt)
    history = _conversation_start(args)
    print("chat: an empty line or /exit quits, /reset clears the history", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() in ("", "/exit"):
            break
        if line.strip() == "/reset":
            history = _conversation_start(args)
            continue
        history.append(harmony.user(line))
        # earlier analysis is dropped on the next render, as the format says (auto_drop_analysis)
        history.extend(m for m in _reply(model, tokenizer, history, args) if not m.get("malformed"))
    return 0


def cmd_demo(args) -> int:
    _need_count(args.new_tokens, "--new-tokens")
    _check_seed(args.seed)
    t0 = time.time()
    cfg = gj.tiny(
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
    print("== 1. a small gpt-oss with the real structure")
    print(
        f"   {cfg.num_layers} layers alternating sliding(window {cfg.sliding_window} keys, itself included)"
        f"/full attention, {cfg.num_heads} query heads sharing {cfg.num_kv_heads} KV heads, "
        f"{cfg.num_experts} experts top-{cfg.experts_per_token}, YaRN RoPE x{cfg.rope_factor:g}"
    )
    model = gj.init(cfg, seed=args.seed)
    print(
        f"   {gj.parameter_count(model):,} parameters, {_fmt_bytes(gj.parameter_bytes(model))} as stored "
        f"(experts packed as MXFP4: uint8 blocks + e8m0 scales)"
    )

    ck = os.path.join(args.out, "checkpoint")
    print(f"\n== 2. write it in the HF hub layout -> {ck}")
    gj.save_hf(model, ck, max_shard_bytes=1 << 20, overwrite=True)  # the demo's own folder, rerun
    for name in sorted(os.listdir(ck)):
        print(f"   {name:40s} {_fmt_bytes(os.path.getsize(os.path.join(ck, name)))}")

    print("\n== 3. load it back (layout detected from the files; packed experts stay packed)")
    loaded = gj.load(ck)
    rng = np.random.default_rng(args.seed)
    # two documents packed into one row: segment ids keep them apart in attention
    lens = (40, 24)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, sum(lens)))[None]
    positions = jnp.asarray(np.concatenate([np.arange(n) for n in lens]))[None]
    segments = jnp.asarray(np.repeat([1, 2], lens))[None]
    fwd = jax.jit(lambda m, t, p, s: m(t, positions=p, segment_ids=s, capture=True))
    out = fwd(loaded, tokens, positions, segments)
    same = bool(jnp.array_equal(out.logits, fwd(model, tokens, positions, segments).logits))
    print(f"   logits {tuple(out.logits.shape)} {out.logits.dtype}; identical to the in-memory model: {same}")
    if not same:
        print("   ERROR: the checkpoint round trip changed the model", file=sys.stderr)
        return 1

    print("\n== 4. inside the forward pass (captured intermediates, no hooks)")
    print("   layer  kind     mean sink mass  router entropy  tokens per expert")
    sink = inspect.sink_mass(out.intermediates).mean(-1)  # [L]: over tokens, then heads
    entropy = inspect.routing_entropy(out.intermediates)  # [L] nats
    load = inspect.expert_counts(out.intermediates, cfg.num_experts)  # [L, E]
    for i in range(cfg.num_layers):
        kind = "sliding" if cfg.is_sliding(i) else "full"
        print(f"   {i:5d}  {kind:8s} {sink[i]:14.3f}  {entropy[i]:14.3f}  {load[i].tolist()}")

    print("\n== 5. generate: both documents as a batch of prompts of different lengths, KV-cached")
    prompts = [[int(t) for t in np.asarray(tokens[0, : lens[0]])], [int(t) for t in np.asarray(tokens[0, lens[0] :])]]
    gen = gj.generate(loaded, None, prompts, max_new_tokens=args.new_tokens, temperature=0, stop_tokens=())
    for i, (p, new) in enumerate(zip(prompts, gen.tokens)):
        print(f"   prompt {i}: {len(p)} tokens -> greedy {new}")
    print(
        f"   the cache keeps {cfg.sliding_window} slots on sliding layers and the full length on full "
        f"layers: {cache_bytes(cfg, 2, max(lens) + args.new_tokens):,} bytes here; for gpt-oss-20b at "
        f"131,072 tokens {cache_bytes(gj.gpt_oss_20b(), 1, 131072) / 2**30:.2f} GiB per sequence (bf16)"
    )
    print(f"\ndone in {time.time() - t0:.1f}s; the checkpoint is in {ck}")
    return 0


def cmd_train(args) -> int:
    if args.estimate_memory is not None:
        _need(
            np.isfinite(args.estimate_memory) and args.estimate_memory >= 0,
            f"--estimate-memory must be a finite number of GiB >= 0, got {args.estimate_memory}",
        )
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    if args.estimate_memory is not None:
        print(train_memory.estimate(cfg).table(args.estimate_memory * 2**30 if args.estimate_memory else None))
        return 0
    _check_run_tokenizer(cfg)
    if cfg.algorithm == "sft":
        summary = sft.train(cfg)
        print(
            f"done: {summary['steps']} steps, final loss {summary.get('final_loss', float('nan')):.4f}; "
            f"weights in {summary['saved']}"
        )
    else:
        summary = rl.train(cfg)
        print(
            f"done: {summary['steps']} {cfg.algorithm} steps, held-out accuracy {summary['eval_accuracy']}; "
            f"weights in {summary['saved']}"
        )
    return 0


def cmd_compile(args) -> int:
    """Compile a config's program for a compile-only target and print the compiler's figures."""
    _need_count(args.batch, "--batch")
    _need_count(args.length, "--length", optional=True)
    if not os.environ.get("JAX_PLATFORMS"):  # the host only traces; without a CUDA driver the cuda
        # plugin would fail to start as a backend and take the compile-only H100s with it
        jax.config.update("jax_platforms", "cpu")
    target = targets.get(args.target)
    cfg = load_config(args.config, args.overrides)
    if args.program == "train":
        report = aot.compile_train_step(cfg, target)
    else:
        m, model_cfg = cfg.model, sft.model_config(cfg)
        kw = dict(batch=args.batch, mesh=cfg.mesh, dtype=m.dtype, experts=m.experts)
        if args.program == "forward":
            report = aot.compile_forward(model_cfg, target, length=args.length or cfg.data.seq_len, **kw)[1]
        else:
            report = aot.compile_decode(model_cfg, target, context=args.length or cfg.data.seq_len, **kw)[1]
    print(report.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_json(), f, indent=2)
    return 0 if report.fits else 1


def cmd_eval(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if not cfg.data.eval:
        raise ValueError("data.eval must name a jsonl file of held-out conversations")
    if not os.path.isfile(cfg.data.eval):
        raise FileNotFoundError(f"data.eval {cfg.data.eval!r} is not a file")
    _check_run_tokenizer(cfg, args.checkpoint)
    model = gj.load(args.checkpoint, dtype=cfg.model.dtype) if args.checkpoint else sft.load_trained(cfg)
    sft.evaluate(cfg, model, gj.load_tokenizer(cfg.model.tokenizer))
    print(f"results in {os.path.join(cfg.run.out_dir, 'eval.json')}")
    return 0


def cmd_export(args) -> int:
    sft.export_hf(
        sft.run_config(args.run_dir), args.dst, experts=args.experts, dtype=args.dtype, overwrite=args.overwrite
    )
    print(f"wrote {args.dst} (HF layout; LoRA adapters, if any, merged)")
    return 0


def cmd_inspect(args) -> int:
    if not args.text and not args.file:
        raise ValueError(
            "give --text and/or --file (a .txt with one document per line, or .jsonl with 'text' or 'messages')"
        )
    if args.file and not os.path.isfile(args.file):
        raise FileNotFoundError(f"--file {args.file!r} is not a file")
    _check_dtype_arg(args.dtype)
    _need_count(args.batch_size, "--batch-size")
    _need_count(args.max_tokens, "--max-tokens", optional=True)
    cfg = _checkpoint_config(args.checkpoint)
    _need(
        1 <= args.seq_len <= cfg.max_position,
        f"--seq-len must be an integer from 1 to the model's context of {cfg.max_position}, got {args.seq_len}",
    )
    tokenizer = gj.load_tokenizer(args.tokenizer or args.checkpoint)
    _check_tokenizer_fits(tokenizer, cfg.vocab_size, "give --tokenizer the checkpoint's own tokenizer")
    model = gj.load(args.checkpoint, dtype=args.dtype, progress=True)
    stats = None
    if args.file:
        stats = inspect.run_corpus(
            model,
            tokenizer,
            args.file,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            lens=not args.no_lens,
        )
    table = None
    if args.text:
        stats = inspect.run_corpus(
            model,
            tokenizer,
            [args.text],
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            progress=False,
            stats=stats,
            lens=not args.no_lens,
        )
        table = inspect_report.text_table(model, tokenizer, args.text)
    paths = inspect_report.write(
        args.out,
        model,
        stats,
        tokenizer,
        text=table,
        source=" + ".join(filter(None, [args.file, args.text and "--text"])),
    )
    print(f"{stats.tokens:,} tokens in {stats.documents} documents; per layer:")
    for i in range(model.cfg.num_layers):
        load = stats.expert_load[i]
        print(
            f"  layer {i:2d} {'sliding' if model.cfg.is_sliding(i) else 'full':7s}  router entropy "
            f"{stats.routing_entropy[i]:.3f}  busiest expert {int(load.argmax())} ({load.max():.1%})  "
            f"sink mass {stats.sink_mass[i].mean():.3f}"
            + (f"  lens accuracy {stats.lens_accuracy[i]:.3f}" if stats.lens_targets else "")
        )
    print("wrote " + ", ".join(paths.values()))
    return 0


def cmd_quickstart(args) -> int:
    _need_count(args.train_size, "--train-size")
    _need_count(args.eval_size, "--eval-size")
    load_config(quickstart.CONFIG, args.overrides)  # bad overrides fail before any data is written
    quickstart.run(args.out, args.overrides, train_size=args.train_size, eval_size=args.eval_size)
    return 0


def main(argv=None) -> int:
    if argv is None:  # the command itself (not a call from Python): huge pages for XLA's host buffers
        reexec_with_huge_pages()
    parser = argparse.ArgumentParser(
        prog="gptoss", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="build, save, load and run a small random gpt-oss")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--new-tokens", type=int, default=8)
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("quickstart", help="train a tiny gpt-oss on addition from scratch, evaluate, sample, report")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the quickstart config, e.g. run.steps=100")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--train-size", type=int, default=20000, help="training problems")
    p.add_argument("--eval-size", type=int, default=500, help="held-out problems (eval.limit of them are scored)")
    p.set_defaults(fn=cmd_quickstart)
    p = sub.add_parser("info", help="parameter counts and bytes of the released models")
    p.add_argument("--preset", choices=["20b", "120b"])
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("convert", help="convert a checkpoint (HF, original/ or native) to the native or HF layout")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument(
        "--to",
        choices=["native", "hf"],
        default="native",
        help="native: this package's fast-loading layout (default); hf: the HF hub layout",
    )
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument(
        "--experts",
        choices=["mxfp4", "dense"],
        default=None,
        help="default: as stored; 'dense' dequantizes packed experts",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dst that is not empty (once the new checkpoint is complete); without it such a dst is refused",
    )
    p.set_defaults(fn=cmd_convert)
    p = sub.add_parser("train", help="fine-tuning from an experiment config: SFT, or GRPO / GSPO (algorithm:)")
    p.add_argument("config", help="YAML experiment config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.learning_rate=1e-3 run.steps=100")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--estimate-memory",
        type=float,
        nargs="?",
        const=0.0,
        metavar="GIB",
        help="print the per-device memory the run needs (from the shapes; against GIB of "
        "device memory if given) and exit",
    )
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser(
        "compile",
        help="compile a config's train step (or forward / decode) for a TPU or H100 "
        "target on this host; print per-device memory vs HBM and the kernels",
    )
    p.add_argument("config", help="experiment config (YAML); its model, mesh, batch, LoRA and remat are used")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    p.add_argument("--target", required=True, help="tpu-v4-8, tpu-v5e-8, tpu-v5p-8, tpu-v6e-8, tpu-v6e-1, h100, h100x8")
    p.add_argument("--program", choices=["train", "forward", "decode"], default="train")
    p.add_argument("--batch", type=int, default=1, help="forward / decode rows")
    p.add_argument("--length", type=int, help="forward tokens / decode context (default: data.seq_len)")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.set_defaults(fn=cmd_compile)
    p = sub.add_parser("eval", help="held-out loss, perplexity and task accuracy of a trained model")
    p.add_argument("config", help="YAML experiment config (data.eval, eval.*)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--checkpoint", help="model to evaluate (default: the run's model, or base + adapters)")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("export", help="a training run's model in the HF layout, LoRA adapters merged")
    p.add_argument("run_dir", help="the run's out_dir (holds config.json and model/ or adapters/)")
    p.add_argument("dst")
    p.add_argument(
        "--experts",
        choices=["mxfp4", "dense"],
        default=None,
        help="mxfp4: re-encode the merged experts; dense: keep them exact (default: as the base)",
    )
    p.add_argument("--dtype", default="bfloat16", help="float dtype of the written tensors")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dst that is not empty (once the export is complete); without it such a dst is refused",
    )
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("inspect", help="expert routing, sink mass and logit lens over a text or corpus")
    p.add_argument("checkpoint", help="checkpoint folder (HF, original/ or native)")
    p.add_argument("--text", help="one text: also reported token by token")
    p.add_argument("--file", help="corpus: .txt (a document per line) or .jsonl ('text' or 'messages')")
    p.add_argument("--out", default="runs/inspect", help="folder for report.json and the plots")
    p.add_argument(
        "--tokenizer", help="tokenizer.json or 'o200k_harmony' (default: the checkpoint's, else o200k_harmony)"
    )
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row (documents are packed)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, help="stop after this many corpus tokens")
    p.add_argument(
        "--no-lens", action="store_true", help="skip the logit lens (it costs one unembedding per layer and token)"
    )
    p.add_argument("--dtype", default="bfloat16")
    p.set_defaults(fn=cmd_inspect)
    for name, fn, helptext in (
        ("generate", cmd_generate, "answer one prompt or conversation file in harmony format"),
        ("chat", cmd_chat, "interactive chat in harmony format"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("checkpoint", help="checkpoint folder (HF, original/ or native)")
        if name == "generate":
            p.add_argument("--prompt", help="the user message (or raw text with --raw)")
            p.add_argument(
                "--conversation", help="JSON file: openai-harmony messages, rendered for the next assistant turn"
            )
            p.add_argument("--raw", action="store_true", help="plain text completion, no chat format")
        p.add_argument("--developer", help="developer instructions")
        p.add_argument("--reasoning-effort", choices=["low", "medium", "high"], default="medium")
        p.add_argument("--show-analysis", action="store_true", help="also print the analysis channel")
        p.add_argument("--max-new-tokens", type=int, default=512)
        p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--dtype", default="bfloat16")
        p.add_argument(
            "--tokenizer", help="tokenizer.json or 'o200k_harmony' (default: the checkpoint's, else o200k_harmony)"
        )
        p.add_argument(
            "--mesh",
            help="shard over a device mesh, e.g. 'fsdp=2,expert=4' (axes data, fsdp, "
            "tensor, expert; one may be -1); default: one device",
        )
        p.set_defaults(fn=fn)
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow the options (`gptoss compile CFG --target h100 k=v`)
    if extra and hasattr(args, "overrides") and not any(a.startswith("-") for a in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return _run(args)


def _run(args) -> int:
    """User errors (bad path, bad checkpoint, prompt too long, bad ids) are one line on stderr."""
    try:
        if args.command in ("generate", "chat", "convert", "train", "eval", "export", "quickstart", "inspect"):
            # a no-op unless launched on several processes (SLURM, Open MPI, TPU pod, JAX_* vars)
            distributed.initialize()
        return args.fn(args)
    except (
        CheckpointError,
        ConfigError,
        SafetensorsError,
        TokenizerError,
        ValueError,
        OSError,
        FloatingPointError,
        targets.TargetUnavailable,
    ) as e:
        print(f"gptoss {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        message = _token_id_error(e)
        if message is None:
            raise
        print(f"gptoss {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _token_id_error(e: BaseException) -> str | None:
    """The message of a `TokenIdError` raised inside a jitted program (JAX re-raises it as a
    JaxRuntimeError whose text ends with the original exception), else None."""
    found = re.findall(r"TokenIdError: (.+)", str(e))
    return found[-1].strip() if type(e).__name__ == "JaxRuntimeError" and found else None


if __name__ == "__main__":
    sys.exit(main())
