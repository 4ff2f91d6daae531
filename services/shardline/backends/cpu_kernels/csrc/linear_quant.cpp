// linear_int8 / linear_int4: quantized weights against activations quantized to int8, on
// VNNI's dpbusd (unsigned bytes x signed bytes, 4 products summed per 32-bit lane), and the
// dequantization of those weights to bf16.
//
// Both weight layouts hold 16 outputs x 4 bytes in each 64-byte vector, per block of 16 outputs
// (int8_kernel_layout, int4_kernel_layout), so dpbusd takes a weight vector whole and needs no
// horizontal sums. A call quantizes x's rows once; each block of 16 outputs then takes them in
// passes of QUANT_TILE_ROWS rows, every weight vector it loads serving all the rows of the pass
// (later passes find the block's weights in cache). StepLinear runs these kernels for up to
// StepLinear::QUANT_ROWS (16) rows, so a 16-row decode step reads the quantized weights from
// memory once; steps of more rows dequantize the weights into linear_vnni's layout for that
// call (dequantize_int8_vnni, dequantize_int4_vnni) and run its AMX or register tiles.
#include "kernels.h"

namespace shardline::cpu_kernels {
namespace {

constexpr int64_t QUANT_TILE_ROWS = 8;      // rows per pass of the int8 and int4 tiles

// ---- activations as int8 ----------------------------------------------------------------------
// Per row and group of 32 channels: int8 values q and a scale sx (x ~ q * sx), the sum of x
// (int4's offsets), and the correction of int8's unsigned weights.
struct QuantRow {
  std::vector<int8_t> q;       // [k]
  std::vector<float> pair;     // [k / 64, 16]: per 64 channels, lanes 0..7 the first group's sx,
                               // 8..15 the second's (the tiles read lane 0 or 8 of group g)
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

// out[0:16] (masked) = v * scale + bias, as bf16
KERNEL void scale_out(const float* v, const float* scale, const float* bias, __mmask16 mask,
                      bf16_t* y) {
  __m512 f = _mm512_mul_ps(_mm512_loadu_ps(v), _mm512_maskz_loadu_ps(mask, scale));
  if (bias) f = _mm512_add_ps(f, _mm512_maskz_loadu_ps(mask, bias));
  __m256bh h = _mm512_cvtneps_pbh(f);
  _mm256_mask_storeu_epi16(y, mask, reinterpret_cast<__m256i&>(h));
}

// y [m, n] (bf16) through a quantized tile kernel: x's rows quantized once on the caller's
// thread (QuantRow), blocks of 16 outputs over the threads, QUANT_TILE_ROWS rows per pass over a
// block (later passes find its weights in cache); tile(blk, rows, count, out [count][16]); the
// per-output scale (or none) and the bias applied as the rows are stored.
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

}  // namespace

// ---- int8 (per-channel weights) ---------------------------------------------------------------
// Weights u = q + 128 (unsigned, as dpbusd multiplies unsigned by signed bytes), tiled
// [n' / 16][k / 4][16][4] (n' = n rounded up to 16): per block of 16 outputs and quad of input
// channels, the 16 outputs' 4 bytes (64 bytes, one vector). Per row and block of outputs:
//   y = scale * (sum_g sx_g * dot_g(u, xq) - corr) + bias,  corr = 128 * sum_g sx_g * sum(xq_g)
namespace {

// M rows (M <= QUANT_TILE_ROWS) against the block at wb -> out [M][16], before scale and bias
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

// INT8_TILE[M - 1] = int8_tile<M>, M = 1 .. QUANT_TILE_ROWS
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

}  // namespace

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

// ---- int4 (group 32) --------------------------------------------------------------------------
// Weights [n' / 16][k / 8][16][4]: per block of 16 outputs and octet of input channels, each
// output's 4 bytes hold channels 0..3 of the octet in their low nibbles and 4..7 in their high
// nibbles (values 0..15), so masking and shifting a 64-byte vector yields two dpbusd operands
// matching the activations' natural quads. Scales and offsets [n' / 16][k / 32][16] float16:
// w = q * s + o. Per row and block: y = sum_g (s_g * sx_g) * dot_g(q, xq) + o_g * sum(x_g) + bias.
namespace {

// M rows (M <= QUANT_TILE_ROWS) against the block at wb (its scales sb, offsets ob) -> out
// [M][16], before the bias
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

// INT4_TILE[M - 1] = int4_tile<M>, M = 1 .. QUANT_TILE_ROWS
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

}  // namespace

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

// ---- dequantization to bf16 [n, k] ------------------------------------------------------------
namespace {

// blocks [b0, b1) of 16 outputs of the tiled int8 layout -> their bf16 rows of out [n, k]
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

}  // namespace

// linear_int8's layout -> bf16 [n, k]
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

// linear_int4's layout -> bf16 [n, k]
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

// ---- dequantization to bf16 in linear_vnni's layout -------------------------------------------
// For a step of more than StepLinear::QUANT_ROWS rows StepLinear dequantizes a quantized weight
// into the VNNI-blocked layout ([n' / 16, k / 2, 16, 2], n' a multiple of 32) and runs
// linear_vnni's AMX or register tiles on it. The copy lives for that call: stages hold only the
// quantized weights.
namespace {

// one pair row of the VNNI layout (64 bytes): output o's two channels (a[o], b[o]) as bf16
KERNEL inline void store_pair_row(bf16_t* row, __m512 a, __m512 b) {
  __m256bh ha = _mm512_cvtneps_pbh(a), hb = _mm512_cvtneps_pbh(b);
  __m512i lo = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i&>(ha));
  __m512i hi = _mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i&>(hb)), 16);
  _mm512_storeu_si512(row, _mm512_or_si512(lo, hi));
}

// blocks [b0, b1) of 16 outputs of the tiled int8 layout -> their blocks of out, in the VNNI
// layout (outputs past n: zeros, their scale read as 0)
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

// blocks [b0, b1) of 16 outputs of the int4 layout -> their blocks of out, in the VNNI layout
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

}  // namespace

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

}  // namespace shardline::cpu_kernels
