// What attention.cpp (rope_store_kv, paged_attention, its AVX512 kernels) and attention_amx.cpp
// (paged_attention's prefill runs on AMX tiles) share.
#pragma once

#include "common.h"

namespace shardline {
namespace cpu_kernels __attribute__((visibility("hidden"))) {

// the most query columns of attend_columns_amx (a C tile's 16 columns): the most rows of a run
// of one prefill chunk that paged_attention hands it
constexpr int64_t AMX_COLUMNS = 16;

// Up to AMX_COLUMNS query "columns" against one sequence's cache and one KV head: column c is a
// query (q[c], head_dim channels) attending positions [first[c], len[c]) (first[c] > 0: a
// sliding window), its output written to o[c]
struct Columns {
  const bf16_t* q[AMX_COLUMNS];
  bf16_t* o[AMX_COLUMNS];
  int64_t first[AMX_COLUMNS];
  int64_t len[AMX_COLUMNS];
  int64_t n = 0;
};

// the first position a row attending `len` positions sees under a sliding window of `window`
// positions (0: no window): max(0, len - window)
inline int64_t window_start(int64_t len, int64_t window) {
  return window > 0 && len > window ? len - window : 0;
}

// A run's query heads (`group` of them, heads[g] the run's rows for query head g) against one
// KV head's cache (kc, vc: [slots, head_dim]), through the run's block table; softcap > 0:
// scores soft-capped (cap_scores)
using AttendRunFn = void (*)(const Columns* heads, int64_t group, const bf16_t* kc,
                             const bf16_t* vc, const int64_t* table, int64_t block, float scale,
                             float softcap);

// the AMX kernel for runs (attention_amx.cpp), for head_dim 64, 128 or 256 where amx_supported() and
// the cache block size is a multiple of 16; else null (paged_attention takes rows one by one)
AttendRunFn attend_run_for(int64_t hd, int64_t block);

// The helpers below have internal linkage in each file that includes them, as when the kernels
// were one file: GCC specialises softmax_rows for its callers' constant arguments.
namespace {

// tanh(x) = sign(x) (1 - e^-2|x|) / (1 + e^-2|x|)
KERNEL inline __m512 tanh512(__m512 x) {
  __m512 e = exp512(_mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(-2.f)));
  __m512 t = _mm512_div_ps(_mm512_sub_ps(_mm512_set1_ps(1.f), e), _mm512_add_ps(_mm512_set1_ps(1.f), e));
  return _mm512_or_ps(t, _mm512_and_ps(x, _mm512_set1_ps(-0.f)));      // x's sign
}

// In place: n scores s -> cap * tanh(s / cap) (Gemma 2's attention-logit soft-capping)
KERNEL void cap_scores(float* s, int64_t n, float cap) {
  const __m512 inv = _mm512_set1_ps(1.f / cap), c = _mm512_set1_ps(cap);
  for (int64_t p = 0; p < n; p += 16) {
    __mmask16 m = n - p >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - p)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(m, s + p);
    _mm512_mask_storeu_ps(s + p, m, _mm512_mul_ps(c, tanh512(_mm512_mul_ps(v, inv))));
  }
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

// 32 channels from the float32 sums of V as position pairs: lo / hi hold, per 128-bit lane L,
// channels 8L..8L+3 and 8L+4..8L+7 (the lane order of unpacklo / unpackhi of two rows of V);
// stored in channel order as bf16
KERNEL inline void store_v_pairs(bf16_t* o, __m512 lo, __m512 hi) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  store_bf16x16(o, _mm512_permutex2var_ps(lo, first, hi));
  store_bf16x16(o + 16, _mm512_permutex2var_ps(lo, second, hi));
}

}  // namespace

}  // namespace cpu_kernels
}  // namespace shardline
