"""The TRL peer's translation layer (`train.trl_peer`), checked without TRL itself (an optional
extra the test setup does not install): the config translation, the prompts as text that
transformers' tokenizer turns back into our ids, the reward adapter, and the per-rollout rows."""

import pytest

from gptoss_jax import harmony
from gptoss_jax.tokenizer import load_tokenizer
from gptoss_jax.train import data as data_lib
from gptoss_jax.train import rewards as rewards_lib
from gptoss_jax.train import trl_peer
from gptoss_jax.train.config import load_config
from gptoss_jax.train.rl import Prompts
from tests import factory


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("trl_peer")
    factory.arithmetic_task(d, train_size=24, eval_size=4)
    return d


def _cfg(task, *extra):
    return load_config(
        None,
        [
            f"model.tokenizer={task / 'tokenizer.json'}",
            f"data.train={task / 'train.jsonl'}",
            "optim.learning_rate=5e-5",
            "optim.warmup_steps=5",
            "optim.total_steps=30",
            "optim.end_learning_rate_fraction=1.0",
            "rl.group_size=8",
            "rl.prompts_per_step=4",
            "rl.updates_per_rollout=2",
            "rl.max_new_tokens=96",
            "rl.rewards={exact_match: 1.0, format: 0.1}",
            "run.steps=15",
            "run.seed=3",
            "algorithm=grpo",
            *extra,
        ],
    )


def test_config_translation(task):
    """Each of our settings lands on TRL's key with the value the module doc's table gives
    (written out by hand here); GSPO switches TRL to sequence-level ratios averaged per sequence."""
    kw = trl_peer.grpo_config_kwargs(_cfg(task, "algorithm=grpo"), "OUT")
    expected = {
        "per_device_train_batch_size": 32,
        "num_generations": 8,
        "num_iterations": 2,
        "max_steps": 30,
        "learning_rate": 5e-5,
        "warmup_steps": 5,
        "lr_scheduler_type": "constant_with_warmup",
        "epsilon": 0.2,
        "epsilon_high": 0.2,
        "beta": 0.0,
        "importance_sampling_level": "token",
        "loss_type": "dapo",
        "scale_rewards": "group",
        "reward_weights": [1.0, 0.1],
        "max_completion_length": 96,
        "seed": 3,
        "shuffle_dataset": False,
        "router_aux_loss_coef": 0.0,
        "bf16": False,
        "use_cpu": True,
    }
    assert {k: kw[k] for k in expected} == expected
    gspo = trl_peer.grpo_config_kwargs(_cfg(task, "algorithm=gspo", "rl.kl_coef=0.05"), "OUT")
    assert (gspo["importance_sampling_level"], gspo["loss_type"], gspo["epsilon"], gspo["beta"]) == (
        "sequence",
        "grpo",
        3e-4,
        0.05,
    )
    seq = trl_peer.grpo_config_kwargs(_cfg(task, "algorithm=grpo", "rl.aggregate=sequence"), "OUT")
    assert seq["loss_type"] == "grpo" and seq["importance_sampling_level"] == "token"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["lora.enabled=true"], "lora"),
        (["data.accum_steps=2"], "accum_steps"),
        (["optim.end_learning_rate_fraction=0.1"], "constant"),
        (["algorithm=sft"], "grpo or gspo"),
    ],
)
def test_config_translation_refuses_what_it_cannot_express(task, extra, message):
    with pytest.raises(ValueError, match=message):
        trl_peer.grpo_config_kwargs(_cfg(task, *extra), "OUT")


def test_prompts_as_text_encode_back_to_our_ids(task):
    """transformers' fast tokenizer, reading our tokenizer.json, encodes each rendered prompt's
    text to exactly our ids, in the order our run visits them; control: a prompt whose text
    encodes differently is refused."""
    path = str(task / "tokenizer.json")
    tok = load_tokenizer(path)
    hf = trl_peer.hf_tokenizer(path, tok)
    assert hf.eos_token_id == tok.token_id("<|return|>")
    convs, report = data_lib.read_jsonl(str(task / "train.jsonl"))
    prompts = Prompts(convs, tok, report=report)
    rows = trl_peer.prompt_rows(prompts, tok, hf, steps=3, per_step=4, seed=3)
    order = [i for step in range(3) for i in prompts.at_step(step, 4, 3)]
    assert [r["reference"] for r in rows] == [prompts.references[i] for i in order]
    for r, i in zip(rows, order):
        assert hf(r["prompt"], add_special_tokens=False)["input_ids"] == list(prompts.tokens[i])
    dropped = lambda text, add_special_tokens: {"input_ids": hf(text, add_special_tokens=False)["input_ids"][1:]}
    with pytest.raises(ValueError, match="other ids"):
        trl_peer.prompt_rows(prompts, tok, dropped, steps=1, per_step=4, seed=3)


def test_reward_adapter_scores_as_our_loop(task):
    """TRL's reward call (completion ids, reference column) gives what `rewards.score` gives our
    loop for the same tokens; a completion cut before its stop token is not `stopped`, so its
    unfinished final answer does not count (control: the same tokens with the stop token do)."""
    tok = load_tokenizer(str(task / "tokenizer.json"))
    spec = rewards_lib.from_config({"exact_match": 1.0, "format": 0.1})
    answer = harmony.render_for_training(
        [harmony.user("What is 2 + 3?"), harmony.assistant("5", channel="final")], tok
    )[0]
    start = len(harmony.render_for_completion([harmony.user("What is 2 + 3?")], tok))
    stop = tok.token_id("<|return|>")
    right = answer[start:-1] + [stop] if answer[-1] != stop else answer[start:]
    cut = right[:-1]
    wrong = harmony.render_for_training([harmony.user("What is 2 + 3?"), harmony.assistant("6", channel="final")], tok)[
        0
    ][start:]
    ids = [right, cut, wrong]
    funcs = trl_peer.reward_functions(spec, tok)
    assert [f.__name__ for f in funcs] == ["exact_match", "format"]
    refs = ["5", "5", "5"]
    got = {f.__name__: f(prompts=[""] * 3, completions=[""] * 3, completion_ids=ids, reference=refs) for f in funcs}
    ours = rewards_lib.score(
        [rewards_lib.Completion(harmony.parse_completion(t, tok), len(t), s) for t, s in zip(ids, [True, False, True])],
        refs,
        spec,
    )[1]
    assert got == ours
    assert got["exact_match"] == [1.0, 0.0, 0.0]


def test_rollout_rows_from_trl_logs():
    """Two optimizer steps per rollout: the reward figures come from the step that sampled, the
    loss figures from the rollout's last update (what train.rl logs; control: the first update's
    or the mean's clip fraction would differ)."""
    logs = [
        {"loss": 1.0, "reward": 0.5, "reward_std": 0.2, "rewards/exact_match/mean": 0.4,
         "completions/mean_length": 70.0, "clip_ratio/region_mean": 0.0, "entropy": 0.1,
         "grad_norm": 2.0, "learning_rate": 1e-5},
        {"loss": 3.0, "clip_ratio/region_mean": 0.02, "entropy": 0.3, "grad_norm": 4.0, "learning_rate": 2e-5},
        {"loss": 0.0, "reward": 0.7, "reward_std": 0.1, "rewards/exact_match/mean": 0.6,
         "completions/mean_length": 60.0, "clip_ratio/region_mean": 0.0, "entropy": 0.2, "kl": 0.01,
         "grad_norm": 1.0, "learning_rate": 3e-5},
        {"loss": 2.0, "clip_ratio/region_mean": 0.04, "entropy": 0.2, "kl": 0.03, "grad_norm": 1.0,
         "learning_rate": 4e-5},
    ]  # fmt: skip
    rows = trl_peer._rollout_rows(logs, 2)
    assert rows[0] == {
        "step": 1, "reward": 0.5, "reward_std": 0.2, "reward_exact_match": 0.4, "response_length": 70.0,
        "learning_rate": 2e-5, "loss": 3.0, "kl": 0.0, "clip_fraction": 0.02, "entropy": 0.3, "grad_norm": 4.0,
    }  # fmt: skip
    assert rows[1]["kl"] == 0.03 and rows[1]["reward"] == 0.7 and rows[1]["step"] == 2
    assert rows[1]["clip_fraction"] == 0.04
