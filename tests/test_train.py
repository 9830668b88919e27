"""Training data and the train step: invariants (packed loss == separate loss, accumulation ==
one big batch, a non-finite step changes nothing) and literal checks of the data pipeline."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gptoss_jax as gj
from gptoss_jax import harmony, moe
from gptoss_jax.train import data
from gptoss_jax.train import step as step_lib
from gptoss_jax.train.losses import chunked_next_token_loss, next_token_loss


# ------------------------------------------------------------------------------------------ data
def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_both_conversation_shapes_and_malformed_lines(tmp_path, tokenizer):
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "thinking": "Two plus two."},
        ]
    }
    native = {
        "messages": [harmony.system_message(reasoning_effort="high"), harmony.user("hi"), harmony.assistant("hello")]
    }
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            json.dumps(chat),
            "{not json",
            json.dumps(native),
            "",
            json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        ],
    )
    convs, report = data.read_jsonl(path)
    assert report.lines == 4 and report.conversations == 2
    assert [r.split(": ")[0] for r in report.malformed] == [f"{path}:2", f"{path}:5"]
    want = harmony.normalize_conversation(
        [
            harmony.system_message(reasoning_effort="low"),
            harmony.developer_message("Be brief."),
            harmony.user("2+2?"),
            harmony.assistant("Two plus two.", channel="analysis"),
            harmony.assistant("4", channel="final"),
        ]
    )
    assert convs[0] == want
    assert convs[1] == harmony.normalize_conversation(native)
    with pytest.raises(data.DataError, match=r"d\.jsonl:2: "):
        data.read_jsonl(path, strict=True)


def test_packing_keeps_examples_whole_and_apart():
    ex = [
        ([1] * 5, [0, 0, 1, 1, 1]),
        ([2] * 3, [0, 1, 1]),
        ([3] * 9, [1] * 9),
        ([4] * 4, [0, 0, 0, 1]),
        ([5] * 2, [1, 1]),
    ]
    report = data.DataReport()
    packed = data.pack(ex, 8, report=report)
    assert report.too_long == 1  # the 9-token example: counted, never truncated
    np.testing.assert_array_equal(packed.tokens, [[1, 1, 1, 1, 1, 2, 2, 2], [4, 4, 4, 4, 5, 5, 0, 0]])
    np.testing.assert_array_equal(packed.segment_ids, [[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 2, 2, 0, 0]])
    np.testing.assert_array_equal(packed.positions, [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 0]])
    np.testing.assert_array_equal(packed.loss_mask, [[0, 0, 1, 1, 1, 0, 1, 1], [0, 0, 0, 1, 1, 1, 0, 0]])
    with pytest.raises(data.DataError, match="more than a row of 8"):
        data.pack(ex, 8, strict=True)


def test_batches_are_a_function_of_the_step():
    packed = data.pack([([i + 1] * 3, [0, 1, 1]) for i in range(10)], 3)
    seen = np.concatenate([data.batch_at(packed, s, 4, seed=1)["tokens"][:, 0] for s in range(5)])
    # epochs 0 and 1 (20 rows): each a permutation of all 10 rows
    assert sorted(seen[:10]) == list(range(1, 11)) and sorted(seen[10:]) == list(range(1, 11))
    # an epoch's order is a fresh permutation: epoch 1 is not epoch 0 again
    assert list(seen[:10]) != list(seen[10:])
    # step 3 holds global draws 12..15: epoch 1, places 2..5 of that epoch's order, the permutation
    # seeded by (seed, epoch)
    want = np.random.default_rng([1, 1]).permutation(10)[2:6] + 1
    np.testing.assert_array_equal(data.batch_at(packed, 3, 4, seed=1)["tokens"][:, 0], want)
    np.testing.assert_array_equal(seen[12:16], want)
    # another seed, another order
    other = np.concatenate([data.batch_at(packed, s, 4, seed=2)["tokens"][:, 0] for s in range(5)])
    assert sorted(other[:10]) == list(range(1, 11)) and list(other) != list(seen)
    # the same batches in a fresh process with another hash seed: resuming elsewhere is exact
    code = (
        "import numpy as np; from gptoss_jax.train import data; "
        "p = data.pack([([i + 1] * 3, [0, 1, 1]) for i in range(10)], 3); "
        "print(np.concatenate([data.batch_at(p, s, 4, seed=1)['tokens'][:, 0] for s in range(5)]).tolist())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == seen.tolist()


def test_packed_loss_equals_separate_loss(tiny_cfg):
    """Three documents packed into one row give the same summed loss and gradients as three
    separate runs, with the packed row's segment_ids in the forward and in the targets
    (`losses.next_token_targets`); scoring every token shows the segment mask is what does it."""
    model = gj.init(tiny_cfg, seed=0, dtype=jnp.float32)
    rng = np.random.RandomState(0)
    ex = [(rng.randint(0, tiny_cfg.vocab_size, n).tolist(), [0] + [1] * (n - 1)) for n in (7, 12, 9)]
    packed = data.pack(ex, 28)
    assert len(packed) == 1
    fwd = nnx.jit(lambda m, t, p, s: m(t, positions=p, segment_ids=s).logits)
    tokens, pos, seg = (jnp.asarray(getattr(packed, k)) for k in ("tokens", "positions", "segment_ids"))
    out = fwd(model, tokens, pos, seg)
    loss, n = next_token_loss(out, tokens, jnp.asarray(packed.loss_mask), seg)
    # Each document alone, right-padded to the longest (one compiled shape): the padding comes after
    # every real token, so it changes no real token's logits (causal), and its targets are masked.
    L = max(len(t) for t, _ in ex)
    alone = lambda xs: jnp.asarray([list(xs) + [0] * (L - len(xs))])
    total = 0.0
    for toks, mask in ex:
        t = alone(toks)
        l, c = next_token_loss(fwd(model, t, None, None), t, alone(mask))
        total += float(l * c)
    assert float(n) == sum(len(t) - 1 for t, _ in ex)
    assert abs(float(loss * n) - total) / total <= 1e-5

    # every token a target: only the segment mask keeps the first token of a document from being
    # scored as the continuation of the one before it
    full = jnp.ones_like(tokens)

    def summed(m, t, p, s, mask, targets_seg):
        l, c = next_token_loss(m(t, positions=p, segment_ids=s).logits, t, mask, targets_seg)
        return l * c

    grad = nnx.jit(nnx.value_and_grad(summed))
    want_loss, want_grad = 0.0, None
    for toks, _ in ex:
        l, g = grad(model, alone(toks), None, None, alone([1] * len(toks)), None)
        want_loss += float(l)
        want_grad = g if want_grad is None else jax.tree.map(jnp.add, want_grad, g)
    got_loss, got_grad = grad(model, tokens, pos, seg, full, seg)
    assert abs(float(got_loss) - want_loss) / want_loss <= 1e-5
    masked, count = next_token_loss(out, tokens, full, seg)
    assert float(count) == sum(len(t) - 1 for t, _ in ex)
    # the chunked loss path scores the same targets
    hidden = nnx.jit(lambda m, t, p, s: m(t, positions=p, segment_ids=s, head=False).hidden)(model, tokens, pos, seg)
    chunked, chunked_count = chunked_next_token_loss(hidden, model.unembed[...], tokens, full, seg, chunk=8)
    assert float(chunked_count) == float(count)
    assert abs(float(chunked - masked)) <= 1e-6 * float(masked)

    def worst(a, b):  # the largest leaf-relative difference between two gradient trees
        rel = jax.tree.map(lambda x, y: float(jnp.abs(x - y).max() / jnp.maximum(jnp.abs(y).max(), 1e-30)), a, b)
        return max(jax.tree.leaves(rel))

    assert worst(got_grad, want_grad) <= 1e-4
    # control: without the segment mask the two boundary targets are scored too
    bad_loss, bad_grad = grad(model, tokens, pos, seg, full, None)
    assert float(next_token_loss(out, tokens, full)[1]) == float(n) + 2 == 27
    assert abs(float(bad_loss) - want_loss) / want_loss > 1e-2
    assert worst(bad_grad, want_grad) > 1e-2


# ------------------------------------------------------------------------------------------ step
@pytest.fixture(scope="module")
def batch(tiny_cfg):
    rng = np.random.RandomState(1)
    tokens = rng.randint(0, tiny_cfg.vocab_size, (4, 16)).astype(np.int32)
    mask = (rng.rand(4, 16) < 0.7).astype(np.int32)
    return {"tokens": tokens, "loss_mask": mask}


def test_schedule_warmup_then_cosine():
    cfg = step_lib.OptimConfig(learning_rate=1e-3, warmup_steps=10, total_steps=110, end_learning_rate_fraction=0.1)
    sched = step_lib.make_schedule(cfg)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(5e-4)
    assert float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(60)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-5)  # half way down the cosine
    assert float(sched(110)) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="must exceed warmup_steps"):
        step_lib.make_schedule(step_lib.OptimConfig(warmup_steps=10, total_steps=10))


def test_accumulation_equals_one_big_batch(tiny_cfg, batch):
    # SGD: an update linear in the gradient (AdamW's first step, ~lr * sign(g), amplifies fp32
    # noise on near-zero gradient entries into full-size differences)
    opt = optax.sgd(0.1)
    results = []
    for accum in (1, 2):
        model = gj.init(tiny_cfg, seed=2, dtype=jnp.float32)
        trainer = step_lib.make_trainer(model, opt, accum_steps=accum)
        state, metrics = trainer.step(trainer.init(model), batch)
        results.append((float(metrics["loss"]), jax.tree.leaves(state.params)))
    (l1, p1), (l2, p2) = results
    assert abs(l1 - l2) / l1 <= 1e-6
    worst = max(float(jnp.abs(a - b).max() / (jnp.abs(a).max() + 1e-30)) for a, b in zip(p1, p2))
    assert worst <= 1e-5


def test_training_lowers_the_loss_and_keeps_packed_experts_frozen(tiny_cfg, batch):
    model = gj.init(tiny_cfg, seed=3)  # bf16 compute, packed experts
    opt = step_lib.make_optimizer(step_lib.OptimConfig(learning_rate=3e-3, warmup_steps=2, total_steps=40))
    trainer = step_lib.make_trainer(model, opt)
    state = trainer.init(model)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state.params))  # fp32 master weights
    blocks_before = np.asarray(model.layers[0].mlp.w1_blocks[...])
    losses = []
    for _ in range(15):
        state, m = trainer.step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses
    trained = trainer.model(state)
    assert trained.layers[0].attn.q[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(trained.layers[0].mlp.w1_blocks[...]), blocks_before)
    assert int(state.step) == 15 and int(state.skipped) == 0


def test_a_non_finite_step_changes_nothing(tiny_cfg, batch):
    model = gj.init(tiny_cfg, seed=4, dtype=jnp.float32)
    opt = step_lib.make_optimizer(step_lib.OptimConfig(warmup_steps=0, total_steps=10))
    trainer = step_lib.make_trainer(model, opt)
    state = trainer.init(model)
    flat = nnx.to_flat_state(state.params)
    poisoned = {p: v for p, v in flat}
    norm_path = ("layers", 0, "attn", "norm")
    poisoned[norm_path] = poisoned[norm_path].replace(jnp.full_like(poisoned[norm_path].get_value(), jnp.nan))
    state = state._replace(params=nnx.from_flat_state(poisoned))
    before = [np.asarray(a) for a in jax.tree.leaves(state.params)]
    opt_before = [np.asarray(a) for a in jax.tree.leaves(state.opt_state)]
    state, m = trainer.step(state, batch)
    assert not bool(m["finite"])
    assert int(state.skipped) == 1 and int(state.bad_in_a_row) == 1 and int(state.step) == 1
    for a, b in zip(jax.tree.leaves(state.params), before):
        np.testing.assert_array_equal(np.asarray(a), b)
    for a, b in zip(jax.tree.leaves(state.opt_state), opt_before):
        np.testing.assert_array_equal(np.asarray(a), b)


# ------------------------------------------------------------------------------------------ eval
def test_eval_loss_equals_the_training_loss(tiny_cfg):
    from gptoss_jax.train import eval as eval_lib

    rng = np.random.RandomState(5)
    ex = [(rng.randint(0, tiny_cfg.vocab_size, n).tolist(), [0] + [1] * (n - 1)) for n in (9, 14, 6, 11, 8)]
    packed = data.pack(ex, 24)
    model = gj.init(tiny_cfg, seed=6, dtype=jnp.float32)
    got = eval_lib.evaluate_loss(model, packed, batch_size=2)  # 3 rows: the last batch is padded
    trainer = step_lib.make_trainer(model, optax.sgd(0.0))
    batch = {k: getattr(packed, k) for k in ("tokens", "loss_mask", "segment_ids", "positions")}
    _, metrics = trainer.step(trainer.init(model), batch)
    assert got["targets"] == sum(len(t) - 1 for t, _ in ex) == int(metrics["targets"])
    assert abs(got["loss"] - float(metrics["loss"])) / float(metrics["loss"]) <= 1e-5
    assert got["perplexity"] == pytest.approx(np.exp(got["loss"]))


def test_task_accuracy_scores_the_parsed_final_answer(tokenizer):
    from gptoss_jax.sampling import Generation
    from gptoss_jax.train import eval as eval_lib

    convs = [
        harmony.normalize_conversation(
            [
                harmony.system_message(reasoning_effort="low"),
                harmony.user(f"{a}+{a}"),
                harmony.assistant(f"double {a}", channel="analysis"),
                harmony.assistant(str(2 * a)),
            ]
        )
        for a in range(6)
    ]
    tid = tokenizer.token_id

    def completion(analysis, final):
        return (
            [tid("<|channel|>")]
            + tokenizer.encode("analysis")
            + [tid("<|message|>")]
            + tokenizer.encode(analysis)
            + [tid("<|end|>"), tid("<|start|>")]
            + tokenizer.encode("assistant")
            + [tid("<|channel|>")]
            + tokenizer.encode("final")
            + [tid("<|message|>")]
            + tokenizer.encode(final)
            + [tid("<|return|>")]
        )

    def fake_generate(model, tok, prompts, **kw):
        # the prompt must end by opening the assistant turn; answers by a % 3: right, wrong, no final
        assert all(p[-2:] == [tid("<|start|>")] + tokenizer.encode("assistant") for p in prompts)
        outs = []
        for p in prompts:
            a = int(tokenizer.decode(p).split("<|message|>")[-1].split("+")[0])
            outs.append(
                completion("x", str(2 * a))
                if a % 3 == 0
                else completion("x", str(2 * a + 1))
                if a % 3 == 1
                else tokenizer.encode("garbage")
            )
        return Generation(outs, ["stop"] * len(outs), [len(p) for p in prompts])

    res = eval_lib.task_accuracy(None, tokenizer, convs, generate=fake_generate, batch_size=4)
    assert (res["correct"], res["total"]) == (2, 6) and res["accuracy"] == pytest.approx(1 / 3)
    assert res["examples"][0] == {"reference": "0", "answer": "0", "correct": True}
    assert res["examples"][2]["answer"] is None
    with pytest.raises(ValueError, match="must end with an assistant turn"):
        eval_lib.split_reference(convs[0][:2])


# ------------------------------------------------------------------------ remat, router loss
def _loss(model):
    """(loss(params, tokens, coef) = token loss + coef * router loss, the model's Params)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, tokens, coef):
        out = nnx.merge(graphdef, params, rest)(tokens, router_loss=True)
        return next_token_loss(out.logits, tokens)[0] + coef * out.router_loss

    return loss, params


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_memory_not_gradients(tiny_cfg, remat):
    from jax._src.ad_checkpoint import saved_residuals  # private: the public API only prints them

    tokens = jnp.asarray(np.random.RandomState(7).randint(0, tiny_cfg.vocab_size, (2, 40)), jnp.int32)
    plain, params = _loss(gj.init(tiny_cfg, seed=8, dtype=jnp.float32, experts="dense"))
    remade, _ = _loss(
        gj.init(tiny_cfg, seed=8, dtype=jnp.float32, experts="dense", kernel=gj.KernelOptions(remat=remat))
    )
    g_plain = jax.jit(jax.grad(plain))(params, tokens, 0.0)
    g_remat = jax.jit(jax.grad(remade))(params, tokens, 0.0)
    for (p, a), (_, b) in zip(nnx.to_flat_state(g_plain), nnx.to_flat_state(g_remat)):
        np.testing.assert_allclose(
            np.asarray(b.get_value()), np.asarray(a.get_value()), rtol=1e-5, atol=1e-7, err_msg=str(p)
        )
    # what the backward pass keeps from the forward pass (beyond the inputs): less with remat
    kept = lambda f: sum(
        np.prod(aval.shape) * aval.dtype.itemsize
        for aval, why in saved_residuals(lambda p: f(p, tokens, 0.0), params)
        if "argument" not in why
    )
    assert kept(remade) < 0.6 * kept(plain), (kept(remade), kept(plain))
    with pytest.raises(ValueError, match="remat must be one of"):
        gj.KernelOptions(remat="some")


def test_router_aux_loss_enters_the_step(tiny_cfg):
    tokens = jnp.asarray(np.random.RandomState(9).randint(0, tiny_cfg.vocab_size, (2, 24)), jnp.int32)
    model = gj.init(tiny_cfg, seed=10, dtype=jnp.float32)
    out = nnx.jit(lambda m, t: m(t, router_loss=True))(model, tokens)
    captured = nnx.jit(lambda m, t: m(t, capture=True).intermediates)(model, tokens)
    per_layer = [
        float(
            moe.load_balancing_loss(
                moe.Routing(
                    i["router_logits"].reshape(-1, tiny_cfg.num_experts),
                    i["expert_ids"].reshape(-1, tiny_cfg.experts_per_token),
                    i["expert_weights"],
                )
            )
        )
        for i in captured
    ]
    assert float(out.router_loss) == pytest.approx(np.mean(per_layer), rel=1e-5)
    # the coefficient reaches the router's gradient
    loss, params = _loss(model)
    grad = jax.jit(jax.grad(loss))
    router = ("layers", 0, "mlp", "router")
    g0, g1 = (np.asarray(dict(nnx.to_flat_state(grad(params, tokens, c)))[router].get_value()) for c in (0.0, 0.5))
    assert np.abs(g1 - g0).max() > 1e-6
    # the step reports it beside the token loss (which stays the token loss alone)
    trainer = step_lib.make_trainer(model, optax.sgd(0.0), router_aux_loss=0.5)
    _, metrics = trainer.step(trainer.init(model), {"tokens": tokens, "loss_mask": jnp.ones_like(tokens)})
    assert float(metrics["router_loss"]) == pytest.approx(float(out.router_loss), rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(float(next_token_loss(out.logits, tokens)[0]), rel=1e-5)


def test_chunked_cross_entropy_equals_the_whole_logits_loss():
    """Logits made 16 positions at a time (T = 45: a ragged last chunk; zero weights inside) give
    the loss and gradients of the [B, T, V] computation (fp32, limit 1e-6 relative)."""
    from gptoss_jax.train.losses import chunked_token_cross_entropy, token_cross_entropy

    k = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(k[0], (2, 45, 32), jnp.float32)
    table = jax.random.normal(k[1], (97, 32), jnp.float32) * 0.3
    targets = jax.random.randint(k[2], (2, 45), 0, 97)
    weights = (jax.random.uniform(k[3], (2, 45)) > 0.3).astype(jnp.float32)

    def whole(h, table):
        logits = jnp.einsum("BTD,VD->BTV", h, table, precision="highest")
        return token_cross_entropy(logits, targets, weights)[0]

    chunked = lambda h, table: chunked_token_cross_entropy(h, table, targets, weights, chunk=16)[0]
    (l1, g1), (l2, g2) = (jax.value_and_grad(f, argnums=(0, 1))(h, table) for f in (whole, chunked))
    assert abs(float(l1 - l2)) <= 1e-6 * abs(float(l1))
    for a, b in zip(g1, g2):
        assert float(jnp.abs(a - b).max()) <= 1e-6 * float(jnp.abs(a).max())
    assert float(chunked_token_cross_entropy(h, table, targets, weights, chunk=16)[1]) == float(weights.sum())
    # control: dropping the last (partial) chunk's positions changes the loss
    first_two = chunked_token_cross_entropy(h[:, :32], table, targets[:, :32], weights[:, :32], chunk=16)[0]
    assert abs(float(first_two - l1)) > 1e-4


def test_train_step_with_a_chunked_loss_equals_the_whole_one(tiny_cfg, batch):
    results = []
    for chunk in (0, 8):
        model = gj.init(tiny_cfg, seed=2, dtype=jnp.float32)
        trainer = step_lib.make_trainer(model, optax.sgd(0.1), loss_chunk=chunk)
        state, metrics = trainer.step(trainer.init(model), batch)
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), jax.tree.leaves(state.params)))
    (l1, n1, p1), (l2, n2, p2) = results
    assert abs(l1 - l2) <= 1e-6 * l1 and abs(n1 - n2) <= 1e-5 * n1
    worst = max(float(jnp.abs(a - b).max() / (jnp.abs(a).max() + 1e-30)) for a, b in zip(p1, p2))
    assert worst <= 1e-5


def test_mcnemar_equals_scipys_exact_binomial_test():
    """The exact McNemar p-value against scipy's two-sided binomial test on the changed problems
    (an independent implementation); control: the one-sided tail is not what it returns."""
    from scipy.stats import binomtest

    from gptoss_jax.train.eval import mcnemar

    rng = np.random.default_rng(0)
    for n, p_before, p_after in ((200, 0.4, 0.7), (200, 0.4, 0.42), (50, 0.5, 0.5), (500, 0.3, 0.31)):
        before = rng.random(n) < p_before
        after = np.where(rng.random(n) < 0.3, rng.random(n) < p_after, before)
        r = mcnemar(before.tolist(), after.tolist())
        assert r["fixed"] == int(np.sum(after & ~before)) and r["broken"] == int(np.sum(before & ~after))
        changed = r["fixed"] + r["broken"]
        oracle = binomtest(r["fixed"], changed, 0.5, alternative="two-sided").pvalue
        assert r["p_value"] == pytest.approx(oracle, rel=1e-9)
        one_sided = binomtest(min(r["fixed"], r["broken"]), changed, 0.5, alternative="less").pvalue
        if one_sided < 0.5:
            assert r["p_value"] != pytest.approx(one_sided, rel=1e-3)
    assert mcnemar([True, False], [True, False]) == {"fixed": 0, "broken": 0, "p_value": 1.0}
    with pytest.raises(ValueError, match="different problem sets"):
        mcnemar([True], [True, False])
