"""Communication of one MoE layer per token on named meshes, from the shapes (no devices needed).

    python scripts/comm_volume.py [--tokens-per-device 4096]

Prints a markdown table: bytes each device sends per local token for the dispatch and combine
all-to-alls (ragged: the real rows; all_to_all: padded buffers at a capacity factor), the
tensor-parallel all-reduce, and the per-step FSDP gather of the packed experts amortized over
the device's tokens. Uniform routing is assumed: (ep - 1) / ep of the rows leave the device."""

import argparse

import gptoss_jax as gj
from gptoss_jax.expert_parallel import communication_per_token, fsdp_gather_bytes

MESHES = {
    "20b": [
        ("8 GPUs, one host", dict(expert=8)),
        ("2 x 4", dict(data=2, expert=4)),
        ("fsdp 2 x tensor 2 x expert 2", dict(fsdp=2, tensor=2, expert=2)),
        ("TPU v5e-16", dict(fsdp=4, expert=4)),
    ],
    "120b": [
        ("8 GPUs, one host", dict(expert=8)),
        ("2 hosts x 8 GPUs", dict(fsdp=2, expert=8)),
        ("tensor 2 x expert 4", dict(tensor=2, expert=4)),
        ("TPU v4-128 (64 chips)", dict(fsdp=4, expert=16)),
    ],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens-per-device", type=int, default=4096)
    args = ap.parse_args()
    t = args.tokens_per_device
    print(
        f"bytes sent per device per local token, one MoE layer, bf16 activations; FSDP gather "
        f"amortized over {t} tokens per device per step\n"
    )
    print(
        "| model | mesh | ragged dispatch+combine | all_to_all cf=1.25 | all_to_all worst (C = t) "
        "| tensor psum | FSDP gather / token | total (ragged) | all layers, ragged |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, preset in (("20b", gj.gpt_oss_20b), ("120b", gj.gpt_oss_120b)):
        cfg = preset()
        worst = cfg.num_experts / cfg.experts_per_token
        for label, shape in MESHES[name]:
            rag = communication_per_token(cfg, shape)
            a2a = communication_per_token(cfg, shape, dispatch="all_to_all", capacity_factor=1.25)
            bad = communication_per_token(cfg, shape, dispatch="all_to_all", capacity_factor=worst)
            gather = fsdp_gather_bytes(cfg, shape) / t
            total = rag["total"] + gather
            spec = " x ".join(f"{a}={n}" for a, n in shape.items())
            print(
                f"| {name} | {label} ({spec}) | {rag['dispatch'] + rag['combine']:,.0f} "
                f"| {a2a['dispatch'] + a2a['combine']:,.0f} | {bad['dispatch'] + bad['combine']:,.0f} "
                f"| {rag['tensor_psum']:,.0f} | {gather:,.0f} | {total:,.0f} "
                f"| {total * cfg.num_layers / 2**20:,.2f} MiB |"
            )


if __name__ == "__main__":
    main()
