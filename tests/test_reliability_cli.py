"""Bad options and bad token ids give one clear error, never a silent wrong result.

- every numeric / named option of the commands is checked before a checkpoint's weights are read,
  and each user error is one line on stderr (exit code 2, no traceback);
- the Python API (`generate`, `SamplingParams`, `load_config`, `ModelConfig.replace`) raises
  ValueError for the same values;
- token ids outside the vocabulary fail a jitted forward (the README's hot-loop form) instead of
  being clamped to the last embedding row; a model sharded over a mesh logs them instead.
Each case has a control: valid input still works and gives the same result as before.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptoss_jax as gj
from gptoss_jax.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny model over a small byte-level BPE (harmony specials included), saved with its
    tokenizer.json so the CLI loads both from the folder."""
    from gptoss_jax.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("reliability") / "ckpt"
    tok = train_bpe(["hello world, what is 2 + 2? the answer is 4."] * 4, vocab_size=300)
    gj.save_hf(gj.init(gj.tiny(vocab_size=tok.vocab_size), seed=0), str(path))
    tok.hf.save(str(path / "tokenizer.json"))
    return path, tok.vocab_size


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("reliability_files")
    (d / "ok.yaml").write_text("model:\n  preset: tiny\n  dtype: float32\nrun:\n  steps: 1\n")
    # the flow mapping opened on line 3 is never closed
    (d / "broken.yaml").write_text("model:\n  preset: tiny\n  overrides: {vocab_size: 64\nrun:\n  steps: 3\n")
    (d / "conv.json").write_text("{not json")
    (d / "train.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}) + "\n"
    )
    return d


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Fail the test if a command reads a checkpoint's weights: its options must be checked first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the options were checked")

    monkeypatch.setattr(gj, "load", refuse)


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# (case, argv with {ckpt} {dir} {V} placeholders, substrings the error line must hold)
GEN = ["generate", "{ckpt}", "--raw", "--prompt", "hello", "--max-new-tokens", "2"]
CASES = [
    ("temperature nan", GEN + ["--temperature", "nan"], ["--temperature must be a finite number >= 0", "nan"]),
    ("temperature inf", GEN + ["--temperature", "inf"], ["--temperature must be a finite number"]),
    ("temperature < 0", GEN + ["--temperature", "-1"], ["--temperature must be a finite number >= 0"]),
    ("top-p nan", GEN + ["--top-p", "nan"], ["--top-p must be a number in (0, 1]"]),
    ("top-p 0", GEN + ["--top-p", "0"], ["--top-p must be a number in (0, 1]"]),
    ("top-k < 0", GEN + ["--top-k", "-1"], ["--top-k must be an integer from 0"]),
    ("top-k > vocab", GEN + ["--top-k", "{V+1}"], ["--top-k", "vocabulary size {V}"]),
    ("max-new-tokens 0", GEN + ["--max-new-tokens", "0"], ["--max-new-tokens must be an integer >= 1"]),
    ("seed < 0", GEN + ["--seed", "-1"], ["--seed must be an integer in [0, 2**63)"]),
    ("seed too big", GEN + ["--seed", str(2**70)], ["--seed must be an integer in [0, 2**63)"]),
    ("dtype float99", GEN + ["--dtype", "float99"], ["--dtype must be one of bfloat16, float16, float32", "float99"]),
    ("dtype int32", GEN + ["--dtype", "int32"], ["--dtype must be one of"]),
    (
        "conversation not JSON",
        ["generate", "{ckpt}", "--conversation", "{dir}/conv.json"],
        ["conv.json is not valid JSON", "line 1"],
    ),
    (
        "tokenizer bigger than the model",
        GEN + ["--tokenizer", "o200k_harmony"],
        ["outside the vocabulary [0, {V})", "--tokenizer"],
    ),
    ("chat temperature nan", ["chat", "{ckpt}", "--temperature", "nan"], ["gptoss chat: error: --temperature"]),
    ("chat top-k > vocab", ["chat", "{ckpt}", "--top-k", "{V+1}"], ["--top-k", "vocabulary size {V}"]),
    (
        "inspect seq-len 0",
        ["inspect", "{ckpt}", "--text", "hi", "--seq-len", "0", "--out", "{dir}/i"],
        ["--seq-len must be"],
    ),
    (
        "inspect batch-size 0",
        ["inspect", "{ckpt}", "--text", "hi", "--batch-size", "0", "--out", "{dir}/i"],
        ["--batch-size must be an integer >= 1"],
    ),
    (
        "inspect max-tokens 0",
        ["inspect", "{ckpt}", "--file", "{dir}/ok.yaml", "--max-tokens", "0", "--out", "{dir}/i"],
        ["--max-tokens must be an integer >= 1"],
    ),
    (
        "inspect dtype",
        ["inspect", "{ckpt}", "--text", "hi", "--dtype", "float99", "--out", "{dir}/i"],
        ["--dtype must be one of"],
    ),
    (
        "inspect missing file",
        ["inspect", "{ckpt}", "--file", "{dir}/none.txt", "--out", "{dir}/i"],
        ["none.txt", "is not a file"],
    ),
    (
        "inspect tokenizer bigger than the model",
        ["inspect", "{ckpt}", "--text", "hi", "--tokenizer", "o200k_harmony", "--out", "{dir}/i"],
        ["has 201088 ids but the model's vocabulary only {V}", "--tokenizer"],
    ),
    (
        "demo new-tokens 0",
        ["demo", "--new-tokens", "0", "--out", "{dir}/demo"],
        ["--new-tokens must be an integer >= 1"],
    ),
    ("demo seed < 0", ["demo", "--seed", "-1", "--out", "{dir}/demo"], ["--seed must be an integer in [0, 2**63)"]),
    (
        "compile batch 0",
        ["compile", "{dir}/ok.yaml", "--target", "h100", "--program", "forward", "--batch", "0"],
        ["--batch must be an integer >= 1"],
    ),
    (
        "compile length 0",
        ["compile", "{dir}/ok.yaml", "--target", "h100", "--program", "decode", "--length", "0"],
        ["--length must be an integer >= 1"],
    ),
    (
        "compile unknown ModelConfig field",
        ["compile", "{dir}/ok.yaml", "--target", "h100", "--program", "forward", "model.overrides={hidden: 64}"],
        ["model.overrides.hidden"],
    ),
    (
        "compile dtype",
        ["compile", "{dir}/ok.yaml", "--target", "h100", "--program", "forward", "model.dtype=float99"],
        ["model.dtype must be one of bfloat16, float16, float32"],
    ),
    (
        "malformed YAML",
        ["train", "{dir}/broken.yaml", "--print-config"],
        ["broken.yaml is not valid YAML", "line 4", "started at line 3"],
    ),
    (
        "malformed override",
        ["train", "{dir}/ok.yaml", "run.steps=[1", "--print-config"],
        ["override 'run.steps=[1'", "not valid YAML"],
    ),
    (
        "unknown ModelConfig field",
        ["train", "{dir}/ok.yaml", "model.overrides={hidden: 64}", "--print-config"],
        ["unknown key(s) model.overrides.hidden", "vocab_size", "d_model", "num_layers"],
    ),
    (
        "ModelConfig field of the wrong type",
        ["train", "{dir}/ok.yaml", "model.overrides={rope_theta: fast}", "--print-config"],
        ["model.overrides.rope_theta must be a number"],
    ),
    (
        "invalid ModelConfig value",
        ["train", "{dir}/ok.yaml", "model.overrides={vocab_size: -1}", "--print-config"],
        ["model.overrides", "vocab_size must be a positive int"],
    ),
    (
        "model.dtype",
        ["train", "{dir}/ok.yaml", "model.dtype=float99", "--estimate-memory"],
        ["model.dtype must be one of bfloat16, float16, float32"],
    ),
    (
        "model.experts",
        ["train", "{dir}/ok.yaml", "model.experts=int4", "--print-config"],
        ["model.experts must be one of mxfp4, dense"],
    ),
    (
        "model.expert_dispatch",
        ["train", "{dir}/ok.yaml", "model.expert_dispatch=alltoall", "--print-config"],
        ["model.expert_dispatch must be one of all_to_all, ragged_all_to_all"],
    ),
    (
        "model.preset",
        ["train", "{dir}/ok.yaml", "model.preset=gpt_oss_7b", "--print-config"],
        ["model.preset must be one of"],
    ),
    (
        "learning rate nan",
        ["train", "{dir}/ok.yaml", "optim.learning_rate=.nan", "--print-config"],
        ["optim.learning_rate must be a finite number"],
    ),
    ("b1 >= 1", ["train", "{dir}/ok.yaml", "optim.b1=1.5", "--print-config"], ["optim.b1 must be in [0, 1)"]),
    ("steps < 0", ["train", "{dir}/ok.yaml", "run.steps=-1", "--print-config"], ["run.steps must be an integer >= 0"]),
    (
        "batch size 0",
        ["train", "{dir}/ok.yaml", "data.batch_size=0", "--print-config"],
        ["data.batch_size must be an integer >= 1"],
    ),
    (
        "rl temperature nan",
        ["train", "{dir}/ok.yaml", "rl.temperature=.nan", "--print-config"],
        ["rl.temperature must be a finite"],
    ),
    ("rl top_p", ["train", "{dir}/ok.yaml", "rl.top_p=2", "--print-config"], ["rl.top_p must be in (0, 1]"]),
    ("lora targets", ["train", "{dir}/ok.yaml", "lora.targets=[qq]", "--print-config"], ["lora.targets must be"]),
    ("mesh axis", ["train", "{dir}/ok.yaml", "mesh={bogus: 2}", "--print-config"], ["unknown mesh axes mesh.bogus"]),
    (
        "mesh size",
        ["train", "{dir}/ok.yaml", "mesh={data: x}", "--print-config"],
        ["mesh.data must be a positive integer or -1"],
    ),
    ("empty override key", ["train", "{dir}/ok.yaml", "run..steps=1", "--print-config"], ["has an empty part"]),
    (
        "estimate-memory nan",
        ["train", "{dir}/ok.yaml", "--estimate-memory", "nan"],
        ["--estimate-memory must be a finite"],
    ),
    (
        "train: tokenizer bigger than the model",
        ["train", "{dir}/ok.yaml", "data.train={dir}/train.jsonl", "run.out_dir={dir}/run"],
        ["o200k_harmony has 201088 ids but the model's vocabulary only 512", "model.tokenizer"],
    ),
    (
        "eval unknown ModelConfig field",
        ["eval", "{dir}/ok.yaml", "model.overrides={hidden: 64}"],
        ["model.overrides.hidden"],
    ),
    ("quickstart override", ["quickstart", "--out", "{dir}/qs", "run.stepz=3"], ["unknown key(s) run.stepz"]),
    ("quickstart train-size 0", ["quickstart", "--out", "{dir}/qs", "--train-size", "0"], ["--train-size must be"]),
]


@pytest.mark.parametrize("case,argv,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_option_is_one_line_before_loading(case, argv, needles, ckpt, files, no_weight_loading, capsys):
    path, V = ckpt
    fill = lambda s: (
        s.replace("{ckpt}", str(path)).replace("{dir}", str(files)).replace("{V+1}", str(V + 1)).replace("{V}", str(V))
    )
    assert main([fill(a) for a in argv]) == 2
    _one_error_line(capsys, *[fill(n) for n in needles])
    assert not (files / "qs").exists()  # quickstart wrote no data before its options were checked


def test_valid_options_still_run(ckpt, files, capsys):
    path, V = ckpt
    args = [
        "generate",
        str(path),
        "--raw",
        "--prompt",
        "hello world",
        "--max-new-tokens",
        "3",
        "--seed",
        "1",
        "--temperature",
        "0.7",
        "--top-p",
        "0.9",
        "--top-k",
        str(V),
        "--dtype",
        "float32",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0 and capsys.readouterr().out == first  # same seed, same text
    assert (
        main(
            [
                "train",
                str(files / "ok.yaml"),
                "--print-config",
                "model.overrides={rope_theta: 1e6, layer_types: [sliding_attention, full_attention, "
                "sliding_attention, full_attention]}",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["overrides"]["rope_theta"] == 1e6  # YAML's string '1e6' read as a number


# ---------------------------------------------------------------------------- the Python API
def test_generate_and_sampler_reject_bad_values(tiny_cfg):
    from gptoss_jax.sampling import SamplingParams, generate

    model = gj.init(tiny_cfg, seed=0, dtype=jnp.float32)
    V = tiny_cfg.vocab_size
    bad = [
        (dict(temperature=float("nan")), "temperature must be a finite number"),
        (dict(temperature=float("inf")), "temperature must be a finite number"),
        (dict(top_p=float("nan")), "top_p must be"),
        (dict(top_k=V + 1), f"top_k must be an integer from 0 .* {V}"),
        (dict(top_k=2.5), "top_k must be an integer"),
        (dict(max_new_tokens=0), "max_new_tokens must be"),
        (dict(seed=-1), "seed must be"),
        (dict(stop_tokens=(V,)), "stop_tokens outside the vocabulary"),
        (dict(prefill_chunk=0), "prefill_chunk must be"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            generate(model, None, [[1, 2, 3]], **{"max_new_tokens": 2, **kwargs})
    with pytest.raises(ValueError, match="integer token ids"):
        generate(model, None, [[1.5, 2]], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, None, [[1, -1]], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        SamplingParams(temperature=float("nan"))
    # control: the edges of the ranges are valid, and sampling is what it was
    g = generate(
        model, None, [[1, 2, 3]], max_new_tokens=3, temperature=0.8, top_k=V, top_p=1.0, seed=5, stop_tokens=(V - 1,)
    )
    again = generate(
        model, None, [np.array([1, 2, 3])], max_new_tokens=3, temperature=0.8, top_k=V, seed=5, stop_tokens=(V - 1,)
    )
    assert g.tokens == again.tokens and all(0 <= t < V for t in g.tokens[0])


def test_config_api_errors(tmp_path):
    from gptoss_jax.config import ConfigError
    from gptoss_jax.train.config import ConfigKeyError, load_config

    with pytest.raises(ConfigError, match="unknown ModelConfig field.*hidden.*the fields are vocab_size"):
        gj.tiny().replace(hidden=64)
    with pytest.raises(ConfigError, match="rope_theta must be a finite number"):
        gj.tiny(rope_theta=float("nan"))
    with pytest.raises(ConfigKeyError, match="model.overrides.hidden"):
        load_config(None, ["model.overrides={hidden: 64}"])
    bad = tmp_path / "b.yaml"
    bad.write_text("run:\n  steps: [1, 2\n")
    with pytest.raises(ConfigKeyError, match=r"b.yaml is not valid YAML: line \d+, column \d+"):
        load_config(str(bad))
    # control
    assert gj.tiny().replace(d_model=128).d_model == 128
    assert load_config(None, ["model.overrides={d_model: 128}"]).model.overrides == {"d_model": 128}


# ------------------------------------------------------------------------------- token ids
def test_jitted_forward_reports_out_of_range_ids(tiny_cfg):
    """The README's hot-loop form `jax.jit(lambda state, t: nnx.merge(graphdef, state)(t).logits)`:
    ids -1 and vocab_size used to read the last embedding row silently."""
    from gptoss_jax.model import traced_token_check

    model = gj.init(tiny_cfg, seed=0, dtype=jnp.float32)
    V = tiny_cfg.vocab_size
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits)
    with traced_token_check(False):  # the program as it was: no check
        unchecked = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits)
        unchecked(state, jnp.zeros((1, 4), jnp.int32))
    for bad in (-1, V):
        with pytest.raises(Exception, match=rf"token ids must lie in \[0, {V}\); got values in "):
            jax.block_until_ready(fwd(state, jnp.array([[1, bad, 3, 4]])))
        # without the check the bad id is read as row V - 1
        np.testing.assert_array_equal(
            np.asarray(unchecked(state, jnp.array([[1, bad, 3, 4]]))),
            np.asarray(fwd(state, jnp.array([[1, V - 1, 3, 4]]))),
        )
    # control: valid ids give the logits of the program without the check (test_model compares
    # the jitted and eager forwards)
    t = jnp.array([[0, 5, V - 1, 7]])
    np.testing.assert_array_equal(np.asarray(fwd(state, t)), np.asarray(unchecked(state, t)))


def test_sharded_jitted_forward_logs_out_of_range_ids(tiny_cfg, caplog):
    """A model sharded over a mesh cannot stop one device alone (the others would wait in the MoE's
    collectives; on CPU that aborts the process): the program reports the bad range in the log."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = gj.make_mesh(data=2, expert=4)
    model = gj.init(tiny_cfg, seed=0, dtype=jnp.float32, mesh=mesh)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits)
    put = lambda a: jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("data")))
    good = np.tile([[1, 2, 3, 4]], (4, 1))
    fwd(state, put(good))
    with caplog.at_level("ERROR", logger="gptoss_jax.model"):
        for _ in range(3):  # a failure of one device alone would hang or abort here
            jax.block_until_ready(fwd(state, put(np.tile([[1, 2, 3, 600]], (4, 1)))))
        jax.effects_barrier()
    logged = [r.getMessage() for r in caplog.records if r.name == "gptoss_jax.model"]
    assert len(logged) == 3 and "token ids must lie in [0, 512); got values in [1, 600]" in logged[0], logged
    # control: valid ids log nothing and give the one-device model's logits (one seed, same weights)
    caplog.clear()
    graphdef1, state1 = nnx.split(gj.init(tiny_cfg, seed=0, dtype=jnp.float32))
    one_device = jax.jit(lambda s, t: nnx.merge(graphdef1, s)(t).logits)(state1, jnp.asarray(good))
    with caplog.at_level("ERROR", logger="gptoss_jax.model"):
        np.testing.assert_allclose(np.asarray(fwd(state, put(good))), np.asarray(one_device), rtol=1e-5, atol=1e-5)
        jax.effects_barrier()
    assert not [r for r in caplog.records if r.name == "gptoss_jax.model"]


def test_cli_reports_an_in_program_id_error_in_one_line(tiny_cfg, monkeypatch, capsys):
    """A TokenIdError raised inside a jitted program reaches the CLI as a JaxRuntimeError: still one
    line, and JAX's logged traceback of the callback is kept off stderr."""
    import gptoss_jax.cli as cli

    model = gj.init(tiny_cfg, seed=0, dtype=jnp.float32)
    graphdef, state = nnx.split(model)

    def bad_command(args):
        jax.block_until_ready(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits)(state, jnp.array([[3, -1]])))
        return 0

    monkeypatch.setattr(cli, "cmd_info", bad_command)
    assert main(["info"]) == 2
    _one_error_line(capsys, "gptoss info: error: token ids must lie in [0, 512); got values in [-1, 3]")
