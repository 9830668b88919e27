"""TRL's `GRPOTrainer` on the same RL run as `train.rl.train(cfg)`: the peer of
`scripts/rl_experiment.py`.

The optional extra `rl-peer` (trl, pinned, with accelerate and datasets) installs it; torch,
transformers and trl are imported where used, so the package never needs them.

One config, two trainers. `grpo_config_kwargs(cfg)` translates the experiment config into
`trl.GRPOConfig`'s arguments, key by key:

| ours (`rl`, `optim`)                    | TRL                                              |
|-----------------------------------------|--------------------------------------------------|
| prompts_per_step x group_size samples   | per_device_train_batch_size, num_generations     |
| updates_per_rollout (optimizer steps)   | num_iterations (max_steps = steps x this)        |
| clip_eps (0.2 GRPO / 3e-4 GSPO)         | epsilon (epsilon_high = epsilon)                 |
| GRPO, token mean over the batch         | loss_type "dapo"; "sequence" aggregate: "grpo"   |
| GSPO (one length-normalized ratio)      | importance_sampling_level "sequence", "grpo"     |
| kl_coef (k3 to the start)               | beta                                             |
| normalize_std                           | scale_rewards "group" / "none"                   |
| rewards {name: weight}                  | one reward function per name, reward_weights     |
| temperature, top_p, max_new_tokens      | the same, top_k 0                                |
| AdamW b1, b2, eps, weight decay, clip   | adam_beta1/2, adam_epsilon, weight_decay, max_grad_norm |
| warmup then constant                    | constant_with_warmup (warmup in optimizer steps) |

The reward functions are this package's (`train.rewards`) applied to TRL's completion token ids
parsed by `harmony.parse_completion`; the prompts are ours (`rl.Prompts`), in the order our run
visits them (`Prompts.at_step`, dataset not reshuffled), as text that TRL's tokenizer turns back
into exactly our ids (checked). Differences that remain: TRL's group std is the sample std with
1e-4 added (ours: population std, 1e-6); TRL samples with torch's generator (same seed, other
draws); TRL's weights train in the model's own float32 torch module.

Held-out accuracy is ours for both: the TRL model is written in the HF layout at each evaluated
step, read back by `gptoss_jax.load`, and scored by `eval.task_accuracy` (greedy, parsed final
answer), so the two trainers are scored by one function. Time per step is split into sampling
(TRL's `transformers.generate` call) and the rest (rewards, old log-probs, updates), evaluation
excluded, as `train.rl` logs it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import gptoss_jax as gj
from gptoss_jax import harmony
from gptoss_jax.train import data as data_lib
from gptoss_jax.train import eval as eval_lib
from gptoss_jax.train import rewards as rewards_lib
from gptoss_jax.train.config import ExperimentConfig
from gptoss_jax.train.metrics import METRICS_FILE, MetricsLog
from gptoss_jax.train.rl import DEFAULT_CLIP, Prompts

STOP_TOKENS = ("<|return|>", "<|call|>")


def grpo_config_kwargs(cfg: ExperimentConfig, out_dir: str) -> dict:
    """`trl.GRPOConfig(**kwargs)` for the run `cfg` describes (table in the module doc).
    Raises ValueError for what TRL's trainer cannot express the same way."""
    rl, optim = cfg.rl, cfg.optim
    if cfg.algorithm not in DEFAULT_CLIP:
        raise ValueError(f"TRL's GRPOTrainer runs grpo or gspo, not {cfg.algorithm!r}")
    if cfg.lora.enabled:
        raise ValueError("the TRL peer trains every weight (lora.enabled is not translated)")
    if cfg.data.accum_steps != 1:
        raise ValueError("the TRL peer takes each rollout as one batch (data.accum_steps must be 1)")
    if optim.end_learning_rate_fraction != 1.0:
        raise ValueError(
            "the TRL peer translates warmup-then-constant schedules only "
            f"(optim.end_learning_rate_fraction is {optim.end_learning_rate_fraction})"
        )
    sequence = cfg.algorithm == "gspo"
    clip = rl.clip_eps if rl.clip_eps is not None else DEFAULT_CLIP[cfg.algorithm]
    spec = rewards_lib.from_config(rl.rewards)
    return {
        "output_dir": out_dir,
        "per_device_train_batch_size": rl.prompts_per_step * rl.group_size,
        "gradient_accumulation_steps": 1,
        "num_generations": rl.group_size,
        "num_iterations": rl.updates_per_rollout,
        "max_steps": cfg.run.steps * rl.updates_per_rollout,
        "learning_rate": optim.learning_rate,
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": optim.warmup_steps,
        "adam_beta1": optim.b1,
        "adam_beta2": optim.b2,
        "adam_epsilon": optim.eps,
        "weight_decay": optim.weight_decay,
        # our RL objective has no load-balancing term; TRL adds the checkpoint's own (0.9) unless told
        "router_aux_loss_coef": 0.0,
        "max_grad_norm": optim.clip_norm if optim.clip_norm is not None else 0.0,
        "temperature": rl.temperature,
        "top_p": rl.top_p,
        "top_k": 0,
        "max_completion_length": rl.max_new_tokens,
        "epsilon": clip,
        "epsilon_high": clip,
        "beta": rl.kl_coef,
        "importance_sampling_level": "sequence" if sequence else "token",
        "loss_type": "grpo" if sequence or rl.aggregate == "sequence" else "dapo",
        "scale_rewards": "group" if rl.normalize_std else "none",
        "reward_weights": [spec.weights[name] for name in spec.weights],
        "seed": cfg.run.seed,
        "data_seed": cfg.run.seed,
        "shuffle_dataset": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
        "disable_tqdm": not cfg.run.progress,
    }


def hf_tokenizer(path: str, tokenizer):
    """Our tokenizer.json as a transformers fast tokenizer: `<|return|>` its end of sequence,
    `<|endoftext|>` its padding (never sampled by a trained policy, never a stop token)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=path, eos_token="<|return|>", pad_token="<|endoftext|>")
    for name in STOP_TOKENS + ("<|endoftext|>",):
        if hf.convert_tokens_to_ids(name) != tokenizer.token_id(name):
            raise ValueError(f"{path}: {name} has another id in transformers' reading of it")
    return hf


def prompt_rows(prompts: Prompts, tokenizer, hf_tok, *, steps: int, per_step: int, seed: int) -> list[dict]:
    """The prompts our run visits, step by step, as TRL dataset rows {prompt, reference}. Each
    prompt's text must encode back to our token ids (ValueError naming the first that does not)."""
    rows = []
    for step in range(steps):
        for i in prompts.at_step(step, per_step, seed):
            text = tokenizer.decode(prompts.tokens[i])
            ids = hf_tok(text, add_special_tokens=False)["input_ids"]
            if list(ids) != list(prompts.tokens[i]):
                raise ValueError(f"prompt {i}: transformers' tokenizer encodes its text to other ids ({text!r})")
            rows.append({"prompt": text, "reference": prompts.references[i]})
    return rows


def reward_functions(spec: rewards_lib.RewardSpec, tokenizer) -> list:
    """One TRL reward function per reward name: our function on the parsed completion ids."""
    stops = {tokenizer.token_id(t) for t in STOP_TOKENS}

    def make(name):
        one = rewards_lib.RewardSpec({name: 1.0})

        def reward(prompts, completions, completion_ids, reference, **_):
            parsed = [
                rewards_lib.Completion(
                    harmony.parse_completion(list(ids), tokenizer), len(ids), bool(ids) and ids[-1] in stops
                )
                for ids in completion_ids
            ]
            return rewards_lib.score(parsed, reference, one)[1][name]

        reward.__name__ = name
        return reward

    return [make(name) for name in spec.weights]


def _rollout_rows(logs: list[dict], updates: int) -> list[dict]:
    """TRL's per-optimizer-step logs as one row per rollout in `train.rl`'s metric names and
    meanings: the reward figures from the update that sampled, the loss figures (loss, KL, clip
    fraction, entropy, gradient norm, learning rate) from the rollout's last update, as
    `train.rl` logs them (its first update is on-policy: ratio 1, nothing clipped)."""
    rows = []
    for r in range(len(logs) // updates):
        group = logs[r * updates : (r + 1) * updates]
        first, last = next((g for g in group if "reward" in g), group[0]), group[-1]
        row = {
            "step": r + 1,
            "reward": first.get("reward"),
            "reward_std": first.get("reward_std"),
            **{
                f"reward_{k.split('/')[1]}": v
                for k, v in first.items()
                if k.startswith("rewards/") and k.endswith("/mean")
            },
            "response_length": first.get("completions/mean_length"),
            "learning_rate": last.get("learning_rate"),
            "loss": last.get("loss"),
            "kl": last.get("kl", 0.0),
            "clip_fraction": last.get("clip_ratio/region_mean"),
            "entropy": last.get("entropy"),
            "grad_norm": last.get("grad_norm"),
        }
        rows.append({k: v for k, v in row.items() if v is not None})
    return rows


def train(cfg: ExperimentConfig, hf_checkpoint: str, *, log=print) -> dict:
    """Run TRL's GRPOTrainer from `hf_checkpoint` (HF layout, float32) on cfg's prompts and
    rewards; held-out accuracy by our evaluation at step 0, every `rl.eval_every` steps and the
    end. Writes `run.out_dir`: metrics.jsonl (our names; one row per rollout), eval_right.json,
    trl_log.json (TRL's per-update logs), summary.json and model/ (HF layout). Returns the summary."""
    import torch
    from datasets import Dataset
    from transformers import GptOssForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rl, out = cfg.rl, cfg.run.out_dir
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, METRICS_FILE)):
        raise FileExistsError(f"{out} holds a run's metrics already (the TRL peer does not resume): delete it first")
    tokenizer = gj.load_tokenizer(cfg.model.tokenizer)
    hf_tok = hf_tokenizer(cfg.model.tokenizer, tokenizer)
    convs, report = data_lib.read_jsonl(cfg.data.train, reasoning_effort=cfg.data.reasoning_effort)
    prompts = Prompts(convs, tokenizer, path=cfg.data.train, report=report)
    rows = prompt_rows(prompts, tokenizer, hf_tok, steps=cfg.run.steps, per_step=rl.prompts_per_step, seed=cfg.run.seed)
    eval_convs, _ = data_lib.read_jsonl(cfg.data.eval, reasoning_effort=cfg.data.reasoning_effort)
    eval_convs = eval_convs[: cfg.eval.limit] if cfg.eval.limit else eval_convs
    spec = rewards_lib.from_config(rl.rewards)

    model = GptOssForCausalLM.from_pretrained(hf_checkpoint, dtype=torch.float32, attn_implementation="eager")
    model.generation_config.eos_token_id = [tokenizer.token_id(t) for t in STOP_TOKENS]
    args = GRPOConfig(**grpo_config_kwargs(cfg, os.path.join(out, "trl")))
    updates = rl.updates_per_rollout
    right, accuracy, logs = {}, {}, []
    timing = {"sampling": 0.0, "steps": []}

    def held_out(step: int, torch_model) -> float:
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            torch_model.save_pretrained(tmp, safe_serialization=True)
            ours = gj.load(tmp, dtype="float32", experts="dense")
        res = eval_lib.task_accuracy(
            ours, tokenizer, eval_convs, max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size
        )
        right[step] = [int(r) for r in res["right"]]
        accuracy[step] = res["accuracy"]
        log(f"TRL step {step}: held-out accuracy {res['accuracy']:.3f}")
        return res["accuracy"]

    class Timed(GRPOTrainer):
        def _generate_single_turn(self, *a, **k):
            t = time.time()
            result = super()._generate_single_turn(*a, **k)
            timing["sampling"] += time.time() - t
            return result

    class Hooks(TrainerCallback):
        def on_train_begin(self, args_, state, control, model=None, **kw):
            held_out(0, model)
            timing["last"] = time.time()

        def on_log(self, args_, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                logs.append(dict(logs))

        def on_step_end(self, args_, state, control, model=None, **kw):
            now = time.time()
            timing["steps"].append((now - timing["last"], timing["sampling"]))
            timing["sampling"] = 0.0
            if state.global_step % updates == 0:
                done = state.global_step // updates
                if done == cfg.run.steps or (rl.eval_every > 0 and done % rl.eval_every == 0):
                    held_out(done, model)
            timing["last"] = time.time()

    trainer = Timed(
        model=model,
        reward_funcs=reward_functions(spec, tokenizer),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=hf_tok,
        callbacks=[Hooks()],
    )
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    trainer.model.save_pretrained(os.path.join(out, "model"), safe_serialization=True)

    with open(os.path.join(out, "trl_log.json"), "w") as f:
        json.dump(logs, f)  # TRL's own per-update logs, as it wrote them
    metrics = _rollout_rows(logs, updates)
    elapsed = 0.0
    for i, row in enumerate(metrics):
        pair = timing["steps"][i * updates : (i + 1) * updates]
        step_seconds, sampling = sum(p[0] for p in pair), sum(p[1] for p in pair)
        elapsed += step_seconds
        row.update(
            seconds=round(elapsed, 3),
            seconds_sampling=round(sampling, 3),
            seconds_update=round(step_seconds - sampling, 3),
        )
        if row["step"] in accuracy:
            row["eval_accuracy"] = accuracy[row["step"]]
    with MetricsLog(out, tensorboard=False) as metrics_log:
        metrics_log.write({"step": 0, "eval_accuracy": accuracy[0]})
        for row in metrics:
            metrics_log.write(row)
    with open(os.path.join(out, "eval_right.json"), "w") as f:
        json.dump({str(k): v for k, v in sorted(right.items())}, f)
    summary = {
        "algorithm": cfg.algorithm,
        "trainer": "trl",
        "steps": cfg.run.steps,
        "eval_accuracy": {str(k): v for k, v in sorted(accuracy.items())},
        "seconds_with_evaluation": round(seconds, 1),
        "metrics": os.path.join(out, METRICS_FILE),
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
