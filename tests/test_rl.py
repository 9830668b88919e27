"""RL fine-tuning: the GRPO / GSPO losses against hand-computed values, the on-policy identity,
rewards (and a raising reward counted as 0), the sampler's log-probs against the training
forward, the LoRA reference being the base, and a GRPO run that resumes to the same weights
(also after a SIGKILL, from its newest checkpoint)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gptoss_jax as gj
from gptoss_jax import harmony, lora
from gptoss_jax.train import rewards as R
from gptoss_jax.train.config import RLSection
from gptoss_jax.train.losses import group_advantages, grpo_loss, gspo_loss, kl_k3, token_logprobs
from gptoss_jax.train.rl import shuffled
from tests import factory

LN = math.log


# ------------------------------------------------------------------------------------------ losses
def test_group_advantages_by_hand():
    a = group_advantages(jnp.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4)
    np.testing.assert_allclose(np.asarray(a), [1, -1, -1, 1, 0, 0, 0, 0], atol=1e-5)  # (r - .5) / .5
    a = group_advantages(jnp.array([3.0, 1.0]), 2, normalize_std=False)
    np.testing.assert_allclose(np.asarray(a), [1, -1])


def test_k3_by_hand():
    # policy p = .5, reference q = .25: q/p - log(q/p) - 1 = .5 + ln 2 - 1
    assert float(kl_k3(jnp.float32(LN(0.5)), jnp.float32(LN(0.25)))) == pytest.approx(0.5 + LN(2) - 1, rel=1e-6)
    assert float(kl_k3(jnp.float32(-1.3), jnp.float32(-1.3))) == 0.0


# two sequences of two tokens: ratios [[1.5, 1], [1, .5]], advantages [1, -1], eps .2
LOGP = jnp.array([[LN(1.5), 0.0], [0.0, LN(0.5)]], jnp.float32)
OLD = jnp.zeros((2, 2), jnp.float32)
ADV = jnp.array([1.0, -1.0])


def test_grpo_by_hand():
    loss, m = grpo_loss(LOGP, OLD, ADV, jnp.ones((2, 2)), clip_eps=0.2)
    # per token min(rA, clip(r)A): [1.2, 1, -1, -0.8]; mean .1
    assert float(loss) == pytest.approx(-0.1, abs=1e-6)
    assert float(m["clip_fraction"]) == pytest.approx(0.5)  # tokens (0,0) and (1,1)
    # sequence aggregation with the last token masked: seq means 1.1 and -1 -> -(0.05)
    loss, _ = grpo_loss(LOGP, OLD, ADV, jnp.array([[1, 1], [1, 0]]), clip_eps=0.2, aggregate="sequence")
    assert float(loss) == pytest.approx(-(1.1 - 1.0) / 2, abs=1e-6)
    # token aggregation of the same: (1.2 + 1 - 1) / 3
    loss, _ = grpo_loss(LOGP, OLD, ADV, jnp.array([[1, 1], [1, 0]]), clip_eps=0.2)
    assert float(loss) == pytest.approx(-1.2 / 3, abs=1e-6)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(LOGP, OLD, ADV, jnp.ones((2, 2)), aggregate="batch")


def test_grpo_kl_term_by_hand():
    ref = LOGP + jnp.array([[LN(0.5), 0.0], [0.0, 0.0]])  # the reference halves one token's probability
    loss, m = grpo_loss(LOGP, OLD, ADV, jnp.ones((2, 2)), clip_eps=0.2, kl_coef=0.1, ref_logp=ref)
    kl = (0.5 + LN(2) - 1) / 4
    assert float(m["kl"]) == pytest.approx(kl, rel=1e-5)
    assert float(loss) == pytest.approx(-0.1 + 0.1 * kl, abs=1e-6)


def test_gspo_by_hand():
    loss, m = gspo_loss(LOGP, OLD, ADV, jnp.ones((2, 2)), clip_eps=0.2)
    # s = exp(mean log-ratio) = sqrt(1.5), sqrt(.5); min(sA, clip(s)A) = 1.2, -0.8
    assert float(loss) == pytest.approx(-(1.2 - 0.8) / 2, abs=1e-6)
    assert float(m["ratio"]) == pytest.approx((math.sqrt(1.5) + math.sqrt(0.5)) / 2, rel=1e-6)
    assert float(m["clip_fraction"]) == pytest.approx(1.0)
    # length normalization: a masked token does not enter its sequence's ratio
    _, m = gspo_loss(LOGP, OLD, ADV, jnp.array([[1, 0], [1, 1]]), clip_eps=0.2)
    assert float(m["ratio"]) == pytest.approx((1.5 + math.sqrt(0.5)) / 2, rel=1e-6)


@pytest.mark.parametrize("which", ["grpo", "grpo_sequence", "gspo"])
def test_on_policy_first_step_is_minus_the_mean_advantage(which):
    r = np.random.default_rng(0)
    logp = jnp.asarray(-r.random((4, 6)), jnp.float32)
    adv = jnp.asarray(r.normal(size=4), jnp.float32)
    mask = jnp.ones((4, 6))
    kw = dict(kl_coef=0.5, ref_logp=logp)  # the reference is the policy: KL 0
    if which == "gspo":
        loss, m = gspo_loss(logp, logp, adv, mask, **kw)
    else:
        loss, m = grpo_loss(
            logp, logp, adv, mask, aggregate="sequence" if which.endswith("sequence") else "token", **kw
        )
    assert float(m["ratio"]) == 1.0 and float(m["kl"]) == 0.0 and float(m["clip_fraction"]) == 0.0
    assert float(loss) == pytest.approx(-float(jnp.mean(adv)), abs=1e-6)
    # and its gradient is the policy gradient: -mean_i A_i * mean_t d logp_it
    g = jax.grad(lambda lp: (gspo_loss if which == "gspo" else grpo_loss)(lp, jax.lax.stop_gradient(lp), adv, mask)[0])(
        logp
    )
    np.testing.assert_allclose(np.asarray(g), -np.asarray(adv)[:, None] / (4 * 6) * np.ones((4, 6)), rtol=1e-5)


# ----------------------------------------------------------------------------------------- rewards
def _completion(analysis, final, stopped=True, n=10):
    msgs = []
    if analysis is not None:
        msgs.append(harmony.assistant(analysis, channel="analysis"))
    if final is not None:
        msgs.append(harmony.assistant(final, channel="final"))
    return R.Completion(harmony.normalize_conversation(msgs), n, stopped)


def test_rewards():
    good = _completion("7+4=11", "11")
    assert R.exact_match(good, " 11 ") == 1.0 and R.exact_match(good, "12") == 0.0
    assert R.numeric_match(_completion(None, "The answer is 1,134."), "1134") == 1.0
    assert R.numeric_match(_completion(None, "0.30000001"), "0.3", rel_tol=1e-6) == 1.0
    assert R.numeric_match(_completion(None, "no number"), "3") == 0.0
    assert R.format_valid(good, "") == 1.0
    assert R.format_valid(_completion("a", None), "") == 0.0  # no final answer
    assert R.format_valid(_completion("a", "11", stopped=False), "") == 0.0  # cut at the length limit
    assert R.length_penalty(good, "") == -10.0
    total, parts, errors = R.score(
        [good, _completion(None, "12")], ["11", "11"], R.from_config({"exact_match": 1.0, "format": 0.5})
    )
    assert total == [1.5, 0.5] and parts["exact_match"] == [1.0, 0.0] and errors == {"exact_match": 0, "format": 0}
    with pytest.raises(ValueError, match="unknown reward"):
        R.from_config({"exactmatch": 1.0})


def test_a_raising_reward_scores_zero_and_is_counted():
    @R.register("flaky_for_test")
    def flaky(c, ref):
        if c.final == "boom":
            raise RuntimeError("bad reward")
        return 2.0

    try:
        total, parts, errors = R.score(
            [_completion(None, "boom"), _completion(None, "ok")], ["", ""], R.from_config({"flaky_for_test": 1.0})
        )
        assert parts["flaky_for_test"] == [0.0, 2.0] and errors == {"flaky_for_test": 1} and total == [0.0, 2.0]
    finally:
        del R.REGISTRY["flaky_for_test"]


# ------------------------------------------------------------------------ sampler vs training forward
def test_sampler_logprobs_equal_the_training_forward(tiny_cfg):
    model = gj.init(tiny_cfg, seed=3, dtype=jnp.float32)
    prompts = [[5, 9, 2, 7], [11, 3]]
    gen = gj.generate(model, None, prompts, max_new_tokens=12, temperature=1.0, seed=4, stop_tokens=(), logprobs=True)
    for p, toks, lps in zip(prompts, gen.tokens, gen.logprobs):
        row = jnp.asarray([p + toks])
        lp, _ = token_logprobs(model(row).logits, row)
        np.testing.assert_allclose(np.asarray(lp[0, len(p) - 1 :]), lps, rtol=1e-5, atol=1e-5)


def test_lora_reference_is_the_base(tiny_cfg):
    from gptoss_jax.train.rl import _zero_lora_b
    from gptoss_jax.train.step import make_trainer, trainable_filter

    base = gj.init(tiny_cfg, seed=5, dtype=jnp.float32)
    want = np.asarray(base(jnp.arange(12)[None]).logits)
    model = lora.add_lora(gj.init(tiny_cfg, seed=5, dtype=jnp.float32), lora.LoRAConfig(rank=2, alpha=4.0))
    trainer = make_trainer(model, optax.sgd(0.1), trainable=trainable_filter(lora=True))
    params = jax.tree.map(lambda a: a + 0.3, trainer.init(model).params)  # "trained": every factor moved
    assert np.abs(np.asarray(trainer.merge(params)(jnp.arange(12)[None]).logits) - want).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(trainer.merge(_zero_lora_b(params))(jnp.arange(12)[None]).logits), want)


# ------------------------------------------------------------------------------------------ the loop
@pytest.fixture(scope="module")
def rl_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl")
    tok = factory.arithmetic_task(d, train_size=32, eval_size=4)
    gj.save_native(gj.init(gj.tiny(vocab_size=tok.vocab_size), seed=1, dtype="float32", experts="dense"), str(d / "m"))
    return d


def _rl_config(d, out, steps, algorithm="grpo"):
    from gptoss_jax.train.config import load_config

    return load_config(None, _rl_overrides(d, out, steps, algorithm))


def _rl_overrides(d, out, steps, algorithm="grpo"):
    return [
        f"algorithm={algorithm}",
        f"model.checkpoint={d / 'm'}",
        "model.dtype=float32",
        "model.experts=dense",
        f"model.tokenizer={d / 'tokenizer.json'}",
        f"data.train={d / 'train.jsonl'}",
        f"data.eval={d / 'eval.jsonl'}",
        "optim.learning_rate=1e-3",
        "optim.warmup_steps=1",
        "optim.total_steps=10",
        "rl.group_size=4",
        "rl.prompts_per_step=2",
        "rl.max_new_tokens=12",
        "rl.updates_per_rollout=2",
        "rl.kl_coef=0.1",
        "rl.rewards={exact_match: 1.0, format: 0.1, length_penalty: 0.01}",
        f"run.out_dir={out}",
        f"run.steps={steps}",
        "run.save_every=2",
        "run.log_every=1",
        "run.progress=false",
        "eval.max_new_tokens=8",
    ]


def test_grpo_run_metrics(rl_setup, tmp_path):
    """The metrics a GRPO run logs. Exact resume is `test_grpo_sigkill_resumes_at_its_checkpoint`'s."""
    from gptoss_jax.train import rl

    straight = rl.train(_rl_config(rl_setup, tmp_path / "a", 4), log=lambda s: None)
    assert straight["resumed_from"] == 0
    records = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    assert records[0] == {"step": 0, "eval_accuracy": straight["eval_accuracy"]["0"]}
    last = records[-1]
    for key in (
        "reward",
        "reward_std",
        "reward_exact_match",
        "reward_format",
        "reward_length_penalty",
        "kl",
        "clip_fraction",
        "ratio",
        "entropy",
        "response_length",
        "logprob_diff",
        "eval_accuracy",
    ):
        assert key in last, key
    assert all(r["logprob_diff"] < 1e-4 for r in records[1:])  # sampler == training forward
    assert last["kl"] > 0  # two updates per rollout: the policy has left the reference
    # the learning rate of the step's last optimizer update (the optimizer counts updates, two
    # per rollout): step 1 ends on update 1, past the one-update warmup, at the peak 1e-3 (by
    # hand; logging the rollout index instead would give update 0's rate, 0)
    assert records[1]["learning_rate"] == pytest.approx(1e-3)
    assert all(r["seconds_sampling"] > 0 and r["seconds_update"] > 0 for r in records[1:])
    assert (tmp_path / "a" / "curves.png").is_file()
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]


def test_gspo_run(rl_setup, tmp_path):
    from gptoss_jax.train import rl

    summary = rl.train(_rl_config(rl_setup, tmp_path / "g", 2, algorithm="gspo"), log=lambda s: None)
    assert summary["algorithm"] == "gspo" and set(summary["eval_accuracy"]) == {"0", "2"}


def test_grpo_sigkill_resumes_at_its_checkpoint(rl_setup, tmp_path):
    """`gptoss train` of a GRPO run killed with SIGKILL after checkpoint 2 and started again goes on
    from its newest checkpoint (not from step 0) and ends with the weights of a run never stopped."""
    import subprocess
    import sys

    from tests.test_sft import _metric_lines, _weights, assert_resumed_at, kill_at_checkpoint

    (tmp_path / "empty.yaml").write_text("")

    def launch(name):
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gptoss_jax.cli",
                "train",
                str(tmp_path / "empty.yaml"),
                *_rl_overrides(rl_setup, tmp_path / name, 6),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    straight, killed = launch("straight"), launch("killed")
    at, killed_lines = kill_at_checkpoint(killed, tmp_path / "killed", 2)  # steps 3..6 still to come
    assert 2 <= at < 6
    straight_out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, straight_out[-2000:]
    resumed = launch("killed")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-2000:]
    assert_resumed_at(at, out, killed_lines, _metric_lines(tmp_path / "killed"), range(0, 7))
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["resumed_from"] == at
    assert _weights(tmp_path / "killed") == _weights(tmp_path / "straight")

    # control: the run never stopped is what a restart from step 0 would give; the checks refuse it
    straight_lines = _metric_lines(tmp_path / "straight")
    with pytest.raises(AssertionError):
        assert_resumed_at(at, straight_out, killed_lines, straight_lines, range(0, 7))
    with pytest.raises(AssertionError, match="written again"):
        assert_resumed_at(at, f"resumed from step {at}\n", killed_lines, straight_lines, range(0, 7))


def test_shuffled_rewards_are_a_seeded_permutation():
    r = np.arange(64, dtype=np.float64)
    a, b = shuffled(r, seed=0, step=3), shuffled(r, seed=0, step=3)
    np.testing.assert_array_equal(a, b)  # a resumed run repeats the step's permutation
    assert sorted(a.tolist()) == r.tolist()  # the same rewards
    assert (a != r).mean() > 0.9  # detached from their samples
    assert not np.array_equal(shuffled(r, seed=0, step=4), a)  # control: another step, another order
    assert RLSection().shuffle_rewards is False
    with pytest.raises(Exception, match="shuffle_rewards"):
        RLSection(shuffle_rewards="yes")
