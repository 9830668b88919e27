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

import jax
import numpy as np

import gptoss_jax as gj
from gptoss_jax import aot, atomic, chat, demo, distributed, harmony, inspect_report, preflight, targets
from gptoss_jax.checkpoint import CheckpointError
from gptoss_jax.config import ConfigError
from gptoss_jax.host import reexec_with_huge_pages
from gptoss_jax.safetensors_io import SafetensorsError
from gptoss_jax.tokenizer import TokenizerError
from gptoss_jax.train import memory as train_memory
from gptoss_jax.train import quickstart, rl, sft
from gptoss_jax.train.config import check_dtype, load_config, to_dict


def cmd_info(args) -> int:
    for name in [args.preset] if args.preset else list(demo.PRESETS):
        print("\n".join(demo.preset_info(name)))
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
        preflight.copy_tokenizer(args.src, tmp)
    print(f"wrote {args.dst} ({args.to} layout, {model.experts} experts)")
    return 0


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


_SAMPLING_FLAGS = {
    key: "--" + key.replace("_", "-") for key in ("temperature", "top_p", "top_k", "max_new_tokens", "seed")
}


# ------------------------------------------------------------------------------ talking to it
def _load_for_chat(args, prompt):
    """(model, tokenizer, sampling): every option, the tokenizer and `prompt` are checked before the
    weights are loaded."""
    _check_dtype_arg(args.dtype)
    sampling = chat.Sampling(**{key: getattr(args, key) for key in _SAMPLING_FLAGS})
    model, tokenizer = chat.load(
        args.checkpoint,
        sampling=sampling,
        prompt=prompt,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
        mesh=args.mesh,
        names=_SAMPLING_FLAGS,
    )
    return model, tokenizer, sampling


def cmd_generate(args) -> int:
    if (args.prompt is None) == (args.conversation is None):
        raise ValueError("give exactly one of --prompt or --conversation")
    if args.raw and args.prompt is None:
        raise ValueError("--raw needs --prompt (plain text, no chat format)")
    if args.conversation:
        try:
            prompt = chat.read_conversation(args.conversation)
        except ValueError as e:
            raise ValueError(f"--conversation {e}") from None
    elif args.raw:
        prompt = args.prompt
    else:
        prompt = chat.conversation_start(args.reasoning_effort, args.developer) + [harmony.user(args.prompt)]
    model, tokenizer, sampling = _load_for_chat(args, prompt)
    if args.raw:
        chat.complete(model, tokenizer, prompt, sampling)
    else:
        chat.reply(model, tokenizer, prompt, sampling, show_analysis=args.show_analysis)
    return 0


def cmd_chat(args) -> int:
    start = chat.conversation_start(args.reasoning_effort, args.developer)  # every turn starts with it: must fit
    session = chat.Chat(*_load_for_chat(args, start), start, show_analysis=args.show_analysis)
    print("chat: an empty line or /exit quits, /reset clears the history", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() in ("", "/exit"):
            break
        if line.strip() == "/reset":
            session.reset()
            continue
        session.send(line)
    return 0


def cmd_demo(args) -> int:
    _need_count(args.new_tokens, "--new-tokens")
    _check_seed(args.seed)
    if not demo.run(args.out, seed=args.seed, new_tokens=args.new_tokens):
        print("   ERROR: the checkpoint round trip changed the model", file=sys.stderr)
        return 1
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
    preflight.check_run_tokenizer(cfg)
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
    preflight.check_run_tokenizer(cfg, args.checkpoint)
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
    model, stats, paths = inspect_report.run(
        args.checkpoint,
        args.out,
        text=args.text,
        file=args.file,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        lens=not args.no_lens,
        dtype=args.dtype,
    )
    print("\n".join(inspect_report.summary(model, stats)))
    print("wrote " + ", ".join(paths.values()))
    return 0


def cmd_quickstart(args) -> int:
    _need_count(args.train_size, "--train-size")
    _need_count(args.eval_size, "--eval-size")
    load_config(quickstart.CONFIG, args.overrides)  # bad overrides fail before any data is written
    quickstart.run(args.out, args.overrides, train_size=args.train_size, eval_size=args.eval_size)
    return 0


_TOKENIZER_HELP = "tokenizer.json or 'o200k_harmony' (default: the checkpoint's, else o200k_harmony)"
_OVERWRITE_HELP = "replace a dst that is not empty (once {} is complete); without it such a dst is refused"


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
        "--experts", choices=["mxfp4", "dense"], help="default: as stored; 'dense' dequantizes packed experts"
    )
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP.format("the new checkpoint"))
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
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP.format("the export"))
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("inspect", help="expert routing, sink mass and logit lens over a text or corpus")
    p.add_argument("checkpoint", help="checkpoint folder (HF, original/ or native)")
    p.add_argument("--text", help="one text: also reported token by token")
    p.add_argument("--file", help="corpus: .txt (a document per line) or .jsonl ('text' or 'messages')")
    p.add_argument("--out", default="runs/inspect", help="folder for report.json and the plots")
    p.add_argument("--tokenizer", help=_TOKENIZER_HELP)
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
        p.add_argument("--tokenizer", help=_TOKENIZER_HELP)
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
