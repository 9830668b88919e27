import os

# Fake several CPU devices for the sharding tests; must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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
    return factory.write_hf(str(tmp_path_factory.mktemp("hf_mxfp4")), t,
                            factory.hf_config_dict(tiny_cfg, mxfp4=True))


@pytest.fixture(scope="session")
def hf_dense_dir(tmp_path_factory, tiny_cfg):
    t = factory.dense_hf_tensors(tiny_cfg, 0)
    return factory.write_hf(str(tmp_path_factory.mktemp("hf_dense")), t,
                            factory.hf_config_dict(tiny_cfg, mxfp4=False))
