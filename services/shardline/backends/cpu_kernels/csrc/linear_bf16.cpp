// linear_vnni: bf16 linears on the VNNI-blocked layout, one weight copy for the GEMV, the AMX
// tiles and the AVX512-BF16 register tiles.
//
// Layout: w [n, k] -> [n / 16][k / 2][16][2]: per block of 16 outputs, for each pair of input
// channels, the 16 outputs' two values (64 bytes, one vector, and one row of an AMX B tile).
// n is padded to a multiple of 32 (vnni_layout), so the tile paths take blocks in pairs: 32
// outputs at a time.
//   up to GEMV_MAX_ROWS rows: y[m, block] += w_block[pair] * broadcast(x[m, pair]), AVX512-BF16
//     dot products of pairs, no horizontal sums (vnni_gemv_block)
//   more rows, AMX: C [H x 32] += A [H x 32 channels] . B [32 channels x 32 outputs] per 32
//     channels, H = 16 rows up to DECODE_ROWS rows, else 32 (amx_block)
//   more rows, no AMX: register tiles of up to DECODE_ROWS rows in the GEMV's form
//     (vnni_rows_chunk)
#include "amx.h"
#include "kernels.h"

namespace shardline::cpu_kernels {
namespace {

constexpr int GEMV_MAX_ROWS = 4;
// Up to this many rows (a decode step) the register tiles take all rows in one pass over the
// weights, AMX blocks are 16 rows, x is packed for AMX on the caller's thread and the tiles'
// threads take STREAM_CHUNKS_PER_THREAD chunks each; beyond (prefill), register tiles take
// chunks of PREFILL_CHUNK_ROWS rows, AMX blocks are 32 rows, x is packed on the threads and
// they take COMPUTE_CHUNKS_PER_THREAD chunks each.
constexpr int DECODE_ROWS = 16;
constexpr int PREFILL_CHUNK_ROWS = 8;

// ---- GEMV -------------------------------------------------------------------------------------
// M <= GEMV_MAX_ROWS rows against one block of 16 outputs, ACC interleaved accumulators per row
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
  // the end of this one)
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

// ---- register tiles (CPUs without AMX) --------------------------------------------------------
// A register tile of M rows x NB blocks of 16 outputs (M * NB <= 16 accumulators): each weight
// vector feeds M dot products, each broadcast activation pair NB. At 16 rows each weight
// vector streamed from memory feeds 16 dot products: enough arithmetic to keep up with the
// memory, with the weights read once for a whole decode step.
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

// M rows (M <= DECODE_ROWS) of x against the two 16-output blocks at wb -> c [M][32]: up to 8
// rows as one M x 2 tile, more as two M x 1 tiles
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

// ROWS_CHUNK[M - 1] = vnni_rows_chunk<M>, M = 1 .. DECODE_ROWS
using RowsChunkFn = void (*)(const bf16_t*, int64_t, const bf16_t*, bool, float*);
template <int... Ms>
constexpr std::array<RowsChunkFn, sizeof...(Ms)> rows_chunk_table(std::integer_sequence<int, Ms...>) {
  return {&vnni_rows_chunk<Ms + 1>...};
}
constexpr auto ROWS_CHUNK = rows_chunk_table(std::make_integer_sequence<int, DECODE_ROWS>{});

// ---- AMX tiles --------------------------------------------------------------------------------
// amx_block's tiles (literals: see amx.h). C_RB: rows 16 R .. 16 R + 15 of the block x the
// pair's output block B; A_R: those rows of x; B_B: output block B of w.
#define TILE_C_00 0
#define TILE_C_01 1
#define TILE_C_10 2
#define TILE_C_11 3
#define TILE_A_0 4
#define TILE_A_1 5
#define TILE_B_0 6
#define TILE_B_1 7

// Rows m0 .. m0 + H - 1 of x against output blocks nb0, nb0 + 1 -> c [H][32] float32, for
// blocks of H = 32 rows (C tiles 00 .. 11, A tiles 0, 1), or H = 16 (a decode step of up to 16
// rows: C tiles 00, 01 and A tile 0, half the tile products and loads of a 32-row block).
// A tiles: 16 rows x 32 channels bf16; B tiles: 16 channel pairs x 16 outputs x 2.
// xpack: x re-laid per H rows as [k / 32][H rows][32 channels], so each A tile (16 rows of 64
// bytes) is 1 KB contiguous; block m0 / H starts at xpack + m0 * k.
template <int H>
AMX_KERNEL void amx_block(const bf16_t* xpack, int64_t k, const bf16_t* w, int64_t nb0,
                          int64_t m0, bool prefetch, float* c /* [H][32] */) {
  static_assert(H == 16 || H == 32, "amx_block: blocks of 16 or 32 rows");
  _tile_zero(TILE_C_00); _tile_zero(TILE_C_01);
  if constexpr (H == 32) { _tile_zero(TILE_C_10); _tile_zero(TILE_C_11); }
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
    _tile_loadd(TILE_A_0, a, 64);
    if constexpr (H == 32) _tile_loadd(TILE_A_1, a + 16 * 32, 64);
    _tile_loadd(TILE_B_0, b0 + kk * 16, 64);
    _tile_loadd(TILE_B_1, b1 + kk * 16, 64);
    _tile_dpbf16ps(TILE_C_00, TILE_A_0, TILE_B_0);
    _tile_dpbf16ps(TILE_C_01, TILE_A_0, TILE_B_1);
    if constexpr (H == 32) {
      _tile_dpbf16ps(TILE_C_10, TILE_A_1, TILE_B_0);
      _tile_dpbf16ps(TILE_C_11, TILE_A_1, TILE_B_1);
    }
  }
  _tile_stored(TILE_C_00, c, 128);
  _tile_stored(TILE_C_01, c + 16, 128);
  if constexpr (H == 32) {
    _tile_stored(TILE_C_10, c + 16 * 32, 128);
    _tile_stored(TILE_C_11, c + 16 * 32 + 16, 128);
  }
}

#undef TILE_C_00
#undef TILE_C_01
#undef TILE_C_10
#undef TILE_C_11
#undef TILE_A_0
#undef TILE_A_1
#undef TILE_B_0
#undef TILE_B_1

// ---- output -----------------------------------------------------------------------------------
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

// 16 outputs act(gate) * up from a row's 32 (16 gate, then 16 up), bias added first
KERNEL void glu_out(const float* c, const float* bias, Activation act, float* yf, bf16_t* yb) {
  __m512 g = _mm512_loadu_ps(c), u = _mm512_loadu_ps(c + 16);
  if (bias) {
    g = _mm512_add_ps(g, _mm512_loadu_ps(bias));
    u = _mm512_add_ps(u, _mm512_loadu_ps(bias + 16));
  }
  __m512 v = act_mul16(act, g, u);
  if (yf) _mm512_storeu_ps(yf, v);
  else store_bf16x16(yb, v);
}

// Where linear_vnni's results go: y [m, width], float32 (yf) or bf16 (yb), with the bias
struct VnniOut {
  int64_t n;              // outputs of the weight
  int64_t width;          // outputs per row of y: n, or (glu) n / 2
  bool glu;
  Activation act;         // of the glu epilogue
  const float* b;         // bias [n], or null
  float* yf;
  bf16_t* yb;

  // row's outputs col .. col + count - 1 from v
  void put(int64_t row, int64_t col, const float* v, int64_t count) const {
    store_out(v, count, b ? b + col : nullptr, yf ? yf + row * n + col : nullptr,
              yb ? yb + row * n + col : nullptr);
  }

  // one row's 32 outputs of the block pair p: as they are, or (glu) act(gate) * up, 16 wide
  void emit(int64_t row, int64_t p, const float* c) const {
    if (!glu) {
      int64_t cols = std::min<int64_t>(32, n - p * 32);
      if (cols > 0) put(row, p * 32, c, cols);
      return;
    }
    glu_out(c, b ? b + p * 32 : nullptr, act, yf ? yf + row * width + p * 16 : nullptr,
            yb ? yb + row * width + p * 16 : nullptr);
  }
};

// ---- the three paths --------------------------------------------------------------------------
// m <= GEMV_MAX_ROWS rows of x [m, k]: blocks of 16 outputs over the threads (glu: the gate
// and the up block of each pair)
void gemv_rows(const VnniOut& y, const bf16_t* xp, int64_t m, int64_t k, const bf16_t* wp) {
  auto gemv = [&](const bf16_t* wb, float* out) {
    switch (m) {
      case 1: vnni_gemv_block<1>(xp, k, wb, out); break;
      case 2: vnni_gemv_block<2>(xp, k, wb, out); break;
      case 3: vnni_gemv_block<3>(xp, k, wb, out); break;
      default: vnni_gemv_block<4>(xp, k, wb, out); break;
    }
  };
  int64_t blocks = (y.n + 15) / 16;
  if (!y.glu) {
    parallel(blocks, [&](int64_t b0, int64_t b1) {
      float out[GEMV_MAX_ROWS * 16];
      for (int64_t blk = b0; blk < b1; ++blk) {
        gemv(wp + blk * 16 * k, out);
        int64_t cols = std::min<int64_t>(16, y.n - blk * 16);
        for (int64_t r = 0; r < m; ++r) y.put(r, blk * 16, out + r * 16, cols);
      }
    });
    return;
  }
  parallel(blocks / 2, [&](int64_t p0, int64_t p1) {
    float out[2][GEMV_MAX_ROWS * 16], c[32];
    for (int64_t p = p0; p < p1; ++p) {
      gemv(wp + 2 * p * 16 * k, out[0]);
      gemv(wp + (2 * p + 1) * 16 * k, out[1]);
      for (int64_t r = 0; r < m; ++r) {
        std::memcpy(c, out[0] + r * 16, 64);
        std::memcpy(c + 16, out[1] + r * 16, 64);
        y.emit(r, p, c);
      }
    }
  });
}

// AVX512-BF16 register tiles, per 32 outputs (`pairs_n` block pairs) over the threads: up to
// DECODE_ROWS rows in one pass over the weights; more in chunks of PREFILL_CHUNK_ROWS, whose
// 8 x 2 tiles need fewer loads per dot product once the weights are in cache
void register_tile_rows(const VnniOut& y, const bf16_t* xp, int64_t m, int64_t k,
                        const bf16_t* wp, int64_t pairs_n) {
  int64_t chunk = m <= DECODE_ROWS ? m : PREFILL_CHUNK_ROWS;
  parallel(pairs_n, [&](int64_t p0, int64_t p1) {
    alignas(64) float c[DECODE_ROWS * 32];
    for (int64_t p = p0; p < p1; ++p) {
      const bf16_t* wb = wp + p * 32 * k;
      for (int64_t r0 = 0; r0 < m; r0 += chunk) {
        int64_t rows = std::min<int64_t>(chunk, m - r0);
        // the first chunk streams the weights (prefetched); later ones find them in cache
        ROWS_CHUNK[rows - 1](xp + r0 * k, k, wb, r0 == 0, c);
        for (int64_t r = 0; r < rows; ++r) y.emit(r0 + r, p, c + r * 32);
      }
    }
  });
}

// AMX tiles, per 32 outputs (`pairs_n` block pairs) over the threads, each taking every block
// of h rows of x re-laid for amx_block
void amx_rows(const VnniOut& y, const bf16_t* xp, int64_t m, int64_t k, const bf16_t* wp,
              int64_t pairs_n) {
  const int64_t h = m <= DECODE_ROWS ? 16 : 32;   // rows per block (amx_block<H>)
  int64_t mp = (m + h - 1) / h * h;
  // 64-byte aligned: an A tile row that straddles two cache lines slows AMX's tile loads. The
  // caller's thread keeps the buffer from call to call; rows past m are zeroed.
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
  if (m <= DECODE_ROWS) pack_rows(0, mp);
  else parallel(mp / h, [&](int64_t b0, int64_t b1) { pack_rows(b0 * h, b1 * h); });  // prefill
  parallel(pairs_n, [&](int64_t p0, int64_t p1) {
    amx_config();
    alignas(64) float c[32 * 32];
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t m0 = 0; m0 < mp; m0 += h) {
        bool pf = m0 == 0 && p + 1 < p1;
        if (h == 16) amx_block<16>(xpad, k, wp, 2 * p, m0, pf, c);
        else amx_block<32>(xpad, k, wp, 2 * p, m0, pf, c);
        for (int64_t r = 0; r < h && m0 + r < m; ++r) y.emit(m0 + r, p, c + r * 32);
      }
    amx_release();
  }, m <= DECODE_ROWS ? STREAM_CHUNKS_PER_THREAD : COMPUTE_CHUNKS_PER_THREAD);
}

}  // namespace

at::Tensor linear_vnni(const at::Tensor& x, const at::Tensor& w, int64_t n,
                       const c10::optional<at::Tensor>& bias, bool out_f32, bool glu,
                       Activation act) {
  check_rows(x, "x");
  int64_t m = x.size(0), k = x.size(1);
  check(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.dim() == 4 && w.size(1) * 2 == k &&
            w.size(2) == 16 && w.size(3) == 2 && w.size(0) * 16 >= n && w.size(0) % 2 == 0 && k % 32 == 0,
        "linear_vnni: weight in the [n / 16, k / 2, 16, 2] layout (vnni_layout), k a multiple of 32");
  check(!glu || (n % 32 == 0 && w.size(0) * 16 == n),
        "linear_vnni: glu weights interleave 16 gate and 16 up rows (glu_layout), n a multiple of 32");
  int64_t width = glu ? n / 2 : n;           // outputs per row
  at::Tensor y = at::empty({m, width}, x.options().dtype(out_f32 ? at::kFloat : at::kBFloat16));
  VnniOut out{n, width, glu, act, bias.has_value() ? bias->data_ptr<float>() : nullptr,
              out_f32 ? y.data_ptr<float>() : nullptr, out_f32 ? nullptr : bf16_mut(y)};
  const bf16_t* wp = bf16_ptr(w);
  const bf16_t* xp = bf16_ptr(x);
  if (m <= GEMV_MAX_ROWS) gemv_rows(out, xp, m, k, wp);
  else if (!amx_supported()) register_tile_rows(out, xp, m, k, wp, w.size(0) / 2);
  else amx_rows(out, xp, m, k, wp, w.size(0) / 2);
  return y;
}

}  // namespace shardline::cpu_kernels
