// CPU kernels for the steps of a bfloat16 (or int8 / int4 weight) stage, built by build.py into
// one extension module.
//
// A decode step reads every weight once for a handful of rows, so it is bound by memory
// bandwidth and by per-op overhead. These kernels read weights at close to the bandwidth and
// run a whole decoder layer in one call (StepLayer). The files, each building on those above:
//
//   common.h           this file: target attributes, bf16 loads and stores, argument checks,
//                      the thread helper `parallel`, exp and the gated MLP's activations
//                      (Activation: SiLU, GELU-tanh)
//   amx.h, amx.cpp     AMX: whether the CPU has it and the process may use it, tile set-up
//   kernels.h          the ops the files below define, as step_layer.cpp and bindings.cpp call them
//   linear_bf16.cpp    linear_vnni: bf16 weights in the VNNI-blocked layout (GEMV, AMX tiles,
//                      AVX512-BF16 register tiles)
//   linear_quant.cpp   linear_int8 / linear_int4 (VNNI dpbusd tiles, activations quantized to
//                      int8 per group of 32) and the dequantization of their weights
//   norm_act.cpp       rms_norm, act_mul, argmax_rows
//   attention.h        what the two attention files share
//   attention.cpp      rope_store_kv (q / k head norms, RoPE, KV store); paged_attention
//                      (sliding windows, soft-capping) and its AVX512 kernels
//   attention_amx.cpp  paged_attention's runs of prefill rows on AMX tiles
//   step_layer.h, .cpp WeightFormat, StepLinear (one projection in its weight format), StepLayer
//                      (a decoder layer, or its attention half for a mixture of experts)
//   shm_reduce.cpp     shm_all_reduce: tensor-parallel ranks' sums through shared memory
//   bindings.cpp       the Python module
//
// Kernels are compiled for their instruction sets by function attribute (KERNEL, AMX_KERNEL),
// so the module loads on any x86-64 CPU; build.load() hands it out only where supported() (the
// CPU has every KERNEL feature), and the AMX paths run only where amx_supported(). Work is split
// over PyTorch's intra-op threads (at::parallel_for, inline OpenMP: the module is built with
// -fopenmp and shares PyTorch's libgomp).
//
// Everything is in namespace shardline::cpu_kernels, hidden (calls between the files bind
// directly inside the module); what only one file uses is in an anonymous namespace there.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

// AVX512 F, BW, VL, DQ, BF16 and VNNI, with FMA and F16C: every kernel but the AMX ones
#define KERNEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,fma,f16c")))
// the AMX kernels: AVX512 F, BW, VL, DQ and BF16, FMA, AMX-TILE and AMX-BF16
#define AMX_KERNEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")))

namespace shardline {
namespace cpu_kernels __attribute__((visibility("hidden"))) {

using bf16_t = uint16_t;

// ---- bf16 vectors and tensors -----------------------------------------------------------------
KERNEL inline __m512 load_bf16x16(const bf16_t* p) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

KERNEL inline void store_bf16x16(bf16_t* p, __m512 v) {      // round to nearest even
  __m256bh h = _mm512_cvtneps_pbh(v);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i&>(h));
}

// v rounded to bf16 (nearest even) and back to float32
KERNEL inline __m512 round_bf16x16(__m512 v) {
  __m256bh h = _mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i&>(h)), 16));
}

inline const bf16_t* bf16_ptr(const at::Tensor& t) {
  return reinterpret_cast<const bf16_t*>(t.data_ptr<at::BFloat16>());
}
inline bf16_t* bf16_mut(at::Tensor& t) {
  return reinterpret_cast<bf16_t*>(t.data_ptr<at::BFloat16>());
}

inline void check(bool ok, const char* what) { TORCH_CHECK(ok, "shardline cpu kernel: ", what); }

inline void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              name, " must be a contiguous 2-d bfloat16 tensor");
}

// ---- threads ----------------------------------------------------------------------------------
// Chunks per thread for `parallel`: streaming kernels (a decode step's weights) take few, large
// chunks; compute-bound ones (a prefill's GEMM) more, whose smaller last chunks leave the
// threads less waiting on each other at the end.
constexpr int64_t STREAM_CHUNKS_PER_THREAD = 4;
constexpr int64_t COMPUTE_CHUNKS_PER_THREAD = 16;

// f(begin, end) over [0, n) on the intra-op threads, in contiguous chunks of about
// n / (per_thread * threads) that each thread takes from a shared counter as it goes: with
// equal static parts every call would be as slow as its slowest thread, and a served worker
// shares its cores with the scheduler and the tokenizer. One thread, or a call from inside a
// parallel region, runs f(0, n) on the caller's thread.
template <typename F>
void parallel(int64_t n, F&& f, int64_t per_thread = STREAM_CHUNKS_PER_THREAD) {
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

// ---- prefetching --------------------------------------------------------------------------------
// How far ahead in the weight stream the streaming kernels (the GEMV, the register tiles, the
// int8 / int4 tiles) prefetch into L1; lines prefetched further ahead were evicted before use.
constexpr int64_t PF_BYTES = 4096;

// ---- exp, the gated MLP's activations ---------------------------------------------------------
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

// The gated MLP's activation (Python: kernels.Activation): act(gate) * up
enum class Activation : int {
  SILU = 0,         // silu(g) = g * sigmoid(g) (SwiGLU)
  GELU_TANH = 1,    // gelu with the tanh approximation (GeGLU: Gemma), F.gelu(approximate="tanh")
};

// g * sigmoid(z) * u = g / (1 + e^-z) * u: the reciprocal estimate (14 bits) refined by one
// Newton step, not a division
KERNEL inline __m512 sigmoid_mul16(__m512 g, __m512 z, __m512 u) {
  __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), z)));
  __m512 r = _mm512_rcp14_ps(d);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
  return _mm512_mul_ps(_mm512_mul_ps(g, r), u);
}

// act(g) * u. silu: g * sigmoid(g). gelu_tanh: 0.5 g (1 + tanh(c (g + 0.044715 g^3))), which is
// g * sigmoid(2 c (g + 0.044715 g^3)), c = sqrt(2 / pi)
KERNEL inline __m512 act_mul16(Activation act, __m512 g, __m512 u) {
  if (act == Activation::SILU) return sigmoid_mul16(g, g, u);
  const __m512 two_c = _mm512_set1_ps(1.5957691216057308f);           // 2 sqrt(2 / pi)
  __m512 inner = _mm512_fmadd_ps(_mm512_mul_ps(g, g), _mm512_set1_ps(0.044715f), _mm512_set1_ps(1.f));
  return sigmoid_mul16(g, _mm512_mul_ps(_mm512_mul_ps(g, inner), two_c), u);
}

}  // namespace cpu_kernels
}  // namespace shardline
