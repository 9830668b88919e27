"""Supervised fine-tuning loop: config -> data -> model -> jitted steps -> checkpoints, metrics.

    summary = train(load_config("configs/quickstart.yaml", ["run.steps=50"]))

Resumes from the newest complete checkpoint in `run.out_dir/checkpoints` (exactly: the state,
counters and data position are restored, and batches are a function of the step). Metrics go to
`run.out_dir/metrics.jsonl`, one line per logged step; the trained weights to
`run.out_dir/model` (native layout, loadable with `gptoss_jax.load`).
"""

from __future__ import annotations

import json
import os
import time

import jax

from gptoss_jax import config as model_config
from gptoss_jax import distributed
from gptoss_jax.train import data as data_lib
from gptoss_jax.train.checkpoints import Checkpoints
from gptoss_jax.train.config import ExperimentConfig, to_dict
from gptoss_jax.train.step import make_optimizer, make_schedule, make_trainer

PRESETS = {"tiny": model_config.tiny, "gpt_oss_20b": model_config.gpt_oss_20b,
           "gpt_oss_120b": model_config.gpt_oss_120b}


def build_model(cfg: ExperimentConfig, mesh=None):
    import gptoss_jax as gj

    m = cfg.model
    if m.checkpoint:
        return gj.load(m.checkpoint, dtype=m.dtype, experts=m.experts, mesh=mesh)
    if m.preset not in PRESETS:
        raise ValueError(f"model.preset {m.preset!r} is not one of {sorted(PRESETS)}")
    model_cfg = PRESETS[m.preset]().replace(**m.overrides) if m.overrides else PRESETS[m.preset]()
    return gj.init(model_cfg, seed=cfg.run.seed, dtype=m.dtype, experts=m.experts, mesh=mesh)


def load_data(cfg: ExperimentConfig, tokenizer, path: str):
    report = data_lib.DataReport()
    convs, _ = data_lib.read_jsonl(path, strict=cfg.data.strict, reasoning_effort=cfg.data.reasoning_effort,
                                   report=report)
    examples = data_lib.tokenize(convs, tokenizer, keep_analysis=cfg.data.keep_analysis, report=report)
    return data_lib.pack(examples, cfg.data.seq_len, strict=cfg.data.strict, report=report), report


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step")


def train(cfg: ExperimentConfig, *, log=print) -> dict:
    import gptoss_jax as gj

    distributed.initialize()
    mesh = gj.sharding.mesh_from_config(cfg.mesh) if cfg.mesh else None
    if not cfg.data.train:
        raise ValueError("data.train must name a jsonl file of conversations")
    if cfg.data.batch_size % cfg.data.accum_steps:
        raise ValueError(f"data.batch_size {cfg.data.batch_size} must be a multiple of data.accum_steps "
                         f"{cfg.data.accum_steps}")
    out = cfg.run.out_dir
    os.makedirs(out, exist_ok=True)
    tokenizer = gj.load_tokenizer(cfg.model.tokenizer)
    packed, report = load_data(cfg, tokenizer, cfg.data.train)
    log(f"data: {report.summary()}; {len(packed)} rows of {cfg.data.seq_len} tokens")
    for line in report.malformed[:5]:
        log(f"  skipped {line}")

    model = build_model(cfg, mesh)
    trainer = make_trainer(model, make_optimizer(cfg.optim), accum_steps=cfg.data.accum_steps)
    state = trainer.init(model)
    schedule = make_schedule(cfg.optim)
    ckpts = Checkpoints(os.path.join(out, "checkpoints"), keep=cfg.run.keep_checkpoints)
    start = ckpts.latest_step() or 0
    if start:
        state, meta = ckpts.restore(start, state)
        if meta.get("seed") != cfg.run.seed:
            raise ValueError(f"{out} was trained with run.seed={meta.get('seed')}; resuming needs the same seed")
        log(f"resumed from step {start}")
    else:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=2)

    rows = distributed.host_rows(mesh, cfg.data.batch_size) if mesh is not None else None
    bar = _progress(cfg.run.steps, start, cfg.run.progress and jax.process_index() == 0)
    t0, last = time.time(), {}
    with open(os.path.join(out, "metrics.jsonl"), "a") as metrics_file:
        for step in range(start, cfg.run.steps):
            batch = data_lib.batch_at(packed, step, cfg.data.batch_size, seed=cfg.run.seed)
            if mesh is not None:
                batch = {k: distributed.global_batch(v[rows], mesh, cfg.data.batch_size) for k, v in batch.items()}
            state, metrics = trainer.step(state, batch)
            done = step + 1
            if done % cfg.run.log_every == 0 or done == cfg.run.steps:
                last = {"step": done, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                        "learning_rate": float(schedule(step)), "targets": int(metrics["targets"]),
                        "skipped": int(state.skipped), "seconds": round(time.time() - t0, 3)}
                if jax.process_index() == 0:
                    metrics_file.write(json.dumps(last) + "\n")
                    metrics_file.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
            if bar is not None:
                bar.update(1)
            if int(state.bad_in_a_row) >= cfg.run.max_bad_steps:
                ckpts.close()
                raise FloatingPointError(f"{cfg.run.max_bad_steps} consecutive steps had a non-finite loss or "
                                         f"gradient (step {done}); lower optim.learning_rate or check the data")
            if done % cfg.run.save_every == 0 or done == cfg.run.steps:
                ckpts.save(done, state, {"seed": cfg.run.seed, "step": done, "data_position": done})
    if bar is not None:
        bar.close()
    ckpts.close()
    trained = trainer.model(state)
    gj.save_native(trained, os.path.join(out, "model"))
    evaluation = evaluate(cfg, trained, tokenizer, log=log) if cfg.data.eval else None
    summary = {"steps": cfg.run.steps, "resumed_from": start, "rows": len(packed), "data": report.summary(),
               "skipped_steps": int(state.skipped), **{f"final_{k}": v for k, v in last.items()},
               "eval": evaluation}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def evaluate(cfg: ExperimentConfig, model, tokenizer, *, log=print) -> dict:
    """Held-out loss / perplexity of `data.eval`, and (with eval.accuracy) greedy task accuracy on
    its final answers; written to run.out_dir/eval.json."""
    from gptoss_jax.train import eval as eval_lib

    packed, report = load_data(cfg, tokenizer, cfg.data.eval)
    results = {"data": report.summary(), **eval_lib.evaluate_loss(model, packed, batch_size=cfg.data.batch_size)}
    log(f"eval: loss {results['loss']:.4f}, perplexity {results['perplexity']:.2f} over {results['targets']} targets")
    if cfg.eval.accuracy:
        convs, _ = data_lib.read_jsonl(cfg.data.eval, reasoning_effort=cfg.data.reasoning_effort)
        if cfg.eval.limit:
            convs = convs[:cfg.eval.limit]
        acc = eval_lib.task_accuracy(model, tokenizer, convs, max_new_tokens=cfg.eval.max_new_tokens,
                                     batch_size=cfg.eval.batch_size)
        results["task"] = acc
        log(f"eval: accuracy {acc['accuracy']:.3f} ({acc['correct']}/{acc['total']})")
    os.makedirs(cfg.run.out_dir, exist_ok=True)
    eval_lib.write_results(os.path.join(cfg.run.out_dir, "eval.json"), results)
    return results
