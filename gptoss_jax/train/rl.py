"""RL fine-tuning: GRPO and GSPO with our own sampler, Python rewards and a KL to the start.

    gptoss train configs/grpo_example.yaml            (algorithm: grpo | gspo; section rl)

One step:
1. rollouts: `rl.prompts_per_step` prompts from data.train (conversations that end with a
   reference final answer; the prompt is everything before it, rendered for completion with the
   conversation's own system message, so its reasoning effort applies), each sampled
   `rl.group_size` times by `gptoss_jax.generate` (temperature / top-p, stop on `<|return|>` /
   `<|call|>`, at most `rl.max_new_tokens`), with the sampler's log-probs of its tokens;
2. rewards (`train.rewards`, weighted) on the parsed completions, then group-normalized
   advantages;
3. the training forward recomputes the sampled tokens' log-probs under the current weights (the
   "old" policy of the ratio) and under the reference; the mean |recomputed - sampler| is logged
   (`logprob_diff`: they are the same function, computed by the cached decoder and by the
   full forward);
4. `rl.updates_per_rollout` optimizer steps on the GRPO or GSPO loss (`train.losses`).

The reference policy is the start of the run: a frozen copy of the trainable variables as they
were built from the config; with LoRA, the base itself (the same adapters with B = 0, so no second
copy of the base weights exists). Prompts, sampling keys and everything else random are functions
of (run.seed, step), so a resumed run continues exactly. This is the plain algorithm: no reward
model, no value function, no dynamic sampling or overlong shaping.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gptoss_jax as gj
from gptoss_jax import distributed, harmony
from gptoss_jax import lora as lora_lib
from gptoss_jax.train import data as data_lib
from gptoss_jax.train import eval as eval_lib
from gptoss_jax.train import rewards as rewards_lib
from gptoss_jax.train.config import ExperimentConfig
from gptoss_jax.train.lock import RunLock
from gptoss_jax.train.losses import group_advantages, grpo_loss, gspo_loss, token_logprobs
from gptoss_jax.train.metrics import METRICS_FILE, MetricsLog, plot_curves
from gptoss_jax.train.sft import (
    _progress,
    _write_json,
    build_model,
    check_token_ids,
    end_of_step,
    model_vocab_size,
    resume_or_start,
    save_trained,
)
from gptoss_jax.train.step import make_optimizer, make_schedule, make_trainer, trainable_filter

DEFAULT_CLIP = {"grpo": 0.2, "gspo": 3e-4}
PLOTTED = ("reward", "eval_accuracy", "kl", "clip_fraction", "response_length", "entropy")


def shuffled(rewards, *, seed: int, step: int) -> np.ndarray:
    """The step's rewards permuted across all its samples (`rl.shuffle_rewards`, a control): the
    same values, no longer attached to the completions that earned them, so an update learns from
    noise with the real rewards' scale. Seeded by (run.seed, step): a resumed run repeats it."""
    rewards = np.asarray(rewards)
    return rewards[np.random.default_rng([seed, 3, step]).permutation(len(rewards))]


def rl_objective(algorithm: str, rl):
    """The `make_trainer` objective of GRPO / GSPO on a rollout batch: tokens, segment_ids
    [n, L]; mask, old_logp, ref_logp [n, L-1] (position t scores token t+1); advantages [n]."""
    clip = rl.clip_eps if rl.clip_eps is not None else DEFAULT_CLIP[algorithm]

    def objective(model, micro):
        out = model(micro["tokens"], segment_ids=micro["segment_ids"])
        logp, entropy = token_logprobs(out.logits, micro["tokens"])
        mask = micro["mask"]
        ref = micro.get("ref_logp")
        if algorithm == "grpo":
            loss, m = grpo_loss(
                logp,
                micro["old_logp"],
                micro["advantages"],
                mask,
                clip_eps=clip,
                kl_coef=rl.kl_coef,
                ref_logp=ref,
                aggregate=rl.aggregate,
            )
            weight = jnp.sum(mask) if rl.aggregate == "token" else jnp.float32(mask.shape[0])
        else:
            loss, m = gspo_loss(
                logp, micro["old_logp"], micro["advantages"], mask, clip_eps=clip, kl_coef=rl.kl_coef, ref_logp=ref
            )
            weight = jnp.float32(mask.shape[0])
        tokens = jnp.maximum(jnp.sum(mask), 1.0)
        m["entropy"] = jnp.sum(entropy * mask) / tokens
        return loss * weight, weight, {"loss": loss * weight, **{k: v * weight for k, v in m.items()}}

    return objective


def _zero_lora_b(params):
    """The reference of a LoRA run: the trainable state with every B factor zeroed."""
    flat = nnx.to_flat_state(params)
    out = []
    for path, var in flat:
        if isinstance(var, lora_lib.LoRAParam) and str(path[-1]).startswith("b_"):
            var = var.replace(jnp.zeros_like(var.get_value()))
        out.append((path, var))
    return nnx.from_flat_state(out)


class Prompts:
    """The rollout prompts of data.train: rendered token ids and reference final answers.
    `path` and `report` (of `data.read_jsonl`) name the file and line of a conversation that has
    no reference answer, and say why none is left when the file yields nothing."""

    def __init__(
        self, conversations, tokenizer, *, path: str = "data.train", report: data_lib.DataReport | None = None
    ):
        self.tokens, self.references = [], []
        lines = report.line_numbers if report is not None else []
        for i, conv in enumerate(conversations):
            try:
                prompt, ref = eval_lib.split_reference(conv)
            except ValueError as e:
                where = f"{path}:{lines[i]}" if i < len(lines) else f"{path}, conversation {i + 1}"
                raise data_lib.DataError(f"{where}: {e} (RL prompts need a reference answer)") from None
            self.tokens.append(harmony.render_for_completion(prompt, tokenizer))
            self.references.append(ref)
        if not self.tokens:
            raise data_lib.no_data_error(path, report or data_lib.DataReport(lines=1), "prompts")
        self.max_len = max(len(t) for t in self.tokens)

    def at_step(self, step: int, n: int, seed: int) -> list[int]:
        """Indices of the prompts of step `step`: a fresh permutation per epoch, seeded."""
        total = len(self.tokens)
        epoch, within = np.divmod(step * n + np.arange(n), total)
        orders = {e: np.random.default_rng([seed, 1, int(e)]).permutation(total) for e in np.unique(epoch)}
        return [int(orders[e][w]) for e, w in zip(epoch, within)]


def build_batch(prompts, completions, sampler_logp, length: int):
    """Rows prompt + completion, right-padded to `length`. mask marks the positions whose next
    token is a completion token; the sampler's log-probs are placed at those positions."""
    n = len(prompts)
    tokens = np.zeros((n, length), np.int32)
    seg = np.zeros((n, length), np.int32)
    mask = np.zeros((n, length - 1), np.float32)
    sampled = np.zeros((n, length - 1), np.float32)
    for i, (p, c, lp) in enumerate(zip(prompts, completions, sampler_logp)):
        row = list(p) + list(c)
        tokens[i, : len(row)] = row
        seg[i, : len(row)] = 1
        mask[i, len(p) - 1 : len(row) - 1] = 1
        sampled[i, len(p) - 1 : len(row) - 1] = lp
    return {"tokens": tokens, "segment_ids": seg, "mask": mask}, sampled


def train(cfg: ExperimentConfig, *, log=print) -> dict:
    algorithm, rl = cfg.algorithm, cfg.rl
    if algorithm not in DEFAULT_CLIP:
        raise ValueError(f"rl.train runs grpo or gspo, not {algorithm!r}")
    if rl.updates_per_rollout < 1:
        raise ValueError("rl.updates_per_rollout must be at least 1")
    if rl.group_size < 2:
        raise ValueError("rl.group_size must be at least 2 (advantages are relative to the group)")
    if not cfg.data.train:
        raise ValueError("data.train must name a jsonl file of conversations with reference answers")
    spec = rewards_lib.from_config(rl.rewards)
    distributed.initialize()
    mesh = gj.sharding.mesh_from_config(cfg.mesh) if cfg.mesh else None
    out = cfg.run.out_dir
    # everything that can be checked without the model first: the data, its token ids
    tokenizer = gj.load_tokenizer(cfg.model.tokenizer)
    convs, report = data_lib.read_jsonl(
        cfg.data.train, strict=cfg.data.strict, reasoning_effort=cfg.data.reasoning_effort
    )
    prompts = Prompts(convs, tokenizer, path=cfg.data.train, report=report)
    log(f"data: {report.summary()}; {len(prompts.tokens)} prompts of up to {prompts.max_len} tokens")
    for line in report.malformed[:5]:
        log(f"  skipped {line}")
    vocab_size = model_vocab_size(cfg)
    check_token_ids(max(max(t) for t in prompts.tokens), cfg, tokenizer, vocab_size, cfg.data.train)
    eval_convs = None
    if cfg.data.eval:
        eval_convs, eval_report = data_lib.read_jsonl(cfg.data.eval, reasoning_effort=cfg.data.reasoning_effort)
        eval_convs = eval_convs[: cfg.eval.limit] if cfg.eval.limit else eval_convs
        eval_prompts = Prompts(eval_convs, tokenizer, path=cfg.data.eval, report=eval_report)
        check_token_ids(max(max(t) for t in eval_prompts.tokens), cfg, tokenizer, vocab_size, cfg.data.eval)
    with RunLock(out, log=log, enabled=jax.process_index() == 0):
        return _train(cfg, mesh, tokenizer, prompts, eval_convs, spec, log)


def _train(cfg: ExperimentConfig, mesh, tokenizer, prompts, eval_convs, spec, log) -> dict:
    algorithm, rl, out = cfg.algorithm, cfg.rl, cfg.run.out_dir
    length = prompts.max_len + rl.max_new_tokens
    length += -length % 16  # one static shape for every step
    model = build_model(cfg, mesh)
    trainable = trainable_filter(lora=cfg.lora.enabled, norms_and_sinks=cfg.lora.train_norms_and_sinks)
    trainer = make_trainer(
        model,
        make_optimizer(cfg.optim),
        accum_steps=cfg.data.accum_steps,
        trainable=trainable,
        objective=rl_objective(algorithm, rl),
    )
    state = trainer.init(model)
    reference = _zero_lora_b(state.params) if cfg.lora.enabled else jax.tree.map(jnp.copy, state.params)
    schedule = make_schedule(cfg.optim)

    @jax.jit
    def logprobs(params, tokens, seg):
        return token_logprobs(trainer.merge(params)(tokens, segment_ids=seg).logits, tokens)[0]

    ckpts, state, _, start = resume_or_start(out, cfg, state, log)

    answers_path = os.path.join(out, "eval_right.json")  # per held-out problem, per evaluated step
    right = {}
    if start > 0 and os.path.isfile(answers_path):
        try:
            with open(answers_path) as f:
                right = {int(k): v for k, v in json.load(f).items() if int(k) <= start}
        except (ValueError, AttributeError) as e:
            ckpts.close(quiet=True)
            raise ValueError(
                f"{answers_path} is not the per-step answers a run writes ({e}); delete it to "
                "resume without the earlier held-out answers"
            ) from None

    def held_out_accuracy(at: int):
        res = eval_lib.task_accuracy(
            trainer.model(state),
            tokenizer,
            eval_convs,
            max_new_tokens=cfg.eval.max_new_tokens,
            batch_size=cfg.eval.batch_size,
        )
        right[at] = [int(r) for r in res["right"]]
        if first_process:
            _write_json(answers_path, {str(k): v for k, v in sorted(right.items())})
        return res["accuracy"]

    first_process = jax.process_index() == 0
    bar = _progress(cfg.run.steps, start, cfg.run.progress and first_process)
    t0, last, accuracy = time.time(), {}, {}
    try:
        with MetricsLog(out, tensorboard=cfg.run.tensorboard, enabled=first_process) as metrics_log:
            if eval_convs and start == 0:
                accuracy[0] = held_out_accuracy(0)
                metrics_log.write({"step": 0, "eval_accuracy": accuracy[0]})
                log(f"step 0: held-out accuracy {accuracy[0]:.3f}")
            for step in range(start, cfg.run.steps):
                idx = prompts.at_step(step, rl.prompts_per_step, cfg.run.seed)
                group = [prompts.tokens[i] for i in idx for _ in range(rl.group_size)]
                refs = [prompts.references[i] for i in idx for _ in range(rl.group_size)]
                t_step = time.time()
                gen = gj.generate(
                    trainer.model(state),
                    tokenizer,
                    group,
                    max_new_tokens=rl.max_new_tokens,
                    temperature=rl.temperature,
                    top_p=rl.top_p,
                    logprobs=True,
                    seed=int(np.random.default_rng([cfg.run.seed, 2, step]).integers(2**31)),
                )
                t_sampled = time.time()  # the tokens are host arrays: sampling is done
                completions = [
                    rewards_lib.Completion(harmony.parse_completion(t, tokenizer), len(t), r == "stop")
                    for t, r in zip(gen.tokens, gen.stop_reason)
                ]
                total, parts, errors = rewards_lib.score(completions, refs, spec)
                learned = shuffled(total, seed=cfg.run.seed, step=step) if rl.shuffle_rewards else total
                advantages = group_advantages(jnp.asarray(learned), rl.group_size, normalize_std=rl.normalize_std)
                batch, sampled = build_batch(group, gen.tokens, gen.logprobs, length)
                batch = {k: jnp.asarray(v) for k, v in batch.items()}
                batch["advantages"] = advantages
                batch["old_logp"] = logprobs(state.params, batch["tokens"], batch["segment_ids"])
                if rl.kl_coef > 0:
                    batch["ref_logp"] = logprobs(reference, batch["tokens"], batch["segment_ids"])
                diff = float(jnp.sum(jnp.abs(batch["old_logp"] - sampled) * batch["mask"]) / jnp.sum(batch["mask"]))
                for _ in range(rl.updates_per_rollout):
                    state, metrics = trainer.step(state, batch)
                jax.block_until_ready(metrics)
                t_updated = time.time()
                done = step + 1
                evaluated = bool(eval_convs) and (
                    done == cfg.run.steps or (rl.eval_every > 0 and done % rl.eval_every == 0)
                )
                if evaluated:
                    accuracy[done] = held_out_accuracy(done)
                if done % cfg.run.log_every == 0 or evaluated or done == cfg.run.steps:
                    rewards_arr = np.asarray(total)
                    last = {
                        "step": done,
                        "reward": float(rewards_arr.mean()),
                        "reward_std": float(rewards_arr.std()),
                        **{f"reward_{k}": float(np.mean(v)) for k, v in parts.items()},
                        **{f"reward_errors_{k}": v for k, v in errors.items() if v},
                        "response_length": float(np.mean([c.num_tokens for c in completions])),
                        "stopped": float(np.mean([c.stopped for c in completions])),
                        "logprob_diff": diff,
                        # the optimizer counts updates: this step's last one
                        "learning_rate": float(schedule((step + 1) * rl.updates_per_rollout - 1)),
                        **{
                            k: float(metrics[k])
                            for k in ("loss", "kl", "clip_fraction", "ratio", "entropy", "grad_norm")
                        },
                        "skipped": int(state.skipped),
                        "seconds": round(time.time() - t0, 3),
                        # this step: sampling (generate), then rewards, the recomputed log-probs
                        # and the optimizer updates (held-out evaluation excluded)
                        "seconds_sampling": round(t_sampled - t_step, 3),
                        "seconds_update": round(t_updated - t_sampled, 3),
                    }
                    if evaluated:
                        last["eval_accuracy"] = accuracy[done]
                    metrics_log.write(last)
                    if bar is not None:
                        bar.set_postfix(reward=f"{last['reward']:.3f}")
                if bar is not None:
                    bar.update(1)
                end_of_step(cfg, state, ckpts, done, {}, "lower optim.learning_rate")
    except BaseException:
        ckpts.close(quiet=True)  # finish or clean up the save in flight
        raise
    if bar is not None:
        bar.close()
    ckpts.close()
    trained = trainer.model(state)
    saved = save_trained(cfg, trained, out)
    if cfg.run.plots and first_process:
        plot_curves(
            os.path.join(out, METRICS_FILE), os.path.join(out, "curves.png"), keys=PLOTTED, title=f"{algorithm}: {out}"
        )
    summary = {
        "algorithm": algorithm,
        "steps": cfg.run.steps,
        "resumed_from": start,
        "saved": saved,
        "eval_accuracy": {str(k): v for k, v in sorted(accuracy.items())},
        "skipped_steps": int(state.skipped),
        **{f"final_{k}": v for k, v in last.items()},
    }
    _write_json(os.path.join(out, "summary.json"), summary)
    return summary
