"""Official checkpoints <-> `GptOss`, as a table of conversion rules.

Two on-disk layouts are read, detected from the files themselves:
- `hf`: the HF hub layout (`model-*.safetensors` + `model.safetensors.index.json`, or one
  `model.safetensors`), with MXFP4 experts (`*_blocks` / `*_scales`) or the bf16 dequantized
  variant (`gate_up_proj` [E, D, 2F], `down_proj` [E, F, D]);
- `original`: OpenAI's `original/` folder (fused `qkv`, `mlp1_weight.blocks`, ...).

Each rule names one model variable, the checkpoint tensor(s) it comes from and the transform
(a reshape/transpose into the layout the matmul consumes). Loading walks the abstract model, so
every variable must be produced by exactly one rule (nothing stays at random init), every
checkpoint tensor must be consumed (unknown keys are errors), and shapes and dtypes are checked
against the declaration. Tensors are memory-mapped and converted one at a time: host memory holds
one tensor beyond the model itself.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from gptoss_jax import atomic, hub, mxfp4
from gptoss_jax import sharding as sharding_lib
from gptoss_jax.config import ModelConfig
from gptoss_jax.errors import CheckpointError
from gptoss_jax.model import EXPERT_FORMATS, GptOss, KernelOptions, PackedWeight, abstract
from gptoss_jax.safetensors_io import SafetensorsError, open_all, save_file


class _Dim(int):
    """A tensor dimension computed from config.json values, remembering how (`text`) and from
    which keys (`keys`: name -> value), so a shape error can say which config entry disagrees."""

    def __new__(cls, value: int, text: str, keys: dict | None = None):
        self = super().__new__(cls, value)
        self.text, self.keys = text, dict(keys or {})
        return self

    def _op(self, other, value: int, fmt: str) -> _Dim:
        return _Dim(value, fmt.format(self.text, _dim_text(other)), {**self.keys, **getattr(other, "keys", {})})

    def __mul__(self, other):
        return self._op(other, int(self) * int(other), "{}*{}")

    def __rmul__(self, other):
        return self._op(other, int(other) * int(self), "{1}*{0}")

    def __add__(self, other):
        return self._op(other, int(self) + int(other), "({}+{})")

    def __floordiv__(self, other):
        return self._op(other, int(self) // int(other), "{}/{}")


def _dim_text(d) -> str:
    return d.text if isinstance(d, _Dim) else str(int(d))


@dataclasses.dataclass(frozen=True)
class _ConfigDims:
    V: _Dim
    D: _Dim
    N: _Dim
    K: _Dim
    H: _Dim
    E: _Dim
    F: _Dim


def _config_dims(cfg: ModelConfig, layout: str) -> _ConfigDims:
    """The config.json entries tensor shapes derive from, under the key names of `layout`."""

    def dim(value, key):
        return _Dim(value, key, {key: value})

    return _ConfigDims(
        V=dim(cfg.vocab_size, "vocab_size"),
        D=dim(cfg.d_model, "hidden_size"),
        N=dim(cfg.num_heads, "num_attention_heads"),
        K=dim(cfg.num_kv_heads, "num_key_value_heads"),
        H=dim(cfg.head_dim, "head_dim"),
        E=dim(cfg.num_experts, "num_experts" if layout == "original" else "num_local_experts"),
        F=dim(cfg.expert_dim, "intermediate_size"),
    )


FLOAT, E2M1, E8M0 = "float", "e2m1", "e8m0"  # what a checkpoint tensor holds: floats, MXFP4 blocks, scales


@dataclasses.dataclass(frozen=True)
class Expect:
    """What one checkpoint tensor must look like on disk, before any transform: its shape (in
    `_Dim`s where config.json decides it) and what it holds (FLOAT, or E2M1 / E8M0 bytes)."""

    shape: tuple
    kind: str = FLOAT


def _floats(*shape) -> tuple[Expect]:
    return (Expect(tuple(shape)),)


@dataclasses.dataclass(frozen=True)
class Rule:
    path: tuple  # model variable path, e.g. ("layers", 3, "attn", "q")
    keys: tuple[str, ...]  # checkpoint tensors read
    load: Callable[..., np.ndarray]  # tensors -> variable value (numpy)
    save: Callable[[np.ndarray], np.ndarray] | None = None  # variable value -> the single tensor
    expect: tuple[Expect, ...] = ()  # per key: its on-disk shape and content, checked before `load`


def _heads_in(n, h):  # [n*h, D] -> [D, n, h]
    return lambda w: w.reshape(n, h, -1).transpose(2, 0, 1)


def _heads_out(w):  # [D, n, h] -> [n*h, D]
    return w.transpose(1, 2, 0).reshape(-1, w.shape[0])


def _same(x):
    return x


def _rows(a, b, fn=_same):
    return lambda w: fn(w[a:b])


def hf_rules(cfg: ModelConfig, experts: str, packed_on_disk: bool) -> list[Rule]:
    N, K, H, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
    d = _config_dims(cfg, "hf")
    rules = [
        Rule(("embed",), ("model.embed_tokens.weight",), _same, _same, _floats(d.V, d.D)),
        Rule(("norm",), ("model.norm.weight",), _same, _same, _floats(d.D)),
        Rule(("unembed",), ("lm_head.weight",), _same, _same, _floats(d.V, d.D)),
    ]
    for n in range(cfg.num_layers):
        p, a, m = f"model.layers.{n}.", ("layers", n, "attn"), ("layers", n, "mlp")
        sa = p + "self_attn."
        rules += [
            Rule(a + ("norm",), (p + "input_layernorm.weight",), _same, _same, _floats(d.D)),
            Rule(a + ("q",), (sa + "q_proj.weight",), _heads_in(N, H), _heads_out, _floats(d.N * d.H, d.D)),
            Rule(
                a + ("q_bias",),
                (sa + "q_proj.bias",),
                lambda b: b.reshape(N, H),
                lambda b: b.reshape(-1),
                _floats(d.N * d.H),
            ),
            Rule(a + ("k",), (sa + "k_proj.weight",), _heads_in(K, H), _heads_out, _floats(d.K * d.H, d.D)),
            Rule(
                a + ("k_bias",),
                (sa + "k_proj.bias",),
                lambda b: b.reshape(K, H),
                lambda b: b.reshape(-1),
                _floats(d.K * d.H),
            ),
            Rule(a + ("v",), (sa + "v_proj.weight",), _heads_in(K, H), _heads_out, _floats(d.K * d.H, d.D)),
            Rule(
                a + ("v_bias",),
                (sa + "v_proj.bias",),
                lambda b: b.reshape(K, H),
                lambda b: b.reshape(-1),
                _floats(d.K * d.H),
            ),
            # o_proj [D, N*H] -> [N, H, D]
            Rule(
                a + ("o",),
                (sa + "o_proj.weight",),
                lambda w: w.T.reshape(N, H, D),
                lambda w: w.reshape(N * H, D).T,
                _floats(d.D, d.N * d.H),
            ),
            Rule(a + ("o_bias",), (sa + "o_proj.bias",), _same, _same, _floats(d.D)),
            Rule(a + ("sinks",), (sa + "sinks",), _same, _same, _floats(d.N)),
            Rule(m + ("norm",), (p + "post_attention_layernorm.weight",), _same, _same, _floats(d.D)),
            Rule(m + ("router",), (p + "mlp.router.weight",), lambda w: w.T, lambda w: w.T, _floats(d.E, d.D)),
            Rule(m + ("router_bias",), (p + "mlp.router.bias",), _same, _same, _floats(d.E)),
            Rule(m + ("b1",), (p + "mlp.experts.gate_up_proj_bias",), _same, _same, _floats(d.E, 2 * d.F)),
            Rule(m + ("b2",), (p + "mlp.experts.down_proj_bias",), _same, _same, _floats(d.E, d.D)),
        ]
        ex = p + "mlp.experts."
        rules += _expert_rules(
            m,
            experts,
            packed_on_disk,
            d,
            packed=(
                (ex + "gate_up_proj_blocks", ex + "gate_up_proj_scales"),
                (ex + "down_proj_blocks", ex + "down_proj_scales"),
            ),
            dense=(ex + "gate_up_proj", ex + "down_proj"),
        )
    return rules


def original_rules(cfg: ModelConfig, experts: str) -> list[Rule]:
    N, K, H, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
    q_end, k_end = N * H, (N + K) * H
    d = _config_dims(cfg, "original")
    qkv = (d.N + 2 * d.K) * d.H
    rules = [
        Rule(("embed",), ("embedding.weight",), _same, expect=_floats(d.V, d.D)),
        Rule(("norm",), ("norm.scale",), _same, expect=_floats(d.D)),
        Rule(("unembed",), ("unembedding.weight",), _same, expect=_floats(d.V, d.D)),
    ]
    for n in range(cfg.num_layers):
        b, a, m = f"block.{n}.", ("layers", n, "attn"), ("layers", n, "mlp")
        qkv_w, qkv_b = b + "attn.qkv.weight", b + "attn.qkv.bias"
        rules += [
            Rule(a + ("norm",), (b + "attn.norm.scale",), _same, expect=_floats(d.D)),
            Rule(a + ("q",), (qkv_w,), _rows(0, q_end, _heads_in(N, H)), expect=_floats(qkv, d.D)),
            Rule(a + ("q_bias",), (qkv_b,), _rows(0, q_end, lambda x: x.reshape(N, H)), expect=_floats(qkv)),
            Rule(a + ("k",), (qkv_w,), _rows(q_end, k_end, _heads_in(K, H)), expect=_floats(qkv, d.D)),
            Rule(a + ("k_bias",), (qkv_b,), _rows(q_end, k_end, lambda x: x.reshape(K, H)), expect=_floats(qkv)),
            Rule(a + ("v",), (qkv_w,), _rows(k_end, k_end + K * H, _heads_in(K, H)), expect=_floats(qkv, d.D)),
            Rule(
                a + ("v_bias",), (qkv_b,), _rows(k_end, k_end + K * H, lambda x: x.reshape(K, H)), expect=_floats(qkv)
            ),
            Rule(a + ("o",), (b + "attn.out.weight",), lambda w: w.T.reshape(N, H, D), expect=_floats(d.D, d.N * d.H)),
            Rule(a + ("o_bias",), (b + "attn.out.bias",), _same, expect=_floats(d.D)),
            Rule(a + ("sinks",), (b + "attn.sinks",), _same, expect=_floats(d.N)),
            Rule(m + ("norm",), (b + "mlp.norm.scale",), _same, expect=_floats(d.D)),
            Rule(m + ("router",), (b + "mlp.gate.weight",), lambda w: w.T, expect=_floats(d.E, d.D)),
            Rule(m + ("router_bias",), (b + "mlp.gate.bias",), _same, expect=_floats(d.E)),
            Rule(m + ("b1",), (b + "mlp.mlp1_bias",), _same, expect=_floats(d.E, 2 * d.F)),
            Rule(m + ("b2",), (b + "mlp.mlp2_bias",), _same, expect=_floats(d.E, d.D)),
        ]
        rules += _expert_rules(
            m,
            experts,
            True,
            d,
            packed=(
                (b + "mlp.mlp1_weight.blocks", b + "mlp.mlp1_weight.scales"),
                (b + "mlp.mlp2_weight.blocks", b + "mlp.mlp2_weight.scales"),
            ),
            dense=None,
        )
    return rules


NATIVE_FORMAT_KEY = "gptoss_jax_format"


def native_rules(state, cfg: ModelConfig | None = None) -> list[Rule]:
    """This package's own layout: one tensor per variable, named by its path, stored in the layout
    and dtype the model uses, so loading is a memory map and a device transfer. With `cfg`, expected
    shapes say which config.json entries they come from."""
    named = _native_shapes(cfg) if cfg is not None else {}
    rules = []
    for p, var in nnx.to_flat_state(state):
        shape = tuple(var.get_value().shape)
        spec = named.get(p[-1])
        if spec is None or tuple(map(int, spec)) != shape:
            spec = shape
        kind = FLOAT
        if isinstance(var, PackedWeight):
            kind = E8M0 if str(p[-1]).endswith("_scales") else E2M1
        rules.append(Rule(p, (".".join(map(str, p)),), _same, _same, (Expect(spec, kind),)))
    return rules


def _native_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    d = _config_dims(cfg, "native")
    D, N, K, H, E, F, B = d.D, d.N, d.K, d.H, d.E, d.F, mxfp4.BLOCK
    return {
        "embed": (d.V, D),
        "unembed": (d.V, D),
        "norm": (D,),
        "q": (D, N, H),
        "q_bias": (N, H),
        "k": (D, K, H),
        "k_bias": (K, H),
        "v": (D, K, H),
        "v_bias": (K, H),
        "o": (N, H, D),
        "o_bias": (D,),
        "sinks": (N,),
        "router": (D, E),
        "router_bias": (E,),
        "b1": (E, 2 * F),
        "b2": (E, D),
        "w1": (E, D, 2 * F),
        "w2": (E, F, D),
        "w1_blocks": (E, 2 * F, D // B, B // 2),
        "w1_scales": (E, 2 * F, D // B),
        "w2_blocks": (E, D, F // B, B // 2),
        "w2_scales": (E, D, F // B),
    }


def _expert_rules(m, experts, packed_on_disk, d: _ConfigDims, *, packed, dense) -> list[Rule]:
    (w1b, w1s), (w2b, w2s) = packed
    B = mxfp4.BLOCK
    # on disk [E, out, in] as blocks [E, out, in/32, 16] and scales [E, out, in/32]
    w1_packed = (Expect((d.E, 2 * d.F, d.D // B, B // 2), E2M1), Expect((d.E, 2 * d.F, d.D // B), E8M0))
    w2_packed = (Expect((d.E, d.D, d.F // B, B // 2), E2M1), Expect((d.E, d.D, d.F // B), E8M0))
    if packed_on_disk and experts == "mxfp4":  # bytes copied as they are
        return [
            Rule(m + ("w1_blocks",), (w1b,), _same, _same, w1_packed[:1]),
            Rule(m + ("w1_scales",), (w1s,), _same, _same, w1_packed[1:]),
            Rule(m + ("w2_blocks",), (w2b,), _same, _same, w2_packed[:1]),
            Rule(m + ("w2_scales",), (w2s,), _same, _same, w2_packed[1:]),
        ]
    if packed_on_disk:  # explicit dequantize-on-load: [E, out, in] -> [E, in, out]
        return [
            Rule(m + ("w1",), (w1b, w1s), _dequantized, expect=w1_packed),
            Rule(m + ("w2",), (w2b, w2s), _dequantized, expect=w2_packed),
        ]
    if experts == "mxfp4":
        raise CheckpointError(
            "this checkpoint stores dense (dequantized) experts; load it with "
            "experts='dense' (quantizing on load would silently change the weights)"
        )
    return [
        Rule(m + ("w1",), (dense[0],), _same, _same, _floats(d.E, d.D, 2 * d.F)),
        Rule(m + ("w2",), (dense[1],), _same, _same, _floats(d.E, d.F, d.D)),
    ]


class _DecodeOverflow(ValueError):
    """A dequantized MXFP4 value beyond the float32 range (scale bytes 253 and 254 can do that)."""

    def __init__(self, index, value, scale):
        super().__init__(index, value, scale)
        self.index, self.value, self.scale = index, value, scale


def _dequantized(blocks, scales):
    """MXFP4 [E, out, in] -> float32 [E, in, out]; refuses values that overflow float32."""
    with np.errstate(over="ignore"):
        w = mxfp4.dequantize_np(blocks, scales)
    bad = _first_nonfinite(w)
    if bad is not None:
        e, r, c = (int(i) for i in np.unravel_index(bad, w.shape))
        raise _DecodeOverflow([e, r, c], float(w[e, r, c]), int(scales[e, r, c // mxfp4.BLOCK]))
    return w.transpose(0, 2, 1)


# ------------------------------------------------------------------------------------ discovery
@dataclasses.dataclass(frozen=True)
class CheckpointFiles:
    layout: str  # "hf", "original" or "native"
    root: str  # folder holding config.json and the tensors
    files: tuple[str, ...]


def resolve_checkpoint(path_or_id: str | os.PathLike) -> str:
    """A checkpoint folder for a local path or a hub id (HF layout downloaded when not cached;
    a cached `original/`-only snapshot is used as it is)."""
    return hub.resolve(
        path_or_id,
        usable=_has_checkpoint,
        patterns=hub.HF_LAYOUT_PATTERNS,
        ignore=hub.ORIGINAL_LAYOUT_PATTERNS + ("metal/*",),
        what="checkpoint",
    )


def _has_checkpoint(folder: str) -> bool:
    try:
        find_checkpoint(folder)
    except CheckpointError:
        return False
    return True


def find_checkpoint(path: str | os.PathLike) -> CheckpointFiles:
    """Resolve a directory to its layout and tensor files. The HF layout wins when a folder holds
    both (the hub repo root has `original/` beside its own files). A hub id ("openai/gpt-oss-20b")
    that is not a local path resolves to its Hugging Face cache snapshot, downloaded when missing
    (see `gptoss_jax.hub`)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        path = resolve_checkpoint(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    for root in (path, os.path.join(path, "original")):
        cfg_file = os.path.join(root, "config.json")
        if not os.path.isfile(cfg_file):
            continue
        with open(cfg_file) as f:
            try:
                cfg_json = json.load(f)
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
        layout = "native" if NATIVE_FORMAT_KEY in cfg_json else "hf" if "model_type" in cfg_json else "original"
        index = os.path.join(root, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{index} is not a safetensors index ({e})") from None
            files = sorted({os.path.join(root, v) for v in weight_map.values()})
            for fp in files:
                if not os.path.isfile(fp):
                    raise CheckpointError(f"{index} lists {os.path.basename(fp)}, which is missing from {root}")
        else:
            files = sorted(glob.glob(os.path.join(root, "*.safetensors")))
        if not files:
            raise CheckpointError(f"{root} has config.json but no *.safetensors files")
        return CheckpointFiles(layout, root, tuple(files))
    raise CheckpointError(f"{path} holds neither config.json nor original/config.json")


# ---------------------------------------------------------------------------------------- load
def _target_dtype(var, dtype):
    if isinstance(var, PackedWeight):
        return np.dtype(np.uint8)
    if var.get_value().dtype == jnp.float32:  # norms and sinks are kept in fp32 whatever `dtype`
        return np.dtype(np.float32)
    return np.dtype(dtype)


def load(
    path: str | os.PathLike,
    *,
    dtype="bfloat16",
    experts: str | None = None,
    mesh=None,
    kernel: KernelOptions | None = None,
    progress: bool = False,
) -> GptOss:
    """Build a `GptOss` from a checkpoint directory (HF hub layout or `original/`).

    experts: "mxfp4" keeps packed experts packed (default when the checkpoint is packed), "dense"
    dequantizes them on load (explicit; 4x the memory); dense checkpoints load as "dense".
    mesh: place each weight with the sharding its logical axes give on this mesh (see
        `gptoss_jax.make_mesh`); the model then runs its MoE layers expert-parallel on it.

    Refused with a `CheckpointError` naming the tensor and its file: a tensor whose stored shape or
    dtype differs from what its rule expects (checked from the headers, before reading any data;
    the config.json entries a shape derives from are named), a NaN or inf float, an E8M0 scale byte
    255 (NaN in OCP MX), and, with experts='dense', an MXFP4 value beyond the float32 range."""
    ck = find_checkpoint(path)
    cfg = ModelConfig.from_pretrained(ck.root)
    try:
        _, where = open_all(ck.files)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    if ck.layout == "hf":
        packed_on_disk = any(k.endswith("gate_up_proj_blocks") for k in where)
    elif ck.layout == "native":
        packed_on_disk = any(k.endswith("w1_blocks") for k in where)
    else:
        packed_on_disk = True
    stored = "mxfp4" if packed_on_disk else "dense"
    experts = experts or stored
    if experts not in EXPERT_FORMATS:
        raise ValueError(f"experts must be one of {EXPERT_FORMATS}, got {experts!r}")
    if ck.layout == "native" and experts != stored:
        raise CheckpointError(
            f"{ck.root} stores {stored} experts; the native layout loads them as stored "
            "(convert through the HF layout to change the expert format)"
        )
    dtype = jnp.dtype(dtype)
    model = abstract(cfg, dtype=dtype, experts=experts)
    graphdef, state = nnx.split(model)
    if ck.layout == "hf":
        rules = hf_rules(cfg, experts, packed_on_disk)
    elif ck.layout == "native":
        rules = native_rules(state, cfg)
    else:
        rules = original_rules(cfg, experts)
    flat = dict(nnx.to_flat_state(state))
    by_path = {r.path: r for r in rules}

    missing_vars = [p for p in flat if p not in by_path]
    if missing_vars:  # a bug in the table, not in the checkpoint
        raise CheckpointError(f"no conversion rule for model variables {missing_vars[:5]}")
    needed = {k for r in rules for k in r.keys}
    missing = sorted(needed - set(where))
    if missing:
        raise CheckpointError(
            f"{ck.root}: missing tensor(s) {missing[:8]}"
            + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        )
    unknown = sorted(set(where) - needed)
    if unknown:
        raise CheckpointError(
            f"{ck.root}: unknown tensor(s) {unknown[:8]}"
            + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
            + f" for a {ck.layout} gpt-oss checkpoint of this config"
        )
    expected = _expected_tensors(rules)
    _check_headers(expected, where)  # shapes and dtypes from the headers: before reading any data

    shardings = None
    if mesh is not None:
        shardings = sharding_lib.variable_shardings(state, mesh)
    items = sorted(flat.items(), key=lambda kv: str(kv[0]))
    it = _progress(items, "loading", progress)
    checked = set()
    for p, var in it:
        rule = by_path[p]
        tensors = []
        for key in rule.keys:
            arr = where[key].get(key)
            if key not in checked:  # once per tensor, though a fused qkv feeds three variables
                _check_values(key, where[key].path, arr, expected[key][0].kind)
                checked.add(key)
            tensors.append(arr)
        try:
            value = rule.load(*tensors)
        except _DecodeOverflow as e:
            blocks, scales = rule.keys
            raise CheckpointError(
                f"tensor {blocks} (in {os.path.basename(where[blocks].path)}) decodes to {e.value} at "
                f"[expert, out, in] {e.index} (scale byte {e.scale} in {scales}): beyond the float32 range, "
                "so it cannot be dequantized; the scales are likely corrupt (re-download the checkpoint)"
            ) from None
        want = tuple(var.get_value().shape)
        if tuple(value.shape) != want:
            shapes = ", ".join(f"{k} {list(where[k].shape(k))}" for k in rule.keys)
            raise CheckpointError(
                f"tensor {shapes} does not fit model variable {'.'.join(map(str, p))} of shape {list(want)}"
            )
        var.set_value(_place(value, _target_dtype(var, dtype), None if shardings is None else shardings[p]))
    model = nnx.merge(graphdef, state)
    model.kernel = kernel or KernelOptions()
    model.mesh = mesh
    return model


def _place(value, dtype: np.dtype, sharding):
    """A checkpoint tensor (usually a view of the memory-mapped file) -> a device array. On a mesh,
    each process reads and converts only the slices its own devices hold, so no host ever holds
    the whole model (nor, for views, even a whole tensor)."""
    if sharding is None:
        return jax.device_put(np.asarray(value).astype(dtype, copy=False))
    return jax.make_array_from_callback(
        tuple(value.shape), sharding, lambda index: np.ascontiguousarray(value[index], dtype=dtype)
    )


def _check_disk_dtype(key: str, dtype: np.dtype, kind: str) -> None:
    floats = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32))
    if kind != FLOAT and dtype != np.uint8:
        raise CheckpointError(f"tensor {key} must be stored as U8 (packed MXFP4), found {dtype}")
    if kind == FLOAT and dtype not in floats:
        raise CheckpointError(f"tensor {key} has dtype {dtype}; expected a float dtype (BF16, F16 or F32)")


def _expected_tensors(rules: Sequence[Rule]) -> dict[str, tuple[Expect, tuple]]:
    """checkpoint tensor -> (what it must look like on disk, the first model variable it feeds)."""
    out: dict[str, tuple[Expect, tuple]] = {}
    for r in rules:
        if len(r.expect) != len(r.keys):  # a bug in the table, not in the checkpoint
            raise CheckpointError(f"conversion rule for {r.path} does not describe its tensors {list(r.keys)}")
        for key, exp in zip(r.keys, r.expect):
            if key in out and out[key][0] != exp:
                raise CheckpointError(f"conversion rules disagree on the shape of tensor {key}")
            out.setdefault(key, (exp, r.path))
    return out


def _check_headers(expected: dict[str, tuple[Expect, tuple]], where) -> None:
    """Every tensor's stored dtype and shape against its rule, from the file headers alone; the
    first mismatch is the error (counting the others)."""
    wrong = []
    for key, (exp, _) in expected.items():
        f = where[key]
        _check_disk_dtype(key, f.dtype(key), exp.kind)
        if tuple(f.shape(key)) != tuple(int(x) for x in exp.shape):
            wrong.append(key)
    if not wrong:
        return
    key = wrong[0]
    exp, var_path = expected[key]
    found, want = tuple(where[key].shape(key)), [int(x) for x in exp.shape]
    msg = (
        f"tensor {key} {list(found)} does not fit model variable {'.'.join(map(str, var_path))} "
        f"(in {os.path.basename(where[key].path)}): expected shape {want}"
    )
    if any(isinstance(x, _Dim) for x in exp.shape):
        msg += f" = [{', '.join(_dim_text(x) for x in exp.shape)}]"
    if len(found) == len(want) and sorted(found) == sorted(want):
        msg += f"; its axes are in the wrong order (stored transposed?): store it as {want}"
    else:
        keys: dict = {}
        for i, x in enumerate(exp.shape):
            if len(found) != len(want) or found[i] != int(x):
                keys.update(getattr(x, "keys", {}))
        if keys:
            msg += (
                "; config.json has "
                + ", ".join(f"{k}={v}" for k, v in keys.items())
                + ", which does not match this tensor (a config.json of another model?)"
            )
    if len(wrong) > 1:
        msg += f"; {len(wrong) - 1} more tensor(s) do not fit either"
    raise CheckpointError(msg)


_CHUNK = 1 << 18  # elements per step of the value checks: stays in cache, no big temporaries
# a float dtype -> (unsigned int of its width, its exponent field): all ones means inf or NaN
_EXPONENT = {
    np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80),
    np.dtype(np.float16): (np.uint16, 0x7C00),
    np.dtype(np.float32): (np.uint32, 0x7F800000),
}


def _first_nonfinite(arr: np.ndarray) -> int | None:
    """Flat index of the first inf or NaN in a contiguous float array, or None: the exponent field
    is tested on the raw bits a chunk at a time, so the tensor is never copied or upcast."""
    uint, mask = _EXPONENT[arr.dtype]
    flat = arr.reshape(-1).view(uint)
    buf = np.empty(min(flat.size, _CHUNK), uint)
    for start in range(0, flat.size, _CHUNK):
        part = flat[start : start + _CHUNK]
        out = np.bitwise_and(part, mask, out=buf[: part.size])
        if out.max() == mask:
            return start + int(np.argmax(out == mask))
    return None


def _check_values(key: str, file: str, arr: np.ndarray, kind: str) -> None:
    """Refuse non-finite floats and E8M0 scale byte 255 (NaN in OCP MX), naming the first one."""
    if arr.size == 0 or kind == E2M1:  # every byte is a valid pair of E2M1 codes
        return
    where = f"tensor {key} (in {os.path.basename(file)})"
    if kind == E8M0:
        if int(arr.max()) != 255:
            return
        flat = arr.reshape(-1)
        idx = [int(i) for i in np.unravel_index(int(np.argmax(flat == 255)), arr.shape)]
        more = int(np.count_nonzero(flat == 255)) - 1
        raise CheckpointError(
            f"{where} holds scale byte 255 (NaN in the OCP MX E8M0 format) at index {idx} (expert {idx[0]})"
            + (f" and {more} more place(s)" if more else "")
            + ": expected bytes 0..254; the file is corrupt (re-download or re-export the checkpoint)"
        )
    first = _first_nonfinite(arr)
    if first is None:
        return
    idx = [int(i) for i in np.unravel_index(first, arr.shape)]
    uint, mask = _EXPONENT[arr.dtype]
    more = int(np.count_nonzero((arr.reshape(-1).view(uint) & mask) == mask)) - 1
    raise CheckpointError(
        f"{where} holds {float(arr.reshape(-1)[first])} at index {idx}"
        + (f" and {more} more non-finite value(s)" if more else "")
        + ": expected finite weights; the file is corrupt or was saved from a diverged model "
        "(re-download or re-export it)"
    )


def _progress(items: Sequence, desc: str, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="tensor")


# ---------------------------------------------------------------------------------------- save
# The hub's quantization_config of MXFP4 checkpoints: what stays unquantized (everything but the
# experts). Also for scripts and tests that write HF configs by hand.
MXFP4_MODULES_NOT_CONVERTED = ("model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head")


def save_hf(
    model: GptOss,
    path: str | os.PathLike,
    *,
    dtype="bfloat16",
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> None:
    """Write the HF hub layout (config.json, sharded safetensors + index). Packed experts are
    written as MXFP4 blocks/scales with the hub's quantization_config; dense ones as the
    dequantized variant. Floats are written in `dtype` (bf16, as the hub files).

    The folder is written whole or not at all (`gptoss_jax.atomic.folder`): into a temporary
    folder beside `path`, renamed to `path` once every file is complete and synced; a failure
    removes the temporary and leaves `path` as it was. A `path` that exists and is not empty is
    refused (FileExistsError) unless `overwrite`, which replaces its contents once the new ones
    are complete."""
    with atomic.folder(path, overwrite=overwrite) as tmp:
        _write_hf(model, tmp, dtype, max_shard_bytes)


def _write_hf(model: GptOss, path: str, dtype, max_shard_bytes: int) -> None:
    cfg = model.cfg
    experts = model.experts
    rules = {r.path: r for r in hf_rules(cfg, experts, packed_on_disk=experts == "mxfp4")}
    tensors: dict[str, np.ndarray] = {}
    for p, var in nnx.to_flat_state(nnx.state(model)):
        rule = rules[p]
        value = np.asarray(jax.device_get(var.get_value()))
        if not isinstance(var, PackedWeight):
            value = value.astype(np.dtype(jnp.dtype(dtype)))
        tensors[rule.keys[0]] = np.ascontiguousarray(rule.save(value))
    hf_cfg = cfg.to_hf_dict()
    hf_cfg["torch_dtype"] = str(jnp.dtype(dtype))
    if experts == "mxfp4":
        hf_cfg["quantization_config"] = {
            "quant_method": "mxfp4",
            "modules_to_not_convert": list(MXFP4_MODULES_NOT_CONVERTED),
        }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    _write_shards(tensors, path, max_shard_bytes)


def save_native(
    model: GptOss, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False
) -> None:
    """Write this package's own layout: variables as they are (same dtypes, same layouts), so
    `load` only memory-maps and transfers. config.json is the HF config plus a format marker.
    Written whole or not at all, and `overwrite` as in `save_hf`."""
    with atomic.folder(path, overwrite=overwrite) as tmp:
        _write_native(model, tmp, max_shard_bytes)


def _write_native(model: GptOss, path: str, max_shard_bytes: int) -> None:
    tensors = {
        ".".join(map(str, p)): np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(nnx.state(model))
    }
    cfg_json = dict(model.cfg.to_hf_dict(), **{NATIVE_FORMAT_KEY: 1, "experts": model.experts})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg_json, f, indent=2)
    _write_shards(tensors, path, max_shard_bytes)


def _write_shards(tensors: dict[str, np.ndarray], path: str, max_shard_bytes: int) -> None:
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensors[key]
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    if len(shards) > 1:
        total = sum(t.nbytes for t in tensors.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
