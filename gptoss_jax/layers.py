"""Pure building blocks of the gpt-oss forward pass: RMSNorm, YaRN RoPE, the clamped SwiGLU.

Dimension letters (used in every einsum of the package): B batch, T query length, S key length,
D model width, N query heads, K kv heads, G query heads per kv head, H head dim, E experts,
k top-k, F expert width, V vocab.

Notable details, each of which moves logits by >10% when wrong (see the spec):
- RMSNorm multiplies by the gain in fp32 *before* casting back (unlike Llama).
- YaRN's correction range is not rounded when `truncate=False` (gpt-oss), and the concentration
  0.1*ln(s)+1 is folded into cos and sin, so q and k both carry it.
- RoPE rotates the two halves of each head (NeoX style), not adjacent pairs.
- SwiGLU: gate/up interleaved (even = gate, odd = up), gate clamped above only, up clamped both
  ways, and a fixed +1 on the up branch.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax import cpu_matvec
from gptoss_jax.config import ModelConfig


def rms_norm(x: jax.Array, gain: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * gain.astype(jnp.float32)).astype(x.dtype)


def embed_lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """table[tokens]. A bf16 table is gathered as its 16-bit patterns: XLA:CPU computes bf16 in
    fp32 and would otherwise convert the whole table (inside a decode loop: once, into a
    loop-invariant fp32 copy as large as the vocabulary)."""
    if table.dtype == jnp.bfloat16:
        bits = jax.lax.bitcast_convert_type(table, jnp.uint16)[tokens]
        return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)
    return table[tokens]


class LowRank(NamedTuple):
    """A low-rank update beside a frozen weight (a LoRA adapter): x -> scale * (x a) b, with `a`
    over the weight's contracted axes then r, and `b` over r then the weight's other axes."""

    a: jax.Array
    b: jax.Array
    scale: float


def linear(x, w, spec: str, *, adapter: LowRank | None = None, native_rows: int = 0) -> jax.Array:
    """einsum(spec, x, w) with fp32 accumulation, plus an adapter's scale * (x a) b (fp32; x a is
    rounded to x's dtype, as a separate matmul would). The adapter's two einsums follow from
    `spec`: "BTD,DNH->BTNH" gives "BTD,Dr->BTr" and "BTr,rNH->BTNH".

    With at most `native_rows` rows of x (the CPU plan, decoding) the product runs through the
    native matrix-vector kernel (`gptoss_jax.cpu_matvec`), which reads w once in its stored dtype;
    the spec must then contract x's trailing axes with w's leading ones."""
    ins, out = spec.split("->")
    xs, ws = ins.split(",")
    contracted = "".join(c for c in ws if c in xs and c not in out)
    kept_x = "".join(c for c in xs if c not in contracted)
    kept_w = "".join(c for c in ws if c not in contracted)
    lead = x.shape[: len(kept_x)]
    rows = math.prod(lead)
    if 0 < rows <= native_rows and xs == kept_x + contracted and ws == contracted + kept_w and out == kept_x + kept_w:
        size = math.prod(x.shape[len(kept_x) :])
        y2 = cpu_matvec.matvec(x.reshape(rows, size), w.reshape(size, -1))
        y = y2.reshape(*lead, *w.shape[len(contracted) :])
    else:
        y = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
    if adapter is None:
        return y
    r = next(c for c in "rRzZ" if c not in spec)  # a subscript the spec does not use
    xa = jnp.einsum(f"{xs},{contracted}{r}->{kept_x}{r}", x, adapter.a, preferred_element_type=jnp.float32)
    return y + adapter.scale * jnp.einsum(
        f"{kept_x}{r},{r}{kept_w}->{out}", xa.astype(x.dtype), adapter.b, preferred_element_type=jnp.float32
    )


def unembed(
    h: jax.Array, w: jax.Array, *, reduction_rows: int = 0, native_rows: int = 0, chunk_rows: int = 0
) -> jax.Array:
    """Logits h [..., D] @ w[V, D]^T in fp32 (fp32 products and accumulation).

    With more than 2 * `chunk_rows` rows (the CPU plan) the product runs `chunk_rows` rows at a
    time in a loop (`lax.map`), so XLA:CPU neither fuses the final norm into one large dot nor
    keeps a [T, D] operand hot across a [T, V] output: at 8,192 rows of the benchmark model the
    fused dot ran at half the rate of the same dot on 1,024-row chunks (fp32 and bf16;
    `experiments/2026-12-06-prefill-attention/`). The same products and sums, row by row.

    With at most `reduction_rows` rows (the CPU plan: decoding, or prefill's last token) the
    product is written as a fused multiply-reduce over D, which streams the bf16 table once;
    XLA:CPU's matmul would first convert the whole table to an fp32 copy (2.2 GiB for gpt-oss)
    and read that instead (`plan.UNEMBED_ROWS_AS_REDUCTION`). With at most `native_rows` rows it
    runs through the native kernel (`gptoss_jax.cpu_matvec`, each table row one output)."""
    lead, D = h.shape[:-1], h.shape[-1]
    n = math.prod(lead)
    if 0 < n <= native_rows:
        return cpu_matvec.matvec(h.reshape(n, D), w, out_in=True).reshape(*lead, w.shape[0])
    if chunk_rows and n > 2 * chunk_rows:
        whole = n - n % chunk_rows
        rows = h.reshape(n, D)
        dot = lambda x: jnp.einsum("RD,VD->RV", x, w, preferred_element_type=jnp.float32)
        out = jax.lax.map(dot, rows[:whole].reshape(whole // chunk_rows, chunk_rows, D)).reshape(whole, -1)
        if whole < n:
            out = jnp.concatenate([out, dot(rows[whole:])])
        return out.reshape(*lead, w.shape[0])
    if n > reduction_rows:
        return jnp.einsum("...D,VD->...V", h, w, preferred_element_type=jnp.float32)
    rows = h.reshape(n, D).astype(jnp.float32)
    w32 = w.astype(jnp.float32)
    if n == 1:
        out = jnp.sum(w32 * rows, axis=-1)[None]  # [1, V]
    else:  # [V, n] order: each table row is reused for every input row while in cache
        out = jnp.sum(w32[:, None, :] * rows[None], axis=-1).T
    return out.reshape(*lead, w.shape[0])


# ----------------------------------------------------------------------------------------- RoPE
def yarn_correction_range(cfg: ModelConfig) -> tuple[float, float]:
    """(low, high) rotary dims of YaRN's NTK-by-parts ramp."""
    d_half = cfg.head_dim / 2

    def dim_for(beta: float) -> float:
        return d_half * math.log(cfg.rope_original_context / (beta * 2 * math.pi)) / math.log(cfg.rope_theta)

    low, high = dim_for(cfg.rope_beta_fast), dim_for(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, cfg.head_dim - 1)
    if high == low:
        high += 1e-3  # a degenerate ramp would divide by zero
    return low, high


# fp32 bit patterns of the released models' inv_freq, as gpt_oss.torch and transformers produce
# them. torch's float32 `pow` is not correctly rounded (entries 6 and 10 differ by one ulp from a
# correctly rounded pow), so recomputing cannot be bit-faithful; a 1-ulp phase error grows
# visible at positions near 1e5.
_RELEASED_ROPE = (64, 150000.0, 32.0, 4096, 32.0, 1.0, False)
_RELEASED_INV_FREQ_BITS = (
    0x3F800000,
    0x3F306535,
    0x3EF316A2,
    0x3EA77FAA,
    0x3E66D3FA,
    0x3E1F0CFD,
    0x3DDB2F9F,
    0x3D970764,
    0x3D502194,
    0x3D01DDD5,
    0x3C9E646F,
    0x3C3DEC94,
    0x3BDEA840,
    0x3B7CFE14,
    0x3B093803,
    0x3A89F778,
    0x39EF543C,
    0x390799B9,
    0x3820ADC6,
    0x37DD6DFC,
    0x37989328,
    0x375242FA,
    0x3710E12C,
    0x36C7A82B,
    0x3689928C,
    0x363D9647,
    0x3602A245,
    0x35B40668,
    0x35781728,
    0x352AF200,
    0x34EB93EB,
    0x34A252D3,
)


@functools.lru_cache(maxsize=32)
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """fp32 inverse frequencies [H/2] in the references' float32 operation order. Bitwise equal to
    the references for the released RoPE settings; otherwise within an ulp (pow rounding)."""
    key = (
        cfg.head_dim,
        cfg.rope_theta,
        cfg.rope_factor,
        cfg.rope_original_context,
        cfg.rope_beta_fast,
        cfg.rope_beta_slow,
        cfg.rope_truncate,
    )
    if key == _RELEASED_ROPE:
        inv = np.array(_RELEASED_INV_FREQ_BITS, dtype=np.uint32).view(np.float32)
        inv.flags.writeable = False  # cached and shared
        return inv
    f32 = np.float32
    exponents = np.arange(0, cfg.head_dim, 2, dtype=f32) / f32(cfg.head_dim)
    # pow evaluated in float64 and rounded once: the correctly rounded float32 result (float32 pow
    # implementations differ by an ulp across CPUs and libraries)
    freq = np.power(np.float64(f32(cfg.rope_theta)), exponents.astype(np.float64)).astype(f32)
    if cfg.rope_factor <= 1.0:
        inv = (f32(1.0) / freq).astype(f32)
        inv.flags.writeable = False
        return inv
    low, high = yarn_correction_range(cfg)
    interpolation = f32(1.0) / (f32(cfg.rope_factor) * freq)
    extrapolation = f32(1.0) / freq
    ramp = (np.arange(cfg.head_dim // 2, dtype=f32) - f32(low)) / f32(high - low)
    mask = f32(1.0) - np.clip(ramp, f32(0.0), f32(1.0))
    inv = (interpolation * (f32(1.0) - mask) + extrapolation * mask).astype(f32)
    inv.flags.writeable = False  # cached and shared
    return inv


def rope_cos_sin(positions: jax.Array, inv_freq, concentration: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin [..., H/2] in fp32 for integer positions [...], concentration folded in."""
    phase = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(phase) * concentration, jnp.sin(phase) * concentration


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Half-split rotation of x [B, T, heads, H] with cos/sin [B, T, H/2].

    cos/sin are cast to x's dtype first, as both references do."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# -------------------------------------------------------------------------------------- SwiGLU
def swiglu(h: jax.Array, *, alpha: float, limit: float) -> jax.Array:
    """[..., 2F] interleaved gate/up -> [..., F]."""
    return swiglu_halves(h[..., 0::2], h[..., 1::2], alpha=alpha, limit=limit)


def swiglu_halves(glu: jax.Array, lin: jax.Array, *, alpha: float, limit: float) -> jax.Array:
    """The clamped SwiGLU of gate `glu` and up `lin` given apart."""
    glu = jnp.minimum(glu, limit)
    lin = jnp.clip(lin, -limit, limit)
    return glu * jax.nn.sigmoid(alpha * glu) * (lin + 1)
