"""Supervised fine-tuning loop: config -> data -> model -> jitted steps -> checkpoints, metrics.

    summary = train(load_config("configs/quickstart.yaml", ["run.steps=50"]))

Resumes from the newest complete checkpoint in `run.out_dir/checkpoints` (exactly: the state,
counters and data position are restored, and batches are a function of the step; SFT draws no
other random numbers). Metrics go to `run.out_dir/metrics.jsonl` (and TensorBoard), one line per
logged step, plotted to `curves.png` at the end; the trained weights to `run.out_dir/model`
(native layout, loadable with `gptoss_jax.load`), or with LoRA the adapters alone to
`run.out_dir/adapters` (`lora.load_adapters` on the same base; `gptoss export` merges them).

The data are read and checked (not empty, token ids inside the model's vocabulary) before a model
is built or the run folder touched; the run then holds `run.out_dir/run.lock` (`train.lock`), so a
second run on the same folder is refused instead of interleaving with the first.
"""

from __future__ import annotations

import json
import os
import time

import jax

import gptoss_jax as gj
from gptoss_jax import atomic, distributed
from gptoss_jax import config as config_lib
from gptoss_jax import lora as lora_lib
from gptoss_jax.config import ModelConfig
from gptoss_jax.model import KernelOptions
from gptoss_jax.train import data as data_lib
from gptoss_jax.train import eval as eval_lib
from gptoss_jax.train.checkpoints import Checkpoints
from gptoss_jax.train.config import ExperimentConfig, from_dict, to_dict
from gptoss_jax.train.lock import RunLock
from gptoss_jax.train.metrics import METRICS_FILE, MetricsLog, plot_curves, truncate_metrics
from gptoss_jax.train.step import make_optimizer, make_schedule, make_trainer, trainable_filter

PRESETS = {"tiny": config_lib.tiny, "gpt_oss_20b": config_lib.gpt_oss_20b, "gpt_oss_120b": config_lib.gpt_oss_120b}


def model_config(cfg: ExperimentConfig):
    """The architecture of `model.preset` with `model.overrides` applied."""
    m = cfg.model
    if m.preset not in PRESETS:
        raise ValueError(f"model.preset {m.preset!r} is not one of {sorted(PRESETS)}")
    return PRESETS[m.preset]().replace(**m.overrides) if m.overrides else PRESETS[m.preset]()


def build_model(cfg: ExperimentConfig, mesh=None, *, adapters: bool = True):
    """The model a run starts from: `model.checkpoint`, or a random `model.preset` (seeded by
    run.seed); with `lora.enabled` (and `adapters`), fresh adapters attached."""

    m = cfg.model
    kernel = kernel_options(cfg)
    if m.checkpoint:
        model = gj.load(m.checkpoint, dtype=m.dtype, experts=m.experts, mesh=mesh, kernel=kernel)
    else:
        model = gj.init(
            model_config(cfg), seed=cfg.run.seed, dtype=m.dtype, experts=m.experts, mesh=mesh, kernel=kernel
        )
    if cfg.lora.enabled and adapters:
        lora_lib.add_lora(model, lora_config(cfg), seed=cfg.run.seed)
    return model


def kernel_options(cfg: ExperimentConfig):
    """The model section's execution choices (remat, expert capacity and exchange) as KernelOptions."""
    m = cfg.model
    return KernelOptions(remat=m.remat, capacity_factor=m.capacity_factor, expert_dispatch=m.expert_dispatch)


def lora_config(cfg: ExperimentConfig) -> lora_lib.LoRAConfig:
    return lora_lib.LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=tuple(cfg.lora.targets))


def load_trained(cfg: ExperimentConfig, mesh=None):
    """The model a finished run wrote: run.out_dir/model, or the base plus run.out_dir/adapters."""

    out = cfg.run.out_dir
    if cfg.lora.enabled:
        return lora_lib.load_adapters(build_model(cfg, mesh, adapters=False), os.path.join(out, "adapters"))
    return gj.load(os.path.join(out, "model"), dtype=cfg.model.dtype, mesh=mesh)


def run_config(run_dir: str) -> ExperimentConfig:
    """The config a run was started with (its config.json), pointed at `run_dir`."""
    import dataclasses

    path = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such training run folder")
    if not os.path.isfile(path):
        raise ValueError(_not_a_run(run_dir))
    raw = _read_json(path)
    if not isinstance(raw, dict) or not {"model", "data", "run"} <= set(raw):
        raise ValueError(_not_a_run(run_dir, model_config=isinstance(raw, dict)))
    cfg = from_dict(raw)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=run_dir))


def _not_a_run(folder: str, *, model_config: bool = False) -> str:
    """Why `folder` is not a training run folder, and what to do instead."""
    names = set(os.listdir(folder))
    if model_config or "original" in names or any(n.endswith(".safetensors") for n in names):
        return (
            f"{folder} is a model checkpoint, not a training run folder (no training config.json: its "
            "config.json is a model config); `gptoss export` takes the run.out_dir of `gptoss train`; "
            f"to write a checkpoint in another layout use `gptoss convert {folder} DST --to hf`"
        )
    for up in (1, 2):  # an orbax step folder (checkpoints/N) or the checkpoints/ folder of a run
        run = os.path.abspath(os.path.join(folder, *[".."] * up))
        if os.path.isfile(os.path.join(run, "config.json")) and os.path.isdir(os.path.join(run, "checkpoints")):
            return (
                f"{folder} is a training checkpoint inside the run folder {run}, not a run folder "
                f"(no config.json); give {run} (its model/ or adapters/ are what is exported)"
            )
    if "_CHECKPOINT_METADATA" in names or any(n.isdigit() for n in names):
        return (
            f"{folder} is a training checkpoint (orbax), not a training run folder (no config.json); "
            "give the run folder that holds config.json and checkpoints/"
        )
    return f"{folder} is not a training run folder (no config.json)"


def export_hf(
    cfg: ExperimentConfig, dst: str, *, experts: str | None = None, dtype: str = "bfloat16", overwrite: bool = False
) -> str:
    """Write a finished run's model in the HF hub layout, LoRA adapters merged into the base;
    experts "mxfp4" (re-encoded) | "dense" | None (as the base stores them). The run's
    tokenizer.json goes beside it when it has one.

    `dst` is written whole or not at all (a temporary folder beside it, renamed into place at the
    end). A `dst` that is not empty is refused (FileExistsError) unless `overwrite`; one that is
    (or is inside, or holds) a folder the export reads from is refused (ValueError)."""

    out, tok = cfg.run.out_dir, cfg.model.tokenizer
    sources = (
        [os.path.join(out, "adapters")] + ([cfg.model.checkpoint] if cfg.model.checkpoint else [])
        if cfg.lora.enabled
        else [os.path.join(out, "model")]
    )
    with atomic.folder(dst, overwrite=overwrite, sources=sources) as tmp:
        model = load_trained(cfg)
        if lora_lib.has_lora(model) or (experts or model.experts) != model.experts:
            model = lora_lib.merge_lora(model, experts=experts)
        gj.save_hf(model, tmp, dtype=dtype)
        tok_file = os.path.join(tok, "tokenizer.json") if os.path.isdir(tok) else tok
        if os.path.isfile(tok_file):
            atomic.copy_file(tok_file, os.path.join(tmp, "tokenizer.json"))
    return dst


def load_data(cfg: ExperimentConfig, tokenizer, path: str):
    """`path`'s conversations tokenized and packed into rows of data.seq_len, and the report of
    what was left out; a DataError naming the file when nothing is left."""
    report = data_lib.DataReport()
    convs, _ = data_lib.read_jsonl(
        path, strict=cfg.data.strict, reasoning_effort=cfg.data.reasoning_effort, report=report
    )
    examples = data_lib.tokenize(convs, tokenizer, keep_analysis=cfg.data.keep_analysis, report=report)
    packed = data_lib.pack(examples, cfg.data.seq_len, strict=cfg.data.strict, report=report)
    if len(packed) == 0:
        raise data_lib.no_data_error(path, report, f"rows of data.seq_len {cfg.data.seq_len} tokens")
    return packed, report


def model_vocab_size(cfg: ExperimentConfig) -> int:
    """The vocab_size of the model a run builds (model.checkpoint's config, or the preset with
    its overrides), read without building it."""

    if cfg.model.checkpoint:
        return ModelConfig.from_pretrained(cfg.model.checkpoint).vocab_size
    return model_config(cfg).vocab_size


def check_token_ids(max_id: int, cfg: ExperimentConfig, tokenizer, vocab_size: int, path: str) -> None:
    """A ValueError when the data's token ids do not fit the model's embedding (every step would
    be NaN, whatever the learning rate)."""
    if max_id < vocab_size:
        return
    fix = (
        f"use the tokenizer {cfg.model.checkpoint} was trained with (model.tokenizer)"
        if cfg.model.checkpoint
        else f"set model.overrides.vocab_size to at least {tokenizer.vocab_size}, or use a tokenizer that fits "
        "the model (model.tokenizer)"
    )
    raise ValueError(
        f"{path} tokenizes to id {max_id}, outside the model's vocabulary: the tokenizer "
        f"{tokenizer.name or cfg.model.tokenizer} has {tokenizer.vocab_size} ids, the model's vocab_size "
        f"is {vocab_size}; {fix}"
    )


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step")


def save_trained(cfg: ExperimentConfig, trained, out: str) -> str:
    """What a finished run keeps, under `out`: the adapters alone with LoRA (the base is the
    config's model.checkpoint / preset), else the whole model (a resumed run replaces its own).
    Returns the folder written."""
    if cfg.lora.enabled:
        path = os.path.join(out, "adapters")
        lora_lib.save_adapters(trained, path, extra={"base": cfg.model.checkpoint or f"preset:{cfg.model.preset}"})
    else:
        path = os.path.join(out, "model")
        gj.save_native(trained, path, overwrite=True)
    return path


def train(cfg: ExperimentConfig, *, log=print) -> dict:
    distributed.initialize()
    mesh = gj.sharding.mesh_from_config(cfg.mesh) if cfg.mesh else None
    if not cfg.data.train:
        raise ValueError("data.train must name a jsonl file of conversations")
    if cfg.data.batch_size % cfg.data.accum_steps:
        raise ValueError(
            f"data.batch_size {cfg.data.batch_size} must be a multiple of data.accum_steps {cfg.data.accum_steps}"
        )
    out = cfg.run.out_dir
    # everything that can be checked without the model first: the data, its token ids
    tokenizer = gj.load_tokenizer(cfg.model.tokenizer)
    packed, report = load_data(cfg, tokenizer, cfg.data.train)
    log(f"data: {report.summary()}; {len(packed)} rows of {cfg.data.seq_len} tokens")
    for line in report.malformed[:5]:
        log(f"  skipped {line}")
    vocab_size = model_vocab_size(cfg)
    check_token_ids(int(packed.tokens.max()), cfg, tokenizer, vocab_size, cfg.data.train)
    if cfg.data.eval:
        eval_packed, _ = load_data(cfg, tokenizer, cfg.data.eval)
        check_token_ids(int(eval_packed.tokens.max()), cfg, tokenizer, vocab_size, cfg.data.eval)
    with RunLock(out, log=log, enabled=jax.process_index() == 0):
        return _train(cfg, mesh, tokenizer, packed, report, log)


def _train(cfg: ExperimentConfig, mesh, tokenizer, packed, report, log) -> dict:
    out = cfg.run.out_dir
    model = build_model(cfg, mesh)
    trainable = trainable_filter(lora=cfg.lora.enabled, norms_and_sinks=cfg.lora.train_norms_and_sinks)
    trainer = make_trainer(
        model,
        make_optimizer(cfg.optim),
        accum_steps=cfg.data.accum_steps,
        trainable=trainable,
        router_aux_loss=cfg.optim.router_aux_loss,
        loss_chunk=cfg.model.loss_chunk,
    )
    state = trainer.init(model)
    schedule = make_schedule(cfg.optim)
    ckpts, state, meta, start = resume_or_start(out, cfg, state, log)

    rows = distributed.host_rows(mesh, cfg.data.batch_size) if mesh is not None else None
    first_process = jax.process_index() == 0
    bar = _progress(cfg.run.steps, start, cfg.run.progress and first_process)
    t0, last = time.time(), {}
    try:
        with MetricsLog(out, tensorboard=cfg.run.tensorboard, enabled=first_process) as metrics_log:
            for step in range(start, cfg.run.steps):
                batch = data_lib.batch_at(packed, step, cfg.data.batch_size, seed=cfg.run.seed)
                if mesh is not None:
                    batch = {k: distributed.global_batch(v[rows], mesh, cfg.data.batch_size) for k, v in batch.items()}
                state, metrics = trainer.step(state, batch)
                done = step + 1
                if done % cfg.run.log_every == 0 or done == cfg.run.steps:
                    last = {
                        "step": done,
                        "loss": float(metrics["loss"]),
                        "grad_norm": float(metrics["grad_norm"]),
                        "learning_rate": float(schedule(step)),
                        "targets": int(metrics["targets"]),
                        "skipped": int(state.skipped),
                        "seconds": round(time.time() - t0, 3),
                    }
                    if "router_loss" in metrics:
                        last["router_loss"] = float(metrics["router_loss"])
                    metrics_log.write(last)
                    if bar is not None:
                        bar.set_postfix(loss=f"{last['loss']:.4f}")
                if bar is not None:
                    bar.update(1)
                end_of_step(
                    cfg, state, ckpts, done, {"data_position": done}, "lower optim.learning_rate or check the data"
                )
    except BaseException:
        ckpts.close(quiet=True)  # finish or clean up the save in flight
        raise
    if bar is not None:
        bar.close()
    ckpts.close()
    trained = trainer.model(state)
    saved = save_trained(cfg, trained, out)
    if cfg.run.plots and first_process:
        plot_curves(os.path.join(out, METRICS_FILE), os.path.join(out, "curves.png"), title=out)
    evaluation = evaluate(cfg, trained, tokenizer, log=log) if cfg.data.eval else None
    summary = {
        "steps": cfg.run.steps,
        "resumed_from": start,
        "rows": len(packed),
        "data": report.summary(),
        "skipped_steps": int(state.skipped),
        "trainable_parameters": _size(state.params),
        "saved": saved,
        **{f"final_{k}": v for k, v in last.items()},
        "eval": evaluation,
    }
    _write_json(os.path.join(out, "summary.json"), summary)
    return summary


# Keys that may change when a run is resumed (how long it runs, how it reports); any other change
# would make the resumed run differ from one that was never interrupted.
_RESUMABLE_CHANGES = {
    "run.steps",
    "run.progress",
    "run.log_every",
    "run.save_every",
    "run.keep_checkpoints",
    "run.tensorboard",
    "run.plots",
    "run.max_bad_steps",
    "data.eval",
    "eval",
}


def end_of_step(cfg: ExperimentConfig, state, ckpts, done: int, meta: dict, hint: str) -> None:
    """After step `done` of a training loop: stop once `run.max_bad_steps` steps in a row were
    non-finite, and checkpoint every `run.save_every` steps and at the end."""
    if int(state.bad_in_a_row) >= cfg.run.max_bad_steps:
        ckpts.close(quiet=True)
        raise FloatingPointError(
            f"{cfg.run.max_bad_steps} consecutive steps had a non-finite loss or gradient (step {done}); {hint}"
        )
    if done % cfg.run.save_every == 0 or done == cfg.run.steps:
        ckpts.save(done, state, {"seed": cfg.run.seed, "step": done, **meta})


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k not in ("mesh",) and not k.endswith("overrides"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def resume_or_start(out: str, cfg: ExperimentConfig, state, log):
    """The run's checkpoints in `out`, and where to start: restored from the latest checkpoint
    (after checking the saved config.json allows it), or from `state` with the config saved.
    Metrics logged past the checkpoint are dropped (they are logged again).
    Returns (checkpoints, state, checkpoint metadata or None, first step)."""
    ckpts = Checkpoints(os.path.join(out, "checkpoints"), keep=cfg.run.keep_checkpoints)
    try:
        start, meta = ckpts.latest_step() or 0, None
        first_process = jax.process_index() == 0
        if start:
            _check_resumable(out, cfg)
            state, meta = ckpts.restore(start, state)
            log(f"resumed from step {start}")
        elif first_process:
            _write_json(os.path.join(out, "config.json"), to_dict(cfg))
        if first_process:
            _truncate_metrics(os.path.join(out, METRICS_FILE), start, log=log)
    except BaseException:
        ckpts.close(quiet=True)
        raise
    return ckpts, state, meta, start


def _write_json(path: str, obj) -> None:
    """`obj` as `path`, whole or not at all (`atomic.file`)."""
    with atomic.file(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def _read_json(path: str):
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None


# Config keys that hold paths: compared as the files they name (relative or absolute, the same file).
_PATH_KEYS = ("data.train", "data.eval", "model.checkpoint", "model.tokenizer")


def _normalised(flat: dict) -> dict:
    out = dict(flat)
    for key in _PATH_KEYS:
        if isinstance(out.get(key), str) and out[key] and os.path.exists(out[key]):
            out[key] = os.path.realpath(out[key])
    # run.out_dir is the folder the checkpoints being resumed were found in, however it is spelled
    out.pop("run.out_dir", None)
    return out


def _check_resumable(out: str, cfg: ExperimentConfig) -> None:
    path = os.path.join(out, "config.json")
    if not os.path.isfile(path):
        return
    before = _normalised(_flat(_read_json(path)))
    now = _normalised(_flat(json.loads(json.dumps(to_dict(cfg)))))  # lists and tuples compared alike
    changed = sorted(
        k
        for k in set(before) | set(now)
        if before.get(k) != now.get(k) and k not in _RESUMABLE_CHANGES and k.split(".")[0] not in _RESUMABLE_CHANGES
    )
    if changed:
        raise ValueError(
            f"{out} holds a run with a different config ({', '.join(changed)}); resuming it would "
            "not continue that run: choose another run.out_dir or delete this one"
        )


def _size(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def _truncate_metrics(path: str, step: int, *, log=print) -> None:
    """Keep the logged lines up to `step` (a run resumed from a checkpoint logs the rest again);
    a torn last line (a run killed mid-write) is dropped with a warning."""
    truncate_metrics(path, step, log=log)


def evaluate(cfg: ExperimentConfig, model, tokenizer, *, log=print) -> dict:
    """Held-out loss / perplexity of `data.eval`, and (with eval.accuracy) greedy task accuracy on
    its final answers; written to run.out_dir/eval.json."""

    packed, report = load_data(cfg, tokenizer, cfg.data.eval)
    results = {"data": report.summary(), **eval_lib.evaluate_loss(model, packed, batch_size=cfg.data.batch_size)}
    log(f"eval: loss {results['loss']:.4f}, perplexity {results['perplexity']:.2f} over {results['targets']} targets")
    if cfg.eval.accuracy:
        convs, _ = data_lib.read_jsonl(cfg.data.eval, reasoning_effort=cfg.data.reasoning_effort)
        if cfg.eval.limit:
            convs = convs[: cfg.eval.limit]
        acc = eval_lib.task_accuracy(
            model, tokenizer, convs, max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size
        )
        results["task"] = acc
        log(f"eval: accuracy {acc['accuracy']:.3f} ({acc['correct']}/{acc['total']})")
    os.makedirs(cfg.run.out_dir, exist_ok=True)
    eval_lib.write_results(os.path.join(cfg.run.out_dir, "eval.json"), results)
    return results
