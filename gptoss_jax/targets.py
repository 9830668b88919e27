"""Named compile-only targets: the TPUs and H100s a program is compiled for, from any host.

    t = targets.get("tpu-v5e-8")
    t.devices()                      # compile-only devices (no hardware needed)
    mesh = t.mesh(fsdp=2, expert=4)  # `sharding.make_mesh` over them
    jax.jit(f, in_shardings=...).lower(*abstract_args).compile()   # XLA:TPU / XLA:GPU + Triton

The compilers come from the `aot` extra (`pip install -e ".[aot]"`): libtpu for TPU topologies,
the CUDA PJRT plugin plus pip's `ptxas` for H100s. Nothing runs: `compile()` gives the target's
own per-device memory figures (`memory_analysis()`) and optimized HLO, which is what the compile
tests and `gptoss compile` read.

Facts behind the table:
- libtpu's compile-only v4 topology exposes each of a chip's two TensorCores as its own device
  (8 devices of 16 GiB for a v4-8); v5p and v5e/v6e chips are one device each.
- The H100 is XLA's published H100 SXM 80 GB description; without a device no autotuning
  happens, so XLA's own GEMM choices are defaults, while Pallas kernels keep their settings.
"""

from __future__ import annotations

import dataclasses
import functools
import os

from gptoss_jax import sharding as sharding_lib

GIB = 2**30

# XLA's published H100 SXM description (gpu_device_info of GpuTargetConfigProto).
_H100_CONFIG = """gpu_device_info { threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: 233472 threads_per_core_limit: 2048
  core_count: 132 fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84942979072 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536 }
platform_name: "CUDA" dnn_version_info { major: 9 minor: 8 } runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3" """


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "tpu" | "gpu": what the plan resolves kernels for
    topology: str
    num_devices: int
    hbm_bytes: int  # per device
    description: str
    single_chip: bool = False

    def devices(self) -> list:
        return list(_devices(self.name))

    def mesh(self, *, data: int = 1, fsdp: int = 1, tensor: int = 1, expert: int = 1, devices=None):
        """`sharding.make_mesh` over this target's devices (all of them unless `devices`); one size
        may be -1 (the rest). `mesh()` with no sizes puts every device on `data`."""
        devs = self.devices() if devices is None else devices
        sizes = dict(data=data, fsdp=fsdp, tensor=tensor, expert=expert)
        if all(v == 1 for v in sizes.values()):
            sizes["data"] = -1
        return sharding_lib.make_mesh(**sizes, devices=devs)

    def mesh_from_config(self, spec):
        """The mesh of a config's `mesh:` section on this target ({} = every device on data)."""
        return sharding_lib.mesh_from_config(spec, devices=self.devices())


TARGETS = {
    t.name: t
    for t in [
        Target(
            "tpu-v4-8", "tpu", "v4:2x2x1", 8, 16 * GIB, "TPU v4-8: 4 chips of 32 GiB, each TensorCore a device (16 GiB)"
        ),
        Target("tpu-v5e-8", "tpu", "v5e:2x4", 8, 16 * GIB, "TPU v5e-8 (v5 lite): 8 chips of 16 GiB"),
        Target("tpu-v5p-8", "tpu", "v5p:2x2x1", 4, 95 * GIB, "TPU v5p-8: 4 chips of 95 GiB"),
        Target("tpu-v6e-8", "tpu", "v6e:2x4", 8, 32 * GIB, "TPU v6e-8 (Trillium): 8 chips of 32 GiB"),
        Target("tpu-v6e-1", "tpu", "v6e:1x1", 1, 32 * GIB, "one TPU v6e chip (32 GiB)", single_chip=True),
        Target("h100", "gpu", "1x1x1", 1, 84942979072, "one NVIDIA H100 SXM 80 GB"),
        Target("h100x8", "gpu", "1x1x8", 8, 84942979072, "eight NVIDIA H100 SXM 80 GB (one host)"),
    ]
}


class TargetUnavailable(RuntimeError):
    """The compilers for a target are not installed (the `aot` extra)."""


def get(name: str) -> Target:
    if isinstance(name, Target):
        return name
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {sorted(TARGETS)}")
    return TARGETS[name]


def _quiet_tpu_env():
    # libtpu otherwise asks the (absent) GCE metadata server; it also takes a machine-wide lock
    # that a second process (a parallel test worker) would fail on.
    for k, v in {
        "TPU_SKIP_MDS_QUERY": "1",
        "TPU_WORKER_HOSTNAMES": "localhost",
        "TPU_WORKER_ID": "0",
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    }.items():
        os.environ.setdefault(k, v)


@functools.cache
def _devices(name: str) -> tuple:
    t = get(name)
    from jax.experimental import topologies

    try:
        if t.platform == "tpu":
            _quiet_tpu_env()
            import libtpu  # noqa: F401  (the compiler; the aot extra)

            kw = {"chips_per_host_bounds": (1, 1, 1)} if t.single_chip else {}
            devs = topologies.get_topology_desc(topology_name=t.topology, platform="tpu", **kw).devices
        else:
            import jax_plugins.xla_cuda12  # noqa: F401  (the CUDA PJRT plugin; the aot extra)

            devs = topologies.get_topology_desc("h100", "cuda", target_config=_H100_CONFIG, topology=t.topology).devices
    except ImportError as e:
        raise TargetUnavailable(
            f"target {name} needs the compile-only toolchain: pip install -e '.[aot]' ({e.name} missing)"
        ) from None
    except NotImplementedError:  # the cuda plugin failed to start as a backend (no CUDA driver here)
        raise TargetUnavailable(
            f"target {name}: the CUDA plugin could not start on this host; compile with JAX_PLATFORMS=cpu "
            f"(the compile-only devices need no driver)"
        ) from None
    if len(devs) != t.num_devices:
        raise RuntimeError(
            f"target {name}: the {t.topology} topology has {len(devs)} devices, expected {t.num_devices}"
        )
    return tuple(devs)


def available(name: str) -> bool:
    try:
        _devices(name)
        return True
    except TargetUnavailable:
        return False


def platform_of(devices) -> str:
    """ "cpu" | "gpu" | "tpu" for a set of devices (a mesh's, or an array's)."""
    platforms = {d.platform for d in devices}
    if len(platforms) != 1:
        raise ValueError(f"devices of several platforms: {sorted(platforms)}")
    p = platforms.pop()
    return {"cuda": "gpu", "rocm": "gpu"}.get(p, p)


__all__ = ["Target", "TARGETS", "TargetUnavailable", "get", "available", "platform_of"]
