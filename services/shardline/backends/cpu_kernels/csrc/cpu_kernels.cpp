// CPU kernels for the decode step of a bfloat16 (or int8 / int4 weight) stage.
//
// A decode step reads every weight once for a handful of rows, so it is bound by memory
// bandwidth, and by per-op overhead: PyTorch's bf16 matmul reaches about half the bandwidth
// at one row, and each small elementwise op costs microseconds. These kernels read weights
// at close to the bandwidth and do each layer in a few calls:
//
//   rms_norm         (residual += x;) out = x / rms(x) * w        bf16 in/out, f32 math
//   linear_vnni      y = x @ w^T (+ b)          w bf16, VNNI-blocked: AVX512-BF16 GEMV for
//                                               up to 4 rows; beyond, AMX tiles, or AVX512-BF16
//                                               register tiles on CPUs without AMX
//   linear_int8      y = x @ (q * s)^T (+ b)    q per channel, stored as q + 128 (uint8)
//   linear_int4      y = x @ w4^T (+ b)         w4 nibbles, scale and offset per group of 32
//                    both tiled 16 outputs x 4 bytes per vector for VNNI's dpbusd, with the
//                    activations quantized to int8 per group of 32; up to 16 rows
//                    (two passes of 8) per read of the weights
//   dequantize_*     int8 / int4 weights -> bf16, for steps of many rows (prefill)
//   rope_store_kv    rotary on q, k of a fused qkv row, k / v written to the paged cache
//   paged_attention  each query row against its own paged context (decode rows, and the rows
//                    of prefill chunks: causal attention as a context per row); runs of up to
//                    16 rows of one prefill chunk on AMX tiles where the CPU has them
//   silu_mul         silu(gate) * up
//   argmax_rows      greedy sampling's argmax over float32 logits
//
// Kernels are compiled for AVX512 (F, BW, VL, BF16, VNNI) by function attribute, so the
// module loads on any x86-64 CPU; Python calls them only when the CPU has those features
// (cpu_kernels.py). Work is split over PyTorch's intra-op threads (at::parallel_for, inline
// OpenMP: the module is built with -fopenmp and shares PyTorch's libgomp).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <utility>
#include <cmath>
#include <cstring>
#include <vector>

#define KERNEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,fma,f16c")))
#define AMX_KERNEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")))

using bf16_t = uint16_t;

namespace {

KERNEL inline __m512 load_bf16x16(const bf16_t* p) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

KERNEL inline void store_bf16x16(bf16_t* p, __m512 v) {
  __m256bh h = _mm512_cvtneps_pbh(v);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i&>(h));
}

inline float bf16_to_f32(bf16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16_t f32_to_bf16(float f) {      // round to nearest even, as PyTorch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7fc0;
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<bf16_t>(u >> 16);
}

const bf16_t* bf16_ptr(const at::Tensor& t) {
  return reinterpret_cast<const bf16_t*>(t.data_ptr<at::BFloat16>());
}
bf16_t* bf16_mut(at::Tensor& t) { return reinterpret_cast<bf16_t*>(t.data_ptr<at::BFloat16>()); }

void check(bool ok, const char* what) { TORCH_CHECK(ok, "shardline cpu kernel: ", what); }

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              name, " must be a contiguous 2-d bfloat16 tensor");
}

// [0, n) over the intra-op threads, in contiguous chunks of about n / (per_thread * threads)
// that each thread takes from a shared counter as it goes. Equal static parts would make every
// call as slow as its slowest thread, and a served worker shares its cores with the scheduler
// and the tokenizer: one preempted thread stalled whole steps (16 concurrent requests through
// the stack on 2 Zen 4 cores, three interleaved pairs of runs: 273 / 292 / 315 tok/s with
// equal parts, 311 / 338 / 332 with shared chunks; batch 1 unchanged). Streaming kernels (a
// decode step's weights) keep 4 chunks per thread; compute-bound ones (a prefill's GEMM) take
// 16, whose smaller last chunks leave less waiting at the end (512-row prefill step on 2
// Emerald Rapids cores, two interleaved runs: 169 / 155 ms with 4, 152 / 144 with 16; decode
// with 16: 3% slower).
template <typename F>
void parallel(int64_t n, F&& f, int64_t per_thread = 4) {
  int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || at::in_parallel_region()) {
    if (n > 0) f(0, n);
    return;
  }
  int64_t chunk = std::max<int64_t>(1, n / (per_thread * threads));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t b = next.fetch_add(chunk); b < n; b = next.fetch_add(chunk))
      f(b, std::min(n, b + chunk));
  });
}

// exp(x) = 2^n * e^r, n = round(x / ln 2), |r| <= ln 2 / 2, e^r by its Taylor series to r^7
// (relative error below 2e-7 on [-87, 88]).
KERNEL inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-87.f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// silu(g) * u = g / (1 + e^-g) * u: the reciprocal estimate (14 bits) refined by one Newton
// step, not a division
KERNEL inline __m512 silu_mul16(__m512 g, __m512 u) {
  __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g)));
  __m512 r = _mm512_rcp14_ps(d);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
  return _mm512_mul_ps(_mm512_mul_ps(g, r), u);
}

// Software prefetch distance, in weight tiles, for the streaming kernels: the hardware
// prefetchers alone reached about 16 GB/s of the ~29 GB/s two cores read.
constexpr int PF_TILES = 2;
constexpr int64_t PF_BYTES = 4096;

// Writes y[:, n0:n1] (float32 or bf16) from dot products, adding bias.
template <typename Dot>
void linear_driver(int64_t m, int64_t n, const c10::optional<at::Tensor>& bias, at::Tensor& y,
                   Dot&& dot) {
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  bool f32 = y.scalar_type() == at::kFloat;
  float* yf = f32 ? y.data_ptr<float>() : nullptr;
  bf16_t* yb = f32 ? nullptr : bf16_mut(y);
  int64_t tiles = (n + 3) / 4;
  parallel(tiles, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(m * 4);
    for (int64_t t = t0; t < t1; ++t) {
      int64_t n0 = t * 4;
      int nb = static_cast<int>(std::min<int64_t>(4, n - n0));
      dot(n0, nb, buf.data());
      for (int64_t j = 0; j < m; ++j)
        for (int i = 0; i < nb; ++i) {
          float v = buf[j * nb + i] + (b ? b[n0 + i] : 0.f);
          if (f32) yf[j * n + n0 + i] = v; else yb[j * n + n0 + i] = f32_to_bf16(v);
        }
    }
  });
}

// ---- bf16 linear on the VNNI-blocked layout (one weight copy for GEMV and AMX) --------------
// Layout: w [n, k] -> [n / 16][k / 2][16][2]: per block of 16 output rows, for each pair of
// input channels, the 16 rows' two values (64 bytes). n is padded to a multiple of 32.
//   few rows:  y[m, block] += w_block[pair] * broadcast(x[m, pair])  (AVX512-BF16, no reductions)
//   many rows: AMX tiles, C[32 x 32] += A[32 x 32 k] . B[32 k x 32], 2 x 2 tiles of 16 x 16
//              (up to 16 rows, a decode step: C[16 x 32], 1 x 2 tiles); without AMX,
//              register tiles of up to 16 rows in the few-rows form

// few rows (M <= 4): per 16-row block, ACC interleaved accumulators per input row
template <int M>
KERNEL void vnni_gemv_block(const bf16_t* x, int64_t k, const bf16_t* wb, float* out /* [M][16] */) {
  constexpr int ACC = M == 1 ? 4 : (M == 2 ? 2 : 1);
  __m512 acc[M][ACC];
  for (int m = 0; m < M; ++m)
    for (int a = 0; a < ACC; ++a) acc[m][a] = _mm512_setzero_ps();
  const int32_t* xp[M];
  for (int m = 0; m < M; ++m) xp[m] = reinterpret_cast<const int32_t*>(x + m * k);
  const int64_t pairs = k / 2;
  // blocks are contiguous: prefetch PF_BYTES ahead in the stream (into the next block near
  // the end of this one); further ahead, prefetched lines were evicted before use
  const char* ahead = reinterpret_cast<const char*>(wb) + PF_BYTES;
  for (int64_t r = 0; r < pairs; r += ACC) {
    for (int a = 0; a < ACC; ++a) _mm_prefetch(ahead + (r + a) * 64, _MM_HINT_T0);
    for (int a = 0; a < ACC; ++a) {
      __m512bh w = reinterpret_cast<__m512bh>(_mm512_loadu_si512(wb + (r + a) * 32));
      for (int m = 0; m < M; ++m)
        acc[m][a] = _mm512_dpbf16_ps(acc[m][a], w,
                                     reinterpret_cast<__m512bh>(_mm512_set1_epi32(xp[m][r + a])));
    }
  }
  for (int m = 0; m < M; ++m) {
    __m512 sum = acc[m][0];
    for (int a = 1; a < ACC; ++a) sum = _mm512_add_ps(sum, acc[m][a]);
    _mm512_storeu_ps(out + m * 16, sum);
  }
}

// more rows without AMX: a register tile of M rows x NB blocks of 16 outputs (M * NB <= 16
// accumulators); each weight vector feeds M FMAs, each broadcast activation pair NB. Rows come
// in chunks of up to 16, so that a decode batch of 16 streams each weight from memory once,
// with 16 FMAs per 64 bytes: enough arithmetic to keep up with the memory, no more (two passes
// of 8 rows took 13.9 ms for SmolLM2's layers at 16 rows on Zen 4, one pass 10.9).
template <int M, int NB>
KERNEL void vnni_rows_tile(const bf16_t* x, int64_t k, const bf16_t* w0, bool prefetch,
                           float* out /* [M][NB * 16] */) {
  __m512 acc[M][NB];
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
  const int32_t* xp[M];
  for (int m = 0; m < M; ++m) xp[m] = reinterpret_cast<const int32_t*>(x + m * k);
  const int64_t pairs = k / 2;
  for (int64_t r = 0; r < pairs; ++r) {
    __m512bh w[NB];
    for (int b = 0; b < NB; ++b) {
      const bf16_t* wr = w0 + b * 16 * k + r * 32;
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(wr) + PF_BYTES, _MM_HINT_T0);
      w[b] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(wr));
    }
    for (int m = 0; m < M; ++m) {
      __m512bh xb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(xp[m][r]));
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], w[b], xb);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(out + m * NB * 16 + b * 16, acc[m][b]);
}

// rows r0 .. r0 + rows (rows <= 16) against the two 16-output blocks at wb -> c [rows][32]:
// up to 8 rows as one 8 x 2 tile, more as two 16 x 1 tiles
template <int M>
KERNEL void vnni_rows_chunk(const bf16_t* x, int64_t k, const bf16_t* wb, bool pf, float* c) {
  if constexpr (M <= 8) {
    vnni_rows_tile<M, 2>(x, k, wb, pf, c);
  } else {
    float half[M * 16];
    for (int b = 0; b < 2; ++b) {
      vnni_rows_tile<M, 1>(x, k, wb + b * 16 * k, pf, half);
      for (int m = 0; m < M; ++m) std::memcpy(c + m * 32 + b * 16, half + m * 16, 64);
    }
  }
}

using RowsChunkFn = void (*)(const bf16_t*, int64_t, const bf16_t*, bool, float*);
template <int... Ms>
constexpr std::array<RowsChunkFn, sizeof...(Ms)> rows_chunk_table(std::integer_sequence<int, Ms...>) {
  return {&vnni_rows_chunk<Ms + 1>...};
}
constexpr auto ROWS_CHUNK = rows_chunk_table(std::make_integer_sequence<int, 16>{});

// out[0:count] = v + bias, as float32 (yf) or bf16 (yb), 16 at a time
KERNEL void store_out(const float* v, int64_t count, const float* bias, float* yf, bf16_t* yb) {
  for (int64_t i = 0; i < count; i += 16) {
    __mmask16 mask = count - i >= 16 ? static_cast<__mmask16>(0xFFFF)
                                     : static_cast<__mmask16>((1u << (count - i)) - 1);
    __m512 f = _mm512_maskz_loadu_ps(mask, v + i);
    if (bias) f = _mm512_add_ps(f, _mm512_maskz_loadu_ps(mask, bias + i));
    if (yf) {
      _mm512_mask_storeu_ps(yf + i, mask, f);
    } else {
      __m256bh h = _mm512_cvtneps_pbh(f);
      _mm256_mask_storeu_epi16(yb + i, mask, reinterpret_cast<__m256i&>(h));
    }
  }
}

struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// 16 outputs silu(gate) * up from a row's 32 (16 gate, then 16 up), bias added first
KERNEL void glu_out(const float* c, const float* bias, float* yf, bf16_t* yb) {
  __m512 g = _mm512_loadu_ps(c), u = _mm512_loadu_ps(c + 16);
  if (bias) {
    g = _mm512_add_ps(g, _mm512_loadu_ps(bias));
    u = _mm512_add_ps(u, _mm512_loadu_ps(bias + 16));
  }
  __m512 v = silu_mul16(g, u);
  if (yf) _mm512_storeu_ps(yf, v);
  else store_bf16x16(yb, v);
}

// out[0:16] (masked) = v * scale + bias, as bf16
KERNEL void scale_out(const float* v, const float* scale, const float* bias, __mmask16 mask,
                      bf16_t* y) {
  __m512 f = _mm512_mul_ps(_mm512_loadu_ps(v), _mm512_maskz_loadu_ps(mask, scale));
  if (bias) f = _mm512_add_ps(f, _mm512_maskz_loadu_ps(mask, bias));
  __m256bh h = _mm512_cvtneps_pbh(f);
  _mm256_mask_storeu_epi16(y, mask, reinterpret_cast<__m256i&>(h));
}

bool amx_enable() {       // Linux asks each process to request the AMX tile state once
  static const bool ok = [] {
    constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

// C tiles 0..3 (H / 16 x 2 blocks of 16 x 16 f32), A tiles 4, 5 (16 rows x 32 bf16), B tiles
// 6, 7 (16 channel pairs x 16 outputs x 2), for blocks of H = 32 rows, or H = 16 (a decode step
// of up to 16 rows: half the tile products and A loads of a 32-row block whose second half is
// zeros). xpack: x re-laid per H rows as [k / 32][H rows][32 channels], so each A tile (16 rows
// of 64 bytes) is 1 KB contiguous; block m0 / H starts at xpack + m0 * k.
template <int H>
AMX_KERNEL void amx_block(const bf16_t* xpack, int64_t k, const bf16_t* w, int64_t nb0,
                          int64_t m0, bool prefetch, float* c /* [H][32] */) {
  static_assert(H == 16 || H == 32, "amx_block: blocks of 16 or 32 rows");
  _tile_zero(0); _tile_zero(1);
  if constexpr (H == 32) { _tile_zero(2); _tile_zero(3); }
  const bf16_t* b0 = w + nb0 * 16 * k;
  const bf16_t* b1 = b0 + 16 * k;
  for (int64_t kk = 0; kk < k; kk += 32) {
    if (prefetch) {   // the same 2 KB of the next 32 outputs' blocks, into L2 (L1 is too small)
      const char* next = reinterpret_cast<const char*>(b0 + 32 * k + kk * 16);
      for (int i = 0; i < 16; ++i) {
        _mm_prefetch(next + i * 64, _MM_HINT_T1);
        _mm_prefetch(next + 32 * k + i * 64, _MM_HINT_T1);
      }
    }
    const bf16_t* a = xpack + m0 * k + kk * H;
    _tile_loadd(4, a, 64);
    if constexpr (H == 32) _tile_loadd(5, a + 16 * 32, 64);
    _tile_loadd(6, b0 + kk * 16, 64);
    _tile_loadd(7, b1 + kk * 16, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (H == 32) {
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  if constexpr (H == 32) {
    _tile_stored(2, c + 16 * 32, 128);
    _tile_stored(3, c + 16 * 32 + 16, 128);
  }
}

AMX_KERNEL void amx_config() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
  // not _tile_loadconfig: gcc 12 does not see that it reads cfg, and drops the stores
  __asm__ volatile("ldtilecfg %0" : : "m"(cfg));
}

AMX_KERNEL void amx_release() { _tile_release(); }

bool amx_supported() {
  // gcc 12 has no __builtin_cpu_supports name for AMX: ask CPUID leaf 7 (EDX bits 22, 24)
  static const bool ok = [] {
    unsigned a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    bool tile = d & (1u << 24), bf16 = d & (1u << 22);
    return tile && bf16 && amx_enable();
  }();
  return ok;
}

at::Tensor linear_vnni(const at::Tensor& x, const at::Tensor& w, int64_t n,
                       const c10::optional<at::Tensor>& bias, bool out_f32, bool glu) {
  check_rows(x, "x");
  int64_t m = x.size(0), k = x.size(1);
  check(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.dim() == 4 && w.size(1) * 2 == k &&
            w.size(2) == 16 && w.size(3) == 2 && w.size(0) * 16 >= n && w.size(0) % 2 == 0 && k % 32 == 0,
        "linear_vnni: weight in the [n / 16, k / 2, 16, 2] layout (vnni_layout), k a multiple of 32");
  check(!glu || (n % 32 == 0 && w.size(0) * 16 == n),
        "linear_vnni: glu weights interleave 16 gate and 16 up rows (glu_layout), n a multiple of 32");
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  int64_t width = glu ? n / 2 : n;           // outputs per row
  at::Tensor y = at::empty({m, width}, x.options().dtype(out_f32 ? at::kFloat : at::kBFloat16));
  float* yf = out_f32 ? y.data_ptr<float>() : nullptr;
  bf16_t* yb = out_f32 ? nullptr : bf16_mut(y);
  auto put = [&](int64_t row, int64_t col, const float* v, int64_t count) {
    store_out(v, count, b ? b + col : nullptr, yf ? yf + row * n + col : nullptr,
              yb ? yb + row * n + col : nullptr);
  };
  // one row's 32 outputs of the block pair p: as they are, or (glu) silu(gate) * up, 16 wide
  auto emit = [&](int64_t row, int64_t p, const float* c) {
    if (!glu) {
      int64_t cols = std::min<int64_t>(32, n - p * 32);
      if (cols > 0) put(row, p * 32, c, cols);
      return;
    }
    glu_out(c, b ? b + p * 32 : nullptr, yf ? yf + row * width + p * 16 : nullptr,
            yb ? yb + row * width + p * 16 : nullptr);
  };
  const bf16_t* wp = bf16_ptr(w);
  const bf16_t* xp = bf16_ptr(x);
  int64_t blocks = (n + 15) / 16;
  auto gemv = [&](const bf16_t* wb, float* out) {
    switch (m) {
      case 1: vnni_gemv_block<1>(xp, k, wb, out); break;
      case 2: vnni_gemv_block<2>(xp, k, wb, out); break;
      case 3: vnni_gemv_block<3>(xp, k, wb, out); break;
      default: vnni_gemv_block<4>(xp, k, wb, out); break;
    }
  };
  if (m <= 4 && !glu) {
    parallel(blocks, [&](int64_t b0, int64_t b1) {
      float out[4 * 16];
      for (int64_t blk = b0; blk < b1; ++blk) {
        gemv(wp + blk * 16 * k, out);
        int64_t cols = std::min<int64_t>(16, n - blk * 16);
        for (int64_t r = 0; r < m; ++r) put(r, blk * 16, out + r * 16, cols);
      }
    });
    return y;
  }
  if (m <= 4) {                              // glu: the gate and the up block of each pair
    parallel(blocks / 2, [&](int64_t p0, int64_t p1) {
      float out[2][4 * 16], c[32];
      for (int64_t p = p0; p < p1; ++p) {
        gemv(wp + 2 * p * 16 * k, out[0]);
        gemv(wp + (2 * p + 1) * 16 * k, out[1]);
        for (int64_t r = 0; r < m; ++r) {
          std::memcpy(c, out[0] + r * 16, 64);
          std::memcpy(c + 16, out[1] + r * 16, 64);
          emit(r, p, c);
        }
      }
    });
    return y;
  }
  if (!amx_supported()) {     // AVX512-BF16 register tiles, per 32 outputs
    // up to 16 rows (decode) in one pass over the weights; more (prefill) in chunks of 8, whose
    // 8 x 2 tiles need fewer loads per FMA once the weights are in cache
    int64_t chunk = m <= 16 ? m : 8;
    int64_t pairs_n = w.size(0) / 2;
    parallel(pairs_n, [&](int64_t p0, int64_t p1) {
      alignas(64) float c[16 * 32];
      for (int64_t p = p0; p < p1; ++p) {
        const bf16_t* wb = wp + p * 32 * k;
        for (int64_t r0 = 0; r0 < m; r0 += chunk) {
          int64_t rows = std::min<int64_t>(chunk, m - r0);
          // the first chunk streams the weights (prefetched); later ones find them in cache
          ROWS_CHUNK[rows - 1](xp + r0 * k, k, wb, r0 == 0, c);
          for (int64_t r = 0; r < rows; ++r) emit(r0 + r, p, c + r * 32);
        }
      }
    });
    return y;
  }
  TORCH_CHECK(amx_enable(), "linear_vnni: the kernel may not use AMX (arch_prctl refused)");
  const int64_t h = m <= 16 ? 16 : 32;       // rows per block (amx_block<H>)
  int64_t mp = (m + h - 1) / h * h;
  // 64-byte aligned: an A tile row that straddles two cache lines costs AMX's tile load about
  // a third of the GEMM's time. The caller's thread keeps the buffer (an at::zeros per call
  // was ~0.4 ms of a 16-sequence decode step's 121 calls); rows past m are zeroed.
  thread_local std::vector<bf16_t> pack_store;
  if (static_cast<int64_t>(pack_store.size()) < mp * k + 32) pack_store.resize(mp * k + 32);
  bf16_t* xpad = reinterpret_cast<bf16_t*>(
      (reinterpret_cast<uintptr_t>(pack_store.data()) + 63) & ~uintptr_t{63});
  auto pack_rows = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t kk = 0; kk < k; kk += 32) {
        bf16_t* dst = xpad + (r / h) * h * k + kk * h + (r % h) * 32;
        if (r < m) std::memcpy(dst, xp + r * k + kk, 64);
        else std::memset(dst, 0, 64);
      }
  };
  if (m <= 16) pack_rows(0, mp);
  else parallel(mp / h, [&](int64_t b0, int64_t b1) { pack_rows(b0 * h, b1 * h); });  // prefill
  int64_t pairs_n = w.size(0) / 2;           // blocks of 32 outputs
  parallel(pairs_n, [&](int64_t p0, int64_t p1) {
    amx_config();
    alignas(64) float c[32 * 32];
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t m0 = 0; m0 < mp; m0 += h) {
        bool pf = m0 == 0 && p + 1 < p1;
        if (h == 16) amx_block<16>(xpad, k, wp, 2 * p, m0, pf, c);
        else amx_block<32>(xpad, k, wp, 2 * p, m0, pf, c);
        for (int64_t r = 0; r < h && m0 + r < m; ++r) emit(m0 + r, p, c + r * 32);
      }
    amx_release();
  }, m <= 16 ? 4 : 16);
  return y;
}

// ---- activations as int8 for the quantized linears (VNNI) --------------------------------
// Per row and group of 32 channels: int8 values q and a scale sx (x ~ q * sx), the sum of x
// (int4's offsets), and the correction of int8's unsigned weights.
struct QuantRow {
  std::vector<int8_t> q;       // [k]
  std::vector<float> pair;     // [k / 64, 16]: lanes 0..7 sx of the chunk's first group, 8..15 second
  std::vector<float> sums;     // [k / 32] sums of x per group
  float corr = 0.f;            // 128 * sum_g sx_g * sum(q_g), for linear_int8's unsigned weights
};

KERNEL void quantize_row(const bf16_t* x, int64_t k, QuantRow& r) {
  r.q.resize(k);
  r.pair.resize(k / 64 * 16);
  r.sums.resize(k / 32);
  r.corr = 0.f;
  for (int64_t g = 0; g < k / 32; ++g) {
    __m512 a = load_bf16x16(x + g * 32), b = load_bf16x16(x + g * 32 + 16);
    float amax = std::max(_mm512_reduce_max_ps(_mm512_abs_ps(a)),
                          _mm512_reduce_max_ps(_mm512_abs_ps(b)));
    r.sums[g] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    float sx = amax / 127.f;
    __m512 inv = _mm512_set1_ps(sx > 0 ? 1.f / sx : 0.f);
    __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv));   // round to nearest
    __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(r.q.data() + g * 32), _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(r.q.data() + g * 32 + 16), _mm512_cvtsepi32_epi8(qb));
    r.corr += 128.f * sx * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
    float* p = r.pair.data() + (g / 2) * 16 + (g % 2) * 8;
    for (int l = 0; l < 8; ++l) p[l] = sx;
  }
}

// ---- int8 linear (per-channel weights, VNNI) ------------------------------------------------
// Weights u = q + 128 (unsigned, as dpbusd multiplies unsigned by signed bytes), tiled like the
// bf16 VNNI layout: [n / 16][k / 4][16][4], per block of 16 outputs and quad of input channels
// the 16 outputs' 4 bytes (64 bytes, one vector). Activations: int8 per group of 32 channels
// with scale sx_g (QuantRow). Per row and block:
//   y = scale * (sum_g sx_g * dot_g(u, xq) - corr),  corr = 128 * sum_g sx_g * sum(xq_g)
// dpbusd accumulates 16 outputs x 4 channels per instruction with no horizontal sums, and a
// weight vector loaded once serves every row of the tile (up to QUANT_TILE_ROWS rows per pass),
// so a 16-row decode step reads the int8 weights once instead of dequantizing them to bf16.
constexpr int64_t QUANT_TILE_ROWS = 8;      // rows per pass of the int8 and int4 tiles

// y [m, n] (bf16) through a quantized tile kernel: x's rows quantized once (QuantRow), blocks
// of 16 outputs over the threads, QUANT_TILE_ROWS rows per pass over a block (later passes find
// its weights in L1); tile(blk, rows, count, out [count][16]); the per-output scale (or none)
// and the bias applied as the rows are stored.
template <typename Tile>
at::Tensor quant_tiles(const at::Tensor& x, int64_t n, int64_t blocks, const float* scale,
                       const c10::optional<at::Tensor>& bias, Tile&& tile) {
  int64_t m = x.size(0), k = x.size(1);
  std::vector<QuantRow> rows(m);
  for (int64_t j = 0; j < m; ++j) quantize_row(bf16_ptr(x) + j * k, k, rows[j]);
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  static const float ones[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
  at::Tensor y = at::empty({m, n}, x.options());
  bf16_t* yb = bf16_mut(y);
  parallel(blocks, [&](int64_t b0, int64_t b1) {
    alignas(64) float out[QUANT_TILE_ROWS * 16];
    for (int64_t blk = b0; blk < b1; ++blk) {
      int64_t cols = std::min<int64_t>(16, n - blk * 16);
      __mmask16 mask = cols == 16 ? static_cast<__mmask16>(0xFFFF)
                                  : static_cast<__mmask16>((1u << cols) - 1);
      for (int64_t r0 = 0; r0 < m; r0 += QUANT_TILE_ROWS) {
        int64_t count = std::min<int64_t>(QUANT_TILE_ROWS, m - r0);
        tile(blk, rows.data() + r0, count, out);
        for (int64_t r = 0; r < count; ++r)
          scale_out(out + r * 16, scale ? scale + blk * 16 : ones, b ? b + blk * 16 : nullptr,
                    mask, yb + (r0 + r) * n + blk * 16);
      }
    }
  });
  return y;
}

template <int M>
KERNEL void int8_tile(const uint8_t* wb, int64_t k, const QuantRow* rows, float* out /* [M][16] */) {
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  const int32_t* xq[M];
  for (int m = 0; m < M; ++m) xq[m] = reinterpret_cast<const int32_t*>(rows[m].q.data());
  for (int64_t g = 0; g < k / 32; ++g) {
    __m512i d[M];
    for (int m = 0; m < M; ++m) d[m] = _mm512_setzero_si512();
    const uint8_t* wg = wb + g * 32 * 16;           // the group's 8 quads x 64 bytes
    for (int c = 0; c < 8; ++c) {
      __m512i w = _mm512_loadu_si512(wg + c * 64);
      _mm_prefetch(reinterpret_cast<const char*>(wg + c * 64) + PF_BYTES, _MM_HINT_T0);
      for (int m = 0; m < M; ++m)
        d[m] = _mm512_dpbusd_epi32(d[m], w, _mm512_set1_epi32(xq[m][g * 8 + c]));
    }
    for (int m = 0; m < M; ++m)
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[m]), _mm512_set1_ps(rows[m].pair[(g / 2) * 16 + (g % 2) * 8]), acc[m]);
  }
  for (int m = 0; m < M; ++m)
    _mm512_storeu_ps(out + m * 16, _mm512_sub_ps(acc[m], _mm512_set1_ps(rows[m].corr)));
}

using Int8TileFn = void (*)(const uint8_t*, int64_t, const QuantRow*, float*);
template <int... Ms>
constexpr std::array<Int8TileFn, sizeof...(Ms)> int8_tile_table(std::integer_sequence<int, Ms...>) {
  return {&int8_tile<Ms + 1>...};
}
constexpr auto INT8_TILE = int8_tile_table(std::make_integer_sequence<int, QUANT_TILE_ROWS>{});

void check_int8_weights(const at::Tensor& u, const at::Tensor& scale, int64_t k, const char* what) {
  check(u.scalar_type() == at::kByte && u.is_contiguous() && u.dim() == 4 && u.size(1) * 4 == k &&
            u.size(2) == 16 && u.size(3) == 4 && k % 64 == 0 && scale.scalar_type() == at::kFloat &&
            scale.numel() <= u.size(0) * 16 && scale.numel() > (u.size(0) - 1) * 16,
        what);
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& u, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  check_rows(x, "x");
  int64_t k = x.size(1), n = scale.numel();
  check_int8_weights(u, scale, k, "linear_int8: u uint8 [n / 16, k / 4, 16, 4] (q + 128, "
                                  "int8_kernel_layout), k a multiple of 64, scale float32 [n]");
  const uint8_t* up = u.data_ptr<uint8_t>();
  return quant_tiles(x, n, u.size(0), scale.data_ptr<float>(), bias,
                     [&](int64_t blk, const QuantRow* rows, int64_t count, float* out) {
                       INT8_TILE[count - 1](up + blk * 16 * k, k, rows, out);
                     });
}

// ---- int4 linear (group 32, VNNI), up to 16 rows per pass over the weights -----------------
// Weights [n / 16][k / 8][16][4]: per block of 16 outputs and octet of input channels, each
// output's 4 bytes hold channels 0..3 of the octet in their low nibbles and 4..7 in their high
// nibbles (values 0..15), so masking and shifting a 64-byte vector yields two dpbusd operands
// matching the activations' natural quads. Scales and offsets [n / 16][k / 32][16] float16:
// w = q * s + o. Per row and block: y = sum_g (s_g * sx_g) * dot_g(q, xq) + o_g * sum(x_g).
template <int M>
KERNEL void int4_tile(const uint8_t* wb, const uint16_t* sb, const uint16_t* ob, int64_t k,
                      const QuantRow* rows, float* out /* [M][16] */) {
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  const int32_t* xq[M];
  for (int m = 0; m < M; ++m) xq[m] = reinterpret_cast<const int32_t*>(rows[m].q.data());
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < k / 32; ++g) {
    // low and high nibbles accumulate apart: two dependency chains per row, not one
    __m512i d[M], e[M];
    for (int m = 0; m < M; ++m) d[m] = e[m] = _mm512_setzero_si512();
    const uint8_t* wg = wb + g * 4 * 64;             // the group's 4 octets x 64 bytes
    for (int c = 0; c < 4; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(wg + c * 64) + PF_BYTES, _MM_HINT_T0);
      __m512i w = _mm512_loadu_si512(wg + c * 64);
      __m512i lo = _mm512_and_si512(w, low), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
      for (int m = 0; m < M; ++m) {
        d[m] = _mm512_dpbusd_epi32(d[m], lo, _mm512_set1_epi32(xq[m][g * 8 + 2 * c]));
        e[m] = _mm512_dpbusd_epi32(e[m], hi, _mm512_set1_epi32(xq[m][g * 8 + 2 * c + 1]));
      }
    }
    for (int m = 0; m < M; ++m) d[m] = _mm512_add_epi32(d[m], e[m]);
    __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + g * 16)));
    __m512 of = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ob + g * 16)));
    for (int m = 0; m < M; ++m) {
      __m512 sx = _mm512_set1_ps(rows[m].pair[(g / 2) * 16 + (g % 2) * 8]);
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[m]), _mm512_mul_ps(sc, sx), acc[m]);
      acc[m] = _mm512_fmadd_ps(of, _mm512_set1_ps(rows[m].sums[g]), acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(out + m * 16, acc[m]);
}

using Int4TileFn = void (*)(const uint8_t*, const uint16_t*, const uint16_t*, int64_t,
                            const QuantRow*, float*);
template <int... Ms>
constexpr std::array<Int4TileFn, sizeof...(Ms)> int4_tile_table(std::integer_sequence<int, Ms...>) {
  return {&int4_tile<Ms + 1>...};
}
constexpr auto INT4_TILE = int4_tile_table(std::make_integer_sequence<int, QUANT_TILE_ROWS>{});

void check_int4_tiles(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& offset,
                      int64_t k, int64_t n, const char* what) {
  check(w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 4 && w.size(1) * 8 == k &&
            w.size(2) == 16 && w.size(3) == 4 && k % 64 == 0 && n <= w.size(0) * 16 &&
            n > (w.size(0) - 1) * 16 && scale.scalar_type() == at::kHalf &&
            offset.scalar_type() == at::kHalf && scale.is_contiguous() && offset.is_contiguous() &&
            scale.dim() == 3 && scale.size(0) == w.size(0) && scale.size(1) == k / 32 &&
            scale.size(2) == 16 && offset.sizes() == scale.sizes(),
        what);
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                       const at::Tensor& offset, int64_t n, const c10::optional<at::Tensor>& bias) {
  check_rows(x, "x");
  int64_t k = x.size(1);
  check_int4_tiles(w, scale, offset, k, n, "linear_int4: weights [n / 16, k / 8, 16, 4] "
                   "uint8, scale and offset [n / 16, k / 32, 16] float16 (int4_kernel_layout)");
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const uint16_t* op = reinterpret_cast<const uint16_t*>(offset.data_ptr<at::Half>());
  return quant_tiles(x, n, w.size(0), nullptr, bias,
                     [&](int64_t blk, const QuantRow* rows, int64_t count, float* out) {
                       INT4_TILE[count - 1](wp + blk * 16 * (k / 2), sp + blk * 16 * (k / 32),
                                            op + blk * 16 * (k / 32), k, rows, out);
                     });
}

// Per octet: the 64-byte vector's low / high nibbles, 4 outputs (16 bytes) at a time, scaled
// and offset per output (w = q * s + o, rounded as PyTorch's q * s + o), stored as each
// output's 8 channels (4 low-nibble, 4 high-nibble values) in its bf16 row.
template <int QD>
KERNEL void dequant_int4_quarter(__m512i lo, __m512i hi, __m512 sc, __m512 of, int64_t rows,
                                 bf16_t* row0 /* output 0's row at this octet */, int64_t k) {
  const __m512i idx = _mm512_set_epi32(4 * QD + 3, 4 * QD + 3, 4 * QD + 3, 4 * QD + 3,
                                       4 * QD + 2, 4 * QD + 2, 4 * QD + 2, 4 * QD + 2,
                                       4 * QD + 1, 4 * QD + 1, 4 * QD + 1, 4 * QD + 1,
                                       4 * QD, 4 * QD, 4 * QD, 4 * QD);
  __m512 s4 = _mm512_permutexvar_ps(idx, sc), o4 = _mm512_permutexvar_ps(idx, of);
  __m128i lq = _mm512_extracti32x4_epi32(lo, QD), hq = _mm512_extracti32x4_epi32(hi, QD);
  __m512 fl = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lq)), s4), o4);
  __m512 fh = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hq)), s4), o4);
  __m256bh bl = _mm512_cvtneps_pbh(fl), bh = _mm512_cvtneps_pbh(fh);
  __m256i l = reinterpret_cast<__m256i&>(bl), h = reinterpret_cast<__m256i&>(bh);
  __m256i even = _mm256_unpacklo_epi64(l, h), odd = _mm256_unpackhi_epi64(l, h);
  __m128i part[4] = {_mm256_castsi256_si128(even), _mm256_castsi256_si128(odd),
                     _mm256_extracti128_si256(even, 1), _mm256_extracti128_si256(odd, 1)};
  for (int j = 0; j < 4; ++j)
    if (4 * QD + j < rows)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(row0 + (4 * QD + j) * k), part[j]);
}

KERNEL void dequant_int4_blocks(const uint8_t* wp, const uint16_t* sp, const uint16_t* op,
                                int64_t n, int64_t k, int64_t b0, int64_t b1, bf16_t* outp) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t blk = b0; blk < b1; ++blk) {
    int64_t rows = std::min<int64_t>(16, n - blk * 16);
    for (int64_t c = 0; c < k / 8; ++c) {
      __m512i w = _mm512_loadu_si512(wp + (blk * (k / 8) + c) * 64);
      __m512i lo = _mm512_and_si512(w, low), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
      int64_t g = c / 4;
      __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp + (blk * (k / 32) + g) * 16)));
      __m512 of = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(op + (blk * (k / 32) + g) * 16)));
      bf16_t* row0 = outp + blk * 16 * k + c * 8;
      dequant_int4_quarter<0>(lo, hi, sc, of, rows, row0, k);
      dequant_int4_quarter<1>(lo, hi, sc, of, rows, row0, k);
      dequant_int4_quarter<2>(lo, hi, sc, of, rows, row0, k);
      dequant_int4_quarter<3>(lo, hi, sc, of, rows, row0, k);
    }
  }
}

// linear_int4's layout -> bf16 [n, k] (for batches past its 16 rows: prefill)
at::Tensor dequantize_int4(const at::Tensor& w, const at::Tensor& scale,
                                 const at::Tensor& offset, int64_t n) {
  int64_t k = w.dim() == 4 ? w.size(1) * 8 : 0;
  check_int4_tiles(w, scale, offset, k, n, "dequantize_int4: int4_kernel_layout's tensors");
  at::Tensor out = at::empty({n, k}, at::dtype(at::kBFloat16));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const uint16_t* op = reinterpret_cast<const uint16_t*>(offset.data_ptr<at::Half>());
  bf16_t* outp = bf16_mut(out);
  at::parallel_for(0, w.size(0), 4, [&](int64_t b0, int64_t b1) {
    dequant_int4_blocks(wp, sp, op, n, k, b0, b1, outp);
  });
  return out;
}

// ---- dequantization to bf16 (for steps of many rows: prefill) -------------------------------
// blocks [b0, b1) of 16 rows of the tiled int8 layout -> bf16 rows
KERNEL void dequant_int8_blocks(const uint8_t* u, const float* scale, int64_t n, int64_t k,
                                int64_t b0, int64_t b1, bf16_t* out) {
  const __m512i off = _mm512_set1_epi32(128);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const uint8_t* wb = u + blk * 16 * k;
    for (int64_t o = 0; o < 16 && blk * 16 + o < n; ++o) {
      int64_t row = blk * 16 + o;
      __m512 s = _mm512_set1_ps(scale[row]);
      for (int64_t c = 0; c < k; c += 16) {          // 16 channels = 4 quads, 4 bytes each
        alignas(16) uint8_t bytes[16];
        for (int qd = 0; qd < 4; ++qd) std::memcpy(bytes + qd * 4, wb + ((c / 4) + qd) * 64 + o * 4, 4);
        __m512i w = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(bytes))), off);
        store_bf16x16(out + row * k + c, _mm512_mul_ps(s, _mm512_cvtepi32_ps(w)));
      }
    }
  }
}

at::Tensor dequantize_int8(const at::Tensor& u, const at::Tensor& scale) {
  int64_t k = u.dim() == 4 ? u.size(1) * 4 : 0, n = scale.numel();
  check_int8_weights(u, scale, k, "dequantize_int8: u in int8_kernel_layout, scale float32 [n]");
  at::Tensor out = at::empty({n, k}, at::dtype(at::kBFloat16));
  const uint8_t* up = u.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  bf16_t* op = bf16_mut(out);
  at::parallel_for(0, u.size(0), 4, [&](int64_t b0, int64_t b1) {
    dequant_int8_blocks(up, sp, n, k, b0, b1, op);
  });
  return out;
}

// ---- quantized weights -> bf16 in linear_vnni's layout, for steps of many rows -------------
// A prefill step of an int8 / int4 stage dequantizes each weight once into the VNNI-blocked
// layout ([n' / 16, k / 2, 16, 2], n' a multiple of 32) and runs linear_vnni's AMX (or register)
// tiles on it: ATen's GEMM on a plain dequantized copy took int8 / int4 prefill to twice the
// bf16 stage's time. The copy lives for one call: stages hold only the quantized weights.

// out pair rows `pair` (lane o: (a[o], b[o]) as bf16) from two float32 vectors
KERNEL inline void store_pair_row(bf16_t* row, __m512 a, __m512 b) {
  __m256bh ha = _mm512_cvtneps_pbh(a), hb = _mm512_cvtneps_pbh(b);
  __m512i lo = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i&>(ha));
  __m512i hi = _mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i&>(hb)), 16);
  _mm512_storeu_si512(row, _mm512_or_si512(lo, hi));
}

KERNEL void int8_to_vnni_blocks(const uint8_t* u, const float* scale, int64_t n, int64_t k,
                                int64_t b0, int64_t b1, bf16_t* out) {
  const __m512i byte = _mm512_set1_epi32(0xFF), off = _mm512_set1_epi32(128);
  for (int64_t blk = b0; blk < b1; ++blk) {
    int64_t rows = std::min<int64_t>(16, n - blk * 16);
    __mmask16 mask = rows >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << rows) - 1);
    __m512 s = _mm512_maskz_loadu_ps(mask, scale + blk * 16);      // 0 past n
    for (int64_t c = 0; c < k / 4; ++c) {            // a quad of channels: pair rows 2c, 2c + 1
      __m512i x = _mm512_loadu_si512(u + (blk * (k / 4) + c) * 64);
      __m512 f[4];
      for (int j = 0; j < 4; ++j)
        f[j] = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_sub_epi32(
                                    _mm512_and_si512(_mm512_srli_epi32(x, 8 * j), byte), off)));
      bf16_t* row = out + (blk * (k / 2) + 2 * c) * 32;
      store_pair_row(row, f[0], f[1]);
      store_pair_row(row + 32, f[2], f[3]);
    }
  }
}

KERNEL void int4_to_vnni_blocks(const uint8_t* w, const uint16_t* sp, const uint16_t* op,
                                int64_t k, int64_t b0, int64_t b1, bf16_t* out) {
  const __m512i nib = _mm512_set1_epi32(0xF);
  for (int64_t blk = b0; blk < b1; ++blk)
    for (int64_t c = 0; c < k / 8; ++c) {            // an octet: pair rows 4c .. 4c + 3
      __m512i x = _mm512_loadu_si512(w + (blk * (k / 8) + c) * 64);
      int64_t g = blk * (k / 32) + c / 4;
      __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp + g * 16)));
      __m512 of = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(op + g * 16)));
      __m512 f[8];                                   // channel t: byte t % 4, low / high nibble
      for (int t = 0; t < 8; ++t)
        f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(
                                   _mm512_srli_epi32(x, 8 * (t % 4) + 4 * (t / 4)), nib)),
                               sc, of);
      bf16_t* row = out + (blk * (k / 2) + 4 * c) * 32;
      for (int pr = 0; pr < 4; ++pr) store_pair_row(row + pr * 32, f[2 * pr], f[2 * pr + 1]);
    }
}

// the VNNI layout's blocks of 16 outputs: the quantized ones' count, rounded up to an even one
// (a zero block last, as vnni_layout pads n to 32)
at::Tensor vnni_buffer(int64_t blocks, int64_t k) {
  int64_t even = (blocks + 1) / 2 * 2;
  at::Tensor out = at::empty({even, k / 2, 16, 2}, at::dtype(at::kBFloat16));
  if (even != blocks) std::memset(bf16_mut(out) + blocks * 16 * k, 0, 16 * k * sizeof(bf16_t));
  return out;
}

at::Tensor dequantize_int8_vnni(const at::Tensor& u, const at::Tensor& scale) {
  int64_t k = u.dim() == 4 ? u.size(1) * 4 : 0, n = scale.numel();
  check_int8_weights(u, scale, k, "dequantize_int8_vnni: u in int8_kernel_layout, scale float32 [n]");
  at::Tensor out = vnni_buffer(u.size(0), k);
  const uint8_t* up = u.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  bf16_t* op = bf16_mut(out);
  parallel(u.size(0), [&](int64_t b0, int64_t b1) { int8_to_vnni_blocks(up, sp, n, k, b0, b1, op); });
  return out;
}

at::Tensor dequantize_int4_vnni(const at::Tensor& w, const at::Tensor& scale,
                                const at::Tensor& offset, int64_t n) {
  int64_t k = w.dim() == 4 ? w.size(1) * 8 : 0;
  check_int4_tiles(w, scale, offset, k, n, "dequantize_int4_vnni: int4_kernel_layout's tensors");
  at::Tensor out = vnni_buffer(w.size(0), k);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const uint16_t* op = reinterpret_cast<const uint16_t*>(offset.data_ptr<at::Half>());
  bf16_t* outp = bf16_mut(out);
  parallel(w.size(0), [&](int64_t b0, int64_t b1) { int4_to_vnni_blocks(wp, sp, op, k, b0, b1, outp); });
  return out;
}


// ---- RMSNorm, SiLU * up ------------------------------------------------------------
KERNEL void rms_norm_row(const bf16_t* x, bf16_t* residual, const float* w, float eps,
                         int64_t h, bf16_t* out) {
  // with residual: residual = bf16(residual + x), and the new residual is normalized
  __m512 ss = _mm512_setzero_ps();
  const bf16_t* src = x;
  if (residual) {
    for (int64_t c = 0; c < h; c += 16)
      store_bf16x16(residual + c, _mm512_add_ps(load_bf16x16(x + c), load_bf16x16(residual + c)));
    src = residual;
  }
  for (int64_t c = 0; c < h; c += 16) {
    __m512 a = load_bf16x16(src + c);
    ss = _mm512_fmadd_ps(a, a, ss);
  }
  __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / h + eps));
  for (int64_t c = 0; c < h; c += 16)
    store_bf16x16(out + c, _mm512_mul_ps(_mm512_mul_ps(load_bf16x16(src + c), inv),
                                         _mm512_loadu_ps(w + c)));
}

at::Tensor rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                    const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  int64_t t = x.size(0), h = x.size(1);
  check(h % 16 == 0 && weight.scalar_type() == at::kFloat && weight.numel() == h,
        "rms_norm: hidden size a multiple of 16, float32 weight");
  bf16_t* res = nullptr;
  if (residual.has_value()) {
    at::Tensor r = *residual;
    check_rows(r, "residual");
    check(r.sizes() == x.sizes(), "rms_norm: residual shape");
    res = bf16_mut(r);
  }
  at::Tensor out = at::empty_like(x);
  const bf16_t* xp = bf16_ptr(x);
  bf16_t* op = bf16_mut(out);
  const float* wp = weight.data_ptr<float>();
  at::parallel_for(0, t, 64, [&](int64_t r0, int64_t r1) {     // rows in parallel past 64
    for (int64_t i = r0; i < r1; ++i)
      rms_norm_row(xp + i * h, res ? res + i * h : nullptr, wp, static_cast<float>(eps), h,
                   op + i * h);
  });
  return out;
}

KERNEL void silu_mul_row(const bf16_t* gu, int64_t inter, bf16_t* out) {
  for (int64_t c = 0; c < inter; c += 16)
    store_bf16x16(out + c, silu_mul16(load_bf16x16(gu + c), load_bf16x16(gu + inter + c)));
}

// ---- greedy sampling ------------------------------------------------------------------------
// Index of each row's largest value: the first one where values tie, the first NaN where there
// is one (torch.argmax's rules). ATen's argmax took 1 ms for 16 rows of SmolLM2's 49152
// logits, ~5% of a 16-sequence decode step; this is about 0.05 ms.
KERNEL int64_t argmax_row(const float* x, int64_t v) {
  const __m512i step = _mm512_set1_epi32(16);
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 best = _mm512_set1_ps(-INFINITY);
  __m512i at = _mm512_setzero_si512();
  int64_t p = 0;
  for (; p + 16 <= v; p += 16) {
    __m512 f = _mm512_loadu_ps(x + p);
    if (_mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q)) break;        // a NaN: found below
    __mmask16 gt = _mm512_cmp_ps_mask(f, best, _CMP_GT_OQ);  // strictly: ties keep the first
    best = _mm512_mask_mov_ps(best, gt, f);
    at = _mm512_mask_mov_epi32(at, gt, idx);
    idx = _mm512_add_epi32(idx, step);
  }
  float m = _mm512_reduce_max_ps(best);
  __mmask16 eq = _mm512_cmp_ps_mask(best, _mm512_set1_ps(m), _CMP_EQ_OQ);
  int64_t found = _mm512_mask_reduce_min_epi32(eq, at);
  for (; p < v; ++p) {                                          // the tail, or from a NaN on
    if (std::isnan(x[p])) return p;
    if (x[p] > m) { m = x[p]; found = p; }
  }
  return found;
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat &&
                  x.size(1) > 0 && x.size(1) < (int64_t{1} << 31),
              "argmax_rows: a contiguous 2-d float32 tensor");
  int64_t n = x.size(0), v = x.size(1);
  at::Tensor out = at::empty({n}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  parallel(n, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) op[r] = argmax_row(xp + r * v, v);
  });
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  int64_t t = gate_up.size(0), inter = gate_up.size(1) / 2;
  check(inter % 16 == 0, "silu_mul: intermediate size a multiple of 16");
  at::Tensor out = at::empty({t, inter}, gate_up.options());
  const bf16_t* gp = bf16_ptr(gate_up);
  bf16_t* op = bf16_mut(out);
  at::parallel_for(0, t, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) silu_mul_row(gp + i * 2 * inter, inter, op + i * inter);
  });
  return out;
}

// ---- rotary + KV store, decode attention --------------------------------------------------
// qkv: [T, (H + 2 KV) * hd] (q heads, k heads, v heads). Rotates q and k in place
// ("rotate half": x * cos + [x2, x1] * sin_signed) and writes k, v at the rows' cache slots.
KERNEL void rope_row(bf16_t* row, int64_t heads, int64_t hd, const float* cos,
                     const float* sin) {
  std::vector<float> v(hd);
  int64_t half = hd / 2;
  for (int64_t hh = 0; hh < heads; ++hh) {
    bf16_t* x = row + hh * hd;
    for (int64_t c = 0; c < hd; c += 16) _mm512_storeu_ps(v.data() + c, load_bf16x16(x + c));
    for (int64_t c = 0; c < hd; c += 16) {
      int64_t sw = (c + half) % hd;     // half is a multiple of 16: a whole vector swaps
      __m512 r = _mm512_fmadd_ps(_mm512_loadu_ps(v.data() + sw), _mm512_loadu_ps(sin + c),
                                 _mm512_mul_ps(_mm512_loadu_ps(v.data() + c),
                                               _mm512_loadu_ps(cos + c)));
      store_bf16x16(x + c, r);
    }
  }
}

void rope_store_kv(at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                   const at::Tensor& sin, const at::Tensor& slots, at::Tensor& k_cache,
                   at::Tensor& v_cache, int64_t heads, int64_t kv_heads) {
  check_rows(qkv, "qkv");
  int64_t t = qkv.size(0), hd = k_cache.size(2), n_slots = k_cache.size(1);
  check(qkv.size(1) == (heads + 2 * kv_heads) * hd && hd % 32 == 0,
        "rope_store_kv: qkv width (heads + 2 kv_heads) * head_dim, head_dim a multiple of 32");
  check(k_cache.is_contiguous() && v_cache.is_contiguous() &&
            k_cache.scalar_type() == at::kBFloat16 && v_cache.scalar_type() == at::kBFloat16 &&
            k_cache.size(0) == kv_heads, "rope_store_kv: caches");
  check(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.size(1) == hd,
        "rope_store_kv: float32 cos / sin tables [positions, head_dim]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  bf16_t* kc = bf16_mut(k_cache);
  bf16_t* vc = bf16_mut(v_cache);
  int64_t width = qkv.size(1);
  for (int64_t i = 0; i < t; ++i)
    TORCH_CHECK(pos[i] >= 0 && pos[i] < cos.size(0) && sl[i] >= 0 && sl[i] < n_slots,
                "rope_store_kv: position or slot out of range");
  bf16_t* qp = bf16_mut(qkv);
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, t, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      bf16_t* row = qp + i * width;
      rope_row(row, heads + kv_heads, hd, cp + pos[i] * hd, sp + pos[i] * hd);
      for (int64_t h = 0; h < kv_heads; ++h) {
        std::memcpy(kc + (h * n_slots + sl[i]) * hd, row + (heads + h) * hd, hd * 2);
        std::memcpy(vc + (h * n_slots + sl[i]) * hd, row + (heads + kv_heads + h) * hd, hd * 2);
      }
    }
  });
}

// In place: each of `rows` rows of `len` scores (rows `stride` apart) -> its softmax.
KERNEL void softmax_rows(float* scores, int64_t rows, int64_t len, int64_t stride) {
  auto tail = [&](int64_t p) {
    return len - p >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (len - p)) - 1);
  };
  for (int64_t g = 0; g < rows; ++g) {
    float* sc = scores + g * stride;
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (int64_t p = 0; p < len; p += 16)
      mv = _mm512_mask_max_ps(mv, tail(p), mv, _mm512_maskz_loadu_ps(tail(p), sc + p));
    __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(mv)), sum = _mm512_setzero_ps();
    for (int64_t p = 0; p < len; p += 16) {
      __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail(p), sc + p), mx));
      sum = _mm512_mask_add_ps(sum, tail(p), sum, e);
      _mm512_mask_storeu_ps(sc + p, tail(p), e);
    }
    __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    for (int64_t p = 0; p < len; p += 16)
      _mm512_mask_storeu_ps(sc + p, tail(p), _mm512_mul_ps(_mm512_maskz_loadu_ps(tail(p), sc + p), inv));
  }
}

// One sequence, one KV head and its `group` query heads: softmax(q k^T * scale) v over the
// sequence's `len` cached positions, read through its block table.
KERNEL void attend(const bf16_t* q, int64_t group, int64_t hd, const bf16_t* kc,
                   const bf16_t* vc, const int64_t* table, int64_t len, int64_t block,
                   float scale, bf16_t* out, int64_t out_stride) {
  std::vector<float> qf(group * hd), scores(group * len), acc(group * hd, 0.f);
  for (int64_t c = 0; c < group * hd; c += 16) _mm512_storeu_ps(qf.data() + c, load_bf16x16(q + c));
  constexpr int64_t AHEAD = 8;      // positions to prefetch ahead (the cache is not in L2)
  auto row = [&](const bf16_t* base, int64_t p) { return base + (table[p / block] * block + p % block) * hd; };
  for (int64_t p = 0; p < len; ++p) {
    const bf16_t* k = row(kc, p);
    if (p + AHEAD < len) {
      const char* nk = reinterpret_cast<const char*>(row(kc, p + AHEAD));
      for (int64_t b = 0; b < hd * 2; b += 64) _mm_prefetch(nk + b, _MM_HINT_T0);
    }
    for (int64_t g = 0; g < group; ++g) {
      __m512 s = _mm512_setzero_ps();
      for (int64_t c = 0; c < hd; c += 16)
        s = _mm512_fmadd_ps(load_bf16x16(k + c), _mm512_loadu_ps(qf.data() + g * hd + c), s);
      scores[g * len + p] = _mm512_reduce_add_ps(s) * scale;
    }
  }
  softmax_rows(scores.data(), group, len, len);
  for (int64_t p = 0; p < len; ++p) {
    const bf16_t* v = row(vc, p);
    if (p + AHEAD < len) {
      const char* nv = reinterpret_cast<const char*>(row(vc, p + AHEAD));
      for (int64_t b = 0; b < hd * 2; b += 64) _mm_prefetch(nv + b, _MM_HINT_T0);
    }
    for (int64_t c = 0; c < hd; c += 16) {
      __m512 vv = load_bf16x16(v + c);
      for (int64_t g = 0; g < group; ++g) {
        float* a = acc.data() + g * hd + c;
        _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(scores[g * len + p]), vv,
                                            _mm512_loadu_ps(a)));
      }
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t c = 0; c < hd; c += 16)
      store_bf16x16(out + g * out_stride + c, _mm512_loadu_ps(acc.data() + g * hd + c));
}

// decode attention reads K this many blocks of 16 positions ahead of use
constexpr int64_t KPF = 2;

// lane i of the result = sum of the 16 lanes of v[i]
KERNEL inline __m512 reduce16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)      // per 128-bit lane: the lane's sums of v[4i .. 4i + 3]
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
  __m512 x0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
  __m512 x1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, 0x88), _mm512_shuffle_f32x4(x0, x1, 0xDD));
}

// 32 channels from the float32 sums of V as position pairs: lo / hi hold, per 128-bit lane L,
// channels 8L..8L+3 and 8L+4..8L+7 (the lane order of unpacklo / unpackhi of two rows of V);
// stored in channel order as bf16
KERNEL inline void store_v_pairs(bf16_t* o, __m512 lo, __m512 hi) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  store_bf16x16(o, _mm512_permutex2var_ps(lo, first, hi));
  store_bf16x16(o + 16, _mm512_permutex2var_ps(lo, second, hi));
}

// attend() for head_dim HD (64 or 128) and up to 8 query heads per KV head: scores of 16
// positions at a time with bf16 dot products and one transposed reduction; the weighted sum
// of V in registers, with bf16 weights (as PyTorch's bf16 attention rounds them).
// G (the query heads per KV head) is a template parameter so that the accumulators of the
// weighted sum (G x HD / 16 vectors) live in registers: with G a run-time value they were
// spilled to the stack and reloaded for every pair of positions.
template <int HD, int G>
KERNEL void attend_fast(const bf16_t* q, const bf16_t* kc, const bf16_t* vc,
                        const int64_t* table, int64_t len, int64_t block, float scale,
                        bf16_t* out, int64_t out_stride) {
  constexpr int64_t group = G;
  constexpr int V = HD / 16;                // f32 vectors per head row
  constexpr int P = HD / 32;                // bf16 pair vectors per head row
  const int64_t padded = (len + 15) / 16 * 16;  // scores of a head: whole 16-position blocks
  // per-thread scratch, grown as needed (three allocations per item and head added up to
  // ~1% of a 16-sequence decode step); every element read is written first
  thread_local std::vector<float> scores;
  thread_local std::vector<int64_t> slot;   // cache slot of each position, without divisions
  thread_local std::vector<bf16_t> sb;
  if (static_cast<int64_t>(scores.size()) < group * padded) {
    scores.resize(group * padded);
    sb.resize(group * padded);
  }
  if (static_cast<int64_t>(slot.size()) < len) slot.resize(len);
  for (int64_t p = 0, b = 0, j = 0; p < len; ++p) {
    slot[p] = table[b] * block + j;
    if (++j == block) { j = 0; ++b; }
  }
  auto row = [&](const bf16_t* base, int64_t p) { return base + slot[p] * HD; };
  __m512bh qv[G][P];
  for (int64_t g = 0; g < group; ++g)
    for (int i = 0; i < P; ++i)
      qv[g][i] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + g * HD + i * 32));
  __m512 part[16];
  for (int64_t p0 = 0; p0 < len; p0 += 16) {
    int64_t n = std::min<int64_t>(16, len - p0);
    const bf16_t* krow[16];
    for (int64_t j = 0; j < n; ++j) krow[j] = row(kc, p0 + j);
    for (int64_t j = n; j < 16; ++j) krow[j] = krow[0];   // past len: scores dropped later
    for (int64_t g = 0; g < group; ++g) {
      for (int j = 0; j < 16; ++j) {
        // prefetches spread over the products (a burst of them per block filled the line
        // fill buffers and stalled the arithmetic): with the first head, K KPF blocks
        // ahead into L1; with the second, this block's V into L2 for the weighted sum
        if (g == 0 && p0 + 16 * KPF + j < len) {
          const char* nk = reinterpret_cast<const char*>(row(kc, p0 + 16 * KPF + j));
          for (int b = 0; b < HD * 2; b += 64) _mm_prefetch(nk + b, _MM_HINT_T0);
        }
        if (g == (G > 1 ? 1 : 0) && j < n) {
          const char* nv = reinterpret_cast<const char*>(row(vc, p0 + j));
          for (int b = 0; b < HD * 2; b += 64) _mm_prefetch(nv + b, _MM_HINT_T1);
        }
        __m512 a = _mm512_setzero_ps();
        for (int i = 0; i < P; ++i)
          a = _mm512_dpbf16_ps(a, reinterpret_cast<__m512bh>(_mm512_loadu_si512(krow[j] + i * 32)), qv[g][i]);
        part[j] = a;
      }
      _mm512_storeu_ps(scores.data() + g * padded + p0,
                       _mm512_mul_ps(reduce16(part), _mm512_set1_ps(scale)));
    }
  }
  softmax_rows(scores.data(), group, len, padded);
  // the weighted sum of V two positions at a time, as bf16 pairs (p, p + 1) per channel:
  // unpacklo / unpackhi of rows p and p + 1 give, per 128-bit lane L of a 32-channel vector,
  // the pairs of channels 8L..8L+3 (lo) and 8L+4..8L+7 (hi); dpbf16 sums each pair into
  // f32 lane 4L+j. A permute puts the channels back in order at the end.
  // the weights in bf16: pair (p, p + 1) is the uint32 at p / 2 (positions past len are 0)
  for (int64_t c = 0; c < group * padded; c += 16) {
    __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(scores.data() + c));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sb.data() + c), reinterpret_cast<__m256i&>(h));
  }
  const uint32_t* wpair = reinterpret_cast<const uint32_t*>(sb.data());
  __m512 acc[G][2 * P];
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
    for (int i = 0; i < 2 * P; ++i) acc[g][i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < len; p += 2) {
    const bf16_t* v0 = row(vc, p);
    const bf16_t* v1 = p + 1 < len ? row(vc, p + 1) : nullptr;
    __m512bh pv[2 * P];
#pragma GCC unroll 8
    for (int i = 0; i < P; ++i) {
      __m512i a = _mm512_loadu_si512(v0 + i * 32);
      __m512i b = v1 ? _mm512_loadu_si512(v1 + i * 32) : _mm512_setzero_si512();
      pv[2 * i] = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(a, b));
      pv[2 * i + 1] = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(a, b));
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      __m512bh w = reinterpret_cast<__m512bh>(
          _mm512_set1_epi32(static_cast<int>(wpair[g * (padded / 2) + p / 2])));
#pragma GCC unroll 8
      for (int i = 0; i < 2 * P; ++i) acc[g][i] = _mm512_dpbf16_ps(acc[g][i], pv[i], w);
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
    for (int i = 0; i < P; ++i)
      store_v_pairs(out + g * out_stride + i * 32, acc[g][2 * i], acc[g][2 * i + 1]);
}

using AttendFn = void (*)(const bf16_t*, const bf16_t*, const bf16_t*, const int64_t*, int64_t,
                         int64_t, float, bf16_t*, int64_t);
template <int HD, int... Gs>
constexpr std::array<AttendFn, sizeof...(Gs)> attend_table(std::integer_sequence<int, Gs...>) {
  return {&attend_fast<HD, Gs + 1>...};
}
constexpr auto ATTEND_64 = attend_table<64>(std::make_integer_sequence<int, 8>{});
constexpr auto ATTEND_128 = attend_table<128>(std::make_integer_sequence<int, 8>{});

// attend_fast for head_dim 64 or 128 and up to 8 query heads per KV head, else null (attend)
AttendFn attend_fast_for(int64_t hd, int64_t group) {
  if (group < 1 || group > 8) return nullptr;
  if (hd == 64) return ATTEND_64[group - 1];
  if (hd == 128) return ATTEND_128[group - 1];
  return nullptr;
}

// ---- attention on AMX tiles ---------------------------------------------------------------
// Up to 16 query "columns" against one sequence's cache and one KV head: column c is a query
// (q[c], HD channels) attending positions [0, len[c]), its output written to o[c]: the rows of
// a prefill chunk, one query head at a time.
//   scores^T = K . Q^T per 16 positions: A = the K block as it is in the cache (16 positions x
//     32 channels per tile, rows HD * 2 bytes apart), B = the columns' queries as channel
//     pairs, C = 16 positions x 16 columns;
//   softmax per column over its own length (as attend_fast: float32, weights rounded to bf16,
//     positions past a column's length weigh 0);
//   out = P . V per 32 positions: A = P (16 columns x 32 positions), B = V as position pairs
//     (v_pairs, built once for all the query heads of a KV head: channels in attend_fast's
//     lane order, put back on store), C = 16 columns x 16 channels, four tiles per 64 channels.
// The AVX512 kernels computed scores with dot products and transposed sums per row and head:
// a 512-token prefill step of SmolLM2 spent ~20% of its time there (now ~8%).
// Tiles: 0..3 C, 4 and 6 A, 5 and 7 B; the caller has configured all of them as 16 x 64 bytes.
struct Columns {
  const bf16_t* q[16];
  bf16_t* o[16];
  int64_t len[16];
  int64_t n = 0;
};

// C tile CT = K block (16 positions, rows HD * 2 bytes apart) . queries^T (qt: S tiles of
// channel pairs x 16 columns); with S == 2 the queries are already in tiles 5 and 7. (A macro:
// the tile intrinsics take their tile numbers as literals.)
#define SCORES_TILE(CT, krow, qt)                                \
  do {                                                           \
    _tile_zero(CT);                                              \
    if constexpr (S == 2) {                                      \
      _tile_loadd(4, (krow), HD * 2);                            \
      _tile_loadd(6, (krow) + 32, HD * 2);                       \
      _tile_dpbf16ps(CT, 4, 5);                                  \
      _tile_dpbf16ps(CT, 6, 7);                                  \
    } else {                                                     \
      for (int s2 = 0; s2 < S; s2 += 2) {                        \
        _tile_loadd(4, (krow) + s2 * 32, HD * 2);                \
        _tile_loadd(5, (qt) + s2 * 256, 64);                     \
        _tile_loadd(6, (krow) + (s2 + 1) * 32, HD * 2);          \
        _tile_loadd(7, (qt) + (s2 + 1) * 256, 64);               \
        _tile_dpbf16ps(CT, 4, 5);                                \
        _tile_dpbf16ps(CT, 6, 7);                                \
      }                                                          \
    }                                                            \
  } while (0)

// st[j][c] (16 positions x 16 columns, float32) -> sc[c * cp + j] * scale for c < n
KERNEL inline void scores_to_rows(const float* st, int64_t n, float scale, float* sc,
                                  int64_t cp) {
  const __m512i column = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176,
                                           192, 208, 224, 240);
  for (int64_t c = 0; c < n; ++c)
    _mm512_storeu_ps(sc + c * cp, _mm512_mul_ps(_mm512_i32gather_ps(column, st + c, 4),
                                                _mm512_set1_ps(scale)));
}

// the 16 cache rows of positions p0 .. p0 + 15 (one block: block % 16 == 0) into L1
KERNEL inline void prefetch_rows(const bf16_t* rows, int64_t hd) {
  const char* p = reinterpret_cast<const char*>(rows);
  for (int64_t o = 0; o < 16 * hd * 2; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
}

// V of positions [0, ctx) as AMX B tiles of position pairs: per 32 positions and 64 channels,
// four tiles of 16 pairs x 64 bytes (unpacklo / unpackhi of channels c0 .. c0 + 31, then c0 + 32
// .. c0 + 63), zeros past ctx; tile t of (p0, c0) at vv + ((p0 / 32 * HD / 64 + c0 / 64) * 4 + t)
// * 512
template <int HD>
KERNEL void v_pairs(const bf16_t* vc, const int64_t* table, int64_t block, int64_t ctx,
                    bf16_t* vv) {
  auto slot = [&](int64_t p) { return table[p / block] * block + p % block; };
  for (int64_t p0 = 0; p0 < ctx; p0 += 32)
    for (int64_t c0 = 0; c0 < HD; c0 += 64) {
      bf16_t* tiles = vv + ((p0 / 32) * (HD / 64) + c0 / 64) * 4 * 512;
      for (int64_t half = 0; half < 2; ++half) {   // positions p0 + 16 half + 2 pr, + 1
        int64_t h0 = p0 + 16 * half;
        const bf16_t* vb0 = h0 < ctx ? vc + slot(h0) * HD + c0 : nullptr;   // 16 rows
        for (int64_t pr = 0; pr < 8; ++pr) {
          int64_t a = h0 + 2 * pr, b = a + 1;
          for (int h2 = 0; h2 < 2; ++h2) {
            __m512i va = a < ctx ? _mm512_loadu_si512(vb0 + (2 * pr) * HD + h2 * 32) : _mm512_setzero_si512();
            __m512i vb = b < ctx ? _mm512_loadu_si512(vb0 + (2 * pr + 1) * HD + h2 * 32) : _mm512_setzero_si512();
            bf16_t* dst = tiles + (2 * h2 * 16 + 8 * half + pr) * 32;
            _mm512_storeu_si512(dst, _mm512_unpacklo_epi16(va, vb));
            _mm512_storeu_si512(dst + 16 * 32, _mm512_unpackhi_epi16(va, vb));
          }
        }
      }
    }
}

template <int HD>
AMX_KERNEL void attend_columns_amx(const Columns& cols, const bf16_t* kc, const bf16_t* vv,
                                   const int64_t* table, int64_t block, float scale) {
  static_assert(HD % 64 == 0, "attend_columns_amx: head_dim a multiple of 64");
  constexpr int S = HD / 32;                       // 32-channel slices of a head
  const int64_t n = cols.n;
  int64_t ctx = 0;                                 // positions the longest column attends
  for (int64_t c = 0; c < n; ++c) ctx = std::max(ctx, cols.len[c]);
  const int64_t cp = (ctx + 31) / 32 * 32;         // scores per column: whole 32-position groups
  thread_local std::vector<uint32_t> qt;           // [S][16 pairs][16 columns]
  thread_local std::vector<float> sc;              // [16 columns][cp]
  thread_local std::vector<bf16_t> pb;             // [16 columns][cp]
  qt.resize(S * 16 * 16);
  if (static_cast<int64_t>(sc.size()) < 16 * cp) { sc.resize(16 * cp); pb.resize(16 * cp); }
  alignas(64) float st[16 * 16];
  auto slot = [&](int64_t p) { return table[p / block] * block + p % block; };
  // the columns' queries as channel pairs: qt[s][pr][c] = pair s * 16 + pr of column c
  for (int64_t c = 0; c < 16; ++c) {
    const uint32_t* qc = c < n ? reinterpret_cast<const uint32_t*>(cols.q[c]) : nullptr;
    for (int64_t pp = 0; pp < HD / 2; ++pp)
      qt[(pp / 16) * 256 + (pp % 16) * 16 + c] = qc ? qc[pp] : 0u;
  }
  // scores, 16 positions at a time into C tile 0 or 1 (alternately: the next block's products
  // run while this one's are stored), transposed into sc[c][p]. K two blocks ahead into L1
  // (a chunk after a long cached prefix reads it from memory)
  if constexpr (S == 2) {                          // the queries stay in tiles 5 and 7
    _tile_loadd(5, qt.data(), 64);
    _tile_loadd(7, qt.data() + 256, 64);
  }
  for (int64_t p0 = 0; p0 < ctx; p0 += 32) {
    bool second_block = p0 + 16 < ctx;
    for (int64_t b = p0 + 32; b < std::min(ctx, p0 + 64); b += 16) prefetch_rows(kc + slot(b) * HD, HD);
    SCORES_TILE(0, kc + slot(p0) * HD, qt.data());
    if (second_block) SCORES_TILE(1, kc + slot(p0 + 16) * HD, qt.data());
    _tile_stored(0, st, 64);                       // st[position j][column c]
    scores_to_rows(st, n, scale, sc.data() + p0, cp);
    if (second_block) {
      _tile_stored(1, st, 64);
      scores_to_rows(st, n, scale, sc.data() + p0 + 16, cp);
    }
  }
  // softmax per column over its own length; weights in bf16, 0 past the length and for
  // columns past n
  for (int64_t c = 0; c < 16; ++c) {
    bf16_t* pc = pb.data() + c * cp;
    int64_t len = c < n ? cols.len[c] : 0;
    if (len) softmax_rows(sc.data() + c * cp, 1, len, cp);
    for (int64_t i = 0; i < cp; i += 16) {
      int64_t m = std::min<int64_t>(16, std::max<int64_t>(0, len - i));
      __mmask16 mask = m >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << m) - 1);
      __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, sc.data() + c * cp + i));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pc + i), reinterpret_cast<__m256i&>(h));
    }
  }
  // out = P . V, 64 channels (four C tiles) per pass
  for (int64_t c0 = 0; c0 < HD; c0 += 64) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t p0 = 0; p0 < ctx; p0 += 32) {
      const bf16_t* tiles = vv + ((p0 / 32) * (HD / 64) + c0 / 64) * 4 * 512;
      _tile_loadd(4, pb.data() + p0, cp * 2);     // B tiles 5, 6, 7, 5: no wait on a tile in use
      _tile_loadd(5, tiles, 64);
      _tile_loadd(6, tiles + 512, 64);
      _tile_loadd(7, tiles + 2 * 512, 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 6);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, tiles + 3 * 512, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
    alignas(64) float ot[4][16 * 16];
    _tile_stored(0, ot[0], 64);
    _tile_stored(1, ot[1], 64);
    _tile_stored(2, ot[2], 64);
    _tile_stored(3, ot[3], 64);
    for (int64_t c = 0; c < n; ++c)
      for (int h2 = 0; h2 < 2; ++h2)
        store_v_pairs(cols.o[c] + c0 + h2 * 32, _mm512_load_ps(ot[2 * h2] + c * 16),
                      _mm512_load_ps(ot[2 * h2 + 1] + c * 16));
  }
}

// a run's query heads against one KV head (v_pairs, then attend_columns_amx per query head)
using AttendRunFn = void (*)(const Columns* heads, int64_t group, const bf16_t* kc,
                             const bf16_t* vc, const int64_t* table, int64_t block, float scale);

template <int HD>
void attend_run_amx(const Columns* heads, int64_t group, const bf16_t* kc, const bf16_t* vc,
                    const int64_t* table, int64_t block, float scale) {
  int64_t ctx = 0;
  for (int64_t c = 0; c < heads[0].n; ++c) ctx = std::max(ctx, heads[0].len[c]);
  thread_local std::vector<bf16_t> vv;
  int64_t need = (ctx + 31) / 32 * (HD / 64) * 4 * 512;
  if (static_cast<int64_t>(vv.size()) < need) vv.resize(need);
  v_pairs<HD>(vc, table, block, ctx, vv.data());
  for (int64_t g = 0; g < group; ++g)
    attend_columns_amx<HD>(heads[g], kc, vv.data(), table, block, scale);
}

// attend_run_amx for head_dim 64 or 128 where AMX is there and 16 positions share a block,
// else null (attend_fast / attend)
AttendRunFn attend_run_for(int64_t hd, int64_t block) {
  if (block % 16 != 0 || !amx_supported()) return nullptr;
  if (hd == 64) return &attend_run_amx<64>;
  if (hd == 128) return &attend_run_amx<128>;
  return nullptr;
}

// qkv: [D, (H + 2 KV) * hd] after rope_store_kv; block_tables: int64 [D, max_blocks], the
// table of each row's sequence; lengths: int64 [D] (positions row i attends, its own
// included). Returns [D, H * hd]. A prefill chunk's rows carry their sequence's table and
// lengths start + 1, start + 2, ..: causal attention, read back from the cache just written
// (1.5x faster than PyTorch's SDPA for a 128-token chunk of SmolLM2 on 2 Zen 4 cores).
at::Tensor paged_attention(const at::Tensor& qkv, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& lengths, int64_t block, int64_t heads,
                            double scale) {
  check_rows(qkv, "qkv");
  int64_t d = qkv.size(0), kv_heads = k_cache.size(0), n_slots = k_cache.size(1),
          hd = k_cache.size(2);
  check(heads % kv_heads == 0, "paged_attention: heads a multiple of kv_heads");
  check(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() &&
            block_tables.size(0) == d && lengths.scalar_type() == at::kLong && lengths.numel() == d,
        "paged_attention: int64 block tables [D, blocks] and lengths [D]");
  int64_t group = heads / kv_heads, max_blocks = block_tables.size(1), width = qkv.size(1);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = lengths.data_ptr<int64_t>();
  for (int64_t i = 0; i < d; ++i) {
    TORCH_CHECK(lens[i] >= 1 && lens[i] <= max_blocks * block, "paged_attention: length");
    for (int64_t b = 0; b < (lens[i] + block - 1) / block; ++b)
      TORCH_CHECK(tables[i * max_blocks + b] >= 0 && (tables[i * max_blocks + b] + 1) * block <= n_slots,
                  "paged_attention: block id out of range");
  }
  at::Tensor out = at::empty({d, heads * hd}, qkv.options());
  const bf16_t* qp = bf16_ptr(qkv);
  const bf16_t* kc = bf16_ptr(k_cache);
  const bf16_t* vc = bf16_ptr(v_cache);
  bf16_t* op = bf16_mut(out);
  float sc = static_cast<float>(scale);
  // runs of rows: up to 16 consecutive rows of one prefill chunk (the same block table,
  // lengths one apart), else single rows (decode). With AMX a run's rows are the columns of
  // attend_columns_amx, a query head at a time; other rows go one by one through attend_fast
  // (or attend). (A decode row's 3 query heads as AMX columns: 16 sequences x 160 positions
  // 5.9 ms against attend_fast's 4.2, the 13 empty columns' work wasted.)
  AttendFn fast = attend_fast_for(hd, group);
  AttendRunFn amx = attend_run_for(hd, block);
  // (first row, rows); the caller's thread keeps the storage: a reference, so that the
  // lambdas below read this thread's list from the pool's threads too
  thread_local std::vector<std::pair<int64_t, int64_t>> runs_store;
  std::vector<std::pair<int64_t, int64_t>>& runs = runs_store;
  runs.clear();
  bool amx_runs = false;                        // any run for attend_columns_amx
  for (int64_t i = 0; i < d;) {
    int64_t r = 1;
    if (amx)
      while (r < 16 && i + r < d && lens[i + r] == lens[i] + r &&
             std::memcmp(tables + (i + r) * max_blocks, tables + i * max_blocks,
                         max_blocks * sizeof(int64_t)) == 0)
        ++r;
    runs.emplace_back(i, r);
    amx_runs |= r > 1;
    i += r;
  }
  // items (run, KV head) one at a time from a shared counter (parallel, chunks of 1): rows of
  // a prefill chunk attend ever longer contexts, so equal static parts would not be equal work
  int64_t items = static_cast<int64_t>(runs.size()) * kv_heads;
  auto one = [&](int64_t t) {
    auto [i, rows] = runs[t / kv_heads];
    int64_t h = t % kv_heads;
    const bf16_t* qh = qp + i * width + h * group * hd;
    const bf16_t* kh = kc + h * n_slots * hd;
    const bf16_t* vh = vc + h * n_slots * hd;
    bf16_t* oh = op + i * heads * hd + h * group * hd;
    const int64_t* table = tables + i * max_blocks;
    if (amx && rows > 1) {                      // the run's rows, a query head at a time
      thread_local std::vector<Columns> per_head;
      per_head.resize(group);
      for (int64_t g = 0; g < group; ++g) {
        Columns& cols = per_head[g];
        cols.n = rows;
        for (int64_t r = 0; r < rows; ++r) {
          cols.q[r] = qh + r * width + g * hd;
          cols.o[r] = oh + r * heads * hd + g * hd;
          cols.len[r] = lens[i] + r;
        }
      }
      amx(per_head.data(), group, kh, vh, table, block, sc);
      return;
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (fast) fast(qh + r * width, kh, vh, table, lens[i + r], block, sc, oh + r * heads * hd, hd);
      else attend(qh + r * width, group, hd, kh, vh, table, lens[i + r], block, sc,
                  oh + r * heads * hd, hd);
    }
  };
  // the first KPF blocks of K of an item, prefetched while the item before it runs
  // (attend_fast prefetches KPF blocks ahead from there on)
  auto prefetch_start = [&](int64_t t) {
    int64_t i = runs[t / kv_heads].first, h = t % kv_heads;
    for (int64_t b = 0; b < KPF && b * block < lens[i]; ++b) {
      const char* kb = reinterpret_cast<const char*>(
          kc + (h * n_slots + tables[i * max_blocks + b] * block) * hd);
      for (int64_t o = 0; o < std::min<int64_t>(block, lens[i] - b * block) * hd * 2; o += 64)
        _mm_prefetch(kb + o, _MM_HINT_T0);
    }
  };
  std::atomic<int64_t> next{0};
  int64_t threads = std::min<int64_t>(at::get_num_threads(), items);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    if (amx_runs) amx_config();
    for (int64_t t = next.fetch_add(1); t < items; ) {
      int64_t after = next.fetch_add(1);
      if (after < items) prefetch_start(after);
      one(t);
      t = after;
    }
    if (amx_runs) amx_release();
  });
  return out;
}

bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

// ---- a whole decoder layer per call ---------------------------------------------------------
// cpu_path.CpuStepPath runs each layer as one call of StepLayer::forward instead of ~9 Python
// calls (about 1 ms of Python and binding overhead per step of SmolLM2's 30 layers).

// One projection in the format its weights are held in; `rows` beyond QUANT_ROWS of a quantized
// layer dequantize its weights into linear_vnni's layout for that call (prefill).
struct StepLinear {
  int64_t kind;                          // 0 bf16 (VNNI layout), 1 int8 (q + 128), 2 int4
  at::Tensor a, b, c;                    // bf16: w; int8: u, scale; int4: packed, scale, offset
  c10::optional<at::Tensor> bias;        // float32
  int64_t n;                             // output features
  bool glu = false;                      // bf16 gate_up in glu_layout: returns silu(gate) * up
  static constexpr int64_t QUANT_ROWS = 16;     // int8 / int4 tiles (passes of 8 rows)

  at::Tensor operator()(const at::Tensor& x, bool out_f32 = false) const {
    at::Tensor y;
    if (kind == 0) return linear_vnni(x, a, n, bias, out_f32, glu);
    if (x.size(0) > QUANT_ROWS) {        // prefill: the weights dequantized for this call
      at::Tensor w = kind == 1 ? dequantize_int8_vnni(a, b) : dequantize_int4_vnni(a, b, c, n);
      return linear_vnni(x, w, n, bias, out_f32, false);
    }
    y = kind == 1 ? linear_int8(x, a, b, bias) : linear_int4(x, a, b, c, n, bias);
    return out_f32 ? y.to(at::kFloat) : y;
  }
};

struct StepLayer {
  at::Tensor in_norm, post_norm;         // float32
  double eps;
  StepLinear qkv, o, gate_up, down;
  int64_t heads, kv_heads;
  double scale;

  // h: the layer's input; residual: the stream before it (None for a stage's first layer).
  // Returns (h, residual) for the next layer; the stage's output is residual + h.
  std::tuple<at::Tensor, at::Tensor> forward(
      const at::Tensor& h, const c10::optional<at::Tensor>& residual_in,
      const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
      const at::Tensor& slots, at::Tensor k_cache, at::Tensor v_cache,
      const at::Tensor& tables, const at::Tensor& lengths, int64_t block) const {
    at::Tensor residual, normed;
    if (residual_in.has_value()) {
      residual = *residual_in;
      normed = rms_norm(h, residual, in_norm, eps);          // residual += h
    } else {
      residual = h.clone();
      normed = rms_norm(h, c10::nullopt, in_norm, eps);
    }
    at::Tensor q = qkv(normed);
    rope_store_kv(q, positions, cos, sin, slots, k_cache, v_cache, heads, kv_heads);
    at::Tensor attn = paged_attention(q, k_cache, v_cache, tables, lengths, block, heads, scale);
    normed = rms_norm(o(attn), residual, post_norm, eps);     // residual += attention
    return {down(gate_up.glu ? gate_up(normed) : silu_mul(gate_up(normed))), residual};
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<StepLinear>(m, "StepLinear")
      .def(py::init([](int64_t kind, at::Tensor a, c10::optional<at::Tensor> b,
                       c10::optional<at::Tensor> c, c10::optional<at::Tensor> bias, int64_t n,
                       bool glu) {
             TORCH_CHECK(!glu || kind == 0, "StepLinear: glu is for bf16 weights (kind 0)");
             return StepLinear{kind, a, b.value_or(at::Tensor()), c.value_or(at::Tensor()), bias, n, glu};
           }),
           py::arg("kind"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("bias"), py::arg("n"),
           py::arg("glu") = false)
      .def("__call__", &StepLinear::operator(), py::arg("x"), py::arg("out_f32") = false);
  py::class_<StepLayer>(m, "StepLayer")
      .def(py::init([](at::Tensor in_norm, at::Tensor post_norm, double eps, StepLinear qkv,
                       StepLinear o, StepLinear gate_up, StepLinear down, int64_t heads,
                       int64_t kv_heads, double scale) {
             return StepLayer{in_norm, post_norm, eps, qkv, o, gate_up, down, heads, kv_heads, scale};
           }))
      .def("forward", &StepLayer::forward);
  m.def("supported", &supported, "whether this CPU has the instructions the kernels use");
  m.def("amx_supported", &amx_supported, "whether AMX-BF16 is there and this process may use it");
  m.def("linear_vnni", &linear_vnni, "y = x @ w^T (+ b), w in the VNNI-blocked layout; with glu, "
        "silu(gate) * up of a gate_up weight in glu_layout",
        py::arg("x"), py::arg("w"), py::arg("n"), py::arg("bias") = py::none(),
        py::arg("out_f32") = false, py::arg("glu") = false);
  m.def("linear_int8", &linear_int8, "y = x @ (q * scale)^T (+ b), u = q + 128", py::arg("x"), py::arg("u"),
        py::arg("scale"), py::arg("bias") = py::none());
  m.def("linear_int4", &linear_int4, "group-32 int4 linear, up to 16 rows per block pass",
        py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("offset"), py::arg("n"),
        py::arg("bias") = py::none());
  m.def("dequantize_int4", &dequantize_int4, "linear_int4's layout -> bf16");
  m.def("dequantize_int8", &dequantize_int8, "linear_int8's u = q + 128 -> bf16");
  m.def("dequantize_int8_vnni", &dequantize_int8_vnni, "linear_int8's weights -> bf16 in linear_vnni's layout");
  m.def("dequantize_int4_vnni", &dequantize_int4_vnni, "linear_int4's weights -> bf16 in linear_vnni's layout");
  m.def("rms_norm", &rms_norm, "(residual += x;) RMSNorm", py::arg("x"), py::arg("residual"),
        py::arg("weight"), py::arg("eps"));
  m.def("argmax_rows", &argmax_rows, "torch.argmax(x, dim=1) of a float32 [N, V] tensor");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("rope_store_kv", &rope_store_kv, "rotary on q, k; k, v into the paged cache");
  m.def("paged_attention", &paged_attention, "each row against its own paged context");
}
