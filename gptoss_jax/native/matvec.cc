// Matrix-vector products for decoding on a CPU, as XLA FFI custom calls.
//
// A decode step multiplies a handful of rows by large weight matrices: the bytes of the weights
// are the cost. XLA:CPU converts a bf16 matrix to an fp32 copy before its matmul, and decodes
// packed MXFP4 experts element by element with integer arithmetic; both leave it far below the
// memory's rate. These kernels read each weight once, in its stored format, convert it in
// registers, and multiply in fp32 (fp32 products and sums, as `preferred_element_type=float32`):
//
//   gptoss_matvec         y[r, o] = sum_i x[r, i] * W[ids[r], ., .]   W [E, I, O] or [E, O, I],
//                         bf16 or fp32 (attribute `out_in` picks the layout)
//   gptoss_mxfp4_matvec   the same for packed MXFP4 matrices [E, O, I]: blocks [E, O, I/32, 16]
//                         uint8 (two E2M1 codes per byte, low nibble first) and scales
//                         [E, O, I/32] uint8 (e8m0, bias 127)
//   gptoss_grouped_matmul y[r] = x[r] @ W[e] for each expert's range of rows (a prefill's sorted
//                         MoE rows), W [E, I, O], x and W both bf16 or both fp32
//   gptoss_decode_attention  one new query per row against the KV cache, with sinks (below)
//   gptoss_prefill_attention  an uncached forward's self-attention with sinks, flash-attention
//                         style over the key blocks each token may see (AVX-512F; below)
//
// Rows that chose the same matrix share its stream (a batch of decoded tokens reads each chosen
// expert once). Work is split over the output columns and run on XLA's intra-op thread pool.
// Only the sum order differs from `x @ W` in fp32.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

// With AVX512-BF16 (and the AVX-512 subsets it comes with) and inputs that are all bf16 values (a
// bf16 model's activations), VDPBF16PS multiplies 32 bf16 weights by 32 inputs per instruction:
// products of two bf16 numbers are exact in fp32 and are summed in fp32 (denormals flushed), so
// only the order of the sums differs from the fp32 path.
#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#define GPTOSS_BF16_DOT 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ------------------------------------------------------------------------------ thread pool
// fn(item) for item in [0, n), on the caller and up to num_threads - 1 pool tasks that claim
// items from a shared counter. The caller returns when every item is done; a task that starts
// late finds nothing left and never touches `fn`, so the shared state (not the caller's frame)
// is all it reads.
template <class F>
void parallel_for(ffi::ThreadPool* pool, int64_t n, const F& fn) {
  int64_t nt = pool ? std::min<int64_t>(pool->num_threads(), n) : 1;
  if (nt <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t n = 0;
    const F* fn = nullptr;
  };
  auto st = std::make_shared<State>();
  st->n = n;
  st->fn = &fn;
  auto work = [st]() {
    for (int64_t i; (i = st->next.fetch_add(1, std::memory_order_relaxed)) < st->n;) {
      (*st->fn)(i);
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < nt; ++t) pool->Schedule(decltype(work)(work));
  work();
  while (st->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float load_f32(const float* p, int64_t i) { return p[i]; }
inline float load_f32(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }

#if defined(__AVX2__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float hsum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}
#endif

// Rows grouped by the matrix they chose: order[starts[g] .. starts[g+1]) are the rows of
// matrix mats[g].
struct Groups {
  std::vector<int32_t> mats, order;
  std::vector<int64_t> starts;
};

Groups group_rows(const int32_t* ids, int64_t R) {
  Groups g;
  std::vector<int32_t> idx(R);
  for (int64_t r = 0; r < R; ++r) idx[r] = int32_t(r);
  std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return ids[a] < ids[b]; });
  for (int64_t k = 0; k < R; ++k) {
    if (k == 0 || ids[idx[k]] != ids[idx[k - 1]]) {
      g.mats.push_back(ids[idx[k]]);
      g.starts.push_back(k);
    }
  }
  g.starts.push_back(R);
  g.order = std::move(idx);
  return g;
}

// Per-thread scratch that outlives a call (not cleared; `Slot` tells a call's buffers apart): a
// fresh vector of megabytes on every decode step costs page faults and zeroing. It grows as
// needed; beyond kScratchKeep bytes it is given back at the next call that needs less. The pool's
// workers write into the caller's buffers only while the caller waits for them.
constexpr int64_t kScratchKeep = int64_t(1) << 25;
template <class T, int Slot>
T* scratch(int64_t n) {
  thread_local std::vector<T> buf;
  if (int64_t(buf.size()) < n) buf.resize(size_t(n));
  else if (int64_t(buf.size() * sizeof(T)) > kScratchKeep && int64_t(n * sizeof(T)) <= kScratchKeep)
    std::vector<T>(size_t(n)).swap(buf);
  return buf.data();
}

constexpr int64_t kRowBlock = 8;     // rows that share one pass over a matrix
constexpr int64_t kColTile = 256;    // output columns per work item (adding partial sums)
constexpr int64_t kInChunk = 64;     // input rows per work item ([I, O] layout)
constexpr int64_t kRowsPerItem = 64;     // output rows per work item (dense [O, I]; 16 read ~20% slower)
// Packed MXFP4 [O, I]: output rows per work item, between these bounds (below).
constexpr int64_t kPackedRowsMin = 16, kPackedRowsMax = 256;

// ------------------------------------------------------------------------- dense, [I, O]
// Work items are chunks of kInChunk input rows of one matrix, each read front to back (whole
// rows: the hardware prefetcher sees one sequential stream per row), accumulated eight stored
// rows at a time into the item's own partial sums [rows, O]; a second pass adds the partials.
// The rows that chose the matrix share each load of its stored rows, up to four at a time
// (AVX-512: a batch of decoded tokens through one projection, or two tokens through one expert,
// read the weights once instead of once per row from cache).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define GPTOSS_ROWS_AVX512 1
// 16 values as fp32 (the first `m` of them when Tail, zeros beyond)
template <bool Tail>
inline __m512 load16(const float* p, __mmask16 m) {
  return Tail ? _mm512_maskz_loadu_ps(m, p) : _mm512_loadu_ps(p);
}
template <bool Tail>
inline __m512 load16(const uint16_t* p, __mmask16 m) {
  __m256i h = Tail ? _mm256_maskz_loadu_epi16(m, p) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// p[r][o] += sum over k < NK of rows[k][o] * xs[r][k], for NR input rows: 16 columns at o
// (the first `m` of them; two FMA chains, even and odd k).
template <int NK, int NR, bool Tail, class T>
inline void accumulate16(const T* const* rows, const float (*xs)[8], int64_t o, __mmask16 m, float* const* p) {
  __m512 w[NK];
  for (int k = 0; k < NK; ++k) w[k] = load16<Tail>(rows[k] + o, m);
  for (int r = 0; r < NR; ++r) {
    __m512 a = load16<Tail>(p[r] + o, m), b = _mm512_setzero_ps();
    for (int k = 0; k < NK; k += 2) {
      a = _mm512_fmadd_ps(w[k], _mm512_set1_ps(xs[r][k]), a);
      if (k + 1 < NK) b = _mm512_fmadd_ps(w[k + 1], _mm512_set1_ps(xs[r][k + 1]), b);
    }
    // a masked store only for the tail (on Zen 4 a masked store costs several plain ones)
    if (Tail) _mm512_mask_storeu_ps(p[r] + o, m, _mm512_add_ps(a, b));
    else _mm512_storeu_ps(p[r] + o, _mm512_add_ps(a, b));
  }
}

// The same for every column o < O.
template <int NK, int NR, class T>
void accumulate_rows(const T* const* rows, const float (*xs)[8], int64_t O, float* const* p) {
  int64_t o = 0;
  for (; o + 16 <= O; o += 16) accumulate16<NK, NR, false>(rows, xs, o, __mmask16(0xFFFF), p);
  if (o < O) accumulate16<NK, NR, true>(rows, xs, o, __mmask16((1u << (O - o)) - 1), p);
}

// Stored rows [i0, i1) of matrix `we` for NR input rows xr, into their partial sums p (zeroed
// here).
template <int NR, class T>
void chunk_rows(const T* we, const float* const* xr, int64_t i0, int64_t i1, int64_t O, float* const* p) {
  for (int r = 0; r < NR; ++r) std::fill(p[r], p[r] + O, 0.f);
  const T* rows[8];
  float xs[NR][8];
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {  // 8 stored rows in flight (4 measured ~8% slower from memory)
    for (int k = 0; k < 8; ++k) rows[k] = we + (i + k) * O;
    for (int r = 0; r < NR; ++r)
      for (int k = 0; k < 8; ++k) xs[r][k] = xr[r][i + k];
    accumulate_rows<8, NR>(rows, xs, O, p);
  }
  for (; i < i1; ++i) {
    rows[0] = we + i * O;
    for (int r = 0; r < NR; ++r) xs[r][0] = xr[r][i];
    accumulate_rows<1, NR>(rows, xs, O, p);
  }
}
#endif

template <class T>
void matvec_in_out(const float* x, const T* w, const Groups& g, int64_t I, int64_t O, float* y,
                   ffi::ThreadPool* pool) {
  int64_t chunks = (I + kInChunk - 1) / kInChunk;
  int64_t ng = int64_t(g.mats.size());
  int64_t R = int64_t(g.order.size());
  // partial sums: for group gi, chunk c, the group's k-th row: part[((start(gi) + k) * chunks + c) * O]
  float* part = scratch<float, 0>(R * chunks * O);
  parallel_for(pool, ng * chunks, [&](int64_t item) {
    int64_t gi = item / chunks, c = item % chunks;
    int64_t i0 = c * kInChunk, i1 = std::min(I, i0 + kInChunk);
    const T* we = w + int64_t(g.mats[gi]) * I * O;
#if defined(GPTOSS_ROWS_AVX512)
    for (int64_t s0 = g.starts[gi]; s0 < g.starts[gi + 1]; s0 += 4) {
      int64_t nr = std::min<int64_t>(4, g.starts[gi + 1] - s0);
      const float* xr[4];
      float* p[4];
      for (int64_t r = 0; r < nr; ++r) xr[r] = x + int64_t(g.order[s0 + r]) * I, p[r] = part + ((s0 + r) * chunks + c) * O;
      if (nr == 1) chunk_rows<1>(we, xr, i0, i1, O, p);
      else if (nr == 2) chunk_rows<2>(we, xr, i0, i1, O, p);
      else if (nr == 3) chunk_rows<3>(we, xr, i0, i1, O, p);
      else chunk_rows<4>(we, xr, i0, i1, O, p);
    }
#else
    for (int64_t s = g.starts[gi]; s < g.starts[gi + 1]; ++s) {
      const float* xr = x + int64_t(g.order[s]) * I;
      float* p = part + (s * chunks + c) * O;
      std::fill(p, p + O, 0.f);
      int64_t i = i0;
      for (; i + 8 <= i1; i += 8) {  // 8 rows of W in flight (4 measured ~8% slower from memory)
        const T* w0 = we + i * O;
        float xs[8];
        for (int r = 0; r < 8; ++r) xs[r] = xr[i + r];
        for (int64_t o = 0; o < O; ++o)
          p[o] += (xs[0] * load_f32(w0, o) + xs[1] * load_f32(w0 + O, o) + xs[2] * load_f32(w0 + 2 * O, o) +
                   xs[3] * load_f32(w0 + 3 * O, o)) +
                  (xs[4] * load_f32(w0 + 4 * O, o) + xs[5] * load_f32(w0 + 5 * O, o) +
                   xs[6] * load_f32(w0 + 6 * O, o) + xs[7] * load_f32(w0 + 7 * O, o));
      }
      for (; i < i1; ++i) {
        const T* w0 = we + i * O;
        float x0 = xr[i];
        for (int64_t o = 0; o < O; ++o) p[o] += x0 * load_f32(w0, o);
      }
    }
#endif
  });
  int64_t tiles = (O + kColTile - 1) / kColTile;
  parallel_for(pool, R * tiles, [&](int64_t item) {
    int64_t s = item / tiles, o0 = (item % tiles) * kColTile, o1 = std::min(O, o0 + kColTile);
    float* yr = y + int64_t(g.order[s]) * O;
    const float* p = part + s * chunks * O;
    for (int64_t o = o0; o < o1; ++o) yr[o] = p[o];
    for (int64_t c = 1; c < chunks; ++c)
      for (int64_t o = o0; o < o1; ++o) yr[o] += p[c * O + o];
  });
}

// ------------------------------------------------------------------------- dense, [O, I]
// 16 partial sums per dot product (vectorizable without reassociating a single sum).

// Dot products of one stored row wr [I] with NR rows xs[r] [I], U independent accumulators
// per row (8 lanes each).
template <class T, int NR, int U>
void dots(const T* wr, const float* const* xs, int64_t I, float* out) {
  int64_t i = 0;
  float head[NR] = {0.f};
#if defined(__AVX2__)
  __m256 a[NR][U];
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < U; ++u) a[r][u] = _mm256_setzero_ps();
  for (; i + 8 * U <= I; i += 8 * U)
    for (int u = 0; u < U; ++u) {
      __m256 wv = load8(wr + i + 8 * u);
      for (int r = 0; r < NR; ++r) a[r][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs[r] + i + 8 * u), a[r][u]);
    }
  for (int r = 0; r < NR; ++r) {
    __m256 t = a[r][0];
    for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, a[r][u]);
    head[r] = hsum(t);
  }
#else
  for (int r = 0; r < NR; ++r) {
    float part[16] = {0};
    for (int64_t j = 0; j + 16 <= I; j += 16)
      for (int k = 0; k < 16; ++k) part[k] += xs[r][j + k] * load_f32(wr, j + k);
    for (int k = 0; k < 16; ++k) head[r] += part[k];
  }
  i = I - I % 16;
#endif
  for (int r = 0; r < NR; ++r) {
    float sum = head[r];
    for (int64_t j = i; j < I; ++j) sum += xs[r][j] * load_f32(wr, j);
    out[r] = sum;
  }
}

// dots(w row, xs, nr, out) for every chosen matrix, output row o (stored row o of W) and block
// of up to RB rows xs (inputs of type X) that chose the matrix; out[r] goes to y[row r, o].
template <int RB, class T, class X, class Dots>
void out_in_rows(const X* x, const T* w, const Groups& g, int64_t I, int64_t O, float* y, ffi::ThreadPool* pool,
                 const Dots& dots) {
  int64_t chunks = (O + kRowsPerItem - 1) / kRowsPerItem;
  int64_t n = int64_t(g.mats.size()) * chunks;
  parallel_for(pool, n, [&](int64_t item) {
    int64_t gi = item / chunks, o0 = (item % chunks) * kRowsPerItem;
    int64_t o1 = std::min(O, o0 + kRowsPerItem);
    const T* we = w + int64_t(g.mats[gi]) * O * I;
    for (int64_t s0 = g.starts[gi]; s0 < g.starts[gi + 1]; s0 += RB) {
      int64_t nr = std::min<int64_t>(RB, g.starts[gi + 1] - s0);
      const X* xs[RB];  // a short block repeats its last row (computed, not stored)
      for (int64_t r = 0; r < RB; ++r) xs[r] = x + int64_t(g.order[s0 + std::min(r, nr - 1)]) * I;
      for (int64_t o = o0; o < o1; ++o) {
        float out[RB];
        dots(we + o * I, xs, nr, out);
        for (int64_t r = 0; r < nr; ++r) y[int64_t(g.order[s0 + r]) * O + o] = out[r];
      }
    }
  });
}

template <class T>
void matvec_out_in(const float* x, const T* w, const Groups& g, int64_t I, int64_t O, float* y,
                   ffi::ThreadPool* pool) {
  out_in_rows<kRowBlock>(x, w, g, I, O, y, pool, [&](const T* wr, const float* const* xs, int64_t nr, float* out) {
    if (nr == 1) dots<T, 1, 4>(wr, xs, I, out);
    else if (nr == 2) dots<T, 2, 4>(wr, xs, I, out);
    else if (nr <= 4) dots<T, 4, 2>(wr, xs, I, out);
    else dots<T, 8, 1>(wr, xs, I, out);
  });
}

// --------------------------------------------------------------- grouped matmul (prefill MoE)
// y[r] = x[r] @ W[e] for the rows r in [starts[e], starts[e] + sizes[e]) of each expert e: one
// matrix product per expert on exactly its rows, as a prefill's sorted MoE rows need (XLA's
// matmuls on fixed chunks of rows reach a fraction of their large-size rate). Work items: an
// expert's rows x a block of kColBlock columns; within one, register tiles of kMR rows x 32
// columns run over every input, the block's strip of W reused by each row tile from cache.
#if defined(__AVX512F__)
#define GPTOSS_F32_GEMM 1
constexpr int kMR = 8;
constexpr int64_t kColBlock = 64;

// tile(xr, w at column c, ncols, yr, nrows) for every tile; a short tile repeats its last row
// (computed, not stored).
template <class T, class Tile>
void grouped_rows(const T* x, const T* w, const int32_t* starts, const int32_t* sizes, int64_t E, int64_t I,
                  int64_t O, float* y, ffi::ThreadPool* pool, const Tile& tile) {
  const int64_t blocks = (O + kColBlock - 1) / kColBlock;
  std::vector<int64_t> item_start(E + 1, 0);  // items of expert e: blocks, if it has rows
  for (int64_t e = 0; e < E; ++e) item_start[e + 1] = item_start[e] + (sizes[e] > 0 ? blocks : 0);
  parallel_for(pool, item_start[E], [&](int64_t item) {
    int64_t e = std::upper_bound(item_start.begin(), item_start.end(), item) - item_start.begin() - 1;
    int64_t c0 = (item - item_start[e]) * kColBlock, c1 = std::min(O, c0 + kColBlock);
    const T* we = w + e * I * O;
    const int64_t r0 = starts[e], r1 = r0 + sizes[e];
    for (int64_t c = c0; c < c1; c += 32)
      for (int64_t t = r0; t < r1; t += kMR) {
        int64_t nr = std::min<int64_t>(kMR, r1 - t);
        const T* xr[kMR];
        float* yr[kMR];
        for (int r = 0; r < kMR; ++r) xr[r] = x + (t + std::min<int64_t>(r, nr - 1)) * I, yr[r] = y + (t + r) * O + c;
        tile(xr, we + c, std::min<int64_t>(32, c1 - c), yr, nr);
      }
  });
}

// fp32: per input, the W row's 32 columns (two vectors) meet each row's input broadcast.
template <int MR>
void gemm_tile(const float* const* xr, const float* w, int64_t I, int64_t O, int64_t ncols, float* const* yr,
               int64_t nrows) {
  __m512 a0[MR], a1[MR];
  for (int r = 0; r < MR; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  const __mmask16 m0 = ncols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << ncols) - 1);
  const __mmask16 m1 = ncols >= 32 ? __mmask16(0xFFFF) : ncols > 16 ? __mmask16((1u << (ncols - 16)) - 1) : __mmask16(0);
  for (int64_t i = 0; i < I; ++i) {
    __m512 w0 = _mm512_maskz_loadu_ps(m0, w + i * O), w1 = _mm512_maskz_loadu_ps(m1, w + i * O + 16);
    for (int r = 0; r < MR; ++r) {
      __m512 xv = _mm512_set1_ps(xr[r][i]);
      a0[r] = _mm512_fmadd_ps(w0, xv, a0[r]);
      a1[r] = _mm512_fmadd_ps(w1, xv, a1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {  // constant bounds: the accumulators stay in registers
    if (r >= nrows) break;
    _mm512_mask_storeu_ps(yr[r], m0, a0[r]);
    _mm512_mask_storeu_ps(yr[r] + 16, m1, a1[r]);
  }
}
#endif  // __AVX512F__

#if defined(GPTOSS_BF16_DOT)
// ------------------------------------------------------------- dense bf16 weights, bf16 inputs

// x as bf16 bits, if every value is a bf16 number; else false.
bool bf16_values(const float* x, int64_t n, uint16_t* out) {
  for (int64_t k = 0; k < n; ++k) {
    uint32_t bits;
    std::memcpy(&bits, x + k, 4);
    if (bits & 0xFFFF) return false;
    out[k] = uint16_t(bits >> 16);
  }
  return true;
}

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// [O, I]: one stored row against NR input rows, 32 products per instruction, two accumulators
// per row; the tail by masked loads (zeros beyond I).
template <int NR>
void dots_bf16(const uint16_t* wr, const uint16_t* const* xs, int64_t I, float* out) {
  __m512 a0[NR], a1[NR];
  for (int r = 0; r < NR; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= I; i += 64) {
    __m512i w0 = _mm512_loadu_si512(wr + i), w1 = _mm512_loadu_si512(wr + i + 32);
    for (int r = 0; r < NR; ++r) {
      a0[r] = _mm512_dpbf16_ps(a0[r], as_bh(w0), as_bh(_mm512_loadu_si512(xs[r] + i)));
      a1[r] = _mm512_dpbf16_ps(a1[r], as_bh(w1), as_bh(_mm512_loadu_si512(xs[r] + i + 32)));
    }
  }
  for (; i < I; i += 32) {
    __mmask32 m = I - i >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << (I - i)) - 1);
    __m512i w0 = _mm512_maskz_loadu_epi16(m, wr + i);
    for (int r = 0; r < NR; ++r)
      a0[r] = _mm512_dpbf16_ps(a0[r], as_bh(w0), as_bh(_mm512_maskz_loadu_epi16(m, xs[r] + i)));
  }
  for (int r = 0; r < NR; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
}

void matvec_out_in_bf16(const uint16_t* x, const uint16_t* w, const Groups& g, int64_t I, int64_t O, float* y,
                        ffi::ThreadPool* pool) {
  out_in_rows<4>(x, w, g, I, O, y, pool, [&](const uint16_t* wr, const uint16_t* const* xs, int64_t nr, float* out) {
    if (nr == 1) dots_bf16<1>(wr, xs, I, out);
    else if (nr == 2) dots_bf16<2>(wr, xs, I, out);
    else dots_bf16<4>(wr, xs, I, out);
  });
}

// [I, O]: VDPBF16PS pairs neighbouring products, so two stored rows (inputs i, i + 1) are
// interleaved word by word (unpacklo/hi within each 128-bit lane) and multiplied by the pair
// (x[i], x[i + 1]) broadcast. The partial sums of a 32-column group therefore sit permuted:
// position k < 16 holds column 8 (k / 4) + k % 4, position 16 + k column 8 (k / 4) + 4 + k % 4
// (`kPairedColumn`); they are put back in order when the partials are added.
constexpr int kPairedColumn[32] = {0,  1,  2,  3,  8,  9,  10, 11, 16, 17, 18, 19, 24, 25, 26, 27,
                                   4,  5,  6,  7,  12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};

// For each of NR input rows r: p[r][O32] += sum over NP pairs of stored rows: rows[2j] * x[r][2j]
// + rows[2j + 1] * x[r][2j + 1] (p permuted). The stored rows are loaded and interleaved once
// for all NR input rows.
template <int NP, int NR>
void accumulate_pairs(const uint16_t* const* rows, const uint32_t (*xpair)[4], int64_t O, float* const* p) {
  __m512i xv[NR][NP];
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NP; ++j) xv[r][j] = _mm512_set1_epi32(int(xpair[r][j]));
  for (int64_t o = 0; o < O; o += 32) {
    __mmask32 m = O - o >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << (O - o)) - 1);
    __m512bh lo[NP], hi[NP];
    for (int j = 0; j < NP; ++j) {
      __m512i a = _mm512_maskz_loadu_epi16(m, rows[2 * j] + o), b = _mm512_maskz_loadu_epi16(m, rows[2 * j + 1] + o);
      lo[j] = as_bh(_mm512_unpacklo_epi16(a, b));
      hi[j] = as_bh(_mm512_unpackhi_epi16(a, b));
    }
    for (int r = 0; r < NR; ++r) {
      __m512 l = _mm512_loadu_ps(p[r] + o), h = _mm512_loadu_ps(p[r] + o + 16);
      for (int j = 0; j < NP; ++j) {
        l = _mm512_dpbf16_ps(l, lo[j], as_bh(xv[r][j]));
        h = _mm512_dpbf16_ps(h, hi[j], as_bh(xv[r][j]));
      }
      _mm512_storeu_ps(p[r] + o, l);
      _mm512_storeu_ps(p[r] + o + 16, h);
    }
  }
}

// One chunk [i0, i1) of stored rows of matrix `we` for NR input rows xr (bf16), into their
// partial sums p (zeroed here).
template <int NR>
void chunk_rows_bf16(const uint16_t* we, const uint16_t* const* xr, int64_t i0, int64_t i1, int64_t O, int64_t O32,
                     float* const* p) {
  static const uint16_t kZeroRow[32] = {0};  // the partner of an odd last row (read up to 32 words)
  for (int r = 0; r < NR; ++r) std::fill(p[r], p[r] + O32, 0.f);
  auto pair = [&](int r, int64_t i) { return uint32_t(xr[r][i]) | uint32_t(i + 1 < i1 ? xr[r][i + 1] : 0) << 16; };
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    const uint16_t* rows[8];
    uint32_t xp[NR][4];
    for (int k = 0; k < 8; ++k) rows[k] = we + (i + k) * O;
    for (int r = 0; r < NR; ++r)
      for (int j = 0; j < 4; ++j) xp[r][j] = pair(r, i + 2 * j);
    accumulate_pairs<4, NR>(rows, xp, O, p);
  }
  for (; i < i1; i += 2) {
    uint32_t xp[NR][4];
    for (int r = 0; r < NR; ++r) xp[r][0] = pair(r, i);
    if (i + 1 < i1) {
      const uint16_t* rows[2] = {we + i * O, we + (i + 1) * O};
      accumulate_pairs<1, NR>(rows, xp, O, p);
    } else {  // a lone last row pairs with zeros (its partner's x is 0 too), 32 columns at a time
      for (int64_t o = 0; o < O; o += 32) {
        const uint16_t* rows[2] = {we + i * O + o, kZeroRow};
        float* po[NR];
        for (int r = 0; r < NR; ++r) po[r] = p[r] + o;
        accumulate_pairs<1, NR>(rows, xp, std::min<int64_t>(32, O - o), po);
      }
    }
  }
}

void matvec_in_out_bf16(const uint16_t* x, const uint16_t* w, const Groups& g, int64_t I, int64_t O, float* y,
                        ffi::ThreadPool* pool) {
  const int64_t O32 = (O + 31) / 32 * 32;
  const int64_t chunks = (I + kInChunk - 1) / kInChunk;
  const int64_t ng = int64_t(g.mats.size()), R = int64_t(g.order.size());
  float* part = scratch<float, 0>(R * chunks * O32);
  parallel_for(pool, ng * chunks, [&](int64_t item) {
    int64_t gi = item / chunks, c = item % chunks;
    int64_t i0 = c * kInChunk, i1 = std::min(I, i0 + kInChunk);
    const uint16_t* we = w + int64_t(g.mats[gi]) * I * O;
    // the group's rows, up to 4 at a time sharing each load of the stored rows
    for (int64_t s0 = g.starts[gi]; s0 < g.starts[gi + 1]; s0 += 4) {
      int64_t nr = std::min<int64_t>(4, g.starts[gi + 1] - s0);
      const uint16_t* xr[4];
      float* p[4];
      for (int64_t r = 0; r < nr; ++r) xr[r] = x + int64_t(g.order[s0 + r]) * I, p[r] = part + ((s0 + r) * chunks + c) * O32;
      if (nr == 1) chunk_rows_bf16<1>(we, xr, i0, i1, O, O32, p);
      else if (nr == 2) chunk_rows_bf16<2>(we, xr, i0, i1, O, O32, p);
      else if (nr == 3) chunk_rows_bf16<3>(we, xr, i0, i1, O, O32, p);
      else chunk_rows_bf16<4>(we, xr, i0, i1, O, O32, p);
    }
  });
  // add the partials group by group of 32 columns, then undo the pairing's permutation
  const int64_t tiles = O32 / 32;
  parallel_for(pool, R * ((tiles + 7) / 8), [&](int64_t item) {
    int64_t s = item / ((tiles + 7) / 8), t0 = (item % ((tiles + 7) / 8)) * 8, t1 = std::min(tiles, t0 + 8);
    float* yr = y + int64_t(g.order[s]) * O;
    const float* p = part + s * chunks * O32;
    for (int64_t t = t0; t < t1; ++t) {
      __m512 lo = _mm512_loadu_ps(p + 32 * t), hi = _mm512_loadu_ps(p + 32 * t + 16);
      for (int64_t c = 1; c < chunks; ++c) {
        lo = _mm512_add_ps(lo, _mm512_loadu_ps(p + c * O32 + 32 * t));
        hi = _mm512_add_ps(hi, _mm512_loadu_ps(p + c * O32 + 32 * t + 16));
      }
      float sums[32];
      _mm512_storeu_ps(sums, lo);
      _mm512_storeu_ps(sums + 16, hi);
      for (int k = 0; k < 32; ++k) {
        int64_t o = 32 * t + kPairedColumn[k];
        if (o < O) yr[o] = sums[k];
      }
    }
  });
}

// ------------------------------------------------------- grouped matmul, bf16 (prefill MoE)
// Register tiles of kMR rows x 32 columns: per pair of inputs, two stored rows of W interleaved
// (as in `accumulate_pairs`) meet each row's input pair broadcast, 16 VDPBF16PS per 2 loads; the
// accumulators' pairing permutation is undone once per tile (`kTileOrder`).
// output column c of a tile <- accumulator lane: c in group L = c / 8 at j = c % 8 comes from the
// "lo" accumulator (lanes 0-15) at 4 L + j for j < 4, else from "hi" (16 + 4 L + j - 4)
constexpr int kTileOrder[32] = {0,  1,  2,  3,  16, 17, 18, 19, 4,  5,  6,  7,  20, 21, 22, 23,
                                8,  9,  10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};

template <int MR>
void gemm_tile(const uint16_t* const* xr, const uint16_t* w, int64_t I, int64_t O, int64_t ncols, float* const* yr,
               int64_t nrows) {
  __m512 lo[MR], hi[MR];
  for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  const __mmask32 m = ncols >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << ncols) - 1);
  int64_t i = 0;
  for (; i + 2 <= I; i += 2) {
    __m512i a = _mm512_maskz_loadu_epi16(m, w + i * O), b = _mm512_maskz_loadu_epi16(m, w + (i + 1) * O);
    __m512bh l = as_bh(_mm512_unpacklo_epi16(a, b)), h = as_bh(_mm512_unpackhi_epi16(a, b));
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, xr[r] + i, 4);
      __m512bh xp = as_bh(_mm512_set1_epi32(pair));
      lo[r] = _mm512_dpbf16_ps(lo[r], l, xp);
      hi[r] = _mm512_dpbf16_ps(hi[r], h, xp);
    }
  }
  if (i < I) {  // an odd last input pairs with zeros
    __m512i a = _mm512_maskz_loadu_epi16(m, w + i * O), z = _mm512_setzero_si512();
    __m512bh l = as_bh(_mm512_unpacklo_epi16(a, z)), h = as_bh(_mm512_unpackhi_epi16(a, z));
    for (int r = 0; r < MR; ++r) {
      __m512bh xp = as_bh(_mm512_set1_epi32(int32_t(xr[r][i])));
      lo[r] = _mm512_dpbf16_ps(lo[r], l, xp);
      hi[r] = _mm512_dpbf16_ps(hi[r], h, xp);
    }
  }
  const __m512i idx0 = _mm512_loadu_si512(kTileOrder), idx1 = _mm512_loadu_si512(kTileOrder + 16);
  const __mmask16 m0 = __mmask16(m & 0xFFFF), m1 = __mmask16(m >> 16);
  for (int r = 0; r < MR; ++r) {  // constant bounds: the accumulators stay in registers
    if (r >= nrows) break;
    _mm512_mask_storeu_ps(yr[r], m0, _mm512_permutex2var_ps(lo[r], idx0, hi[r]));
    _mm512_mask_storeu_ps(yr[r] + 16, m1, _mm512_permutex2var_ps(lo[r], idx1, hi[r]));
  }
}
#endif  // GPTOSS_BF16_DOT

#if defined(GPTOSS_F32_GEMM)
// The grouped matmul in T (fp32, or bf16 where GPTOSS_BF16_DOT built its tile): `gemm_tile`'s
// overload for T on every tile.
template <class T>
void grouped_matmul(const T* x, const T* w, const int32_t* starts, const int32_t* sizes, int64_t E, int64_t I,
                    int64_t O, float* y, ffi::ThreadPool* pool) {
  grouped_rows(x, w, starts, sizes, E, I, O, y, pool, [&](auto xr, auto wc, int64_t ncols, auto yr, int64_t nr) {
    gemm_tile<kMR>(xr, wc, I, O, ncols, yr, nr);
  });
}
#endif

// ------------------------------------------------------------------------------- MXFP4
// E2M1 code -> value * 2 (integers in [-12, 12]); scale byte s -> 2**(s - 127) / 2.
constexpr int8_t kE2M1x2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

float half_pow2(uint8_t s) { return std::ldexp(1.0f, int(s) - 128); }

// x deinterleaved per block of 32 inputs: [16 even inputs, 16 odd inputs], so that the low
// nibbles of a block's 16 bytes meet the even inputs and the high nibbles the odd ones.
void deinterleave(const float* x, int64_t I, float* out) {
  for (int64_t b = 0; b < I / 32; ++b)
    for (int j = 0; j < 16; ++j) {
      out[b * 32 + j] = x[b * 32 + 2 * j];
      out[b * 32 + 16 + j] = x[b * 32 + 2 * j + 1];
    }
}

// One packed row (G blocks of 32 values) against NR rows of deinterleaved inputs; U independent
// accumulators per row (U * NR <= 4 keeps the FMA chains short enough to overlap).
template <int NR, int U>
void mxfp4_dots(const uint8_t* bo, const uint8_t* so, const float* pow2, int64_t G, const float* const* xs,
                float* out) {
#if defined(__AVX2__)
  const __m128i lut = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kE2M1x2));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  __m256 acc[NR][U];
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = _mm256_setzero_ps();
  for (int64_t b = 0; b < G; ++b) {
    __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bo + b * 16));
    __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(q, low4));
    __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(q, 4), low4));
    __m256 sc = _mm256_set1_ps(pow2[so[b]]);
    __m256 v[4] = {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))),
    };
    for (int j = 0; j < 4; ++j) v[j] = _mm256_mul_ps(v[j], sc);
    for (int r = 0; r < NR; ++r) {
      const float* xb = xs[r] + b * 32;
      for (int j = 0; j < 4; ++j) acc[r][j % U] = _mm256_fmadd_ps(v[j], _mm256_loadu_ps(xb + 8 * j), acc[r][j % U]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    __m256 t = acc[r][0];
    for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[r][u]);
    out[r] = hsum(t);
  }
#else
  float part[NR][16] = {{0}};
  for (int64_t b = 0; b < G; ++b) {
    float sc = pow2[so[b]];
    float v[32];
    for (int j = 0; j < 16; ++j) {
      uint8_t q = bo[b * 16 + j];
      v[j] = float(kE2M1x2[q & 15]) * sc;
      v[16 + j] = float(kE2M1x2[q >> 4]) * sc;
    }
    for (int r = 0; r < NR; ++r)
      for (int j = 0; j < 16; ++j) part[r][j] += v[j] * xs[r][b * 32 + j] + v[16 + j] * xs[r][b * 32 + 16 + j];
  }
  for (int r = 0; r < NR; ++r) {
    out[r] = 0.f;
    for (int j = 0; j < 16; ++j) out[r] += part[r][j];
  }
#endif
}

#if defined(GPTOSS_BF16_DOT)
// The bf16 path: two blocks (32 bytes) at a time, widened to 32 words; VPERMW looks up each
// word's low nibble (its low 5 bits index a table holding the 16 codes twice) and, after a shift,
// its high nibble, giving the codes' doubled values as bf16 numbers (integers -12..12, exact).
// VDPBF16PS multiplies them with the inputs, laid out per pair of blocks as [even inputs of block
// b, of block b + 1, odd inputs of b, of b + 1] (16 each), so fp32 lanes 0-7 hold block b's sums
// and lanes 8-15 block b + 1's; one FMA applies the two blocks' powers of two.
constexpr uint16_t kE2M1x2Bf16[32] = {0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40C0, 0x4100, 0x4140,
                                      0x8000, 0xBF80, 0xC000, 0xC040, 0xC080, 0xC0C0, 0xC100, 0xC140,
                                      0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40C0, 0x4100, 0x4140,
                                      0x8000, 0xBF80, 0xC000, 0xC040, 0xC080, 0xC0C0, 0xC100, 0xC140};

template <int NR>
void mxfp4_dots_bf16(const uint8_t* bo, const uint8_t* so, const float* pow2, int64_t G,
                     const uint16_t* const* xs, float* out) {
  const __m512i tbl = _mm512_loadu_si512(kE2M1x2Bf16);
  __m512 acc0[NR], acc1[NR];
  for (int r = 0; r < NR; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  // blocks b and b + 1 (only b when `one`), into acc
  auto step = [&](int64_t b, bool one, __m512* acc) {
    __m256i q8 = one ? _mm256_maskz_loadu_epi8(0xFFFF, bo + b * 16)
                     : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bo + b * 16));
    __m512i q = _mm512_cvtepu8_epi16(q8);
    __m512i lo = _mm512_permutexvar_epi16(q, tbl), hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(q, 4), tbl);
    __m512 sc = _mm512_insertf32x8(_mm512_set1_ps(pow2[so[b]]), _mm256_set1_ps(one ? 0.f : pow2[so[b + 1]]), 1);
    for (int r = 0; r < NR; ++r) {
      const uint16_t* xb = xs[r] + b * 32;
      __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), as_bh(lo), as_bh(_mm512_loadu_si512(xb)));
      t = _mm512_dpbf16_ps(t, as_bh(hi), as_bh(_mm512_loadu_si512(xb + 32)));
      acc[r] = _mm512_fmadd_ps(t, sc, acc[r]);
    }
  };
  int64_t b = 0;
  for (; b + 4 <= G; b += 4) {
    step(b, false, acc0);
    step(b + 2, false, acc1);
  }
  if (b + 2 <= G) step(b, false, acc0), b += 2;
  if (b < G) step(b, true, acc1);
  for (int r = 0; r < NR; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
}

// x as bf16 bits laid out for `mxfp4_dots_bf16` (per pair of blocks; an odd last block's
// partner zero), if every value is a bf16 number; else false. Row stride: ceil(G / 2) * 64.
bool mxfp4_bf16_inputs(const float* x, int64_t R, int64_t I, uint16_t* out) {
  const int64_t G = I / 32, stride = (G + 1) / 2 * 64;
  for (int64_t r = 0; r < R; ++r) {
    if (G % 2)  // an odd last block: its partner's inputs are zeros
      for (int64_t k = 0; k < 32; ++k) out[r * stride + G / 2 * 64 + (k & 1) * 32 + 16 + k / 2] = 0;
    for (int64_t b = 0; b < G; ++b)
      for (int64_t k = 0; k < 32; ++k) {
        uint32_t bits;
        std::memcpy(&bits, x + r * I + b * 32 + k, 4);
        if (bits & 0xFFFF) return false;
        // pair b / 2 at b / 2 * 64; within it: evens of the first block, evens of the second,
        // odds of the first, odds of the second
        out[r * stride + b / 2 * 64 + (k & 1) * 32 + (b & 1) * 16 + k / 2] = uint16_t(bits >> 16);
      }
  }
  return true;
}
#endif

// dots(bo, so, xs, nr, out) for every chosen matrix, output row o (a packed row: blocks bo, scales
// so) and block of up to RB rows xs (inputs of type X, laid out for `dots`) that chose the matrix;
// out[r] goes to y[row r, o].
template <int RB, class X, class Dots>
void packed_rows(const X* xin, int64_t x_stride, const uint8_t* blocks, const uint8_t* scales, const Groups& g, int64_t I,
                 int64_t O, float* y, ffi::ThreadPool* pool, const Dots& dots) {
  const int64_t G = I / 32;
  // Long runs of consecutive rows per item (a thread streams up to 256 rows, ~390 KB of a 20b
  // expert, before it moves on): items of 16 rows, taken by two threads in turn, read a cold
  // expert at ~16 GB/s here, runs of 256 at ~22. Enough items remain for the threads to share
  // the work evenly: about 4 per thread.
  const int64_t ng = int64_t(g.mats.size());
  const int64_t nt = pool ? std::max<int64_t>(pool->num_threads(), 1) : 1;
  int64_t rows = (ng * O + 4 * nt - 1) / (4 * nt);
  rows = std::clamp((rows + kPackedRowsMin - 1) / kPackedRowsMin * kPackedRowsMin, kPackedRowsMin, kPackedRowsMax);
  int64_t chunks = (O + rows - 1) / rows;
  parallel_for(pool, ng * chunks, [&](int64_t item) {
    int64_t gi = item / chunks, o0 = (item % chunks) * rows;
    int64_t o1 = std::min(O, o0 + rows);
    const uint8_t* be = blocks + int64_t(g.mats[gi]) * O * G * 16;
    const uint8_t* se = scales + int64_t(g.mats[gi]) * O * G;
    for (int64_t s0 = g.starts[gi]; s0 < g.starts[gi + 1]; s0 += RB) {
      int64_t nr = std::min<int64_t>(RB, g.starts[gi + 1] - s0);
      const X* xs[RB];  // a short block repeats its last row (computed, not stored)
      for (int64_t r = 0; r < RB; ++r) xs[r] = xin + int64_t(g.order[s0 + std::min(r, nr - 1)]) * x_stride;
      for (int64_t o = o0; o < o1; ++o) {
        float out[RB];
        dots(be + o * G * 16, se + o * G, xs, nr, out);
        for (int64_t r = 0; r < nr; ++r) y[int64_t(g.order[s0 + r]) * O + o] = out[r];
      }
    }
  });
}

void mxfp4_matvec(const float* x, const uint8_t* blocks, const uint8_t* scales, const Groups& g,
                  int64_t I, int64_t O, float* y, ffi::ThreadPool* pool) {
  const int64_t G = I / 32;
  int64_t R = int64_t(g.order.size());
  float pow2[256];
  for (int s = 0; s < 256; ++s) pow2[s] = half_pow2(uint8_t(s));
#if defined(GPTOSS_BF16_DOT)
  uint16_t* xb = scratch<uint16_t, 1>(R * ((G + 1) / 2 * 64));
  if (mxfp4_bf16_inputs(x, R, I, xb)) {
    packed_rows<8>(xb, (G + 1) / 2 * 64, blocks, scales, g, I, O, y, pool,
                   [&](const uint8_t* bo, const uint8_t* so, const uint16_t* const* xs, int64_t nr, float* out) {
                     if (nr == 1) mxfp4_dots_bf16<1>(bo, so, pow2, G, xs, out);
                     else if (nr == 2) mxfp4_dots_bf16<2>(bo, so, pow2, G, xs, out);
                     else if (nr <= 4) mxfp4_dots_bf16<4>(bo, so, pow2, G, xs, out);
                     else mxfp4_dots_bf16<8>(bo, so, pow2, G, xs, out);
                   });
    return;
  }
#endif
  float* xd = scratch<float, 1>(R * I);
  for (int64_t r = 0; r < R; ++r) deinterleave(x + r * I, I, xd + r * I);
  packed_rows<4>(xd, I, blocks, scales, g, I, O, y, pool,
                 [&](const uint8_t* bo, const uint8_t* so, const float* const* xs, int64_t nr, float* out) {
                   if (nr == 1) mxfp4_dots<1, 4>(bo, so, pow2, G, xs, out);
                   else if (nr == 2) mxfp4_dots<2, 2>(bo, so, pow2, G, xs, out);
                   else mxfp4_dots<4, 1>(bo, so, pow2, G, xs, out);
                 });
}

ffi::Error check_ids(const int32_t* ids, int64_t R, int64_t E) {
  for (int64_t r = 0; r < R; ++r)
    if (ids[r] < 0 || ids[r] >= E) return ffi::Error::InvalidArgument("matrix id out of range");
  return ffi::Error::Success();
}

// x [R, I] f32, w [E, I, O] or [E, O, I] (bf16 / f32), ids [R] s32 -> y [R, O] f32.
ffi::Error MatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> ids,
                      ffi::ResultBuffer<ffi::F32> y, bool out_in) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3) return ffi::Error::InvalidArgument("matvec: x must be [R, I], w [E, ., .]");
  int64_t R = xd[0], I = xd[1], E = wd[0];
  int64_t O = out_in ? wd[1] : wd[2];
  if ((out_in ? wd[2] : wd[1]) != I) return ffi::Error::InvalidArgument("matvec: x and w disagree on I");
  if (auto err = check_ids(ids.typed_data(), R, E); err.failure()) return err;
  Groups g = group_rows(ids.typed_data(), R);
  float* yd = y->typed_data();
  const float* xp = x.typed_data();
  switch (w.element_type()) {
    case ffi::DataType::BF16: {
      auto* wp = reinterpret_cast<const uint16_t*>(w.untyped_data());
#if defined(GPTOSS_BF16_DOT)
      uint16_t* xb = scratch<uint16_t, 1>(R * I);
      if (bf16_values(xp, R * I, xb)) {
        out_in ? matvec_out_in_bf16(xb, wp, g, I, O, yd, &pool) : matvec_in_out_bf16(xb, wp, g, I, O, yd, &pool);
        break;
      }
#endif
      out_in ? matvec_out_in(xp, wp, g, I, O, yd, &pool) : matvec_in_out(xp, wp, g, I, O, yd, &pool);
      break;
    }
    case ffi::DataType::F32: {
      auto* wp = reinterpret_cast<const float*>(w.untyped_data());
      out_in ? matvec_out_in(xp, wp, g, I, O, yd, &pool) : matvec_in_out(xp, wp, g, I, O, yd, &pool);
      break;
    }
    default:
      return ffi::Error::InvalidArgument("matvec: w must be bf16 or f32");
  }
  return ffi::Error::Success();
}

// x [R, I] f32, blocks [E, O, I/32, 16] u8, scales [E, O, I/32] u8, ids [R] s32 -> y [R, O] f32.
ffi::Error Mxfp4MatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> blocks,
                           ffi::Buffer<ffi::U8> scales, ffi::Buffer<ffi::S32> ids, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto bd = blocks.dimensions();
  if (xd.size() != 2 || bd.size() != 4 || bd[3] != 16) return ffi::Error::InvalidArgument("mxfp4_matvec: bad ranks");
  int64_t R = xd[0], I = xd[1], E = bd[0], O = bd[1];
  if (bd[2] * 32 != I) return ffi::Error::InvalidArgument("mxfp4_matvec: x and blocks disagree on I");
  if (auto err = check_ids(ids.typed_data(), R, E); err.failure()) return err;
  Groups g = group_rows(ids.typed_data(), R);
  mxfp4_matvec(x.typed_data(), blocks.typed_data(), scales.typed_data(), g, I, O, y->typed_data(), &pool);
  return ffi::Error::Success();
}

// x [R, I], w [E, I, O] (both bf16 or both f32), starts/sizes [E] s32 -> y [R, O] f32; rows
// outside every expert's range are zeros.
ffi::Error GroupedMatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> starts,
                             ffi::Buffer<ffi::S32> sizes, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[1] != xd[1])
    return ffi::Error::InvalidArgument("grouped_matmul: x must be [R, I], w [E, I, O]");
  if (x.element_type() != w.element_type())
    return ffi::Error::InvalidArgument("grouped_matmul: x and w must have the same type");
  int64_t R = xd[0], I = xd[1], E = wd[0], O = wd[2];
  if (starts.element_count() != size_t(E) || sizes.element_count() != size_t(E))
    return ffi::Error::InvalidArgument("grouped_matmul: starts and sizes must have one entry per matrix");
  const int32_t *st = starts.typed_data(), *sz = sizes.typed_data();
  std::vector<char> covered(size_t(R), 0);
  for (int64_t e = 0; e < E; ++e) {
    if (sz[e] < 0 || st[e] < 0 || int64_t(st[e]) + sz[e] > R)
      return ffi::Error::InvalidArgument("grouped_matmul: a group's rows fall outside x");
    for (int64_t r = st[e]; r < st[e] + sz[e]; ++r) {
      if (covered[r]) return ffi::Error::InvalidArgument("grouped_matmul: groups overlap");
      covered[r] = 1;
    }
  }
  float* yd = y->typed_data();
  for (int64_t r = 0; r < R; ++r)
    if (!covered[r]) std::fill(yd + r * O, yd + (r + 1) * O, 0.f);
  switch (x.element_type()) {
#if defined(GPTOSS_BF16_DOT)
    case ffi::DataType::BF16:
      grouped_matmul(reinterpret_cast<const uint16_t*>(x.untyped_data()),
                     reinterpret_cast<const uint16_t*>(w.untyped_data()), st, sz, E, I, O, yd, &pool);
      return ffi::Error::Success();
#endif
#if defined(GPTOSS_F32_GEMM)
    case ffi::DataType::F32:
      grouped_matmul(reinterpret_cast<const float*>(x.untyped_data()), reinterpret_cast<const float*>(w.untyped_data()),
                     st, sz, E, I, O, yd, &pool);
      return ffi::Error::Success();
#endif
    default:
      return ffi::Error(ffi::ErrorCode::kUnimplemented, "grouped_matmul: not built for this type on this CPU");
  }
}


// ------------------------------------------------------------------ decode attention (T = 1)
// One new query per row against the KV cache: out[b, n] = sum_s p[s] v[b, s, n / G], the
// softmax over the visible keys' scores q.k * scale and the head's sink logit (whose share,
// the sink mass, is returned beside). Key s is visible to row b when kpos[b, s] >= 0 (the slot
// holds a token), kpos <= qpos[b], and qpos - kpos < window (window > 0). XLA's code for these
// small products ran ~1.9 ms per gpt-oss-20b layer at 1,025 cached keys; the cache is 2 MB.
//
// Work items: (row, chunk of up to kKeyChunk keys); each reads its keys' and values' rows front
// to back (all KV heads: the cache is [B, S, K, H]), once for the G query heads that share a KV
// head, and leaves per KV head (max score, sum of exp, exp-weighted values); a second pass
// merges the chunks with the sink. Products, sums and exp in fp32.
constexpr int64_t kKeyChunk = 64;

// exp(x) for x <= 0 (scores minus their maximum), 8 at a time: x = n ln2 + r, |r| <= ln2 / 2,
// exp(r) by its Taylor series to r^7 (relative error < 2e-8 there), times 2^n; below -87 -> 0.
// ln 2 in two parts: the high part has few significant bits, so n * kLn2Hi is exact.
constexpr float kExpMin = -87.f, kLog2e = 1.4426950408889634f;
constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.4286068203094172e-06f;
// exp(r)'s Taylor coefficients to r^7, highest first (Horner's order)
constexpr float kExpTaylor[8] = {1.f / 5040.f, 1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f};
#if defined(__AVX2__)
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lo = _mm256_set1_ps(kExpMin);
  __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 y = _mm256_set1_ps(kExpTaylor[0]);
  for (int i = 1; i < 8; ++i) y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpTaylor[i]));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(under, y);
}
#endif

// The scores and weighted values of up to kLanes query heads of one KV head side by side (one
// fp32 lane each), over nk keys / values in fp32 (rows kf[j], vf[j] of H): every key and value
// element is broadcast once against the lanes. qt [H, kLanes] holds the queries times the scale
// (zero lanes beyond the heads); sc [nk, kLanes] receives the probabilities before normalizing,
// mx / sm [kLanes] the maximum score and the sum of exp, acc [kLanes, H] the weighted values.
constexpr int64_t kLanes = 8;

void attend_lanes(const float* qt, const float* const* kf, const float* const* vf, int64_t nk, int64_t H, float* sc,
                  float* mx, float* sm, float* acc) {
#if defined(__AVX2__)
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= nk; j += 8) {  // 8 keys at a time: each query row loaded once for 8 FMAs
    __m256 a[8];
    for (int u = 0; u < 8; ++u) a[u] = _mm256_setzero_ps();
    for (int64_t h = 0; h < H; ++h) {
      __m256 qh = _mm256_loadu_ps(qt + h * kLanes);
      for (int u = 0; u < 8; ++u) a[u] = _mm256_fmadd_ps(qh, _mm256_broadcast_ss(kf[j + u] + h), a[u]);
    }
    for (int u = 0; u < 8; ++u) {
      _mm256_storeu_ps(sc + (j + u) * kLanes, a[u]);
      m = _mm256_max_ps(m, a[u]);
    }
  }
  for (; j < nk; ++j) {
    const float* kr = kf[j];
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t h = 0;
    for (; h + 2 <= H; h += 2) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qt + h * kLanes), _mm256_broadcast_ss(kr + h), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qt + (h + 1) * kLanes), _mm256_broadcast_ss(kr + h + 1), a1);
    }
    for (; h < H; ++h) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qt + h * kLanes), _mm256_broadcast_ss(kr + h), a0);
    __m256 sj = _mm256_add_ps(a0, a1);
    _mm256_storeu_ps(sc + j * kLanes, sj);
    m = _mm256_max_ps(m, sj);
  }
  __m256 total = _mm256_setzero_ps();
  for (int64_t j = 0; j < nk; ++j) {
    __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(sc + j * kLanes), m));
    _mm256_storeu_ps(sc + j * kLanes, e);
    total = _mm256_add_ps(total, e);
  }
  _mm256_storeu_ps(mx, m);
  _mm256_storeu_ps(sm, total);
  for (int64_t h0 = 0; h0 < H; h0 += 8) {
    int64_t nh = std::min<int64_t>(8, H - h0);
    __m256 o[8];
    for (int u = 0; u < 8; ++u) o[u] = _mm256_setzero_ps();
    if (nh == 8) {
      for (int64_t j = 0; j < nk; ++j) {
        __m256 pj = _mm256_loadu_ps(sc + j * kLanes);
        const float* vr = vf[j] + h0;
        for (int u = 0; u < 8; ++u) o[u] = _mm256_fmadd_ps(pj, _mm256_broadcast_ss(vr + u), o[u]);
      }
    } else {
      for (int64_t j = 0; j < nk; ++j) {
        __m256 pj = _mm256_loadu_ps(sc + j * kLanes);
        const float* vr = vf[j] + h0;
        for (int u = 0; u < nh; ++u) o[u] = _mm256_fmadd_ps(pj, _mm256_broadcast_ss(vr + u), o[u]);
      }
    }
    alignas(32) float t[8][kLanes];
    for (int u = 0; u < 8; ++u) _mm256_store_ps(t[u], o[u]);
    for (int64_t l = 0; l < kLanes; ++l)
      for (int64_t u = 0; u < nh; ++u) acc[l * H + h0 + u] = t[u][l];
  }
#else
  float m[kLanes], total[kLanes] = {0.f};
  for (int64_t l = 0; l < kLanes; ++l) m[l] = -INFINITY;
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t l = 0; l < kLanes; ++l) {
      float d = 0.f;
      for (int64_t h = 0; h < H; ++h) d += qt[h * kLanes + l] * kf[j][h];
      sc[j * kLanes + l] = d;
      m[l] = std::max(m[l], d);
    }
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t l = 0; l < kLanes; ++l) total[l] += (sc[j * kLanes + l] = std::exp(sc[j * kLanes + l] - m[l]));
  for (int64_t l = 0; l < kLanes; ++l) {
    mx[l] = m[l];
    sm[l] = total[l];
    for (int64_t h = 0; h < H; ++h) {
      float o = 0.f;
      for (int64_t j = 0; j < nk; ++j) o += sc[j * kLanes + l] * vf[j][h];
      acc[l * H + h] = o;
    }
  }
#endif
}

// n values as fp32 into buf (bf16 widened)
inline void to_f32(const float* src, float* buf, int64_t n) { std::memcpy(buf, src, size_t(n) * sizeof(float)); }
inline void to_f32(const uint16_t* src, float* buf, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(buf + i, load8(src + i));
#endif
  for (; i < n; ++i) buf[i] = bf16_to_f32(src[i]);
}

template <class T>
void decode_attention(const float* q, const T* k, const T* v, const float* sinks, const int32_t* kpos,
                      const int32_t* qpos, int64_t B, int64_t S, int64_t N, int64_t K, int64_t H, int64_t window,
                      float scale, float* out, float* mass, ffi::ThreadPool* pool) {
  const int64_t G = N / K, KH = K * H;
  // keys per item: their keys and values as fp32 within ~128 KB (L2), 8 .. kKeyChunk
  const int64_t C = std::max<int64_t>(8, std::min<int64_t>(kKeyChunk, (int64_t(1) << 17) / (2 * KH * 4)));
  const int64_t chunks = (S + C - 1) / C;
  const int64_t per = G * (H + 2);  // a chunk's result for a KV head: max and sum per head, then G x H
  float* part = scratch<float, 2>(B * K * chunks * per);
  parallel_for(pool, B * chunks, [&](int64_t item) {
    int64_t c = item % chunks, b = item / chunks;
    int64_t s0 = c * C, s1 = std::min(S, s0 + C);
    int32_t qp = qpos[b];
    float* buf = scratch<float, 3>(2 * C * KH + H * kLanes + C * kLanes + kLanes * (H + 2));
    float *kf = buf, *vf = kf + C * KH, *qt = vf + C * KH, *sc = qt + H * kLanes;
    float* lanes = sc + C * kLanes;  // [max, sum, acc [kLanes, H]] of one block of heads
    // the visible keys' rows (all KV heads), read front to back and widened to fp32
    int64_t nk = 0;
    for (int64_t s = s0; s < s1; ++s) {
      int32_t kp = kpos[b * S + s];
      if (kp < 0 || kp > qp || (window > 0 && int64_t(qp) - kp >= window)) continue;
      to_f32(k + (b * S + s) * KH, kf + nk * KH, KH);
      to_f32(v + (b * S + s) * KH, vf + nk * KH, KH);
      ++nk;
    }
    for (int64_t kh = 0; kh < K; ++kh) {
      float* res = part + ((b * K + kh) * chunks + c) * per;
      float *mx = res, *sm = res + G, *acc = res + 2 * G;
      if (nk == 0) {
        std::fill(res, res + per, 0.f);
        std::fill(mx, mx + G, -INFINITY);
        continue;
      }
      const float* krow[kKeyChunk];
      const float* vrow[kKeyChunk];
      for (int64_t j = 0; j < nk; ++j) {
        krow[j] = kf + j * KH + kh * H;
        vrow[j] = vf + j * KH + kh * H;
      }
      for (int64_t g0 = 0; g0 < G; g0 += kLanes) {
        int64_t ng = std::min(kLanes, G - g0);
        for (int64_t h = 0; h < H; ++h)
          for (int64_t l = 0; l < kLanes; ++l)
            qt[h * kLanes + l] = l < ng ? q[(b * N + kh * G + g0 + l) * H + h] * scale : 0.f;
        attend_lanes(qt, krow, vrow, nk, H, sc, lanes, lanes + kLanes, lanes + 2 * kLanes);
        for (int64_t l = 0; l < ng; ++l) {
          mx[g0 + l] = lanes[l];
          sm[g0 + l] = lanes[kLanes + l];
          std::copy(lanes + 2 * kLanes + l * H, lanes + 2 * kLanes + (l + 1) * H, acc + (g0 + l) * H);
        }
      }
    }
  });
  // merge: exp(m_c - M) rescales each chunk to the common maximum M (the sink's logit included)
  parallel_for(pool, B * N, [&](int64_t bn) {
    int64_t b = bn / N, n = bn % N, kh = n / G, g = n % G;
    const float* base = part + (b * K + kh) * chunks * per;
    float M = sinks[n];
    for (int64_t c = 0; c < chunks; ++c) M = std::max(M, base[c * per + g]);
    float sink = std::exp(sinks[n] - M), total = sink;
    float* o = out + bn * H;
    std::fill(o, o + H, 0.f);
    for (int64_t c = 0; c < chunks; ++c) {
      const float* res = base + c * per;
      if (res[g] == -INFINITY) continue;
      float f = std::exp(res[g] - M);
      total += f * res[G + g];
      const float* a = res + 2 * G + g * H;
      int64_t h = 0;
#if defined(__AVX2__)
      __m256 fv = _mm256_set1_ps(f);
      for (; h + 8 <= H; h += 8) _mm256_storeu_ps(o + h, _mm256_fmadd_ps(fv, _mm256_loadu_ps(a + h), _mm256_loadu_ps(o + h)));
#endif
      for (; h < H; ++h) o[h] += f * a[h];
    }
    float inv = 1.f / total;
    for (int64_t h = 0; h < H; ++h) o[h] *= inv;
    mass[bn] = sink * inv;
  });
}

// q [B, N, H] f32, k/v [B, S, K, H] (bf16 or f32), sinks [N] f32, kpos [B, S] s32, qpos [B] s32
// -> out [B, N, H] f32, sink mass [B, N] f32. Attributes: window (0: none), scale.
ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                               ffi::Buffer<ffi::F32> sinks, ffi::Buffer<ffi::S32> kpos, ffi::Buffer<ffi::S32> qpos,
                               ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> mass, int64_t window,
                               float scale) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || kd[0] != qd[0] || kd[3] != qd[2])
    return ffi::Error::InvalidArgument("decode_attention: q must be [B, N, H], k [B, S, K, H]");
  int64_t B = qd[0], N = qd[1], H = qd[2], S = kd[1], K = kd[2];
  auto vd = v.dimensions();
  if (vd.size() != 4 || vd[0] != B || vd[1] != S || vd[2] != K || vd[3] != H || v.element_type() != k.element_type())
    return ffi::Error::InvalidArgument("decode_attention: v must match k");
  if (K == 0 || N % K != 0) return ffi::Error::InvalidArgument("decode_attention: heads must be a multiple of KV heads");
  if (sinks.element_count() != size_t(N) || kpos.element_count() != size_t(B * S) || qpos.element_count() != size_t(B))
    return ffi::Error::InvalidArgument("decode_attention: sinks [N], kpos [B, S], qpos [B]");
  const float *qp = q.typed_data(), *sp = sinks.typed_data();
  const int32_t *kp = kpos.typed_data(), *qq = qpos.typed_data();
  float *op = out->typed_data(), *mp = mass->typed_data();
  switch (k.element_type()) {
    case ffi::DataType::F32:
      decode_attention(qp, reinterpret_cast<const float*>(k.untyped_data()),
                       reinterpret_cast<const float*>(v.untyped_data()), sp, kp, qq, B, S, N, K, H, window, scale, op,
                       mp, &pool);
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      decode_attention(qp, reinterpret_cast<const uint16_t*>(k.untyped_data()),
                       reinterpret_cast<const uint16_t*>(v.untyped_data()), sp, kp, qq, B, S, N, K, H, window, scale,
                       op, mp, &pool);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("decode_attention: the cache must be bf16 or f32");
  }
}


// ------------------------------------------------------ prefill attention (self-attention)
// A prefill's (or an uncached forward's) self-attention with sinks, as a flash-attention loop:
// queries and keys are the same T tokens, each segment contiguous with consecutive positions
// (the contract of `attention.self_attention`), so the keys a token may see lie in the array
// slots [t - W + 1, t] (sliding layers) or [0, t] (full layers), and blocks of keys outside that
// range are never visited. Within the visited blocks, key s is visible to token t when
// seg[s] == seg[t], pos[s] <= pos[t] and pos[t] - pos[s] < W (`attention.attention_mask`).
//
// A first pass lays each KV head's keys out transposed in blocks of kKeyBlock ([H, kKeyBlock]) and
// its values as fp32 rows. Work items are (row b, KV head, kQRows tokens): the G query heads of
// the KV head for those tokens (M = kQRows * G query vectors, scaled) go through every visited
// key block: scores by register tiles of 8 query vectors x 32 keys, an online softmax per query
// vector (running maximum, starting at the head's sink logit, and sum of exp; the weighted
// values rescaled when the maximum grows), then the weighted values by tiles of 6 query vectors x
// 64 columns. fp32 products, sums, exp and probabilities; no [T, T] matrix is ever written.
#if defined(GPTOSS_F32_GEMM)
#define GPTOSS_PREFILL_ATTENTION 1
constexpr int64_t kQRows = 16;
constexpr int64_t kKeyBlock = 32;

// exp(x) for x <= 0, 16 at a time (exp_nonpositive's steps and constants; 2^n by VSCALEFPS).
inline __m512 exp_nonpositive16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(kExpMin);
  __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  x = _mm512_max_ps(x, lo);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 y = _mm512_set1_ps(kExpTaylor[0]);
  for (int i = 1; i < 8; ++i) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpTaylor[i]));
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(y, n));
}

// p[r, 0:32] = qs[r] . kt[:, 0:32] for NR query vectors (rows of qs, H apart); kt [H, 32].
template <int NR>
inline void qk_tile(const float* qs, const float* kt, int64_t H, float* p) {
  __m512 a0[NR], a1[NR];
  for (int r = 0; r < NR; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  for (int64_t h = 0; h < H; ++h) {
    __m512 k0 = _mm512_loadu_ps(kt + h * kKeyBlock), k1 = _mm512_loadu_ps(kt + h * kKeyBlock + 16);
    for (int r = 0; r < NR; ++r) {
      __m512 qv = _mm512_set1_ps(qs[r * H + h]);
      a0[r] = _mm512_fmadd_ps(qv, k0, a0[r]);
      a1[r] = _mm512_fmadd_ps(qv, k1, a1[r]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    _mm512_storeu_ps(p + r * kKeyBlock, a0[r]);
    _mm512_storeu_ps(p + r * kKeyBlock + 16, a1[r]);
  }
}

void qk_block(const float* qs, const float* kt, int64_t H, int64_t nm, float* p) {
  int64_t m = 0;
  for (; m + 8 <= nm; m += 8) qk_tile<8>(qs + m * H, kt, H, p + m * kKeyBlock);
  const float* qr = qs + m * H;
  float* pr = p + m * kKeyBlock;
  switch (nm - m) {
    case 7: qk_tile<7>(qr, kt, H, pr); break;
    case 6: qk_tile<6>(qr, kt, H, pr); break;
    case 5: qk_tile<5>(qr, kt, H, pr); break;
    case 4: qk_tile<4>(qr, kt, H, pr); break;
    case 3: qk_tile<3>(qr, kt, H, pr); break;
    case 2: qk_tile<2>(qr, kt, H, pr); break;
    case 1: qk_tile<1>(qr, kt, H, pr); break;
    default: break;
  }
}

// o[r, h0 : h0 + 16 NU] += p[r, 0:32] @ vb[0:32, h0 : h0 + 16 NU] for NR query vectors.
template <int NR, int NU>
inline void pv_tile(const float* p, const float* vb, int64_t H, int64_t h0, float* o) {
  __m512 acc[NR][NU];
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < NU; ++u) acc[r][u] = _mm512_loadu_ps(o + r * H + h0 + 16 * u);
  for (int64_t j = 0; j < kKeyBlock; ++j) {
    __m512 vv[NU];
    for (int u = 0; u < NU; ++u) vv[u] = _mm512_loadu_ps(vb + j * H + h0 + 16 * u);
    for (int r = 0; r < NR; ++r) {
      __m512 pr = _mm512_set1_ps(p[r * kKeyBlock + j]);
      for (int u = 0; u < NU; ++u) acc[r][u] = _mm512_fmadd_ps(pr, vv[u], acc[r][u]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < NU; ++u) _mm512_storeu_ps(o + r * H + h0 + 16 * u, acc[r][u]);
}

template <int NU>
void pv_rows(const float* p, const float* vb, int64_t H, int64_t h0, int64_t nm, float* o) {
  int64_t m = 0;
  for (; m + 6 <= nm; m += 6) pv_tile<6, NU>(p + m * kKeyBlock, vb, H, h0, o + m * H);
  const float* pr = p + m * kKeyBlock;
  float* orow = o + m * H;
  switch (nm - m) {
    case 5: pv_tile<5, NU>(pr, vb, H, h0, orow); break;
    case 4: pv_tile<4, NU>(pr, vb, H, h0, orow); break;
    case 3: pv_tile<3, NU>(pr, vb, H, h0, orow); break;
    case 2: pv_tile<2, NU>(pr, vb, H, h0, orow); break;
    case 1: pv_tile<1, NU>(pr, vb, H, h0, orow); break;
    default: break;
  }
}

void pv_block(const float* p, const float* vb, int64_t H, int64_t nm, float* o) {
  for (int64_t h0 = 0; h0 < H; h0 += 64) {
    switch (std::min<int64_t>(4, (H - h0) / 16)) {
      case 4: pv_rows<4>(p, vb, H, h0, nm, o); break;
      case 3: pv_rows<3>(p, vb, H, h0, nm, o); break;
      case 2: pv_rows<2>(p, vb, H, h0, nm, o); break;
      default: pv_rows<1>(p, vb, H, h0, nm, o); break;
    }
  }
}

// q [B, T, N, H], k/v [B, T, K, H] (T: fp32 or bf16), pos/seg [B, T] -> out [B, T, N, H], mass [B, T, N].
// H a multiple of 16.
template <class T>
void prefill_attention(const T* q, const T* k, const T* v, const float* sinks, const int32_t* pos, const int32_t* seg,
                       int64_t B, int64_t Tn, int64_t N, int64_t K, int64_t H, int64_t window, float scale,
                       float* out, float* mass, ffi::ThreadPool* pool) {
  const int64_t G = N / K, KB = kKeyBlock, nkb = (Tn + KB - 1) / KB;
  // keys transposed per block [B, K, nkb, H, KB] and values [B, K, nkb * KB, H], fp32, zero past T
  float* kt = scratch<float, 4>(B * K * nkb * KB * H);
  float* vf = scratch<float, 5>(B * K * nkb * KB * H);
  parallel_for(pool, B * K * nkb, [&](int64_t it) {
    int64_t c = it % nkb, b = it / nkb / K, kh = it / nkb % K;
    float *ktb = kt + it * KB * H, *vb = vf + it * KB * H;
    for (int64_t j = 0; j < KB; ++j) {
      int64_t s = c * KB + j;
      if (s >= Tn) {
        for (int64_t h = 0; h < H; ++h) ktb[h * KB + j] = 0.f;
        std::fill(vb + j * H, vb + (j + 1) * H, 0.f);
        continue;
      }
      const T* kr = k + ((b * Tn + s) * K + kh) * H;
      for (int64_t h = 0; h < H; ++h) ktb[h * KB + j] = load_f32(kr, h);
      to_f32(v + ((b * Tn + s) * K + kh) * H, vb + j * H, H);
    }
  });
  const int64_t R = kQRows, nqb = (Tn + R - 1) / R, M = R * G;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // the longest items (the last tokens of a full layer) first
  parallel_for(pool, B * K * nqb, [&](int64_t it) {
    int64_t qb = nqb - 1 - it / (B * K), b = it % (B * K) / K, kh = it % K;
    int64_t t0 = qb * R, t1 = std::min(Tn, t0 + R), nm = (t1 - t0) * G;
    float* buf = scratch<float, 6>(2 * M * H + M * KB + 2 * M);
    float *qs = buf, *o = qs + M * H, *p = o + M * H, *mx = p + M * KB, *sm = mx + M;
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t g = 0; g < G; ++g) {
        int64_t m = (t - t0) * G + g, n = kh * G + g;
        const T* qr = q + ((b * Tn + t) * N + n) * H;
        for (int64_t h = 0; h < H; ++h) qs[m * H + h] = load_f32(qr, h) * scale;
        std::fill(o + m * H, o + (m + 1) * H, 0.f);
        mx[m] = sinks[n];
        sm[m] = 0.f;
      }
    const int32_t *pb = pos + b * Tn, *sb = seg + b * Tn;
    const int64_t first = window > 0 ? std::max<int64_t>(0, t0 - window + 1) : 0;
    for (int64_t c = first / KB; c * KB < t1; ++c) {
      const int64_t s0 = c * KB, base = (b * K + kh) * nkb + c;
      qk_block(qs, kt + base * KB * H, H, nm, p);
      // the block's keys: positions and segments, lanes past T invalid
      __mmask16 valid[2];
      __m512i kp[2], ks[2];
      for (int u = 0; u < 2; ++u) {
        int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, Tn - s0 - 16 * u));
        valid[u] = _mm512_cmp_epi32_mask(lane, _mm512_set1_epi32(int32_t(left)), _MM_CMPINT_LT);
        kp[u] = _mm512_maskz_loadu_epi32(valid[u], pb + s0 + 16 * u);
        ks[u] = _mm512_maskz_loadu_epi32(valid[u], sb + s0 + 16 * u);
      }
      for (int64_t t = t0; t < t1; ++t) {
        __m512i qp = _mm512_set1_epi32(pb[t]), qg = _mm512_set1_epi32(sb[t]);
        __mmask16 vis[2];
        for (int u = 0; u < 2; ++u) {
          vis[u] = valid[u] & _mm512_cmp_epi32_mask(ks[u], qg, _MM_CMPINT_EQ) &
                   _mm512_cmp_epi32_mask(kp[u], qp, _MM_CMPINT_LE);
          if (window > 0)  // pos[t] - pos[s] < W  <=>  pos[s] > pos[t] - W
            vis[u] &= _mm512_cmp_epi32_mask(kp[u], _mm512_set1_epi32(int32_t(pb[t] - window)), _MM_CMPINT_NLE);
        }
        if ((vis[0] | vis[1]) == 0) {
          for (int64_t g = 0; g < G; ++g) std::fill(p + ((t - t0) * G + g) * KB, p + ((t - t0) * G + g + 1) * KB, 0.f);
          continue;
        }
        const __m512 ninf = _mm512_set1_ps(-INFINITY);
        for (int64_t g = 0; g < G; ++g) {
          int64_t m = (t - t0) * G + g;
          float* pr = p + m * KB;
          __m512 s[2] = {_mm512_loadu_ps(pr), _mm512_loadu_ps(pr + 16)};
          float top = _mm512_reduce_max_ps(
              _mm512_max_ps(_mm512_mask_mov_ps(ninf, vis[0], s[0]), _mm512_mask_mov_ps(ninf, vis[1], s[1])));
          if (top > mx[m]) {  // a new maximum: rescale what was summed so far
            float f = std::exp(mx[m] - top);
            sm[m] *= f;
            __m512 fv = _mm512_set1_ps(f);
            for (int64_t h = 0; h < H; h += 16)
              _mm512_storeu_ps(o + m * H + h, _mm512_mul_ps(fv, _mm512_loadu_ps(o + m * H + h)));
            mx[m] = top;
          }
          __m512 mv = _mm512_set1_ps(mx[m]);
          __m512 total = _mm512_setzero_ps();
          for (int u = 0; u < 2; ++u) {
            __m512 e = _mm512_maskz_mov_ps(vis[u], exp_nonpositive16(_mm512_maskz_sub_ps(vis[u], s[u], mv)));
            _mm512_storeu_ps(pr + 16 * u, e);
            total = _mm512_add_ps(total, e);
          }
          sm[m] += _mm512_reduce_add_ps(total);
        }
      }
      pv_block(p, vf + base * KB * H, H, nm, o);
    }
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t g = 0; g < G; ++g) {
        int64_t m = (t - t0) * G + g, n = kh * G + g;
        float sink = std::exp(sinks[n] - mx[m]), inv = 1.f / (sm[m] + sink);
        float* orow = out + ((b * Tn + t) * N + n) * H;
        for (int64_t h = 0; h < H; ++h) orow[h] = o[m * H + h] * inv;
        mass[(b * Tn + t) * N + n] = sink * inv;
      }
  });
}

// q [B, T, N, H], k/v [B, T, K, H] (all bf16 or all f32), sinks [N] f32, pos/seg [B, T] s32 ->
// out [B, T, N, H] f32, sink mass [B, T, N] f32. Attributes: window (0: none), scale.
ffi::Error PrefillAttentionImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                                ffi::Buffer<ffi::F32> sinks, ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> seg,
                                ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> mass, int64_t window,
                                float scale) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("prefill_attention: q, k, v must be [B, T, heads, H]");
  int64_t B = qd[0], Tn = qd[1], N = qd[2], H = qd[3], K = kd[2];
  if (kd[0] != B || kd[1] != Tn || kd[3] != H || vd[0] != B || vd[1] != Tn || vd[2] != K || vd[3] != H)
    return ffi::Error::InvalidArgument("prefill_attention: k and v must be [B, T, K, H] of q's B, T, H");
  if (K == 0 || N % K != 0 || H % 16 != 0)
    return ffi::Error::InvalidArgument("prefill_attention: heads a multiple of KV heads, H a multiple of 16");
  if (q.element_type() != k.element_type() || v.element_type() != k.element_type())
    return ffi::Error::InvalidArgument("prefill_attention: q, k, v must have one dtype");
  if (sinks.element_count() != size_t(N) || pos.element_count() != size_t(B * Tn) ||
      seg.element_count() != size_t(B * Tn))
    return ffi::Error::InvalidArgument("prefill_attention: sinks [N], positions and segments [B, T]");
  const float* sp = sinks.typed_data();
  const int32_t *pp = pos.typed_data(), *gp = seg.typed_data();
  float *op = out->typed_data(), *mp = mass->typed_data();
  switch (k.element_type()) {
    case ffi::DataType::F32:
      prefill_attention(reinterpret_cast<const float*>(q.untyped_data()),
                        reinterpret_cast<const float*>(k.untyped_data()),
                        reinterpret_cast<const float*>(v.untyped_data()), sp, pp, gp, B, Tn, N, K, H, window, scale,
                        op, mp, &pool);
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      prefill_attention(reinterpret_cast<const uint16_t*>(q.untyped_data()),
                        reinterpret_cast<const uint16_t*>(k.untyped_data()),
                        reinterpret_cast<const uint16_t*>(v.untyped_data()), sp, pp, gp, B, Tn, N, K, H, window,
                        scale, op, mp, &pool);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("prefill_attention: q, k, v must be bf16 or f32");
  }
}
#endif  // GPTOSS_F32_GEMM

}  // namespace

// 1 when grouped_matmul takes fp32 (AVX-512F).
extern "C" int GptossHasGroupedF32() {
#if defined(GPTOSS_F32_GEMM)
  return 1;
#else
  return 0;
#endif
}

// 1 when the dense [in, out] products with fp32 inputs share each load among rows (AVX-512).
extern "C" int GptossHasSharedRows() {
#if defined(GPTOSS_ROWS_AVX512)
  return 1;
#else
  return 0;
#endif
}

// 1 when the MXFP4 kernel was built with the bf16 dot product path (AVX512-BF16).
extern "C" int GptossHasBf16Dot() {
#if defined(GPTOSS_BF16_DOT)
  return 1;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossMatvec, MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("out_in"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossMxfp4Matvec, Mxfp4MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossGroupedMatmul, GroupedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale"));

// Defined only where prefill_attention is built (AVX-512F): the library's loader registers it when present.
#if defined(GPTOSS_PREFILL_ATTENTION)
XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossPrefillAttention, PrefillAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale"));
#endif
