"""Matrix-vector products for decoding on a CPU, and a prefill's MoE grouped matmul and
self-attention: native kernels (`native/matvec.cc`, XLA FFI custom calls); the products read each
weight once in its stored format.

A decode step multiplies a few rows by large matrices, so its cost is the bytes of the weights.
XLA:CPU's own code for that shape converts a bf16 matrix to an fp32 copy before multiplying, and
decodes packed MXFP4 experts with scalar-ish integer arithmetic; measured on gpt-oss-20b's shapes
these kernels are several times faster (`experiments/2026-12-06-cpu-matvec/`).

- `matvec(x, w, ids, out_in=...)`: y[r] = x[r] @ W[ids[r]] for a stack W [E, I, O] (or [E, O, I]
  with `out_in=True`, each row of W one output), bf16 or fp32; `ids=None` means one matrix.
- `mxfp4_matvec(x, t, ids)`: the same for packed MXFP4 matrices (`mxfp4.MXFP4`, logical
  [E, O, I]), the codes decoded by byte lookups.
- `grouped_matmul(x, w, starts, sizes)`: each expert's rows through its matrix (a prefill's
  sorted MoE rows), bf16 or fp32, forward only.
- `decode_attention(q, k, v, sinks, k_pos, q_pos, window=...)`: one new query per row against
  the KV cache (a decode step's attention with sinks), reading the cache once for the query
  heads that share a KV head; fp32 products, sums and softmax.
- `prefill_attention(q, k, v, sinks, positions, segment_ids, window=...)`: an uncached forward's
  self-attention (`attention.self_attention`'s contract) as one flash-attention loop that visits
  only the key blocks a token may see (AVX-512F, `has_prefill_attention()`).

Where the CPU has AVX512-BF16 and every input is a bf16 value (a bf16 model's activations), bf16
weights and decoded MXFP4 codes meet the inputs in VDPBF16PS (exact products, fp32 sums);
otherwise fp32 FMAs (AVX2 / AVX-512) or plain C++. All return fp32 [R, O], with fp32 products
and sums (only the summation order differs from `jnp.einsum(..., preferred_element_type=float32)`
over the fp32 values); rows that chose the same matrix share one pass over it. Gradients of
`matvec` / `mxfp4_matvec` (a custom VJP written with jnp) reach x and dense W, never packed
blocks.

The library is compiled on first use with the system's C++ compiler (`$CXX`, else `g++` / `c++`)
for this machine (`-march=native`) and cached under `$GPTOSS_JAX_CACHE` (default
`~/.cache/gptoss_jax`), keyed by the source, the flags, the compiler, jaxlib and the CPU's model
and feature flags. `available()`
says whether it can be used here (x86-64 or aarch64 Linux/macOS, a compiler that builds it);
when it cannot, the model's plan keeps XLA's code and `unavailable_reason()` says why. The
targets are registered for the CPU platform only; the plan uses them only in programs built for
the CPU. `GPTOSS_NATIVE=0` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.attention import attention_reference, self_attention
from gptoss_jax.mxfp4 import MXFP4

SOURCE = Path(__file__).parent / "native" / "matvec.cc"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_TARGETS = {
    "gptoss_matvec": "GptossMatvec",
    "gptoss_mxfp4_matvec": "GptossMxfp4Matvec",
    "gptoss_grouped_matmul": "GptossGroupedMatmul",
    "gptoss_decode_attention": "GptossDecodeAttention",
}
# Built only where the CPU has their instructions (AVX-512F): registered when present.
_OPTIONAL_TARGETS = {"gptoss_prefill_attention": "GptossPrefillAttention"}


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be built or used here; the message says why."""


def cache_dir() -> Path:
    return Path(os.environ.get("GPTOSS_JAX_CACHE") or Path.home() / ".cache" / "gptoss_jax") / "native"


def _compiler() -> str:
    for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return c
    raise NativeUnavailable("no C++ compiler found ($CXX, g++, c++, clang++)")


def _version(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0] if out else cxx


def _cpu_signature() -> str:
    """The CPU's model and feature flags: `-march=native` code built for one CPU may not run on
    another (a home directory shared by a cluster's nodes), so they are part of the cache key."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        import platform

        return f"{platform.machine()} {platform.processor()}"


def build(*, force: bool = False) -> Path:
    """Compile the library (once per source, flags, compiler, jaxlib and CPU; atomic, safe across
    processes) and return its path."""
    import jaxlib

    cxx = _compiler()
    parts = [SOURCE.read_bytes(), " ".join(FLAGS).encode(), _version(cxx).encode(), jaxlib.__version__.encode()]
    key = hashlib.sha256(b"\0".join([*parts, _cpu_signature().encode()])).hexdigest()[:16]
    out = cache_dir() / f"matvec-{key}.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(tmp_out)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise NativeUnavailable(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{res.stderr[-2000:]}")
        os.replace(tmp_out, out)
    return out


_LIB: list = []


@functools.cache
def _load() -> str | None:
    """Build, load and register the kernels; None when that worked, else the reason."""
    if os.environ.get("GPTOSS_NATIVE", "1") == "0":
        return "turned off by GPTOSS_NATIVE=0"
    if os.uname().sysname not in ("Linux", "Darwin") or os.uname().machine not in ("x86_64", "aarch64", "arm64"):
        return f"not built for {os.uname().sysname} {os.uname().machine}"
    try:
        lib = ctypes.CDLL(str(build()))
        for name, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        for name, symbol in _OPTIONAL_TARGETS.items():
            if hasattr(lib, symbol):
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (NativeUnavailable, OSError, AttributeError) as e:
        return str(e)
    _LIB.append(lib)
    return None


def has_grouped_f32() -> bool:
    """Whether `grouped_matmul` takes fp32 (built with AVX-512F)."""
    return available() and bool(_LIB[0].GptossHasGroupedF32())


def has_shared_rows() -> bool:
    """Whether dense `[in, out]` products with fp32 inputs share each load of the weights among
    the rows that chose a matrix (built with AVX-512F/BW/VL; without, each row makes its own pass)."""
    return available() and bool(_LIB[0].GptossHasSharedRows())


def has_prefill_attention() -> bool:
    """Whether `prefill_attention` is built (AVX-512F): its handler is in the library."""
    return available() and hasattr(_LIB[0], _OPTIONAL_TARGETS["gptoss_prefill_attention"])


def has_bf16_dot() -> bool:
    """Whether the MXFP4 kernel has its AVX512-BF16 path (used when the inputs are bf16 values)."""
    return available() and bool(_LIB[0].GptossHasBf16Dot())


def available() -> bool:
    """True when the kernels are built and registered (for the CPU platform: the plan uses them
    only for programs built for the CPU)."""
    return _load() is None


def unavailable_reason() -> str | None:
    return _load()


def require():
    reason = unavailable_reason()
    if reason is not None:
        raise NativeUnavailable(f"native CPU kernels unavailable: {reason}")


def _ids(ids, R: int):
    return jnp.zeros((R,), jnp.int32) if ids is None else jnp.asarray(ids).astype(jnp.int32).reshape(R)


# ----------------------------------------------------------------------------- dense matrices
def matvec(x, w, ids=None, *, out_in: bool = False) -> jax.Array:
    """x [R, I] @ W[ids[r]]: w [E, I, O] ([E, O, I] with `out_in`), or one matrix [I, O] / [O, I]
    with `ids=None`; bf16 or fp32 weights. -> fp32 [R, O]."""
    require()
    if w.ndim == 2:
        if ids is not None:
            raise ValueError("matvec: ids given for a single matrix")
        w = w[None]
    R, I = x.shape
    E, a, b = w.shape
    if (b if out_in else a) != I:
        raise ValueError(f"matvec: x {tuple(x.shape)} does not fit w {tuple(w.shape)} (out_in={out_in})")
    if w.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"matvec: weights must be bf16 or fp32, got {w.dtype}")
    return _matvec(x, w, _ids(ids, R), out_in)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _matvec(x, w, ids, out_in):
    O = w.shape[1] if out_in else w.shape[2]
    call = jax.ffi.ffi_call(
        "gptoss_matvec", jax.ShapeDtypeStruct((x.shape[0], O), jnp.float32), vmap_method="sequential"
    )
    return call(x.astype(jnp.float32), w, ids, out_in=out_in)


def _matvec_fwd(x, w, ids, out_in):
    return _matvec(x, w, ids, out_in), (x, w, ids)


def _matvec_bwd(out_in, res, dy):
    x, w, ids = res
    wr = w[ids].astype(jnp.float32)  # [R, ., .]
    if out_in:  # y[r, o] = sum_i x[r, i] w[o, i]
        dx = jnp.einsum("RO,ROI->RI", dy, wr)
        dw_rows = jnp.einsum("RO,RI->ROI", dy, x.astype(jnp.float32))
    else:
        dx = jnp.einsum("RO,RIO->RI", dy, wr)
        dw_rows = jnp.einsum("RO,RI->RIO", dy, x.astype(jnp.float32))
    dw = jnp.zeros(w.shape, jnp.float32).at[ids].add(dw_rows).astype(w.dtype)
    return dx.astype(x.dtype), dw, np.zeros(ids.shape, jax.dtypes.float0)


_matvec.defvjp(_matvec_fwd, _matvec_bwd)


# ------------------------------------------------------------------------------ packed MXFP4
def mxfp4_matvec(x, t: MXFP4, ids=None) -> jax.Array:
    """x [R, I] @ W[ids[r]]^T for packed matrices t (logical [E, O, I], or [O, I] with
    `ids=None`), decoded in registers. -> fp32 [R, O]."""
    require()
    blocks, scales = jnp.asarray(t.blocks), jnp.asarray(t.scales)
    if blocks.ndim == 3:
        if ids is not None:
            raise ValueError("mxfp4_matvec: ids given for a single matrix")
        blocks, scales = blocks[None], scales[None]
    R, I = x.shape
    if blocks.ndim != 4 or blocks.shape[-1] != 16 or blocks.shape[2] * 32 != I:
        raise ValueError(f"mxfp4_matvec: x {tuple(x.shape)} does not fit packed blocks {tuple(blocks.shape)}")
    return _mxfp4_matvec(x, blocks, scales, _ids(ids, R))


@jax.custom_vjp
def _mxfp4_matvec(x, blocks, scales, ids):
    call = jax.ffi.ffi_call(
        "gptoss_mxfp4_matvec",
        jax.ShapeDtypeStruct((x.shape[0], blocks.shape[1]), jnp.float32),
        vmap_method="sequential",
    )
    return call(x.astype(jnp.float32), blocks, scales, ids)


def _mxfp4_fwd(x, blocks, scales, ids):
    return _mxfp4_matvec(x, blocks, scales, ids), (x, blocks, scales, ids)


def _mxfp4_bwd(res, dy):
    x, blocks, scales, ids = res
    w = MXFP4(blocks[ids], scales[ids]).dequantize(jnp.float32)  # [R, O, I]
    dx = jnp.einsum("RO,ROI->RI", dy, w).astype(x.dtype)
    zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)
    return dx, zero(blocks), zero(scales), zero(ids)


_mxfp4_matvec.defvjp(_mxfp4_fwd, _mxfp4_bwd)


# ------------------------------------------------------------------- grouped matmul (bf16)
def grouped_matmul(x, w, starts, sizes) -> jax.Array:
    """y[r] = x[r] @ w[e] for the rows r in [starts[e], starts[e] + sizes[e]) of each matrix e
    (a sorted MoE's rows, each expert's product on exactly its rows); other rows of y are zeros.
    x [R, I], w [E, I, O], both bf16 (needs AVX512-BF16, `has_bf16_dot()`: bf16 products are
    exact in fp32 and summed in fp32) or both fp32 (needs AVX-512F, `has_grouped_f32()`: fp32
    FMAs); starts/sizes [E] int32 -> fp32 [R, O]. A forward computation only (no derivative
    rule: the MoE uses it where nothing is differentiated)."""
    require()
    if x.dtype != w.dtype or x.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"grouped_matmul: x and w must be both bf16 or both fp32, got {x.dtype} and {w.dtype}")
    if x.dtype == jnp.bfloat16 and not has_bf16_dot():
        raise NativeUnavailable("grouped_matmul in bf16 needs a CPU with AVX512-BF16")
    if x.dtype == jnp.float32 and not has_grouped_f32():
        raise NativeUnavailable("grouped_matmul in fp32 needs a CPU with AVX-512F")
    if x.ndim != 2 or w.ndim != 3 or w.shape[1] != x.shape[1]:
        raise ValueError(f"grouped_matmul: x {tuple(x.shape)} does not fit w {tuple(w.shape)} ([R, I] and [E, I, O])")
    E = w.shape[0]
    starts = jnp.asarray(starts).astype(jnp.int32).reshape(E)
    sizes = jnp.asarray(sizes).astype(jnp.int32).reshape(E)
    call = jax.ffi.ffi_call(
        "gptoss_grouped_matmul", jax.ShapeDtypeStruct((x.shape[0], w.shape[2]), jnp.float32), vmap_method="sequential"
    )
    return call(x, w, starts, sizes)


# ----------------------------------------------------------------- decode attention (T = 1)
def decode_attention(q, k, v, sinks, k_pos, q_pos, *, window: int | None = None, scale: float | None = None):
    """Attention of one new query per row over the cache, with sinks: q [B, N, H], k/v
    [B, S, K, H] (bf16 or fp32, the same), sinks [N], k_pos [B, S] int (the position each slot
    holds, -1 = empty), q_pos [B] int. Key s is visible to row b when 0 <= k_pos[b, s] <= q_pos[b]
    and, with a `window`, q_pos[b] - k_pos[b, s] < window (`attention.attention_mask`). Scores
    q.k * scale (default 1/sqrt(H)), softmax over the visible keys and the head's sink logit.
    Returns (out fp32 [B, N, H], sink mass fp32 [B, N]), as `attention.attend` with T = 1 but
    with the probabilities kept in fp32 (`attend` rounds them to the cache's dtype before
    multiplying by v). Gradients (rarely wanted through a cache) are those of `attend`."""
    require()
    B, N, H = q.shape
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != B or k.shape[3] != H or k.dtype != v.dtype:
        raise ValueError(
            f"decode_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
            "([B, N, H], and k, v both [B, S, K, H] of one dtype)"
        )
    if k.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"decode_attention: the cache must be bf16 or fp32, got {k.dtype}")
    S, K = k.shape[1], k.shape[2]
    if N % K:
        raise ValueError(f"decode_attention: {N} query heads are not a multiple of {K} KV heads")
    if window is not None and window < 1:
        raise ValueError(f"decode_attention: window must be >= 1 or None, got {window}")
    scale = H**-0.5 if scale is None else float(scale)
    k_pos = jnp.asarray(k_pos).astype(jnp.int32).reshape(B, S)
    q_pos = jnp.asarray(q_pos).astype(jnp.int32).reshape(B)
    return _decode_attention(q, k, v, jnp.asarray(sinks), k_pos, q_pos, window or 0, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _decode_attention(q, k, v, sinks, k_pos, q_pos, window, scale):
    B, N, H = q.shape
    call = jax.ffi.ffi_call(
        "gptoss_decode_attention",
        (jax.ShapeDtypeStruct((B, N, H), jnp.float32), jax.ShapeDtypeStruct((B, N), jnp.float32)),
        vmap_method="sequential",
    )
    return call(
        q.astype(jnp.float32),
        k,
        v,
        sinks.astype(jnp.float32),
        k_pos,
        q_pos,
        window=np.int64(window),
        scale=np.float32(scale),
    )


def _attend_reference(q, k, v, sinks, k_pos, q_pos, window, scale):
    ones = jnp.ones(k_pos.shape, jnp.int32)
    out, mass = attention_reference(
        q[:, None].astype(jnp.float32),
        k,
        v,
        sinks,
        q_pos=q_pos[:, None],
        k_pos=k_pos,
        q_seg=ones[:, :1],
        k_seg=ones,
        window=window or None,
        k_valid=k_pos >= 0,
        scale=scale,
    )
    return out[:, 0], mass[:, 0]


def _decode_attention_fwd(q, k, v, sinks, k_pos, q_pos, window, scale):
    return _decode_attention(q, k, v, sinks, k_pos, q_pos, window, scale), (q, k, v, sinks, k_pos, q_pos)


def _decode_attention_bwd(window, scale, res, cot):
    q, k, v, sinks, k_pos, q_pos = res
    ref = lambda q, k, v, sinks: _attend_reference(q, k, v, sinks, k_pos, q_pos, window, scale)
    _, vjp = jax.vjp(ref, q, k, v, sinks)
    zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)
    return (*vjp(cot), zero(k_pos), zero(q_pos))


_decode_attention.defvjp(_decode_attention_fwd, _decode_attention_bwd)


# ------------------------------------------------------------ prefill attention (self-attention)
def prefill_attention(q, k, v, sinks, positions, segment_ids, *, window: int | None = None):
    """`attention.self_attention` as one native flash-attention loop: q [B, T, N, H], k/v
    [B, T, K, H] (all bf16 or all fp32; H a multiple of 16), sinks [N], positions / segment_ids
    [B, T], `window` for a sliding layer. Same contract (queries and keys are the same tokens, each
    segment contiguous with consecutive positions) and the same mask, scale 1/sqrt(H) and sinks;
    only the key blocks a token may see are visited, and no [T, T] matrix is written. fp32
    products, sums, exp and probabilities (XLA's bf16 path rounds the probabilities to bf16).
    Returns (out [B, T, N, H] in q's dtype, sink mass fp32 [B, T, N]). Needs AVX-512F
    (`has_prefill_attention()`). Under differentiation the forward and its gradients are
    `self_attention`'s (XLA), so a training step computes exactly what it did without the kernel."""
    require()
    if not has_prefill_attention():
        raise NativeUnavailable("prefill_attention needs a CPU with AVX-512F")
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"prefill_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
            "([B, T, N, H], and k, v both [B, T, K, H])"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"prefill_attention: q, k, v must be all bf16 or all fp32, got {q.dtype}/{k.dtype}/{v.dtype}")
    B, T, N, H = q.shape
    if N % k.shape[2] or H % 16:
        raise ValueError(f"prefill_attention: {N} heads over {k.shape[2]} KV heads, head size {H} (a multiple of 16?)")
    if window is not None and window < 1:
        raise ValueError(f"prefill_attention: window must be >= 1 or None, got {window}")
    positions = jnp.asarray(positions).astype(jnp.int32).reshape(B, T)
    segment_ids = jnp.asarray(segment_ids).astype(jnp.int32).reshape(B, T)
    return _prefill_attention(q, k, v, jnp.asarray(sinks).astype(jnp.float32), positions, segment_ids, window or 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _prefill_attention(q, k, v, sinks, positions, segment_ids, window):
    B, T, N, H = q.shape
    call = jax.ffi.ffi_call(
        "gptoss_prefill_attention",
        (jax.ShapeDtypeStruct((B, T, N, H), jnp.float32), jax.ShapeDtypeStruct((B, T, N), jnp.float32)),
        vmap_method="sequential",
    )
    out, mass = call(q, k, v, sinks, positions, segment_ids, window=np.int64(window), scale=np.float32(H**-0.5))
    return out.astype(q.dtype), mass


def _prefill_attention_fwd(q, k, v, sinks, positions, segment_ids, window):
    xla = lambda q, k, v, sinks: self_attention(
        q, k, v, sinks, positions=positions, segment_ids=segment_ids, window=window or None
    )
    (out, mass), vjp = jax.vjp(xla, q, k, v, sinks)
    return (out, mass), (vjp, positions, segment_ids)


def _prefill_attention_bwd(window, res, cot):
    vjp, positions, segment_ids = res
    zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)
    return (*vjp(cot), zero(positions), zero(segment_ids))


_prefill_attention.defvjp(_prefill_attention_fwd, _prefill_attention_bwd)
