// rms_norm (with the residual add fused in), act_mul, and greedy sampling's argmax_rows.
#include "kernels.h"

namespace shardline::cpu_kernels {
namespace {

// ---- RMSNorm ----------------------------------------------------------------------------------
// 1 / rms of h channels of x
KERNEL inline float inv_rms(const bf16_t* x, int64_t h, float eps) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t c = 0; c < h; c += 16) {
    __m512 a = load_bf16x16(x + c);
    ss = _mm512_fmadd_ps(a, a, ss);
  }
  return 1.f / std::sqrt(_mm512_reduce_add_ps(ss) / h + eps);
}

// one row of h channels: out = r / rms(r) * w, r = x, or with residual: residual = bf16(residual
// + x'), and r the new residual. x' = x, or with xw: bf16(x / rms(x) * xw) (the sandwich norms'
// norm of a sublayer's output before its residual add)
KERNEL void rms_norm_row(const bf16_t* x, bf16_t* residual, const float* w, const float* xw,
                         float eps, int64_t h, bf16_t* out) {
  const bf16_t* src = x;
  if (residual) {
    __m512 xs = _mm512_set1_ps(xw ? inv_rms(x, h, eps) : 1.f);
    for (int64_t c = 0; c < h; c += 16) {
      __m512 a = load_bf16x16(x + c);
      if (xw) {                                   // rounded to bf16, as the module's output
        a = round_bf16x16(_mm512_mul_ps(_mm512_mul_ps(a, xs), _mm512_loadu_ps(xw + c)));
      }
      store_bf16x16(residual + c, _mm512_add_ps(a, load_bf16x16(residual + c)));
    }
    src = residual;
  }
  __m512 inv = _mm512_set1_ps(inv_rms(src, h, eps));
  for (int64_t c = 0; c < h; c += 16)
    store_bf16x16(out + c, _mm512_mul_ps(_mm512_mul_ps(load_bf16x16(src + c), inv),
                                         _mm512_loadu_ps(w + c)));
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                    const at::Tensor& weight, double eps,
                    const c10::optional<at::Tensor>& x_weight) {
  check_rows(x, "x");
  int64_t t = x.size(0), h = x.size(1);
  check(h % 16 == 0 && weight.scalar_type() == at::kFloat && weight.numel() == h &&
            weight.is_contiguous(), "rms_norm: hidden size a multiple of 16, float32 weight");
  bf16_t* res = nullptr;
  if (residual.has_value()) {
    at::Tensor r = *residual;
    check_rows(r, "residual");
    check(r.sizes() == x.sizes(), "rms_norm: residual shape");
    res = bf16_mut(r);
  }
  const float* xw = nullptr;
  if (x_weight.has_value()) {
    check(res != nullptr && x_weight->scalar_type() == at::kFloat && x_weight->numel() == h &&
              x_weight->is_contiguous(), "rms_norm: x_weight float32 [h], with a residual");
    xw = x_weight->data_ptr<float>();
  }
  at::Tensor out = at::empty_like(x);
  const bf16_t* xp = bf16_ptr(x);
  bf16_t* op = bf16_mut(out);
  const float* wp = weight.data_ptr<float>();
  at::parallel_for(0, t, 64, [&](int64_t r0, int64_t r1) {     // rows in parallel past 64
    for (int64_t i = r0; i < r1; ++i)
      rms_norm_row(xp + i * h, res ? res + i * h : nullptr, wp, xw, static_cast<float>(eps), h,
                   op + i * h);
  });
  return out;
}

// ---- act(gate) * up -----------------------------------------------------------------------------
namespace {

KERNEL void act_mul_row(const bf16_t* gu, int64_t inter, Activation act, bf16_t* out) {
  for (int64_t c = 0; c < inter; c += 16)
    store_bf16x16(out + c, act_mul16(act, load_bf16x16(gu + c), load_bf16x16(gu + inter + c)));
}

}  // namespace

at::Tensor act_mul(const at::Tensor& gate_up, Activation act) {
  check_rows(gate_up, "gate_up");
  int64_t t = gate_up.size(0), inter = gate_up.size(1) / 2;
  check(inter % 16 == 0, "act_mul: intermediate size a multiple of 16");
  at::Tensor out = at::empty({t, inter}, gate_up.options());
  const bf16_t* gp = bf16_ptr(gate_up);
  bf16_t* op = bf16_mut(out);
  at::parallel_for(0, t, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) act_mul_row(gp + i * 2 * inter, inter, act, op + i * inter);
  });
  return out;
}

// ---- greedy sampling --------------------------------------------------------------------------
namespace {

// Index of the largest of x[0:v]: the first one where values tie, the first NaN where there is
// one (torch.argmax's rules). 16 lanes of running maxima and their indices; the tail past the
// last whole vector, or the rest from a vector holding a NaN on, one value at a time.
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

}  // namespace

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

}  // namespace shardline::cpu_kernels
